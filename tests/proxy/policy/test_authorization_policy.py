"""AuthorizationPolicy: principals, ports, methods and paths are checked where they are written."""

from __future__ import annotations

import pytest

from proxy.config.loader import LoadResult, load_bytes
from proxy.policy.model import AuthorizationPolicy

HEAD = (
    "apiVersion: snapbright.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: pay}\n"
    "spec:\n  service: payments\n  rules:\n"
)
# Line 7 is the first rule.


def _load(rules: str) -> LoadResult:
    return load_bytes(
        HEAD + rules, {AuthorizationPolicy.KIND: AuthorizationPolicy}, source="a.yaml"
    )


def test_principals_are_read_and_normalised() -> None:
    (document,) = _load(
        "  - from:\n"
        "      - id: spiffe://us-west.demo/ns/shop/sa/web\n"
        "      - trustDomain: spiffe://ap-southeast.demo\n"
        "      - idPrefix: spiffe://us-west.demo/ns/ops/\n"
        "    ports: [8080, 8443]\n"
        "    methods: [GET, POST]\n"
        "    paths: [/api/, /healthz]\n"
    ).raise_for_errors()
    assert isinstance(document, AuthorizationPolicy)
    (rule,) = document.spec.rules
    assert [(p.id, p.trust_domain, p.id_prefix) for p in rule.from_] == [
        ("spiffe://us-west.demo/ns/shop/sa/web", None, None),
        (None, "ap-southeast.demo", None),
        (None, None, "spiffe://us-west.demo/ns/ops"),
    ]
    assert rule.ports == (8080, 8443)
    assert rule.paths == ("/api/", "/healthz")


ERRORS = [
    pytest.param(
        "  - from: [{id: 'spiffe://US-west.demo/ns/a/sa/b'}]\n",
        ("SB0201", 7, 17, "spec.rules[0].from[0].id"),
        "trust domain must be lowercase",
        id="uppercase-trust-domain",
    ),
    pytest.param(
        "  - from: [{id: 'https://us-west.demo/ns/a'}]\n",
        ("SB0201", 7, 17, "spec.rules[0].from[0].id"),
        "scheme must be 'spiffe://'",
        id="wrong-scheme",
    ),
    pytest.param(
        "  - from: [{id: 'spiffe://us-west.demo/ns/../sa/b'}]\n",
        ("SB0201", 7, 17, "spec.rules[0].from[0].id"),
        "'.' or '..' segment",
        id="dot-segment-in-id",
    ),
    pytest.param(
        "  - from: [{trustDomain: 'us-west.demo:443'}]\n",
        ("SB0201", 7, 26, "spec.rules[0].from[0].trustDomain"),
        "port",
        id="trust-domain-with-port",
    ),
    pytest.param(
        "  - from: [{idPrefix: 'spiffe://us-west.demo'}]\n",
        ("SB0201", 7, 23, "spec.rules[0].from[0].idPrefix"),
        "use trustDomain",
        id="prefix-without-path",
    ),
    pytest.param(
        "  - from: [{id: 'spiffe://a.demo/x', trustDomain: a.demo}]\n",
        ("SB0201", 7, 12, "spec.rules[0].from[0]"),
        "exactly one of",
        id="two-principal-forms",
    ),
    pytest.param(
        "  - from: [{}]\n",
        ("SB0201", 7, 12, "spec.rules[0].from[0]"),
        "exactly one of",
        id="empty-principal",
    ),
    pytest.param(
        "  - ports: [80]\n",
        ("SB0202", 7, 5, "spec.rules[0].from"),
        "required",
        id="rule-without-from",
    ),
    pytest.param(
        "  - from: []\n",
        ("SB0201", 7, 11, "spec.rules[0].from"),
        "at least 1 item",
        id="empty-from",
    ),
    pytest.param(
        "  - from: [{trustDomain: a.demo}]\n    ports: [0]\n",
        ("SB0201", 8, 13, "spec.rules[0].ports[0]"),
        "greater than or equal to 1",
        id="port-zero",
    ),
    pytest.param(
        "  - from: [{trustDomain: a.demo}]\n    ports: [80, 80]\n",
        ("SB0201", 8, 17, "spec.rules[0].ports[1]"),
        "listed twice",
        id="port-twice",
    ),
    pytest.param(
        "  - from: [{trustDomain: a.demo}]\n    methods: [get]\n",
        ("SB0201", 8, 15, "spec.rules[0].methods[0]"),
        "should match pattern",
        id="lowercase-method",
    ),
    pytest.param(
        "  - from: [{trustDomain: a.demo}]\n    paths: [/public/../admin]\n",
        ("SB0201", 8, 13, "spec.rules[0].paths[0]"),
        "must be normalised",
        id="path-with-dot-segments",
    ),
    pytest.param(
        "  - from: [{trustDomain: a.demo}]\n    paths: ['/%61dmin']\n",
        ("SB0201", 8, 13, "spec.rules[0].paths[0]"),
        "no '%'",
        id="path-with-escape",
    ),
    pytest.param(
        "  - from: [{trustDomain: a.demo}]\n    paths: [admin]\n",
        ("SB0201", 8, 13, "spec.rules[0].paths[0]"),
        "must start with '/'",
        id="relative-path",
    ),
    pytest.param(
        "  - from: [{trustDomain: a.demo}]\n    action: DENY\n",
        ("SB0203", 8, 5, "spec.rules[0].action"),
        "unknown field",
        id="deny-rules-do-not-exist",
    ),
]


@pytest.mark.parametrize(("rules", "where", "reason"), ERRORS)
def test_config_error(rules: str, where: tuple[str, int, int, str], reason: str) -> None:
    result = _load(rules)
    assert len(result.diagnostics) == 1, result.diagnostics
    (diagnostic,) = result.diagnostics
    assert (diagnostic.code.value, diagnostic.line, diagnostic.column, diagnostic.path) == where
    assert reason in diagnostic.message
