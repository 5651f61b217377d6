"""TLS for the peering stream: who may open a TLS connection to the peering port, and as whom.

gRPC's Python TLS can neither defer client verification nor request a client certificate
without verifying it, so everything the acceptor needs must be decided by its set of client
roots, which :func:`grpc.dynamic_ssl_server_credentials` lets us change before every
handshake. The scheme (one port, always mutual TLS, never plain "server-auth only"):

- **Established peers** dial with their SVID. The acceptor's client roots hold the roots of
  every established peer that dials it (never of peers it dials itself); after the handshake
  the shell re-verifies the peer's leaf (``auth_context()['x509_pem_cert']``) with
  :func:`proxy.identity.svid.validate_svid` against ONLY the roots of the trust domain the
  leaf claims, and that domain must be the domain recorded for a current peer. A root of
  another peer is never enough.
- **The first establish** has no peer bundle yet. A token's one-time secret derives, one
  way (HKDF-SHA256), a P-256 key: the *bootstrap root* of that token. The acceptor adds that
  root (it built it when it issued the token) to its client roots while the token is
  outstanding; the dialer, holding the token, builds the same key, and signs itself a
  short-lived *bootstrap leaf* under it. So only a token holder passes the handshake, and the
  acceptor then also redeems the secret the Open carries, once, and only for the token whose
  root signed the leaf. Once redeemed (or expired) the root leaves the client roots.
  The dialer sends its own trust bundle in the stream; from then on it is an established peer.
- **The dialer** trusts only the acceptor's own bundle (from the token, then as the acceptor
  publishes it), and checks the server's DNS SAN
  ``controlplane.snapbright.<cluster>.<mesh>``, which it also sends as SNI so that the east-west
  gateway can route the connection to the control plane.

Our own bundle is in the client roots too (gRPC needs at least one root); a leaf of our own
domain is refused after the handshake, since no peer has our trust domain.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.peering.model import check_label, check_mesh
from proxy.identity.svid import X509Svid

BOOTSTRAP_LEAF_TTL = timedelta(minutes=10)
_SKEW = timedelta(seconds=60)
_BOOTSTRAP_ORG = "snapbright peering bootstrap"
_HKDF_INFO = b"snapbright peering bootstrap root v1"
# The order of the P-256 group: a derived scalar must lie in [1, n - 1].
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def control_plane_server_name(cluster: str, mesh: str) -> str:
    """The SNI and DNS SAN of a cluster's control plane on the peering port."""
    return f"controlplane.snapbright.{check_label(cluster, 'cluster')}.{check_mesh(mesh)}"


def _bootstrap_key(secret: bytes) -> ec.EllipticCurvePrivateKey:
    material = HKDF(hashes.SHA256(), 48, salt=None, info=_HKDF_INFO).derive(secret)
    scalar = int.from_bytes(material, "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def _bootstrap_name(token_id: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _BOOTSTRAP_ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, f"token {token_id}"),
        ]
    )


def bootstrap_root(
    secret: bytes, token_id: str, not_before: datetime, not_after: datetime
) -> x509.Certificate:
    """The client root a token's secret stands for, valid while the token is."""
    key = _bootstrap_key(secret)
    name = _bootstrap_name(token_id)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before - _SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def bootstrap_leaf(
    secret: bytes, token_id: str, now: datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A short-lived client certificate under the token's bootstrap root, and its key."""
    root_key = _bootstrap_key(secret)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peering establish")]))
        .issuer_name(_bootstrap_name(token_id))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + BOOTSTRAP_LEAF_TTL)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    return leaf, key


def bootstrap_token_of(leaf: x509.Certificate, roots: Mapping[str, x509.Certificate]) -> str | None:
    """The id of the outstanding token whose bootstrap root signed ``leaf``, if any.

    ``roots`` maps token ids to their bootstrap roots. The signature is checked here, not
    just the issuer name: the TLS layer trusted a union of roots.
    """
    for token_id, root in roots.items():
        if leaf.issuer != root.subject:
            continue
        try:
            leaf.verify_directly_issued_by(root)
        except Exception:  # noqa: S112 — any failure means "not this root"
            continue
        return token_id
    return None


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def pem(certificates: Iterable[x509.Certificate]) -> bytes:
    """Certificates as concatenated PEM."""
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certificates)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def server_configuration(
    svid: X509Svid, client_roots: Iterable[x509.Certificate]
) -> grpc.ServerCertificateConfiguration:
    """The acceptor's TLS configuration: present ``svid``, accept clients of ``client_roots``."""
    roots = pem(client_roots)
    if not roots:
        raise ValueError("the peering port needs at least one client root")
    return grpc.ssl_server_certificate_configuration(
        [(_key_pem(svid.key), svid.chain_pem())], root_certificates=roots
    )


def svid_channel_credentials(
    svid: X509Svid, server_roots: Iterable[x509.Certificate]
) -> grpc.ChannelCredentials:
    """Dial as ``svid``, trusting only ``server_roots`` (the acceptor domain's roots)."""
    return grpc.ssl_channel_credentials(
        root_certificates=pem(server_roots),
        private_key=_key_pem(svid.key),
        certificate_chain=svid.chain_pem(),
    )


def bootstrap_channel_credentials(
    secret: bytes, token_id: str, server_roots: Iterable[x509.Certificate], now: datetime
) -> grpc.ChannelCredentials:
    """Dial for a first establish, presenting a bootstrap leaf of the token's secret."""
    leaf, key = bootstrap_leaf(secret, token_id, now)
    return grpc.ssl_channel_credentials(
        root_certificates=pem(server_roots),
        private_key=_key_pem(key),
        certificate_chain=pem([leaf]),
    )


def peer_leaf(auth_context: Mapping[str, Iterable[bytes]]) -> x509.Certificate | None:
    """The client's leaf certificate from a gRPC ``auth_context()``, if it presented one."""
    certs = list(auth_context.get("x509_pem_cert", ()))
    if len(certs) != 1:
        return None
    try:
        return x509.load_pem_x509_certificate(certs[0])
    except ValueError:
        return None
