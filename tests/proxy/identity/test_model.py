"""SPIFFE ID and trust-domain parsing follows the SPIFFE ID spec, strictly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.identity.model import SpiffeId, SpiffeIdError, TrustDomain


@pytest.mark.parametrize(
    ("text", "trust_domain", "path"),
    [
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://us-west.acme/ns/payments/sa/api", "us-west.acme", "/ns/payments/sa/api"),
        ("spiffe://a_b.c-d/A.b-C_9", "a_b.c-d", "/A.b-C_9"),
        ("spiffe://x/.../a..b", "x", "/.../a..b"),
    ],
)
def test_valid_ids_parse_and_format_back_unchanged(text: str, trust_domain: str, path: str) -> None:
    spiffe_id = SpiffeId.parse(text)
    assert spiffe_id.trust_domain == TrustDomain(trust_domain)
    assert spiffe_id.path == path
    assert str(spiffe_id) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("SPIFFE://example.org/a", "scheme must be lowercase"),
        ("Spiffe://example.org/a", "scheme must be lowercase"),
        ("https://example.org/a", "scheme must be 'spiffe://'"),
        ("spiffe:/example.org/a", "scheme must be 'spiffe://'"),
        ("spiffe://", "trust domain is empty"),
        ("spiffe:///a", "trust domain is empty"),
        ("spiffe://Example.org/a", "trust domain must be lowercase"),
        ("spiffe://example.org:8443/a", "must not carry a port"),
        ("spiffe://user@example.org/a", "must not carry userinfo"),
        ("spiffe://exa mple.org/a", "may hold only a-z"),
        ("spiffe://example.org/a?x=1", "no query"),
        ("spiffe://example.org/a#frag", "no fragment"),
        ("spiffe://example.org/a%20b", "no percent-encoding"),
        ("spiffe://example.org/", "must not end with '/'"),
        ("spiffe://example.org/a/", "must not end with '/'"),
        ("spiffe://example.org//a", "empty segment"),
        ("spiffe://example.org/a/./b", "'.' or '..' segment"),
        ("spiffe://example.org/a/../b", "'.' or '..' segment"),
        ("spiffe://example.org/a/b c", "may hold only A-Z"),
        ("spiffe://example.org/ünï", "may hold only A-Z"),
        ("spiffe://" + "a" * 256 + "/x", "longer than 255"),
        ("spiffe://example.org/" + "a" * 2100, "longer than 2048"),
    ],
)
def test_invalid_ids_are_rejected_with_the_rule_that_failed(text: str, reason: str) -> None:
    with pytest.raises(SpiffeIdError) as caught:
        SpiffeId.parse(text)
    assert reason in caught.value.reason


def test_an_id_of_exactly_2048_bytes_is_accepted() -> None:
    prefix = "spiffe://example.org/"
    text = prefix + "a" * (2048 - len(prefix))
    assert str(SpiffeId.parse(text)) == text


def test_direct_construction_validates_like_parse() -> None:
    with pytest.raises(SpiffeIdError, match="empty segment"):
        SpiffeId(TrustDomain("example.org"), "/a//b")
    with pytest.raises(SpiffeIdError, match="lowercase"):
        TrustDomain("Example.org")


def test_workload_ids_use_namespace_and_service_account() -> None:
    td = TrustDomain.for_cluster("us-west", "acme")
    spiffe_id = SpiffeId.workload(td, "payments", "api")
    assert str(spiffe_id) == "spiffe://us-west.acme/ns/payments/sa/api"
    with pytest.raises(SpiffeIdError):
        SpiffeId.workload(td, "pay/ments", "api")


@pytest.mark.parametrize(
    ("cluster", "mesh"),
    [("US-west", "acme"), ("us.west", "acme"), ("", "acme"), ("us-west", ""), ("a", "b..c")],
)
def test_for_cluster_rejects_names_that_are_not_dns_labels(cluster: str, mesh: str) -> None:
    with pytest.raises(SpiffeIdError):
        TrustDomain.for_cluster(cluster, mesh)


def test_trust_domain_parses_bare_name_or_id_without_path() -> None:
    assert TrustDomain.parse("example.org") == TrustDomain("example.org")
    assert TrustDomain.parse("spiffe://example.org") == TrustDomain("example.org")
    assert str(TrustDomain("example.org").spiffe_id) == "spiffe://example.org"
    with pytest.raises(SpiffeIdError, match="no path"):
        TrustDomain.parse("spiffe://example.org/a")


def test_ids_are_hashable_values() -> None:
    a = SpiffeId.parse("spiffe://example.org/a")
    assert {a: 1}[SpiffeId.parse("spiffe://example.org/a")] == 1
    with pytest.raises(AttributeError):
        a.path = "/b"  # type: ignore[misc]


@given(st.text(max_size=80))
def test_parse_never_raises_anything_but_spiffe_id_error(text: str) -> None:
    try:
        spiffe_id = SpiffeId.parse(text)
    except SpiffeIdError:
        return
    assert str(spiffe_id) == text
