"""The sidecar's SVID and trust bundles as TLS contexts, swapped whole on rotation.

The contexts are the engine's (`proxy.tls.engine.TlsContext`: the OpenSSL inside
``cryptography``, driven over memory BIOs), not the stdlib ``ssl`` module's.

A new SVID or bundle set builds a new `MeshTls`; `TlsHolder.current` is replaced in one
assignment. Listeners and connectors read ``holder.current`` once per NEW connection, so
connections already open keep the context they were made with and are never dropped.

ALPN tells the inbound side what a connection carries: ``http/1.1`` (the outbound HTTP
listener's pooled connections) or ``snapbright-tcp`` (opaque bytes from a TCP port, e.g.
gRPC), since both arrive on the one mTLS port.
"""

from __future__ import annotations

from proxy.identity.bundle import TrustBundleSet
from proxy.identity.model import TrustDomain
from proxy.identity.svid import X509Svid
from proxy.tls.engine import TlsContext

__all__ = ["ALPN_HTTP", "ALPN_TCP", "MeshTls", "TlsHolder"]

ALPN_HTTP = "http/1.1"
ALPN_TCP = "snapbright-tcp"


class MeshTls:
    """Contexts built from one SVID and one bundle set (client ones built on first use)."""

    __slots__ = ("_clients", "bundles", "server", "svid")

    def __init__(self, svid: X509Svid, bundles: TrustBundleSet) -> None:
        self.svid = svid
        self.bundles = bundles
        self.server = TlsContext.server(svid, bundles, (ALPN_HTTP, ALPN_TCP))
        self._clients: dict[tuple[TrustDomain, str], TlsContext | None] = {}

    def client(self, trust_domain: TrustDomain, alpn: str) -> TlsContext | None:
        """A client context trusting only ``trust_domain``'s roots; ``None`` if unknown."""
        key = (trust_domain, alpn)
        try:
            return self._clients[key]
        except KeyError:
            pass
        bundle = self.bundles.get(trust_domain)
        context = None
        if bundle is not None and not bundle.revoked:
            context = TlsContext.client(self.svid, bundle, (alpn,))
        self._clients[key] = context
        return context


class TlsHolder:
    """The `MeshTls` in force; replaced (never mutated) when the SVID or bundles change."""

    __slots__ = ("current",)

    def __init__(self, current: MeshTls) -> None:
        self.current = current

    def update(self, svid: X509Svid, bundles: TrustBundleSet) -> bool:
        """Build new contexts if the SVID or the bundles changed; whether they did."""
        now = self.current
        if now.svid.serial == svid.serial and now.bundles.version == bundles.version:
            return False
        self.current = MeshTls(svid, bundles)
        return True
