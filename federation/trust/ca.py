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

Rotation keeps every peer able to verify every leaf, in three steps:

1. :meth:`ClusterCA.rotate` *stages* a new authority: its root joins the bundle (the sequence
   goes up, so it is published to proxies and peers), but it signs nothing yet. The old
   authority keeps signing, and is scheduled to leave the bundle at ``now + overlap``; leaves
   it signs from now on never outlive that date (they are capped at it).
2. :meth:`ClusterCA.advance` switches: the staged authority signs from then on, once the caller
   says every peer has acknowledged a bundle that carries it (``bundle_acked``), or, when no
   acknowledgement comes (a peer is down, or no control plane runs), by itself at the
   rotation's switch deadline (half the overlap by default, so leaves re-issued under the new
   root have the other half to spread before the old root leaves). The old authority's keys
   are dropped then: it never signs again.
3. ``advance`` (or :meth:`ClusterCA.prune`) drops the old root at its retirement date: by then
   the last leaf it signed since the rotation has expired. Leaves it signed before the
   rotation are re-issued by the control plane when the new root takes over; the default
   overlap (72 h) is longer than the default leaf lifetime (24 h), so even a leaf that is never
   re-issued expires before its root leaves.

Both roots are in the bundle from step 1 to step 3. Each change of the bundle increments its
sequence (the switch does not change the bundle).
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

    Keys are ``None`` once the authority is retired: it never signs again. ``retire_at`` is
    when it leaves the bundle (``None``: not scheduled). ``switch_by`` is set while it is
    *staged* by a rotation: in the bundle, not signing yet, and taking over at the latest then.
    """

    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey | None
    intermediate: x509.Certificate | None = None
    intermediate_key: ec.EllipticCurvePrivateKey | None = None
    retire_at: datetime | None = None
    switch_by: datetime | None = None

    @property
    def staged(self) -> bool:
        """True while a rotation has added this authority but it does not sign yet."""
        return self.switch_by is not None

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
        """The authority that signs new SVIDs (never a staged one)."""
        return next(a for a in reversed(self.authorities) if not a.staged)

    @property
    def staged(self) -> Authority | None:
        """The authority a rotation in progress has added, until it takes over."""
        last = self.authorities[-1]
        return last if last.staged else None

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
        if authority.retire_at is not None:
            # A rotation is under way: no leaf of the old root may outlive the old root.
            not_after = min(not_after, authority.retire_at)
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
        switch_within: timedelta | None = None,
    ) -> ClusterCA:
        """Stage a new authority (see the module docstring): its root joins the bundle now,
        it signs once peers have acknowledged it (:meth:`advance`) or at ``now +
        switch_within`` (default: half the overlap), and the old roots leave the bundle at
        ``now + overlap`` (one already retiring keeps its earlier date)."""
        if overlap < timedelta(0):
            raise CaError("the rotation overlap must not be negative")
        switch_within = overlap / 2 if switch_within is None else switch_within
        if not timedelta(0) <= switch_within <= overlap:
            raise CaError("the new root must take over within the overlap, not after it")
        staged = self.staged
        if staged is not None:
            raise CaError(
                f"a rotation is in progress: root {staged.name} takes over once peers hold it,"
                f" at the latest at {staged.switch_by.isoformat() if staged.switch_by else '?'}"
            )
        retiring = tuple(
            replace(a, retire_at=a.retire_at if a.retire_at is not None else now + overlap)
            for a in self.authorities
        )
        fresh = replace(
            _new_authority(
                self.trust_domain, now, root_ttl, intermediate=self.active.intermediate is not None
            ),
            switch_by=now + switch_within,
        )
        return replace(self, authorities=(*retiring, fresh), sequence=self.sequence + 1)

    def advance(self, now: datetime, *, bundle_acked: bool = False) -> ClusterCA:
        """The CA at ``now``: a staged authority takes over if ``bundle_acked`` (every peer,
        and every local proxy, holds a bundle of this CA at :attr:`sequence` or later) or its
        switch deadline has passed; then authorities whose retirement date has come are
        dropped. Returns ``self`` when nothing changes."""
        ca = self
        staged = ca.staged
        if staged is not None and (bundle_acked or (staged.switch_by and now >= staged.switch_by)):
            ca = ca._switch(staged)
        kept = tuple(
            a
            for a in ca.authorities
            if a.staged or a.root_key is not None or a.retire_at is None or now < a.retire_at
        )
        if len(kept) != len(ca.authorities):
            ca = replace(ca, authorities=kept, sequence=ca.sequence + 1)
        return ca

    def prune(self, now: datetime) -> ClusterCA:
        """:meth:`advance` with no acknowledgement: a staged authority takes over only at its
        deadline, and retired roots are dropped (returns ``self`` if nothing changes)."""
        return self.advance(now)

    def _switch(self, staged: Authority) -> ClusterCA:
        # The old authorities never sign again; their retirement dates stand, and each is
        # after the last leaf they signed since the rotation (sign_svid caps them).
        authorities = tuple(
            replace(a, switch_by=None)
            if a is staged
            else replace(a, root_key=None, intermediate_key=None)
            for a in self.authorities
        )
        return replace(self, authorities=authorities)


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
