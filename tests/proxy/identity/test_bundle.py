"""The SPIFFE bundle parser accepts what the spec allows and rejects everything else by name."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.identity.bundle import (
    MAX_BUNDLE_BYTES,
    BundleError,
    TrustBundle,
    TrustBundleSet,
    format_bundle,
    parse_bundle,
)
from proxy.identity.model import TrustDomain
from tests.proxy.identity.forge import forge_domain, forge_leaf

A = forge_domain("a.mesh", intermediate=True)
B = forge_domain("b.mesh")
TD = A.trust_domain


def _document(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(format_bundle(A.bundle(sequence=5)))
    for key, value in changes.items():
        if value is _DROP:
            document.pop(key)
        else:
            document[key] = value
    return document


def _key(**changes: Any) -> dict[str, Any]:
    key: dict[str, Any] = dict(_document()["keys"][0])
    for name, value in changes.items():
        if value is _DROP:
            key.pop(name)
        else:
            key[name] = value
    return key


def _der(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


_DROP = object()
_LEAF = forge_leaf(A).leaf


def test_format_then_parse_round_trips() -> None:
    bundle = A.bundle(sequence=5)
    parsed = parse_bundle(TD, format_bundle(bundle))
    assert parsed == bundle
    assert parsed.roots == (A.root,)
    assert parsed.intermediates == (A.intermediate,)
    document = json.loads(format_bundle(bundle))
    assert document["keys"][0]["kty"] == "EC"
    assert document["keys"][0]["crv"] == "P-256"
    assert document["keys"][0]["use"] == "x509-svid"
    assert document["spiffe_sequence"] == 5
    assert document["spiffe_refresh_hint"] == 300


def test_an_empty_key_set_is_valid_and_revokes_the_domain() -> None:
    bundle = parse_bundle(TD, json.dumps({"keys": [], "spiffe_sequence": 9}))
    assert bundle.roots == ()
    assert bundle.revoked


def test_jwt_svid_keys_are_ignored() -> None:
    jwt_key = {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "k1", "use": "jwt-svid"}
    document = _document(keys=[jwt_key, _key()])
    assert parse_bundle(TD, json.dumps(document)).roots == (A.root,)


def test_rsa_roots_round_trip_with_n_and_e() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(A.root.not_valid_before_utc)
        .not_valid_after(A.root.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    bundle = TrustBundle(TD, (root,), sequence=1)
    body = format_bundle(bundle)
    assert json.loads(body)["keys"][0]["e"] == "AQAB"
    assert parse_bundle(TD, body) == bundle


REJECTED: list[tuple[str, bytes, str]] = [
    ("too large", b" " * (MAX_BUNDLE_BYTES + 1), "larger than"),
    ("not UTF-8", b'{"keys": [\xff]}', "not UTF-8"),
    ("not JSON", b"{keys: []}", "not JSON"),
    ("top-level array", b"[]", "JSON object"),
    ("duplicate top-level member", b'{"keys": [], "keys": []}', "duplicate JSON member 'keys'"),
    (
        "duplicate member inside a key",
        json.dumps(_document())
        .replace('"use": "x509-svid"', '"use": "x509-svid", "use": "x"')
        .encode(),
        "duplicate JSON member 'use'",
    ),
    ("NaN", b'{"keys": [], "spiffe_sequence": NaN}', "NaN"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("keys missing", b"{}", "'keys' must be a list"),
    ("keys not a list", b'{"keys": {}}', "'keys' must be a list"),
    ("key not an object", b'{"keys": [1]}', "keys[0] must be a JSON object"),
    ("use missing", json.dumps(_document(keys=[_key(use=_DROP)])).encode(), "keys[0].use"),
    ("wrong use", json.dumps(_document(keys=[_key(use="enc")])).encode(), "keys[0].use"),
    ("x5c missing", json.dumps(_document(keys=[_key(x5c=_DROP)])).encode(), "exactly one"),
    (
        "x5c with two certificates",
        json.dumps(_document(keys=[_key(x5c=[_der(A.root), _der(A.root)])])).encode(),
        "exactly one",
    ),
    ("x5c not base64", json.dumps(_document(keys=[_key(x5c=["@@@"])])).encode(), "base64"),
    (
        "x5c not a certificate",
        json.dumps(_document(keys=[_key(x5c=["AAAA"])])).encode(),
        "not a DER certificate",
    ),
    (
        "leaf certificate in x5c",
        json.dumps(_document(keys=[_key(x5c=[_der(_LEAF)])])).encode(),
        "not a CA certificate",
    ),
    (
        "root of another trust domain",
        json.dumps(_document(keys=[json.loads(format_bundle(B.bundle()))["keys"][0]])).encode(),
        "names spiffe://b.mesh",
    ),
    (
        "key parameters do not match the certificate",
        json.dumps(_document(keys=[_key(x=_key()["y"])])).encode(),
        "keys[0].x does not match",
    ),
    ("wrong kty", json.dumps(_document(keys=[_key(kty="RSA")])).encode(), "keys[0].kty"),
    (
        "same root twice",
        json.dumps(_document(keys=[_key(), _key()])).encode(),
        "appears twice",
    ),
    ("negative sequence", json.dumps(_document(spiffe_sequence=-1)).encode(), "non-negative"),
    ("sequence is a string", json.dumps(_document(spiffe_sequence="5")).encode(), "integer"),
    ("sequence is a boolean", json.dumps(_document(spiffe_sequence=True)).encode(), "integer"),
    ("refresh hint zero", json.dumps(_document(spiffe_refresh_hint=0)).encode(), "1 week"),
    ("refresh hint negative", json.dumps(_document(spiffe_refresh_hint=-5)).encode(), "1 week"),
    (
        "refresh hint over a week",
        json.dumps(_document(spiffe_refresh_hint=7 * 24 * 3600 + 1)).encode(),
        "1 week",
    ),
    ("refresh hint float", json.dumps(_document(spiffe_refresh_hint=1.5)).encode(), "integer"),
    (
        "intermediate that is a leaf",
        json.dumps(_document(snapbright_intermediates=[_der(_LEAF)])).encode(),
        "snapbright_intermediates[0] is not a CA",
    ),
]


@pytest.mark.parametrize(("body", "reason"), [pytest.param(b, r, id=n) for n, b, r in REJECTED])
def test_bad_bundles_are_rejected_with_the_rule_that_failed(body: bytes, reason: str) -> None:
    with pytest.raises(BundleError) as caught:
        parse_bundle(TD, body)
    assert reason in caught.value.reason


def test_a_week_long_refresh_hint_is_the_limit_and_is_accepted() -> None:
    body = json.dumps(_document(spiffe_refresh_hint=7 * 24 * 3600))
    assert parse_bundle(TD, body).refresh_hint_seconds == 7 * 24 * 3600


UPDATES: list[tuple[str, dict[str, Any], str | None]] = [
    ("higher sequence", {"spiffe_sequence": 6, "keys": []}, None),
    ("same sequence, same keys", {}, None),
    ("lower sequence", {"spiffe_sequence": 4}, "sequence went backwards"),
    ("same sequence, other keys", {"keys": []}, "unchanged but the keys changed"),
    ("sequence dropped", {"spiffe_sequence": _DROP}, "drops 'spiffe_sequence'"),
]


@pytest.mark.parametrize(("changes", "reason"), [pytest.param(c, r, id=n) for n, c, r in UPDATES])
def test_updates_to_a_known_bundle_must_not_go_backwards(
    changes: dict[str, Any], reason: str | None
) -> None:
    known = A.bundle(sequence=5)
    body = json.dumps(_document(**changes))
    if reason is None:
        assert parse_bundle(TD, body, previous=known).trust_domain == TD
        return
    with pytest.raises(BundleError) as caught:
        parse_bundle(TD, body, previous=known)
    assert reason in caught.value.reason


def test_bundle_sets_are_keyed_by_trust_domain_and_versioned_by_content() -> None:
    bundles = TrustBundleSet([A.bundle(), B.bundle()])
    assert bundles[B.trust_domain].roots == (B.root,)
    assert bundles.get(TrustDomain("z.mesh")) is None
    assert set(bundles.all_roots()) == {A.root, B.root}
    same = TrustBundleSet([B.bundle(), A.bundle()])
    assert same.version == bundles.version
    revoked = bundles.with_bundle(TrustBundle(B.trust_domain, (), sequence=2))
    assert revoked.version != bundles.version
    assert len(revoked) == 2
    assert revoked[B.trust_domain].revoked
    with pytest.raises(BundleError, match="two bundles"):
        TrustBundleSet([A.bundle(), A.bundle(sequence=2)])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_crash_the_parser(body: bytes) -> None:
    try:
        bundle = parse_bundle(TD, body)
    except BundleError:
        return  # the only exception it may raise
    assert bundle.trust_domain == TD


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["keys", "use", "x5c", "kty", "crv", "x", "y", "spiffe_sequence"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(_json_values)
def test_arbitrary_json_never_crashes_the_parser(document: object) -> None:
    try:
        bundle = parse_bundle(TD, json.dumps(document))
    except BundleError:
        return  # the only exception it may raise
    assert bundle.trust_domain == TD
