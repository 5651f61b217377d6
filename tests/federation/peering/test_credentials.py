"""Bootstrap roots: only a holder of a token's secret gets a client certificate through."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

from federation.peering.credentials import (
    bootstrap_leaf,
    bootstrap_root,
    bootstrap_token_of,
    control_plane_server_name,
    peer_leaf,
    pem,
)
from federation.peering.model import PeeringValueError
from tests.proxy.identity.forge import forge_domain, forge_leaf

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
EXPIRES = NOW + timedelta(hours=1)
TOKEN = "0123456789abcdef"
OTHER = "fedcba9876543210"


def test_the_dialers_leaf_verifies_under_the_root_the_acceptor_derived_from_the_same_secret() -> (
    None
):
    secret = secrets.token_bytes(32)
    root = bootstrap_root(secret, TOKEN, NOW, EXPIRES)
    leaf, _ = bootstrap_leaf(secret, TOKEN, NOW)
    other = bootstrap_root(secrets.token_bytes(32), OTHER, NOW, EXPIRES)
    assert bootstrap_token_of(leaf, {OTHER: other, TOKEN: root}) == TOKEN


def test_a_leaf_from_another_secret_matches_no_token() -> None:
    root = bootstrap_root(secrets.token_bytes(32), TOKEN, NOW, EXPIRES)
    leaf, _ = bootstrap_leaf(secrets.token_bytes(32), TOKEN, NOW)
    # Same issuer name, another key: the signature decides, not the name.
    assert leaf.issuer == root.subject
    assert bootstrap_token_of(leaf, {TOKEN: root}) is None


def test_an_svid_of_a_real_domain_is_no_bootstrap_leaf() -> None:
    domain = forge_domain("b.acme", NOW)
    root = bootstrap_root(secrets.token_bytes(32), TOKEN, NOW, EXPIRES)
    assert bootstrap_token_of(forge_leaf(domain, NOW).leaf, {TOKEN: root}) is None


def test_the_bootstrap_root_is_a_ca_that_lives_as_long_as_its_token() -> None:
    root = bootstrap_root(secrets.token_bytes(32), TOKEN, NOW, EXPIRES)
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca
    assert root.not_valid_after_utc == EXPIRES
    assert root.not_valid_before_utc <= NOW


def test_the_bootstrap_leaf_is_a_short_lived_client_certificate() -> None:
    leaf, _ = bootstrap_leaf(secrets.token_bytes(32), TOKEN, NOW)
    ekus = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in ekus
    assert leaf.not_valid_after_utc - NOW <= timedelta(minutes=10)


def test_control_plane_server_name_is_built_from_valid_names_only() -> None:
    assert (
        control_plane_server_name("us-west", "acme.io") == "controlplane.snapbright.us-west.acme.io"
    )
    with pytest.raises(PeeringValueError):
        control_plane_server_name("us_west", "acme")


@pytest.mark.parametrize(
    "auth_context",
    [{}, {"x509_pem_cert": []}, {"x509_pem_cert": [b"not a certificate"]}],
    ids=["no certificate", "empty", "garbage"],
)
def test_peer_leaf_is_none_without_a_readable_certificate(
    auth_context: dict[str, list[bytes]],
) -> None:
    assert peer_leaf(auth_context) is None


def test_peer_leaf_reads_the_pem_grpc_reports() -> None:
    leaf = forge_leaf(forge_domain("b.acme", NOW), NOW).leaf
    assert peer_leaf({"x509_pem_cert": [pem([leaf])]}) == leaf
