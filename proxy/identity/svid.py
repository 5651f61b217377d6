"""X.509-SVIDs: the workload's own certificate, and validation of a peer's on receipt.

:func:`validate_svid` applies the SPIFFE X509-SVID rules (spec sections 4 and 5) in our own
code, each failure named by a :class:`Rejection`, and then has cryptography's X.509 verifier
build the chain against a store that holds *only the roots of the trust domain the leaf
claims*. A root of another federated domain is not enough: a certificate that claims domain B
but chains to A's root is rejected (``Rejection.FOREIGN_ROOT``).

Snapbright policy beyond the spec's MUSTs: the leaf must carry an extended key usage
extension, and it must include the EKU the peer's purpose needs (clientAuth for a client,
serverAuth for a server). Our CA always issues both.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from proxy.identity.bundle import TrustBundleSet
from proxy.identity.model import SCHEME_PREFIX, SpiffeId, SpiffeIdError, TrustDomain


class Purpose(enum.Enum):
    """What the peer is to us: the EKU its certificate must allow."""

    CLIENT = "client"
    SERVER = "server"


class Rejection(enum.Enum):
    """Why a peer's SVID was rejected: one rule each."""

    MALFORMED = "the certificate cannot be parsed"
    NO_URI_SAN = "the leaf has no URI SAN"
    MANY_URI_SANS = "the leaf has more than one URI SAN"
    NOT_SPIFFE_SCHEME = "the URI SAN is not a spiffe:// URI"
    INVALID_SPIFFE_ID = "the URI SAN is not a valid SPIFFE ID"
    NO_PATH = "the SPIFFE ID has no path (it names a trust domain, not a workload)"
    LEAF_IS_CA = "the leaf is a CA certificate (cA=true)"
    LEAF_SIGNS_CERTIFICATES = "the leaf has keyCertSign or cRLSign key usage"
    NO_DIGITAL_SIGNATURE = "the leaf lacks digitalSignature key usage"
    NO_CLIENT_AUTH = "the leaf lacks the clientAuth extended key usage"
    NO_SERVER_AUTH = "the leaf lacks the serverAuth extended key usage"
    NOT_YET_VALID = "the leaf is not valid yet"
    EXPIRED = "the leaf has expired"
    UNKNOWN_TRUST_DOMAIN = "no trust bundle is known for the claimed trust domain"
    REVOKED_TRUST_DOMAIN = "the claimed trust domain's bundle is empty: all its SVIDs are revoked"
    SELF_SIGNED = "the leaf is self-signed"
    BAD_SIGNATURE = "the signature does not verify under the named issuer's key"
    FOREIGN_ROOT = "the chain ends at a root of another trust domain, not the claimed one"
    UNTRUSTED_CHAIN = "the chain does not end at a root of the claimed trust domain"
    UNEXPECTED_ID = "the peer is not the expected identity"


class SvidError(Exception):
    """A peer's SVID was rejected; ``reason`` names the rule, ``detail`` adds specifics."""

    def __init__(self, reason: Rejection, detail: str = "") -> None:
        message = reason.value if not detail else f"{reason.value}: {detail}"
        super().__init__(message)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class X509Svid:
    """A workload's own SVID: its chain (leaf first, then intermediates) and private key."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    key: ec.EllipticCurvePrivateKey

    @property
    def leaf(self) -> x509.Certificate:
        """The SVID certificate itself."""
        return self.chain[0]

    @property
    def serial(self) -> int:
        """The leaf's serial number (identifies this SVID in caches)."""
        return self.leaf.serial_number

    @property
    def not_after(self) -> datetime:
        """When the leaf expires."""
        return self.leaf.not_valid_after_utc

    @property
    def renew_at(self) -> datetime:
        """Two thirds into the leaf's lifetime: when to ask for a new one."""
        start = self.leaf.not_valid_before_utc
        return start + (self.not_after - start) * 2 / 3

    def chain_pem(self) -> bytes:
        """Leaf then intermediates, PEM."""
        return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in self.chain)

    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM (write it 0600)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def spiffe_id_of(leaf: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID a leaf claims (its one URI SAN), before any trust decision."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise SvidError(Rejection.NO_URI_SAN) from None
    except ValueError as error:
        raise SvidError(Rejection.MALFORMED, str(error)) from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise SvidError(Rejection.NO_URI_SAN)
    if len(uris) > 1:
        raise SvidError(Rejection.MANY_URI_SANS, ", ".join(uris))
    uri = uris[0]
    if not uri.startswith(SCHEME_PREFIX):
        raise SvidError(Rejection.NOT_SPIFFE_SCHEME, uri)
    try:
        spiffe_id = SpiffeId.parse(uri)
    except SpiffeIdError as error:
        raise SvidError(Rejection.INVALID_SPIFFE_ID, error.reason) from None
    if not spiffe_id.path:
        raise SvidError(Rejection.NO_PATH, uri)
    return spiffe_id


def validate_svid(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    bundles: TrustBundleSet,
    now: datetime,
    purpose: Purpose,
) -> SpiffeId:
    """Return the peer's SPIFFE ID if ``leaf`` is a valid X.509-SVID for ``purpose``.

    ``intermediates`` are what the peer sent beside its leaf; the claimed domain's published
    intermediates are added. Only the claimed domain's roots anchor the chain.
    """
    spiffe_id = spiffe_id_of(leaf)
    _check_leaf_extensions(leaf, purpose)
    if now < leaf.not_valid_before_utc:
        raise SvidError(Rejection.NOT_YET_VALID, f"valid from {leaf.not_valid_before_utc}")
    if now > leaf.not_valid_after_utc:
        raise SvidError(Rejection.EXPIRED, f"expired at {leaf.not_valid_after_utc}")
    domain = spiffe_id.trust_domain
    bundle = bundles.get(domain)
    if bundle is None:
        raise SvidError(Rejection.UNKNOWN_TRUST_DOMAIN, domain.name)
    if bundle.revoked:
        raise SvidError(Rejection.REVOKED_TRUST_DOMAIN, domain.name)
    candidates = [*intermediates, *bundle.intermediates]
    try:
        _verify_chain(leaf, candidates, bundle.roots, now)
    except VerificationError as error:
        raise _diagnose(leaf, candidates, bundles, domain, now, str(error)) from None
    return spiffe_id


def _check_leaf_extensions(leaf: x509.Certificate, purpose: Purpose) -> None:
    try:
        extensions = leaf.extensions
    except ValueError as error:
        raise SvidError(Rejection.MALFORMED, str(error)) from None
    try:
        if extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise SvidError(Rejection.LEAF_IS_CA)
    except x509.ExtensionNotFound:
        pass  # absent basicConstraints means cA=false
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise SvidError(Rejection.NO_DIGITAL_SIGNATURE, "no keyUsage extension") from None
    if usage.key_cert_sign or usage.crl_sign:
        raise SvidError(Rejection.LEAF_SIGNS_CERTIFICATES)
    if not usage.digital_signature:
        raise SvidError(Rejection.NO_DIGITAL_SIGNATURE)
    wanted, missing = (
        (ExtendedKeyUsageOID.CLIENT_AUTH, Rejection.NO_CLIENT_AUTH)
        if purpose is Purpose.CLIENT
        else (ExtendedKeyUsageOID.SERVER_AUTH, Rejection.NO_SERVER_AUTH)
    )
    try:
        ekus = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise SvidError(missing, "no extendedKeyUsage extension") from None
    if wanted not in ekus:
        raise SvidError(missing)


def _verify_chain(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: datetime,
) -> None:
    # The leaf's own rules were checked above with SPIFFE reasons; the EE policy is opened up
    # so one verifier serves both purposes (the client verifier would insist on clientAuth).
    # CA certificates keep the Web PKI profile: critical cA, keyCertSign, key identifiers.
    verifier = (
        PolicyBuilder()
        .store(Store(list(roots)))
        .time(now)
        .max_chain_depth(4)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all()
        )
        .build_client_verifier()
    )
    verifier.verify(leaf, intermediates)


def _diagnose(
    leaf: x509.Certificate,
    candidates: list[x509.Certificate],
    bundles: TrustBundleSet,
    domain: TrustDomain,
    now: datetime,
    detail: str,
) -> SvidError:
    # The verifier only says "no chain"; name the likely cause so operators can act on it.
    if leaf.issuer == leaf.subject and _signed_by(leaf, leaf):
        return SvidError(Rejection.SELF_SIGNED)
    for other, bundle in bundles.items():
        if other == domain or not bundle.roots:
            continue
        try:
            _verify_chain(leaf, [*candidates, *bundle.intermediates], bundle.roots, now)
        except VerificationError:
            continue
        return SvidError(Rejection.FOREIGN_ROOT, f"claims {domain.name}, chains to {other.name}")
    for issuer in (*candidates, *bundles[domain].roots):
        if _names_issuer(leaf, issuer) and _signed_by(leaf, issuer) is False:
            return SvidError(Rejection.BAD_SIGNATURE, f"issuer {issuer.subject.rfc4514_string()}")
    return SvidError(Rejection.UNTRUSTED_CHAIN, detail)


def _names_issuer(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``cert`` names ``issuer`` by subject and, where both carry them, key id."""
    if cert.issuer != issuer.subject:
        return False
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except (x509.ExtensionNotFound, ValueError):
        return True
    return aki.key_identifier is None or aki.key_identifier == ski.digest


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool | None:
    """True/False if the signature does/does not verify; None if it cannot be checked."""
    try:
        cert.verify_directly_issued_by(issuer)
    except InvalidSignature:
        return False
    except (ValueError, TypeError):
        return None
    return True
