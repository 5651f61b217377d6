"""Open mTLS connections by their peer's trust domain, so that withdrawn trust closes them.

Both directions hold one: the inbound listener (callers' domains) and the outbound connector
(servers' domains). When the sidecar applies a bundle set that drops a domain or revokes it
(an empty key set), every connection of that domain is aborted at once.
"""

from __future__ import annotations

import asyncio

from proxy.identity.bundle import TrustBundleSet
from proxy.identity.model import TrustDomain

__all__ = ["PeerConnections", "trusts"]


def trusts(bundles: TrustBundleSet, domain: TrustDomain) -> bool:
    """Whether ``bundles`` holds a bundle of ``domain`` that is not revoked."""
    bundle = bundles.get(domain)
    return bundle is not None and not bundle.revoked


class PeerConnections:
    """Open connections by the trust domain of their peer, so withdrawn trust can close them.

    Adding is per connection, never per request. A connection is dropped when its owner says
    it ended (`discard`), or, where the owner (the HTTP path of proxy/http) has no end hook,
    when the domain's set next outgrows its mark and closed transports are swept: amortised
    constant work per connection, and memory bounded by twice the connections open.
    """

    __slots__ = ("_by_domain", "_marks")

    _MARK_MIN = 16

    def __init__(self) -> None:
        self._by_domain: dict[TrustDomain, set[asyncio.Transport]] = {}
        self._marks: dict[TrustDomain, int] = {}

    def add(self, domain: TrustDomain, transport: asyncio.Transport) -> None:
        """Hold ``transport``, whose peer is of ``domain``."""
        held = self._by_domain.get(domain)
        if held is None:
            held = self._by_domain[domain] = set()
        elif len(held) >= self._marks.get(domain, self._MARK_MIN):
            held.difference_update([t for t in held if t.is_closing()])
            self._marks[domain] = max(self._MARK_MIN, 2 * len(held))
        held.add(transport)

    def discard(self, domain: TrustDomain, transport: asyncio.Transport) -> None:
        """Forget ``transport`` (it ended)."""
        held = self._by_domain.get(domain)
        if held is not None:
            held.discard(transport)

    def count(self, domain: TrustDomain) -> int:
        """How many connections of ``domain`` are open."""
        return sum(1 for t in self._by_domain.get(domain, ()) if not t.is_closing())

    def withdraw(self, bundles: TrustBundleSet) -> int:
        """Abort every open connection of a domain ``bundles`` does not trust (absent or
        revoked); how many were open."""
        closed = 0
        for domain in [d for d in self._by_domain if not trusts(bundles, d)]:
            held = self._by_domain.pop(domain)
            self._marks.pop(domain, None)
            for transport in held:
                if not transport.is_closing():
                    closed += 1
                transport.abort()
        return closed
