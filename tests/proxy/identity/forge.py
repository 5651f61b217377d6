"""Test fixtures: real certificates, honest or hostile, built with cryptography.

Independent of the CA in ``federation.trust`` so data-plane tests can use it too. A
:class:`ForgedDomain` is a trust domain with a root (and key); :func:`forge_leaf` makes a leaf
under it, and every SPIFFE rule can be broken through a keyword argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.identity.bundle import TrustBundle
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.identity.svid import X509Svid

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
BOTH_EKUS = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
_DEFAULT = object()


def key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    """A KeyUsage with only the named bits set."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class ForgedDomain:
    """A trust domain with a self-signed root and, optionally, an intermediate."""

    trust_domain: TrustDomain
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate | None = None
    intermediate_key: ec.EllipticCurvePrivateKey | None = None

    @property
    def issuer(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """The certificate and key that sign leaves."""
        if self.intermediate is not None and self.intermediate_key is not None:
            return self.intermediate, self.intermediate_key
        return self.root, self.root_key

    def bundle(self, sequence: int = 1) -> TrustBundle:
        """This domain's trust bundle."""
        intermediates = (self.intermediate,) if self.intermediate else ()
        return TrustBundle(self.trust_domain, (self.root,), intermediates, sequence, 300)

    def workload(self, name: str = "api") -> SpiffeId:
        """A workload ID in this domain."""
        return SpiffeId.workload(self.trust_domain, "default", name)


def _ca_cert(
    name: str,
    subject_key: ec.EllipticCurvePrivateKey,
    signer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    now: datetime,
    ca: bool = True,
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {'CA' if issuer is None else 'int'}"),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{name}")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            key_usage(key_cert_sign=ca, crl_sign=ca, digital_signature=not ca), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), False
        )
        .sign(signer_key, hashes.SHA256())
    )


def forge_domain(name: str, now: datetime = NOW, *, intermediate: bool = False) -> ForgedDomain:
    """A fresh trust domain ``name`` whose root is valid from a day before ``now``."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert(name, root_key, root_key, None, now)
    if not intermediate:
        return ForgedDomain(TrustDomain(name), root, root_key)
    int_key = ec.generate_private_key(ec.SECP256R1())
    int_cert = _ca_cert(name, int_key, root_key, root.subject, now)
    return ForgedDomain(TrustDomain(name), root, root_key, int_cert, int_key)


def forge_leaf(
    domain: ForgedDomain,
    now: datetime = NOW,
    *,
    uris: Sequence[str] | None = None,
    ca: bool = False,
    usage: x509.KeyUsage | object | None = _DEFAULT,
    ekus: Sequence[x509.ObjectIdentifier] | None = BOTH_EKUS,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    signer_key: ec.EllipticCurvePrivateKey | None = None,
    self_signed: bool = False,
) -> X509Svid:
    """A leaf issued by ``domain`` (honest by default); each keyword breaks one rule.

    ``uris`` replaces the URI SANs (default: one workload ID of ``domain``); ``signer_key``
    signs with another key while still naming ``domain``'s issuer; ``self_signed`` makes the
    leaf its own issuer.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_cert, issuer_key = domain.issuer
    spiffe_uris = [str(domain.workload())] if uris is None else list(uris)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "forged")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if self_signed else issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(minutes=5))
        .not_valid_after(not_after or now + timedelta(hours=24))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if spiffe_uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in spiffe_uris]),
            critical=False,
        )
    chosen_usage = key_usage(digital_signature=True) if usage is _DEFAULT else usage
    if isinstance(chosen_usage, x509.KeyUsage):
        builder = builder.add_extension(chosen_usage, critical=True)
    if ekus is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
    signing_key = key if self_signed else (signer_key or issuer_key)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(
            key.public_key() if self_signed else issuer_key.public_key()
        ),
        critical=False,
    )
    leaf = builder.sign(signing_key, hashes.SHA256())
    spiffe_id = SpiffeId.parse(spiffe_uris[0]) if _parses(spiffe_uris) else domain.workload()
    chain = (leaf, domain.intermediate) if domain.intermediate and not self_signed else (leaf,)
    return X509Svid(spiffe_id, chain, key)


def _parses(uris: Sequence[str]) -> bool:
    try:
        SpiffeId.parse(uris[0])
    except (ValueError, IndexError):
        return False
    return True
