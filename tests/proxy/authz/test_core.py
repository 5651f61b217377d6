"""Authorization: path normalisation against bypass tricks, and who may call what."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.authz.core import Verdict, authorize, normalise_path
from proxy.config.loader import load_bytes
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.policy.model import AuthorizationPolicy

LOCAL = TrustDomain("us-west.demo")
ADMIN = SpiffeId.parse("spiffe://us-west.demo/ns/ops/sa/admin")
WEB = SpiffeId.parse("spiffe://us-west.demo/ns/shop/sa/web")
CART = SpiffeId.parse("spiffe://us-west.demo/ns/shop/sa/cart")
SHOPPING = SpiffeId.parse("spiffe://us-west.demo/ns/shopping/sa/web")
REMOTE = SpiffeId.parse("spiffe://ap-southeast.demo/ns/shop/sa/web")


def _policy(rules: str, name: str = "pay") -> AuthorizationPolicy:
    text = (
        "apiVersion: snapbright.io/v1alpha1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}}}\nspec:\n  service: payments\n  rules:\n{rules}"
    )
    (document,) = load_bytes(text, {"AuthorizationPolicy": AuthorizationPolicy}).raise_for_errors()
    assert isinstance(document, AuthorizationPolicy)
    return document


# The admin may reach /admin; the web front end only /public/ (istio#27409-style setting).
SPLIT = _policy(
    "  - from: [{id: spiffe://us-west.demo/ns/ops/sa/admin}]\n"
    "    paths: [/admin]\n"
    "  - from: [{idPrefix: spiffe://us-west.demo/ns/shop}]\n"
    "    paths: [/public/]\n"
)


NORMALISED = [
    ("/", "/"),
    ("/admin", "/admin"),
    ("/admin;x", "/admin"),
    ("/admin;x=1;y/", "/admin/"),
    ("/public/../admin", "/admin"),
    ("/public/./../admin", "/admin"),
    ("/public/%2e%2e/admin", "/admin"),
    ("/public/%2E%2e/admin", "/admin"),
    ("/public/.%2e/admin", "/admin"),
    ("/public/..;/admin", "/admin"),
    ("/public/%2e%2e;x/admin", "/admin"),
    ("/%61dmin", "/admin"),
    ("/%61%64%6D%69%6E", "/admin"),
    ("//admin", "/admin"),
    ("///admin//", "/admin/"),
    ("/admin/.", "/admin/"),
    ("/admin/", "/admin/"),
    ("/admin/x/..", "/admin/"),
    ("/../admin", "/admin"),
    ("/../../../../admin", "/admin"),
    ("/..", "/"),
    ("/a/b/../../..", "/"),
    ("/admin?x=/../secret&y=%2F", "/admin?x=/../secret&y=%2F"),
    ("/public/../admin?q", "/admin?q"),
    ("/caf%c3%a9", "/caf%C3%A9"),
    ("/a%3bb", "/a%3Bb"),
    ("/%7euser", "/~user"),
    ("/a%2520b", "/a%2520b"),
]


@pytest.mark.parametrize(("raw", "expected"), NORMALISED)
def test_normalise_path(raw: str, expected: str) -> None:
    assert normalise_path(raw) == expected


AMBIGUOUS = [
    "/public/%2e%2e%2fadmin",
    "/public/..%2Fadmin",
    "/public%2F..%2Fadmin",
    "/admin%2f",
    "/public/..%5Cadmin",
    "/public/..%5cadmin",
    "/public\\..\\admin",
    "/admin%",
    "/admin%2",
    "/admin%zz",
    "/admin#frag",
    "/ad min",
    "/admïn",
    "/admin\x00",
    "admin",
    "",
    "*",
    "http://payments/admin",
]


@pytest.mark.parametrize("raw", AMBIGUOUS)
def test_ambiguous_path_does_not_normalise(raw: str) -> None:
    assert normalise_path(raw) is None


BYPASS_ATTEMPTS = [raw for raw, expected in NORMALISED if expected.startswith("/admin")]


@pytest.mark.parametrize("raw", BYPASS_ATTEMPTS + AMBIGUOUS)
def test_a_caller_allowed_only_public_paths_never_reaches_admin(raw: str) -> None:
    verdict = authorize([SPLIT], WEB, LOCAL, 8080, "GET", raw)
    assert not verdict.allowed


@pytest.mark.parametrize("raw", BYPASS_ATTEMPTS)
def test_the_admin_reaches_admin_however_the_path_is_spelled(raw: str) -> None:
    assert authorize([SPLIT], ADMIN, LOCAL, 8080, "GET", raw).allowed


@given(st.text(alphabet=st.sampled_from(list("/.;%2eEfF5cC6?a")), max_size=30))
def test_normalised_paths_are_fixed_points_without_dot_segments_params_or_needless_escapes(
    raw: str,
) -> None:
    normalised = normalise_path("/" + raw)
    if normalised is None:
        return
    path = normalised.partition("?")[0]
    assert normalise_path(normalised) == normalised
    assert "//" not in path
    assert ";" not in path
    assert all(segment not in (".", "..") for segment in path.split("/"))
    escapes = re.findall(r"%([0-9A-Fa-f]{2})", path)
    assert all(chr(int(e, 16)) not in "abcdefABCDEF0123456789.-_~" for e in escapes)


def test_with_no_policy_same_domain_callers_are_allowed_and_others_denied() -> None:
    assert authorize([], WEB, LOCAL, 8080, "POST", "/anything").allowed
    verdict = authorize([], REMOTE, LOCAL, 8080, "GET", "/")
    assert not verdict.allowed
    assert "ap-southeast.demo" in verdict.reason


def test_once_a_policy_exists_whatever_no_rule_allows_is_denied() -> None:
    policy = _policy("  - from: [{id: spiffe://us-west.demo/ns/shop/sa/web}]\n")
    assert authorize([policy], WEB, LOCAL, 8080, "GET", "/").allowed
    assert not authorize([policy], CART, LOCAL, 8080, "GET", "/").allowed


def test_a_policy_without_rules_denies_everyone() -> None:
    policy = _policy("    []\n")
    assert not authorize([policy], WEB, LOCAL, 8080, "GET", "/").allowed


def test_cross_cluster_callers_need_an_explicit_rule() -> None:
    local_only = _policy("  - from: [{trustDomain: us-west.demo}]\n")
    assert not authorize([local_only], REMOTE, LOCAL, 8080, "GET", "/").allowed
    explicit = _policy("  - from: [{trustDomain: ap-southeast.demo}]\n", name="remote")
    verdict = authorize([local_only, explicit], REMOTE, LOCAL, 8080, "GET", "/")
    assert verdict == Verdict(
        True, "rule 0 of default/remote allows " + str(REMOTE), "default/remote"
    )


def test_a_caller_without_identity_is_denied_even_without_policies() -> None:
    assert not authorize([], None, LOCAL, 8080, "GET", "/").allowed


RULE = _policy(
    "  - from:\n"
    "      - id: spiffe://us-west.demo/ns/ops/sa/admin\n"
    "      - idPrefix: spiffe://us-west.demo/ns/shop/\n"
    "    ports: [8080]\n"
    "    methods: [GET, HEAD]\n"
    "    paths: [/api]\n"
)

MATCHING = [
    pytest.param(ADMIN, 8080, "GET", "/api", True, id="exact-id"),
    pytest.param(WEB, 8080, "GET", "/api/v1/pay", True, id="id-prefix"),
    pytest.param(SHOPPING, 8080, "GET", "/api", False, id="prefix-is-whole-segments"),
    pytest.param(REMOTE, 8080, "GET", "/api", False, id="same-path-other-domain"),
    pytest.param(WEB, 9090, "GET", "/api", False, id="other-port"),
    pytest.param(WEB, 8080, "POST", "/api", False, id="other-method"),
    pytest.param(WEB, 8080, "get", "/api", False, id="methods-are-case-sensitive"),
    pytest.param(WEB, 8080, "HEAD", "/api?x=1", True, id="query-ignored"),
    pytest.param(WEB, 8080, "GET", "/apix", False, id="path-prefix-is-whole-segments"),
    pytest.param(WEB, 8080, "GET", "/API", False, id="paths-are-case-sensitive"),
    pytest.param(WEB, 8080, "GET", "/", False, id="above-prefix"),
]


@pytest.mark.parametrize(("peer", "port", "method", "path", "allowed"), MATCHING)
def test_rule_matching(peer: SpiffeId, port: int, method: str, path: str, allowed: bool) -> None:
    assert authorize([RULE], peer, LOCAL, port, method, path).allowed is allowed


def test_the_verdict_does_not_depend_on_policy_order() -> None:
    a = _policy("  - from: [{trustDomain: us-west.demo}]\n", name="a")
    b = _policy("  - from: [{trustDomain: us-west.demo}]\n", name="b")
    assert authorize([a, b], WEB, LOCAL, 1, "GET", "/") == authorize(
        [b, a], WEB, LOCAL, 1, "GET", "/"
    )
