"""The cluster CA issues SPIFFE-conformant SVIDs and rotates roots with an overlap."""

from __future__ import annotations

import json
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


HOUR = timedelta(hours=1)


def _issuer_key_id(leaf: x509.Certificate) -> bytes | None:
    return _ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier


def _key_id(cert: x509.Certificate) -> bytes:
    return _ext(cert, x509.SubjectKeyIdentifier).value.digest


def test_a_rotation_publishes_the_new_root_but_the_old_one_keeps_signing() -> None:
    ca = create_ca(TD, NOW)
    old_root = ca.active.root
    rotated = ca.rotate(NOW + HOUR, overlap=72 * HOUR)
    staged = rotated.staged
    assert staged is not None
    assert rotated.sequence == ca.sequence + 1
    assert rotated.bundle().roots == (old_root, staged.root)
    assert rotated.active.root == old_root
    leaf = rotated.issue(API, NOW + 2 * HOUR).leaf
    assert _issuer_key_id(leaf) == _key_id(old_root)
    # A peer that holds only the bundle from before the rotation accepts it.
    before = TrustBundleSet([ca.bundle()])
    assert validate_svid(leaf, [], before, NOW + 2 * HOUR, Purpose.CLIENT) == API


def test_leaves_signed_during_a_rotation_never_outlive_the_old_root() -> None:
    rotated = create_ca(TD, NOW).rotate(NOW, overlap=10 * HOUR)
    leaf = rotated.issue(API, NOW + HOUR, ttl=24 * HOUR).leaf
    assert leaf.not_valid_after_utc == NOW + 10 * HOUR
    with pytest.raises(CaError, match="not valid"):
        rotated.issue(API, NOW + 10 * HOUR)  # only reachable without advance(): it switches


@pytest.mark.parametrize(
    ("at", "acked", "switched"),
    [
        (NOW + HOUR, False, False),
        (NOW + HOUR, True, True),
        (NOW + 36 * HOUR - timedelta(seconds=1), False, False),
        (NOW + 36 * HOUR, False, True),
    ],
    ids=["waiting", "peers-acked", "just-before-deadline", "deadline"],
)
def test_the_new_root_takes_over_when_peers_ack_it_or_at_half_the_overlap(
    at: datetime, acked: bool, switched: bool
) -> None:
    rotated = create_ca(TD, NOW).rotate(NOW, overlap=72 * HOUR)
    staged = rotated.staged
    assert staged is not None
    advanced = rotated.advance(at, bundle_acked=acked)
    assert (advanced.active.root == staged.root) is switched
    assert (advanced is rotated) is not switched
    # The bundle does not change at the switch: nothing new to publish.
    assert advanced.bundle() == rotated.bundle()


def test_after_the_switch_only_the_new_root_signs_and_the_old_keys_are_gone() -> None:
    rotated = create_ca(TD, NOW, intermediate=True).rotate(NOW, overlap=72 * HOUR)
    switched = rotated.advance(NOW + HOUR, bundle_acked=True)
    old, new = switched.authorities
    assert (old.root_key, old.intermediate_key) == (None, None)
    assert new.switch_by is None
    assert switched.staged is None
    assert new.intermediate is not None
    leaf = switched.issue(API, NOW + HOUR, ttl=24 * HOUR).leaf
    assert _issuer_key_id(leaf) == _key_id(new.intermediate)
    assert leaf.not_valid_after_utc == NOW + 25 * HOUR  # no cap: the new root is not retiring


def test_the_old_root_leaves_the_bundle_once_its_last_leaf_has_expired() -> None:
    ca = create_ca(TD, NOW)
    rotated = ca.rotate(NOW, overlap=10 * HOUR)
    last_old = rotated.issue(API, NOW + HOUR).leaf  # the last leaf it signs: switched next
    switched = rotated.advance(NOW + HOUR, bundle_acked=True)
    during = switched.advance(NOW + 10 * HOUR - timedelta(seconds=1))
    assert during is switched
    assert len(during.bundle().roots) == 2
    at_end = NOW + 10 * HOUR - timedelta(seconds=1)
    assert validate_svid(last_old, [], TrustBundleSet([during.bundle()]), at_end, Purpose.CLIENT)

    after = switched.advance(NOW + 10 * HOUR)
    assert after.bundle().roots == (switched.active.root,)
    assert after.sequence == switched.sequence + 1
    assert last_old.not_valid_after_utc <= NOW + 10 * HOUR  # expired when its root left
    with pytest.raises(SvidError) as caught:
        validate_svid(last_old, [], TrustBundleSet([after.bundle()]), at_end, Purpose.CLIENT)
    assert caught.value.reason is Rejection.UNTRUSTED_CHAIN


def test_every_leaf_of_a_rotation_validates_at_a_peer_holding_what_it_acked() -> None:
    """Virtual time, a minute a step: the peer holds the bundle from before the rotation until
    minute 5, then everything we publish. Every unexpired leaf validates there, every minute."""
    ca = create_ca(TD, NOW)
    old_root = ca.active.root
    peer_bundle = ca.bundle()
    ca = ca.rotate(NOW, overlap=HOUR)
    leaves: list[x509.Certificate] = []
    for minute in range(61):
        now = NOW + timedelta(minutes=minute)
        if minute >= 5:
            peer_bundle = ca.bundle()
        ca = ca.advance(now, bundle_acked=(peer_bundle.sequence or 0) >= ca.sequence)
        if minute >= 5:
            peer_bundle = ca.bundle()
        leaf = ca.issue(API, now, ttl=timedelta(minutes=10)).leaf
        assert (_issuer_key_id(leaf) == _key_id(old_root)) is (minute < 5)
        leaves.append(leaf)
        held = TrustBundleSet([peer_bundle])
        for earlier in leaves:
            if earlier.not_valid_after_utc > now:
                assert validate_svid(earlier, [], held, now, Purpose.CLIENT) == API
    assert ca.bundle().roots == (ca.active.root,)


def test_a_second_rotation_waits_until_the_first_has_switched() -> None:
    once = create_ca(TD, NOW).rotate(NOW, overlap=10 * HOUR)
    with pytest.raises(CaError, match="rotation is in progress"):
        once.rotate(NOW + HOUR)
    switched = once.advance(NOW + HOUR, bundle_acked=True)
    twice = switched.rotate(NOW + 2 * HOUR, overlap=72 * HOUR)
    retire = [a.retire_at for a in twice.authorities]
    assert retire == [NOW + 10 * HOUR, NOW + 74 * HOUR, None]
    assert twice.sequence == 3


def test_a_rotation_with_no_overlap_replaces_the_root_at_once() -> None:
    rotated = create_ca(TD, NOW).rotate(NOW, overlap=timedelta(0))
    staged = rotated.staged
    assert staged is not None
    now = rotated.advance(NOW)
    assert now.bundle().roots == (staged.root,)
    assert now.active.root == staged.root


@pytest.mark.parametrize(
    ("overlap", "switch_within", "message"),
    [
        (-HOUR, None, "must not be negative"),
        (HOUR, 2 * HOUR, "within the overlap"),
        (HOUR, -HOUR, "within the overlap"),
    ],
)
def test_rotate_refuses_a_bad_schedule(
    overlap: timedelta, switch_within: timedelta | None, message: str
) -> None:
    with pytest.raises(CaError, match=message):
        create_ca(TD, NOW).rotate(NOW, overlap=overlap, switch_within=switch_within)


def test_state_round_trips_through_the_state_directory(tmp_path: Path) -> None:
    ca = create_ca(TD, NOW, intermediate=True).rotate(NOW, overlap=timedelta(hours=1))
    save_ca(tmp_path, ca)
    loaded = load_ca(tmp_path)
    assert loaded.trust_domain == TD
    assert loaded.sequence == ca.sequence
    assert loaded.bundle() == ca.bundle()
    assert [a.retire_at for a in loaded.authorities] == [a.retire_at for a in ca.authorities]
    assert [a.switch_by for a in loaded.authorities] == [None, NOW + timedelta(minutes=30)]
    assert loaded.active.root == ca.active.root
    svid = loaded.issue(API, NOW)
    assert validate_svid(svid.leaf, [], TrustBundleSet([loaded.bundle()]), NOW, Purpose.SERVER)


def test_keys_are_0600_and_retired_keys_are_deleted(tmp_path: Path) -> None:
    ca = create_ca(TD, NOW, intermediate=True)
    save_ca(tmp_path, ca)
    keys = sorted(tmp_path.rglob("*.key"))
    assert [k.name for k in keys] == ["intermediate.key", "root.key"]
    assert all(stat.S_IMODE(k.stat().st_mode) == KEY_MODE for k in keys)
    save_ca(tmp_path, ca.rotate(NOW).advance(NOW, bundle_acked=True))
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


def test_a_state_file_from_before_staged_rotations_loads_with_nothing_staged(
    tmp_path: Path,
) -> None:
    ca = create_ca(TD, NOW)
    save_ca(tmp_path, ca)
    state_file = tmp_path / "ca" / "ca.json"
    document = json.loads(state_file.read_text())
    for entry in document["authorities"]:
        del entry["switch_by"]
    state_file.write_text(json.dumps(document))
    loaded = load_ca(tmp_path)
    assert loaded.staged is None
    assert loaded.active.root == ca.active.root


def test_a_state_file_with_a_staged_authority_before_the_last_is_refused(tmp_path: Path) -> None:
    save_ca(tmp_path, create_ca(TD, NOW).rotate(NOW, overlap=HOUR))
    state_file = tmp_path / "ca" / "ca.json"
    document = json.loads(state_file.read_text())
    document["authorities"].reverse()
    state_file.write_text(json.dumps(document))
    with pytest.raises(StoreError, match="only the newest"):
        load_ca(tmp_path)
