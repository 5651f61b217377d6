"""PeerCheck: a peer's SPIFFE ID from the chain OpenSSL verified, in virtual time.

Chains are given as OpenSSL reports them (DER, leaf first, trust anchor last); the anchor
must be a root of the domain the leaf claims, whatever else vouches for the leaf.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.identity.bundle import TrustBundle, TrustBundleSet
from proxy.identity.svid import Purpose, Rejection, SvidError, X509Svid
from proxy.tls.peer import PeerCheck
from tests.proxy.identity.forge import NOW, forge_domain, forge_leaf

A = forge_domain("a.mesh")
B = forge_domain("b.mesh", intermediate=True)
STRANGER = forge_domain("x.mesh")
BUNDLES = TrustBundleSet([A.bundle(), B.bundle()])
LEAF_A = forge_leaf(A)
LEAF_B = forge_leaf(B)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def chain(svid: X509Svid, anchor: x509.Certificate) -> tuple[bytes, ...]:
    """The chain OpenSSL would report: the SVID's chain, then ``anchor``."""
    return (*(der(cert) for cert in svid.chain), der(anchor))


def test_an_honest_chain_gives_the_leafs_spiffe_id() -> None:
    check = PeerCheck()
    assert check.verify(chain(LEAF_B, B.root), BUNDLES, NOW, Purpose.CLIENT) == LEAF_B.spiffe_id
    assert check.verify(chain(LEAF_A, A.root), BUNDLES, NOW, Purpose.SERVER) == LEAF_A.spiffe_id


REFUSED: list[tuple[str, tuple[bytes, ...], Rejection]] = [
    ("no chain at all", (), Rejection.MALFORMED),
    ("a leaf that is not DER", (b"junk", der(A.root)), Rejection.MALFORMED),
    (
        # B's leaf is sound under B's root, but the path the handshake took ends at A's.
        "an anchor of another federated domain",
        chain(LEAF_B, A.root),
        Rejection.FOREIGN_ROOT,
    ),
    ("an anchor no bundle holds", chain(LEAF_B, STRANGER.root), Rejection.UNTRUSTED_CHAIN),
    (
        "a leaf claiming B signed under A",
        chain(forge_leaf(A, uris=[str(B.workload())]), A.root),
        Rejection.FOREIGN_ROOT,
    ),
    (
        "a leaf of an unknown domain",
        chain(forge_leaf(STRANGER), STRANGER.root),
        Rejection.UNKNOWN_TRUST_DOMAIN,
    ),
    (
        "a client leaf without clientAuth",
        chain(forge_leaf(A, ekus=[ExtendedKeyUsageOID.SERVER_AUTH]), A.root),
        Rejection.NO_CLIENT_AUTH,
    ),
    ("a leaf without a URI SAN", chain(forge_leaf(A, uris=[]), A.root), Rejection.NO_URI_SAN),
]


@pytest.mark.parametrize(
    ("peer_chain", "reason"),
    [(c, r) for _, c, r in REFUSED],
    ids=[name for name, _, _ in REFUSED],
)
def test_a_refused_chain_says_which_rule_it_broke(
    peer_chain: tuple[bytes, ...], reason: Rejection
) -> None:
    with pytest.raises(SvidError) as refused:
        PeerCheck().verify(peer_chain, BUNDLES, NOW, Purpose.CLIENT)
    assert refused.value.reason is reason


def test_a_cached_leaf_is_still_checked_against_now() -> None:
    check = PeerCheck()
    peer = chain(LEAF_A, A.root)
    assert check.verify(peer, BUNDLES, NOW, Purpose.CLIENT) == LEAF_A.spiffe_id
    assert check.verify(peer, BUNDLES, NOW + timedelta(hours=1), Purpose.CLIENT)
    assert len(check) == 1  # one verdict, reused
    with pytest.raises(SvidError) as late:
        check.verify(peer, BUNDLES, LEAF_A.not_after + timedelta(seconds=1), Purpose.CLIENT)
    assert late.value.reason is Rejection.EXPIRED
    with pytest.raises(SvidError) as early:
        check.verify(
            peer, BUNDLES, LEAF_A.leaf.not_valid_before_utc - timedelta(seconds=1), Purpose.CLIENT
        )
    assert early.value.reason is Rejection.NOT_YET_VALID


def test_changed_trust_is_judged_afresh() -> None:
    check = PeerCheck()
    peer = chain(LEAF_B, B.root)
    assert check.verify(peer, BUNDLES, NOW, Purpose.CLIENT) == LEAF_B.spiffe_id
    revoked = BUNDLES.with_bundle(TrustBundle(B.trust_domain, (), (), 2, 300))
    with pytest.raises(SvidError) as refused:
        check.verify(peer, revoked, NOW, Purpose.CLIENT)
    assert refused.value.reason is Rejection.REVOKED_TRUST_DOMAIN
    without_b = TrustBundleSet([A.bundle()])
    with pytest.raises(SvidError) as unknown:
        check.verify(peer, without_b, NOW, Purpose.CLIENT)
    assert unknown.value.reason is Rejection.UNKNOWN_TRUST_DOMAIN


def test_a_peer_can_be_pinned_to_an_id_or_a_trust_domain() -> None:
    check = PeerCheck()
    peer = chain(LEAF_A, A.root)
    assert check.verify(peer, BUNDLES, NOW, Purpose.SERVER, expect=A.trust_domain)
    assert check.verify(peer, BUNDLES, NOW, Purpose.SERVER, expect=LEAF_A.spiffe_id)
    for expect in (B.trust_domain, A.workload("other")):
        with pytest.raises(SvidError) as refused:
            check.verify(peer, BUNDLES, NOW, Purpose.SERVER, expect=expect)
        assert refused.value.reason is Rejection.UNEXPECTED_ID


def test_the_cache_is_bounded() -> None:
    check = PeerCheck(max_entries=2)
    for _ in range(3):
        check.verify(chain(forge_leaf(A), A.root), BUNDLES, NOW, Purpose.CLIENT)
    assert len(check) == 2
    with pytest.raises(ValueError, match="at least 1"):
        PeerCheck(max_entries=0)
