"""The inbound listener: mTLS from peers, their SPIFFE ID checked, policy enforced, to the app.

Each accepted TCP connection runs its TLS handshake first (`loop.start_tls` with the server
context in force at that moment, which loads every federated root and issues no session
tickets), so that a failed handshake is counted with a reason (``plaintext``,
``untrusted-chain``, ``expired``, …). Then `verify_peer` re-verifies the client's leaf
against the roots of the trust domain it claims ONLY (a chain to another federated root is
``foreign-root``); a refused peer is closed and counted.

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
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

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
from proxy.tls.context import verify_peer

__all__ = ["PEER_ID_HEADER", "Inbound", "handshake_failure_reason"]

PEER_ID_HEADER = b"x-snapbright-peer-id"


def handshake_failure_reason(error: BaseException) -> str:
    """A short label for why a TLS handshake failed (the rejected-connections metric)."""
    if isinstance(error, TimeoutError):
        return "handshake-timeout"
    if isinstance(error, ssl.SSLCertVerificationError):
        # X509_V_ERR_CERT_HAS_EXPIRED / X509_V_ERR_CERT_NOT_YET_VALID.
        if error.verify_code == 10:
            return "expired"
        if error.verify_code == 9:
            return "not-yet-valid"
        # X509_V_ERR_INVALID_PURPOSE: no clientAuth EKU, or no digitalSignature usage.
        if error.verify_code == 26:
            return "invalid-purpose"
        return "untrusted-chain"
    if isinstance(error, ssl.SSLError):
        reason = (error.reason or "").upper()
        if reason in (
            "HTTP_REQUEST",
            "WRONG_VERSION_NUMBER",
            "UNSUPPORTED_PROTOCOL",
            "HTTPS_PROXY_REQUEST",
        ):
            return "plaintext"
        if "CERTIFICATE_VERIFY_FAILED" in reason or "UNKNOWN_CA" in reason:
            return "untrusted-chain"
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
            return "no-certificate"
        return "handshake-failed"
    return "handshake-failed"


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


class _TlsAccept(asyncio.Protocol):
    """Runs the TLS handshake and the peer check, then hands the connection on.

    Bytes of the ClientHello may be read before ``start_tls`` has put its TLS protocol on
    the transport (uvloop reads at once, and ``pause_reading`` in ``connection_made`` does
    not stop a read already made): they are held and fed to the TLS protocol once it is
    connected, before reading resumes.
    """

    def __init__(self, inbound: Inbound, http: Callable[[], asyncio.Protocol]) -> None:
        self._inbound = inbound
        self._http = http
        self._raw: list[bytes] | None = []
        self._raw_transport: asyncio.Transport | None = None
        self._early: list[bytes] = []
        self._eof = False
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = cast(asyncio.Transport, transport)
        self._raw_transport = raw
        raw.pause_reading()
        self._inbound.start_handshake(self._accept(raw))
        # The task's first step (start_tls swapping the protocol) runs in this loop turn and
        # schedules the TLS protocol's connection_made and resume_reading; this runs after.
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, self._feed_raw)

    def _feed_raw(self) -> None:
        held, self._raw = self._raw, None
        raw = self._raw_transport
        if not held or raw is None or raw.is_closing():
            return
        protocol: Any = raw.get_protocol()
        # uvloop's TLS protocol is buffered without subclassing asyncio.BufferedProtocol.
        buffered = hasattr(protocol, "get_buffer")
        for data in held:
            if buffered:
                view = memoryview(data)
                while view:
                    buffer = memoryview(protocol.get_buffer(len(view)))
                    size = min(len(buffer), len(view))
                    buffer[:size] = view[:size]
                    protocol.buffer_updated(size)
                    view = view[size:]
            else:
                protocol.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self._raw is not None:
            # Still the raw transport's protocol: TLS records for the handshake.
            self._raw.append(data)
        else:
            # Decrypted bytes that came between the handshake and the hand-over.
            self._early.append(data)

    def eof_received(self) -> bool | None:
        self._eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True

    async def _accept(self, raw: asyncio.Transport) -> None:
        inbound = self._inbound
        loop = asyncio.get_running_loop()
        tls = inbound.tls.current
        try:
            transport = await loop.start_tls(
                raw,
                self,
                tls.server,
                server_side=True,
                ssl_handshake_timeout=inbound.handshake_timeout,
            )
        except (OSError, TimeoutError) as error:
            inbound.reject(handshake_failure_reason(error))
            raw.abort()
            return
        if transport is None:
            raw.abort()
            return
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            peer = verify_peer(ssl_object, tls.bundles, datetime.now(UTC), Purpose.CLIENT)
        except SvidError as error:
            inbound.reject(_svid_reason(error))
            transport.abort()
            return
        if self._lost:
            return
        if not trusts(inbound.tls.current.bundles, peer.trust_domain):
            # Trust was withdrawn while this handshake ran with the contexts of before.
            inbound.reject("trust-withdrawn")
            transport.abort()
            return
        if ssl_object.selected_alpn_protocol() == ALPN_TCP:
            await self._pipe(transport, peer)
            return
        inbound.peers.add(peer.trust_domain, transport)
        inbound.verified[transport] = peer
        protocol = self._http()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        inbound.verified.pop(transport, None)
        for data in self._early:
            protocol.data_received(data)
        self._early.clear()
        if self._eof and not protocol.eof_received():
            transport.close()

    async def _pipe(self, transport: asyncio.Transport, peer: SpiffeId) -> None:
        inbound = self._inbound
        policies = inbound.policies
        verdict = authorize(
            policies.policies, peer, policies.local, inbound.app_port, "CONNECT", "/"
        )
        if not verdict.allowed:
            inbound.reject("forbidden")
            transport.abort()
            return
        caller = PipeEnd()
        transport.set_protocol(caller)
        caller.connection_made(transport)
        for data in self._early:
            caller.data_received(data)
        self._early.clear()
        loop = asyncio.get_running_loop()
        try:
            _, app = await loop.create_connection(PipeEnd, inbound.app_host, inbound.app_port)
        except OSError:
            transport.abort()
            return
        join(caller, app)
        if self._eof:
            caller.eof_received()
        inbound.pipes.add(caller)
        inbound.peers.add(peer.trust_domain, transport)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({caller.closed, app.closed})
        inbound.peers.discard(peer.trust_domain, transport)
        inbound.pipes.discard(caller)
        caller.close()
        app.close()


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
        self._on_reject = on_reject
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: OutboundServer | None = None

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

    def start_handshake(self, coro: Any) -> None:
        """Run one connection's handshake as a task (tracked, so shutdown can cancel it)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _gate(self, transport: asyncio.BaseTransport) -> RequestGate | None:
        peer = self.verified.get(transport)
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
            wrap_protocol=lambda http: lambda: _TlsAccept(self, http),
        )

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop accepting, let requests finish for up to ``grace`` seconds, close the rest."""
        for task in list(self._tasks):
            task.cancel()
        for pipe in list(self.pipes):
            pipe.close()
        if self._server is not None:
            await self._server.aclose(grace)
