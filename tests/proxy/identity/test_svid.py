"""Validating a peer's X.509-SVID: each hostile certificate is rejected for its own reason."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.identity.bundle import TrustBundle, TrustBundleSet
from proxy.identity.model import SpiffeId
from proxy.identity.svid import Purpose, Rejection, SvidError, X509Svid, validate_svid
from tests.proxy.identity.forge import NOW, ForgedDomain, forge_domain, forge_leaf, key_usage

A = forge_domain("a.mesh")
B = forge_domain("b.mesh")
C = forge_domain("c.mesh", intermediate=True)
BUNDLES = TrustBundleSet([A.bundle(), B.bundle(), C.bundle()])

Forger = Callable[[], X509Svid]

HOSTILE: list[tuple[str, Forger, Purpose, Rejection]] = [
    ("no URI SAN", lambda: forge_leaf(B, uris=[]), Purpose.CLIENT, Rejection.NO_URI_SAN),
    (
        "two URI SANs",
        lambda: forge_leaf(B, uris=["spiffe://b.mesh/x", "spiffe://b.mesh/y"]),
        Purpose.CLIENT,
        Rejection.MANY_URI_SANS,
    ),
    (
        "non-spiffe scheme",
        lambda: forge_leaf(B, uris=["https://b.mesh/ns/x/sa/y"]),
        Purpose.CLIENT,
        Rejection.NOT_SPIFFE_SCHEME,
    ),
    (
        "malformed SPIFFE ID",
        lambda: forge_leaf(B, uris=["spiffe://B.MESH/x"]),
        Purpose.CLIENT,
        Rejection.INVALID_SPIFFE_ID,
    ),
    (
        "ID with no path",
        lambda: forge_leaf(B, uris=["spiffe://b.mesh"]),
        Purpose.CLIENT,
        Rejection.NO_PATH,
    ),
    ("CA leaf", lambda: forge_leaf(B, ca=True), Purpose.CLIENT, Rejection.LEAF_IS_CA),
    (
        "keyCertSign on leaf",
        lambda: forge_leaf(B, usage=key_usage(digital_signature=True, key_cert_sign=True)),
        Purpose.CLIENT,
        Rejection.LEAF_SIGNS_CERTIFICATES,
    ),
    (
        "cRLSign on leaf",
        lambda: forge_leaf(B, usage=key_usage(digital_signature=True, crl_sign=True)),
        Purpose.SERVER,
        Rejection.LEAF_SIGNS_CERTIFICATES,
    ),
    (
        "missing digitalSignature",
        lambda: forge_leaf(B, usage=key_usage()),
        Purpose.CLIENT,
        Rejection.NO_DIGITAL_SIGNATURE,
    ),
    (
        "no keyUsage at all",
        lambda: forge_leaf(B, usage=None),
        Purpose.CLIENT,
        Rejection.NO_DIGITAL_SIGNATURE,
    ),
    (
        "missing clientAuth for a client",
        lambda: forge_leaf(B, ekus=[ExtendedKeyUsageOID.SERVER_AUTH]),
        Purpose.CLIENT,
        Rejection.NO_CLIENT_AUTH,
    ),
    (
        "missing serverAuth for a server",
        lambda: forge_leaf(B, ekus=[ExtendedKeyUsageOID.CLIENT_AUTH]),
        Purpose.SERVER,
        Rejection.NO_SERVER_AUTH,
    ),
    (
        "no EKU extension",
        lambda: forge_leaf(B, ekus=None),
        Purpose.SERVER,
        Rejection.NO_SERVER_AUTH,
    ),
    (
        "expired",
        lambda: forge_leaf(
            B, not_before=NOW - timedelta(days=2), not_after=NOW - timedelta(seconds=1)
        ),
        Purpose.CLIENT,
        Rejection.EXPIRED,
    ),
    (
        "not yet valid",
        lambda: forge_leaf(B, not_before=NOW + timedelta(seconds=1)),
        Purpose.CLIENT,
        Rejection.NOT_YET_VALID,
    ),
    (
        "claims B, signed by A's root",
        lambda: forge_leaf(A, uris=["spiffe://b.mesh/ns/default/sa/api"]),
        Purpose.CLIENT,
        Rejection.FOREIGN_ROOT,
    ),
    (
        "claims B, signed by A's root, server purpose",
        lambda: forge_leaf(A, uris=["spiffe://b.mesh/ns/default/sa/api"]),
        Purpose.SERVER,
        Rejection.FOREIGN_ROOT,
    ),
    (
        "self-signed leaf",
        lambda: forge_leaf(B, self_signed=True),
        Purpose.CLIENT,
        Rejection.SELF_SIGNED,
    ),
    (
        "wrong signature (names B's root, signed by another key)",
        lambda: forge_leaf(B, signer_key=ec.generate_private_key(ec.SECP256R1())),
        Purpose.CLIENT,
        Rejection.BAD_SIGNATURE,
    ),
    (
        "issued by an unknown CA",
        lambda: forge_leaf(forge_domain("b.mesh")),
        Purpose.CLIENT,
        Rejection.UNTRUSTED_CHAIN,
    ),
    (
        "claims a domain with no bundle",
        lambda: forge_leaf(forge_domain("z.mesh")),
        Purpose.CLIENT,
        Rejection.UNKNOWN_TRUST_DOMAIN,
    ),
]


@pytest.mark.parametrize(
    ("forge", "purpose", "reason"),
    [pytest.param(f, p, r, id=name) for name, f, p, r in HOSTILE],
)
def test_hostile_certificates_are_rejected_for_the_right_reason(
    forge: Forger, purpose: Purpose, reason: Rejection
) -> None:
    svid = forge()
    with pytest.raises(SvidError) as caught:
        validate_svid(svid.leaf, list(svid.chain[1:]), BUNDLES, NOW, purpose)
    assert caught.value.reason is reason, str(caught.value)


@pytest.mark.parametrize("purpose", list(Purpose))
@pytest.mark.parametrize("domain", [A, B, C], ids=["a", "b", "c-with-intermediate"])
def test_an_honest_svid_is_accepted_for_both_purposes(
    domain: ForgedDomain, purpose: Purpose
) -> None:
    svid = forge_leaf(domain)
    assert validate_svid(svid.leaf, [], BUNDLES, NOW, purpose) == domain.workload()


def test_intermediates_sent_by_the_peer_are_used_to_build_the_chain() -> None:
    svid = forge_leaf(C)
    bundles = TrustBundleSet([TrustBundle(C.trust_domain, (C.root,))])
    with pytest.raises(SvidError):
        validate_svid(svid.leaf, [], bundles, NOW, Purpose.CLIENT)
    assert validate_svid(svid.leaf, list(svid.chain[1:]), bundles, NOW, Purpose.CLIENT)


def test_an_intermediate_is_never_an_anchor() -> None:
    svid = forge_leaf(C)
    assert C.intermediate is not None
    # A bundle whose only "root" is C's intermediate: the chain must still end at a root.
    only_intermediate = TrustBundleSet([TrustBundle(C.trust_domain, (), (C.intermediate,))])
    with pytest.raises(SvidError) as caught:
        validate_svid(svid.leaf, [], only_intermediate, NOW, Purpose.CLIENT)
    assert caught.value.reason is Rejection.REVOKED_TRUST_DOMAIN


def test_an_empty_bundle_revokes_every_svid_of_its_domain() -> None:
    svid = forge_leaf(B)
    bundles = BUNDLES.with_bundle(TrustBundle(B.trust_domain, (), sequence=2))
    with pytest.raises(SvidError) as caught:
        validate_svid(svid.leaf, [], bundles, NOW, Purpose.SERVER)
    assert caught.value.reason is Rejection.REVOKED_TRUST_DOMAIN


def test_validity_bounds_are_inclusive() -> None:
    svid = forge_leaf(B)
    leaf = svid.leaf
    for instant in (leaf.not_valid_before_utc, leaf.not_valid_after_utc):
        assert validate_svid(leaf, [], BUNDLES, instant, Purpose.CLIENT) == svid.spiffe_id


def test_renew_at_is_two_thirds_into_the_lifetime() -> None:
    svid = forge_leaf(B, not_before=NOW, not_after=NOW + timedelta(hours=3))
    assert svid.renew_at == NOW + timedelta(hours=2)
    assert svid.spiffe_id == SpiffeId.parse("spiffe://b.mesh/ns/default/sa/api")
