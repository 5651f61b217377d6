"""The cluster CA: an ECDSA P-256 root per cluster (optionally an intermediate) that issues
X.509-SVIDs, and rotates roots with an overlap.

Everything here is a value computed from arguments: ``now`` is passed in, nothing reads a
clock, nothing touches disk (:mod:`federation.trust.store` persists a :class:`ClusterCA`).

Certificates follow the SPIFFE X509-SVID spec:

- a root's subject names the trust domain and its only URI SAN is ``spiffe://<td>``;
  basicConstraints cA=true (critical), keyUsage keyCertSign+cRLSign (critical), SKI and AKI;
- an intermediate is the same with pathLen 0, signed by the root;
- a leaf has exactly one URI SAN (the workload's SPIFFE ID), cA=false (critical),
  keyUsage digitalSignature only (critical), EKU serverAuth+clientAuth, SKI and AKI, and it
  never outlives its issuer.

Rotation: :meth:`ClusterCA.rotate` adds a new authority, which signs every SVID from then on,
and keeps the old root in the bundle until ``now + overlap`` so that SVIDs issued under it
stay valid while workloads renew. :meth:`ClusterCA.prune` drops it after that. Each change of
the bundle increments its sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.identity.bundle import TrustBundle
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.identity.svid import X509Svid

DEFAULT_SVID_TTL = timedelta(hours=24)
CLOCK_SKEW_ALLOWANCE = timedelta(seconds=60)
"""How far SVIDs are backdated, for peers whose clocks run behind ours."""
DEFAULT_ROOT_TTL = timedelta(days=365)
DEFAULT_ROTATION_OVERLAP = timedelta(hours=72)
BUNDLE_REFRESH_HINT_SECONDS = 300


class CaError(Exception):
    """The CA cannot do what was asked; the message says why."""


@dataclass(frozen=True, slots=True)
class Authority:
    """One generation of the CA: a root, maybe an intermediate, and when it leaves the bundle.

    Keys are ``None`` once the authority is retired: it never signs again.
    """

    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey | None
    intermediate: x509.Certificate | None = None
    intermediate_key: ec.EllipticCurvePrivateKey | None = None
    retire_at: datetime | None = None

    @property
    def name(self) -> str:
        """A stable short name (the root's serial number in hex)."""
        return f"{self.root.serial_number:x}"


@dataclass(frozen=True, slots=True)
class ClusterCA:
    """A cluster's CA state: its trust domain, authorities (the last signs), bundle sequence."""

    trust_domain: TrustDomain
    authorities: tuple[Authority, ...]
    sequence: int

    @property
    def active(self) -> Authority:
        """The authority that signs new SVIDs."""
        return self.authorities[-1]

    def bundle(self) -> TrustBundle:
        """The domain's trust bundle: every root not yet pruned, plus intermediates."""
        return TrustBundle(
            trust_domain=self.trust_domain,
            roots=tuple(a.root for a in self.authorities),
            intermediates=tuple(a.intermediate for a in self.authorities if a.intermediate),
            sequence=self.sequence,
            refresh_hint_seconds=BUNDLE_REFRESH_HINT_SECONDS,
        )

    def issue(
        self, spiffe_id: SpiffeId, now: datetime, ttl: timedelta = DEFAULT_SVID_TTL
    ) -> X509Svid:
        """Issue an X.509-SVID for ``spiffe_id`` valid from ``now`` for ``ttl`` (capped)."""
        key = ec.generate_private_key(ec.SECP256R1())
        return X509Svid(spiffe_id, self.sign_svid(spiffe_id, key.public_key(), now, ttl), key)

    def sign_svid(
        self,
        spiffe_id: SpiffeId,
        public_key: CertificatePublicKeyTypes,
        now: datetime,
        ttl: timedelta = DEFAULT_SVID_TTL,
        *,
        dns_names: tuple[str, ...] = (),
    ) -> tuple[x509.Certificate, ...]:
        """The chain (leaf first) of an SVID for ``spiffe_id`` over a key the workload keeps.

        This is how a CSR is answered: the caller has checked the CSR's signature and decided
        which identity the requester proved; nothing else in the CSR is trusted. ``dns_names``
        are extra DNS SANs (the SPIFFE spec allows them beside the one URI SAN), for servers
        whose clients check a host name, such as gRPC's.
        """
        if spiffe_id.trust_domain != self.trust_domain:
            raise CaError(f"{spiffe_id} is not in this CA's trust domain {self.trust_domain}")
        if not spiffe_id.path:
            raise CaError(f"{spiffe_id} has no path: an SVID names a workload")
        if ttl <= timedelta(0):
            raise CaError("the SVID lifetime must be positive")
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1 | ec.SECP384R1
        ):
            raise CaError("an SVID key must be ECDSA P-256 or P-384")
        authority = self.active
        issuer, issuer_key = (
            (authority.intermediate, authority.intermediate_key)
            if authority.intermediate is not None
            else (authority.root, authority.root_key)
        )
        if issuer_key is None:
            raise CaError("the active authority has no signing key")
        not_after = min(now + ttl, issuer.not_valid_after_utc, authority.root.not_valid_after_utc)
        if not_after <= now or now < issuer.not_valid_before_utc:
            raise CaError(
                f"the CA is not valid at {now.isoformat()} "
                f"(valid {issuer.not_valid_before_utc.isoformat()} to "
                f"{issuer.not_valid_after_utc.isoformat()}): rotate it"
            )
        san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
        san.extend(x509.DNSName(name) for name in dns_names)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, _o(self))]))
            .issuer_name(issuer.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            # Backdated a little so a peer whose clock runs slightly behind accepts it at once.
            .not_valid_before(max(now - CLOCK_SKEW_ALLOWANCE, issuer.not_valid_before_utc))
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(_aki(issuer), critical=False)
            .sign(issuer_key, hashes.SHA256())
        )
        return (leaf, authority.intermediate) if authority.intermediate else (leaf,)

    def rotate(
        self,
        now: datetime,
        overlap: timedelta = DEFAULT_ROTATION_OVERLAP,
        root_ttl: timedelta = DEFAULT_ROOT_TTL,
    ) -> ClusterCA:
        """Add a new authority that signs from now on; the old roots stay until ``now+overlap``.

        An authority that is already retiring keeps its earlier date.
        """
        if overlap < timedelta(0):
            raise CaError("the rotation overlap must not be negative")
        retiring = tuple(
            replace(
                a,
                root_key=None,
                intermediate_key=None,
                retire_at=a.retire_at if a.retire_at is not None else now + overlap,
            )
            for a in self.authorities
        )
        fresh = _new_authority(
            self.trust_domain, now, root_ttl, intermediate=self.active.intermediate is not None
        )
        return replace(self, authorities=(*retiring, fresh), sequence=self.sequence + 1)

    def prune(self, now: datetime) -> ClusterCA:
        """Drop authorities whose overlap has ended (returns ``self`` if none has)."""
        kept = tuple(a for a in self.authorities if a.retire_at is None or now < a.retire_at)
        if len(kept) == len(self.authorities):
            return self
        return replace(self, authorities=kept, sequence=self.sequence + 1)


def create_ca(
    trust_domain: TrustDomain,
    now: datetime,
    *,
    intermediate: bool = False,
    root_ttl: timedelta = DEFAULT_ROOT_TTL,
) -> ClusterCA:
    """A new CA for ``trust_domain`` with one authority and bundle sequence 1."""
    return ClusterCA(
        trust_domain, (_new_authority(trust_domain, now, root_ttl, intermediate),), sequence=1
    )


def _o(ca: ClusterCA) -> str:
    return ca.trust_domain.name[:64]  # X.520 caps O at 64 characters


def _new_authority(
    trust_domain: TrustDomain, now: datetime, ttl: timedelta, intermediate: bool
) -> Authority:
    if ttl <= timedelta(0):
        raise CaError("the root lifetime must be positive")
    root_key = ec.generate_private_key(ec.SECP256R1())
    serial = x509.random_serial_number()
    root_name = _ca_name(trust_domain, "root", serial)
    root = (
        _ca_builder(trust_domain, root_name, root_name, root_key, serial, now, now + ttl)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    if not intermediate:
        return Authority(root, root_key)
    int_key = ec.generate_private_key(ec.SECP256R1())
    int_serial = x509.random_serial_number()
    int_cert = (
        _ca_builder(
            trust_domain,
            _ca_name(trust_domain, "intermediate", int_serial),
            root_name,
            int_key,
            int_serial,
            now,
            now + ttl,
            path_length=0,
        )
        .add_extension(_aki(root), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    return Authority(root, root_key, int_cert, int_key)


def _ca_name(trust_domain: TrustDomain, role: str, serial: int) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain.name[:64]),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{role} {serial:x}"[:64]),
        ]
    )


def _ca_builder(
    trust_domain: TrustDomain,
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    serial: int,
    not_before: datetime,
    not_after: datetime,
    path_length: int | None = None,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(str(trust_domain.spiffe_id))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
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
