"""The cluster CA issues SPIFFE-conformant SVIDs and rotates roots with an overlap."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from federation.trust.ca import CLOCK_SKEW_ALLOWANCE, CaError, ClusterCA, create_ca
from federation.trust.store import KEY_MODE, StoreError, load_ca, save_ca, write_atomic
from proxy.identity.bundle import TrustBundleSet
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.identity.svid import Purpose, Rejection, SvidError, validate_svid

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
TD = TrustDomain.for_cluster("us-west", "acme")
API = SpiffeId.workload(TD, "payments", "api")


@pytest.fixture(scope="module")
def ca() -> ClusterCA:
    return create_ca(TD, NOW)


@pytest.fixture(scope="module")
def ca_with_intermediate() -> ClusterCA:
    return create_ca(TD, NOW, intermediate=True)


_T = TypeVar("_T", bound=x509.ExtensionType)


def _ext(cert: x509.Certificate, kind: type[_T]) -> x509.Extension[_T]:
    return cert.extensions.get_extension_for_class(kind)


def test_root_names_the_trust_domain_and_is_a_critical_ca(ca: ClusterCA) -> None:
    root = ca.active.root
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(root.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    uris = _ext(root, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert uris == ["spiffe://us-west.acme"]
    constraints = _ext(root, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    usage = _ext(root, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    ski = _ext(root, x509.SubjectKeyIdentifier).value
    assert _ext(root, x509.AuthorityKeyIdentifier).value.key_identifier == ski.digest


def test_svid_follows_the_x509_svid_profile(ca: ClusterCA) -> None:
    svid = ca.issue(API, NOW)
    leaf = svid.leaf
    san = _ext(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(API)]
    assert len(list(san)) == 1
    constraints = _ext(leaf, x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca
    usage = _ext(leaf, x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert not usage.value.crl_sign
    assert set(_ext(leaf, x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    root_ski = _ext(ca.active.root, x509.SubjectKeyIdentifier).value.digest
    assert _ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == root_ski


def test_svid_lives_24_hours_by_default_and_renews_at_two_thirds(ca: ClusterCA) -> None:
    svid = ca.issue(API, NOW)
    assert svid.leaf.not_valid_before_utc == NOW
    assert svid.not_after == NOW + timedelta(hours=24)
    assert svid.renew_at == NOW + timedelta(hours=16)
    short = ca.issue(API, NOW, ttl=timedelta(minutes=30))
    assert short.not_after == NOW + timedelta(minutes=30)
    assert short.renew_at == NOW + timedelta(minutes=20)


def test_svid_is_backdated_for_peers_whose_clocks_run_behind(ca: ClusterCA) -> None:
    later = NOW + timedelta(hours=1)
    svid = ca.issue(API, later)
    assert svid.leaf.not_valid_before_utc == later - CLOCK_SKEW_ALLOWANCE
    # Never before the issuer itself is valid.
    assert ca.issue(API, NOW).leaf.not_valid_before_utc == ca.active.root.not_valid_before_utc


def test_svid_never_outlives_its_issuer(ca: ClusterCA) -> None:
    root_end = ca.active.root.not_valid_after_utc
    late = root_end - timedelta(hours=1)
    svid = ca.issue(API, late, ttl=timedelta(hours=24))
    assert svid.not_after == root_end
    with pytest.raises(CaError, match="not valid"):
        ca.issue(API, root_end + timedelta(seconds=1))


@pytest.mark.parametrize(
    ("spiffe_id", "ttl", "message"),
    [
        (SpiffeId.parse("spiffe://other.acme/ns/a/sa/b"), timedelta(hours=1), "trust domain"),
        (TD.spiffe_id, timedelta(hours=1), "no path"),
        (API, timedelta(0), "positive"),
    ],
)
def test_issue_refuses_bad_requests(
    ca: ClusterCA, spiffe_id: SpiffeId, ttl: timedelta, message: str
) -> None:
    with pytest.raises(CaError, match=message):
        ca.issue(spiffe_id, NOW, ttl)


@pytest.mark.parametrize("use_intermediate", [False, True])
def test_sign_svid_certifies_the_callers_own_key_for_the_given_identity(
    ca: ClusterCA, ca_with_intermediate: ClusterCA, use_intermediate: bool
) -> None:
    authority = ca_with_intermediate if use_intermediate else ca
    key = ec.generate_private_key(ec.SECP256R1())
    chain = authority.sign_svid(API, key.public_key(), NOW, timedelta(hours=1))
    leaf = chain[0]
    assert leaf.public_key() == key.public_key()
    assert len(chain) == (2 if use_intermediate else 1)
    assert leaf.not_valid_after_utc == NOW + timedelta(hours=1)
    bundles = TrustBundleSet([authority.bundle()])
    assert validate_svid(leaf, chain[1:], bundles, NOW, Purpose.CLIENT) == API


def test_sign_svid_adds_dns_names_beside_the_one_uri_san(ca: ClusterCA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (leaf,) = ca.sign_svid(API, key.public_key(), NOW, dns_names=("cp.us-west.acme",))
    san = _ext(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(API)]
    assert san.get_values_for_type(x509.DNSName) == ["cp.us-west.acme"]
    assert validate_svid(leaf, [], TrustBundleSet([ca.bundle()]), NOW, Purpose.SERVER) == API


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP256K1()).public_key(),
        ed25519.Ed25519PrivateKey.generate().public_key(),
    ],
    ids=["secp256k1", "ed25519"],
)
def test_sign_svid_refuses_keys_outside_p256_and_p384(
    ca: ClusterCA, key: CertificatePublicKeyTypes
) -> None:
    with pytest.raises(CaError, match="P-256 or P-384"):
        ca.sign_svid(API, key, NOW)


@pytest.mark.parametrize("use_intermediate", [False, True])
def test_issued_svids_validate_against_the_ca_bundle(
    ca: ClusterCA, ca_with_intermediate: ClusterCA, use_intermediate: bool
) -> None:
    authority = ca_with_intermediate if use_intermediate else ca
    svid = authority.issue(API, NOW)
    assert len(svid.chain) == (2 if use_intermediate else 1)
    bundles = TrustBundleSet([authority.bundle()])
    for purpose in Purpose:
        # The leaf alone suffices: the bundle carries the intermediate as chain material.
        assert validate_svid(svid.leaf, [], bundles, NOW, purpose) == API


def test_intermediate_is_a_path_length_zero_ca_under_the_root(
    ca_with_intermediate: ClusterCA,
) -> None:
    intermediate = ca_with_intermediate.active.intermediate
    assert intermediate is not None
    constraints = _ext(intermediate, x509.BasicConstraints).value
    assert constraints.ca
    assert constraints.path_length == 0
    intermediate.verify_directly_issued_by(ca_with_intermediate.active.root)
    assert ca_with_intermediate.bundle().roots == (ca_with_intermediate.active.root,)
    assert ca_with_intermediate.bundle().intermediates == (intermediate,)


def test_rotation_adds_the_new_root_first_and_drops_the_old_after_the_overlap() -> None:
    ca = create_ca(TD, NOW)
    old_svid = ca.issue(API, NOW)
    old_root = ca.active.root
    rotated = ca.rotate(NOW + timedelta(hours=1), overlap=timedelta(hours=72))
    assert rotated.sequence == ca.sequence + 1
    assert rotated.bundle().roots == (old_root, rotated.active.root)
    assert rotated.authorities[0].root_key is None  # the old root never signs again
    new_svid = rotated.issue(API, NOW + timedelta(hours=1))
    new_svid.leaf.verify_directly_issued_by(rotated.active.root)

    during = rotated.prune(NOW + timedelta(hours=72))
    assert during is rotated
    bundles = TrustBundleSet([during.bundle()])
    at = NOW + timedelta(hours=20)
    assert validate_svid(old_svid.leaf, [], bundles, at, Purpose.CLIENT) == API
    assert validate_svid(new_svid.leaf, [], bundles, at, Purpose.CLIENT) == API

    after = rotated.prune(NOW + timedelta(hours=73))
    assert after.bundle().roots == (rotated.active.root,)
    assert after.sequence == rotated.sequence + 1
    with pytest.raises(SvidError) as caught:
        validate_svid(old_svid.leaf, [], TrustBundleSet([after.bundle()]), at, Purpose.CLIENT)
    assert caught.value.reason is Rejection.UNTRUSTED_CHAIN


def test_a_second_rotation_keeps_the_first_retirement_date() -> None:
    ca = create_ca(TD, NOW)
    once = ca.rotate(NOW, overlap=timedelta(hours=10))
    twice = once.rotate(NOW + timedelta(hours=1), overlap=timedelta(hours=72))
    retire = [a.retire_at for a in twice.authorities]
    assert retire == [NOW + timedelta(hours=10), NOW + timedelta(hours=73), None]
    assert twice.sequence == 3


def test_state_round_trips_through_the_state_directory(tmp_path: Path) -> None:
    ca = create_ca(TD, NOW, intermediate=True).rotate(NOW, overlap=timedelta(hours=1))
    save_ca(tmp_path, ca)
    loaded = load_ca(tmp_path)
    assert loaded.trust_domain == TD
    assert loaded.sequence == ca.sequence
    assert loaded.bundle() == ca.bundle()
    assert [a.retire_at for a in loaded.authorities] == [a.retire_at for a in ca.authorities]
    svid = loaded.issue(API, NOW)
    assert validate_svid(svid.leaf, [], TrustBundleSet([loaded.bundle()]), NOW, Purpose.SERVER)


def test_keys_are_0600_and_retired_keys_are_deleted(tmp_path: Path) -> None:
    ca = create_ca(TD, NOW, intermediate=True)
    save_ca(tmp_path, ca)
    keys = sorted(tmp_path.rglob("*.key"))
    assert [k.name for k in keys] == ["intermediate.key", "root.key"]
    assert all(stat.S_IMODE(k.stat().st_mode) == KEY_MODE for k in keys)
    save_ca(tmp_path, ca.rotate(NOW))
    keys_after = sorted(tmp_path.rglob("*.key"))
    assert len(keys_after) == 2
    assert not set(keys) & set(keys_after)
    assert not list(tmp_path.rglob("*.tmp"))


def test_pruned_authorities_leave_the_state_directory(tmp_path: Path) -> None:
    rotated = create_ca(TD, NOW).rotate(NOW, overlap=timedelta(hours=1))
    save_ca(tmp_path, rotated)
    assert len(list(tmp_path.rglob("root.pem"))) == 2
    save_ca(tmp_path, rotated.prune(NOW + timedelta(hours=2)))
    assert len(list(tmp_path.rglob("root.pem"))) == 1


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    save_ca(tmp_path, create_ca(TD, NOW))
    key = next(tmp_path.rglob("root.key"))
    key.chmod(0o644)
    with pytest.raises(StoreError, match="chmod 600"):
        load_ca(tmp_path)


def test_loading_an_empty_directory_says_to_init(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="ca init"):
        load_ca(tmp_path)


def test_atomic_write_replaces_whole_files_with_the_given_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "secret.key"
    write_atomic(target, b"one", 0o600)
    write_atomic(target, b"two", 0o600)
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["secret.key"]
