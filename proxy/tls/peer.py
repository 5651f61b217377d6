"""The peer's SPIFFE ID from the chain OpenSSL verified, checked once per leaf.

The handshake (proxy/tls/engine.py) already verified the peer's chain with OpenSSL against
the roots its context trusts. On a server that is every federated root, so one rule is left
for our code, the mesh's key rule: the chain must end at a root of the trust domain the
leaf's URI SAN claims. :class:`PeerCheck` takes the chain OpenSSL verified (DER, leaf first,
trust anchor last) and accepts it only if the anchor is byte for byte a root of the claimed
domain (a leaf claiming B that chains to A's root is ``FOREIGN_ROOT``), and if the leaf
passes the SPIFFE rules of :func:`proxy.identity.svid.validate_svid`.

The verdict is cached per (leaf, anchor, bundle set version, purpose): a peer's repeated
connections cost one dict lookup, plus the check of the leaf's validity period against
``now``, which is made every time. A cache miss runs :func:`validate_svid` itself, so the
rules (and the rejection reasons) are the ones the rest of the mesh applies; it also checks
the chain a second time, with cryptography's verifier, once per leaf. Any change of trust
changes the bundle set version, so revoked or withdrawn domains are re-judged at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.identity.bundle import TrustBundleSet
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.identity.svid import Purpose, Rejection, SvidError, validate_svid

__all__ = ["PeerCheck"]

_Key = tuple[bytes, bytes, str, Purpose]
_Verdict = tuple[SpiffeId, datetime, datetime]


class PeerCheck:
    """Judges peers from their OpenSSL-verified chains, remembering accepted leaves."""

    __slots__ = ("_max", "_roots", "_verdicts")

    _ROOT_SETS_MAX = 8

    def __init__(self, max_entries: int = 4096) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max = max_entries
        self._verdicts: dict[_Key, _Verdict] = {}
        self._roots: dict[str, dict[bytes, frozenset[TrustDomain]]] = {}

    def __len__(self) -> int:
        return len(self._verdicts)

    def verify(
        self,
        chain: Sequence[bytes],
        bundles: TrustBundleSet,
        now: datetime,
        purpose: Purpose,
        expect: SpiffeId | TrustDomain | None = None,
    ) -> SpiffeId:
        """The peer's SPIFFE ID, or :class:`SvidError` (then close the connection).

        ``chain`` is what OpenSSL verified, leaf first and trust anchor last; ``bundles`` the
        set the handshake's context was built from; ``purpose`` the peer's role (``CLIENT``
        on a server); ``expect`` pins the peer to one ID or one trust domain.
        """
        if not chain:
            raise SvidError(Rejection.MALFORMED, "the peer presented no verified chain")
        key = (chain[0], chain[-1], bundles.version, purpose)
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._judge(chain, bundles, now, purpose)
            verdicts = self._verdicts
            if len(verdicts) >= self._max:
                del verdicts[next(iter(verdicts))]
            verdicts[key] = verdict
        spiffe_id, not_before, not_after = verdict
        if now < not_before:
            raise SvidError(Rejection.NOT_YET_VALID, f"valid from {not_before}")
        if now > not_after:
            raise SvidError(Rejection.EXPIRED, f"expired at {not_after}")
        if expect is not None:
            if isinstance(expect, SpiffeId):
                if spiffe_id != expect:
                    raise SvidError(Rejection.UNEXPECTED_ID, f"got {spiffe_id}, want {expect}")
            elif spiffe_id.trust_domain != expect:
                raise SvidError(
                    Rejection.UNEXPECTED_ID, f"got {spiffe_id}, want trust domain {expect}"
                )
        return spiffe_id

    def _judge(
        self, chain: Sequence[bytes], bundles: TrustBundleSet, now: datetime, purpose: Purpose
    ) -> _Verdict:
        try:
            leaf = x509.load_der_x509_certificate(chain[0])
            intermediates = [x509.load_der_x509_certificate(der) for der in chain[1:-1]]
        except ValueError as error:
            raise SvidError(Rejection.MALFORMED, str(error)) from None
        spiffe_id = validate_svid(leaf, intermediates, bundles, now, purpose)
        # The path OpenSSL took must end at the claimed domain's root too, not merely at
        # some federated root that also happens to vouch for the leaf.
        owners = self._owners(bundles).get(chain[-1], frozenset())
        if spiffe_id.trust_domain not in owners:
            if owners:
                names = ", ".join(sorted(d.name for d in owners))
                raise SvidError(Rejection.FOREIGN_ROOT, f"the handshake's anchor is {names}'s")
            raise SvidError(Rejection.UNTRUSTED_CHAIN, "the handshake's anchor is no known root")
        return spiffe_id, leaf.not_valid_before_utc, leaf.not_valid_after_utc

    def _owners(self, bundles: TrustBundleSet) -> dict[bytes, frozenset[TrustDomain]]:
        """Root DER -> the trust domains publishing it, per bundle set version."""
        owners = self._roots.get(bundles.version)
        if owners is None:
            found: dict[bytes, set[TrustDomain]] = {}
            for domain, bundle in bundles.items():
                for root in bundle.roots:
                    der = root.public_bytes(serialization.Encoding.DER)
                    found.setdefault(der, set()).add(domain)
            owners = {der: frozenset(domains) for der, domains in found.items()}
            if len(self._roots) >= self._ROOT_SETS_MAX:
                self._roots.clear()
            self._roots[bundles.version] = owners
        return owners
