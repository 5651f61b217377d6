"""The inbound listener: mTLS from peers, their SPIFFE ID checked, policy enforced, to the app.

Each accepted TCP connection runs its TLS handshake first (proxy/tls/engine.py, with the
server context in force at that moment, which loads every federated root and allows no
resumption), so that a failed handshake is counted with a reason (``plaintext``,
``untrusted-chain``, ``expired``, …, ``handshake-timeout``). Then `PeerCheck` accepts the
client only if the chain OpenSSL verified ends at a root of the trust domain its leaf claims
(a chain to another federated root is ``foreign-root``) and the leaf keeps the SPIFFE rules;
a refused peer is closed and counted. No task runs per connection, except for TCP pipes.

Trust can be withdrawn while a connection is open (``peering delete`` removes the peer's
bundle; an empty bundle revokes the whole domain). Every verified connection is held in a
registry by its caller's trust domain, and `Inbound.withdraw` aborts those of domains the new
bundle set no longer trusts, counted as ``trust-withdrawn``; a request in flight on one fails.

ALPN says what the connection carries. ``http/1.1``: the HTTP path of proxy/http takes it,
with a `RequestGate` per connection that authorizes each request (SPIFFE ID, port, method,
normalised path; `proxy.authz.core`) and answers 403 with the reason, and that replaces any
``x-snapbright-peer-id`` the caller sent by the verified one. ``snapbright-tcp``: opaque
bytes (gRPC) piped to the app, once the caller is authorized for method ``CONNECT`` on path
``/`` (a rule without method and path restrictions).

The port that rules name is the app's port (the service's port).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final

from proxy.authz.core import authorize
from proxy.http.core import RequestGate, RoundRobinRoute, Route, StaticEndpoint
from proxy.http.model import Limits, Timeouts
from proxy.http.server import OutboundServer, serve_outbound
from proxy.identity.bundle import TrustBundleSet
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.identity.svid import Purpose, SvidError
from proxy.policy.model import AuthorizationPolicy
from proxy.sidecar.peers import PeerConnections, trusts
from proxy.sidecar.pipe import PipeEnd, join
from proxy.sidecar.tls import ALPN_TCP, TlsHolder
from proxy.tls.engine import TlsAcceptor, TlsContext, TlsTransport, server_factory
from proxy.tls.peer import PeerCheck

__all__ = ["PEER_ID_HEADER", "Inbound"]

PEER_ID_HEADER: Final = b"x-snapbright-peer-id"


def _svid_reason(error: SvidError) -> str:
    return error.reason.name.lower().replace("_", "-")


class _AppRouter:
    """The inbound router: every request goes to the local app."""

    __slots__ = ("_route",)

    def __init__(self, host: str, port: int) -> None:
        self._route = RoundRobinRoute([StaticEndpoint(host, port)])

    def route(self, authority: bytes) -> Route | None:
        return self._route


class _Policies:
    """The authorization inputs in force; replaced whole on each config update."""

    __slots__ = ("local", "policies")

    def __init__(self, local: TrustDomain, policies: tuple[AuthorizationPolicy, ...]) -> None:
        self.local = local
        self.policies = policies


class _PeerGate:
    """One connection's verified peer: its header, and the authorization of each request."""

    __slots__ = ("_header", "_inbound", "_peer", "_policies", "_verdicts")

    _VERDICTS_MAX = 64

    def __init__(self, inbound: Inbound, peer: SpiffeId) -> None:
        self._inbound = inbound
        self._peer = peer
        self._header = (PEER_ID_HEADER, str(peer).encode("ascii"))
        # Verdicts of this peer's recent (method, path) pairs under the policies in force:
        # keep-alive callers repeat them, and a policy update starts afresh.
        self._policies: _Policies | None = None
        self._verdicts: dict[tuple[bytes, bytes], str | None] = {}

    def headers(self, hdr: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        kept = [field for field in hdr if field[0].lower() != PEER_ID_HEADER]
        kept.append(self._header)
        return kept

    def admit(self, method: bytes, path: bytes) -> str | None:
        inbound = self._inbound
        policies = inbound.policies
        verdicts = self._verdicts
        if policies is not self._policies:
            self._policies = policies
            verdicts.clear()
        key = (method, path)
        try:
            refusal = verdicts[key]
        except KeyError:
            refusal = self._decide(policies, method, path)
            if len(verdicts) >= self._VERDICTS_MAX:
                verdicts.clear()
            verdicts[key] = refusal
        if refusal is not None:
            inbound.reject("forbidden")
        return refusal

    def _decide(self, policies: _Policies, method: bytes, path: bytes) -> str | None:
        verdict = authorize(
            policies.policies,
            self._peer,
            policies.local,
            self._inbound.app_port,
            method.decode("latin-1"),
            path.decode("latin-1"),
        )
        return None if verdict.allowed else f"forbidden: {verdict.reason}"


class Inbound:
    """The inbound listener of one sidecar."""

    def __init__(
        self,
        tls: TlsHolder,
        app: tuple[str, int],
        local: TrustDomain,
        *,
        on_reject: Callable[[str], None] | None = None,
        handshake_timeout: float = 5.0,
    ) -> None:
        self.tls = tls
        self.app_host, self.app_port = app
        self.policies = _Policies(local, ())
        self.handshake_timeout = handshake_timeout
        self.verified: dict[Any, SpiffeId] = {}
        self.pipes: set[PipeEnd] = set()
        self.peers = PeerConnections()
        self.peer_check = PeerCheck()
        self._on_reject = on_reject
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: OutboundServer | None = None
        self._closing = False
        self._acceptor: TlsAcceptor | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        assert self._server is not None
        return self._server.port

    def set_policies(self, local: TrustDomain, policies: tuple[AuthorizationPolicy, ...]) -> None:
        """The AuthorizationPolicies of this workload's service, swapped in at once."""
        self.policies = _Policies(local, policies)

    def withdraw(self, bundles: TrustBundleSet) -> int:
        """Close at once every connection from a domain ``bundles`` no longer trusts (absent
        or revoked), each counted as ``trust-withdrawn``; how many were closed.

        Call it after the `TlsHolder` has the new bundles, so no new connection of that
        domain gets through the handshake either.
        """
        closed = self.peers.withdraw(bundles)
        for _ in range(closed):
            self.reject("trust-withdrawn")
        return closed

    def reject(self, reason: str) -> None:
        """Count one refused connection or request."""
        if self._on_reject is not None:
            self._on_reject(reason)

    def _server_context(self) -> TlsContext:
        return self.tls.current.server

    def _accepted(
        self, http: Callable[[], asyncio.Protocol], transport: TlsTransport
    ) -> asyncio.BaseProtocol | None:
        """After a handshake: who the caller is, and which protocol serves it (None: refuse)."""
        if self._closing:
            return None  # a handshake that outlived the listener
        try:
            peer = self.peer_check.verify(
                transport.peer_chain(),
                transport.context.bundles,
                datetime.now(UTC),
                Purpose.CLIENT,
            )
        except SvidError as error:
            self.reject(_svid_reason(error))
            return None
        if not trusts(self.tls.current.bundles, peer.trust_domain):
            # Trust was withdrawn while this handshake ran with the contexts of before.
            self.reject("trust-withdrawn")
            return None
        if transport.alpn == ALPN_TCP:
            return self._pipe(transport, peer)
        self.peers.add(peer.trust_domain, transport)
        # The HTTP protocol's gate takes it in connection_made, which follows at once.
        self.verified[transport] = peer
        return http()

    def _pipe(self, transport: TlsTransport, peer: SpiffeId) -> PipeEnd | None:
        policies = self.policies
        verdict = authorize(policies.policies, peer, policies.local, self.app_port, "CONNECT", "/")
        if not verdict.allowed:
            self.reject("forbidden")
            return None
        caller = PipeEnd()
        task = asyncio.get_running_loop().create_task(self._join_app(caller, transport, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return caller

    async def _join_app(self, caller: PipeEnd, transport: TlsTransport, peer: SpiffeId) -> None:
        """Connect to the app and pipe; the caller's bytes wait in ``caller`` meanwhile."""
        loop = asyncio.get_running_loop()
        try:
            _, app = await loop.create_connection(PipeEnd, self.app_host, self.app_port)
        except OSError:
            transport.abort()
            return
        join(caller, app)
        self.pipes.add(caller)
        self.peers.add(peer.trust_domain, transport)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({caller.closed, app.closed})
        self.peers.discard(peer.trust_domain, transport)
        self.pipes.discard(caller)
        caller.close()
        app.close()

    def _gate(self, transport: asyncio.BaseTransport) -> RequestGate | None:
        peer = self.verified.pop(transport, None)
        return None if peer is None else _PeerGate(self, peer)

    async def serve(
        self,
        host: str,
        port: int,
        *,
        limits: Limits | None = None,
        timeouts: Timeouts | None = None,
    ) -> None:
        """Listen on ``host:port``."""
        self._server = await serve_outbound(
            host,
            port,
            _AppRouter(self.app_host, self.app_port),
            limits=limits,
            timeouts=timeouts,
            gates=self._gate,
            wrap_protocol=self._acceptor_for,
        )

    def _acceptor_for(self, http: Callable[[], asyncio.Protocol]) -> TlsAcceptor:
        # Kept, so that closing can drop the connections still in their handshake.
        self._acceptor = server_factory(
            self._server_context, partial(self._accepted, http), self.reject, self.handshake_timeout
        )
        return self._acceptor

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop accepting, let requests finish for up to ``grace`` seconds, close the rest."""
        self._closing = True
        if self._acceptor is not None:
            self._acceptor.abort_handshakes()
        for task in list(self._tasks):
            task.cancel()
        for pipe in list(self.pipes):
            pipe.close()
        if self._server is not None:
            await self._server.aclose(grace)
