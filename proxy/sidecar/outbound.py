"""Outbound mTLS: connections to a target's endpoints, and the per-upstream TCP ports.

`MeshConnector` is the upstream pool's connector (proxy/http), bounded by the upstream's
TrafficPolicy connect timeout: TLS 1.3 (proxy/tls/engine.py) with the sidecar's SVID, SNI
``<service>.<namespace>.<cluster>.<mesh>`` (so an east-west gateway can route it), a client
context holding only the target's trust domain bundle, and after the handshake, before any
protocol sees the connection, `PeerCheck` expecting that trust domain. A refusal is an
OSError (`PeerRejected`): the forwarder counts it as a connect failure, and `on_reject`
counts the reason (a certificate OpenSSL refused: ``untrusted-chain``, ``expired``, …).
Every connection it opens is held by the target's trust domain: `MeshConnector.withdraw`
aborts those of a domain no longer trusted, and the pool forgets an idle connection once its
transport is lost.

`serve_tcp` listens on 127.0.0.1 for one upstream: each accepted connection picks an
endpoint through the upstream's route (weights, P2C, breaker) and pipes opaque bytes over
the same mTLS (ALPN ``snapbright-tcp``) to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

from proxy.http.core import Overloaded
from proxy.http.model import Failure
from proxy.identity.bundle import TrustBundleSet
from proxy.identity.svid import Purpose, SvidError
from proxy.sidecar.peers import PeerConnections
from proxy.sidecar.pipe import PipeEnd, join
from proxy.sidecar.router import MeshEndpoint, MeshRoute
from proxy.sidecar.tls import ALPN_HTTP, TlsHolder
from proxy.tls.engine import TlsError, TlsTransport, connect
from proxy.tls.peer import PeerCheck

__all__ = ["MeshConnector", "PeerRejected", "TcpServer", "serve_tcp"]


class PeerRejected(ConnectionError):
    """The endpoint's TLS identity was refused; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class MeshConnector:
    """Opens mTLS connections to mesh endpoints (`MeshEndpoint`) for the upstream pool."""

    def __init__(
        self,
        tls: TlsHolder,
        *,
        alpn: str = ALPN_HTTP,
        handshake_timeout: float = 5.0,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self._tls = tls
        self._alpn = alpn
        self._timeout = handshake_timeout
        self._on_reject = on_reject
        self.peers = PeerConnections()
        self.peer_check = PeerCheck()

    def withdraw(self, bundles: TrustBundleSet) -> int:
        """Abort every connection to a domain ``bundles`` no longer trusts (absent or
        revoked), each counted as ``trust-withdrawn``; how many were closed."""
        closed = self.peers.withdraw(bundles)
        if self._on_reject is not None:
            for _ in range(closed):
                self._on_reject("trust-withdrawn")
        return closed

    async def __call__(self, factory: Callable[[], Any], endpoint: Any) -> tuple[Any, Any]:
        """Connect, handshake, verify the server's SVID; raise OSError on any failure."""
        target = cast(MeshEndpoint, endpoint).target
        tls = self._tls.current
        context = tls.client(target.trust_domain, self._alpn)
        if context is None:
            raise self._reject("unknown-trust-domain", f"no bundle for {target.trust_domain}")
        bundles = tls.bundles
        check = self.peer_check

        def verify(transport: TlsTransport) -> None:
            try:
                check.verify(
                    transport.peer_chain(),
                    bundles,
                    datetime.now(UTC),
                    Purpose.SERVER,
                    expect=target.trust_domain,
                )
            except SvidError as error:
                raise self._reject(
                    error.reason.name.lower().replace("_", "-"), str(error)
                ) from None

        try:
            transport, protocol = await connect(
                asyncio.get_running_loop(),
                factory,
                endpoint.host,
                endpoint.port,
                context,
                target.sni,
                min(target.connect_timeout, self._timeout),
                verify=verify,
            )
        except TimeoutError:
            raise ConnectionError("connect or TLS handshake timed out") from None
        except TlsError as error:
            if error.verify_code:
                # OpenSSL refused the server's certificate (a chain to no root of the target's
                # domain, expired, …): counted with that reason.
                raise self._reject(error.reason, str(error)) from None
            raise
        self.peers.add(target.trust_domain, transport)
        return transport, protocol

    def _reject(self, reason: str, detail: str) -> PeerRejected:
        if self._on_reject is not None:
            self._on_reject(reason)
        return PeerRejected(reason, detail)


class _TcpClient(PipeEnd):
    """The app's side of one TCP-port connection."""

    def __init__(self, server: TcpServer) -> None:
        super().__init__()
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Nothing to read until the mTLS side exists; bytes that come early are held.
        self._server.start(self)


class TcpServer:
    """A running TCP port of one upstream."""

    def __init__(self, route: Callable[[], MeshRoute | None], connector: MeshConnector) -> None:
        self._route = route
        self._connector = connector
        self.requested_port = 0
        """The port asked for (0: any)."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ends: set[PipeEnd] = set()

    @property
    def port(self) -> int:
        """The bound port."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def start(self, client: _TcpClient) -> None:
        """A connection was accepted: connect upstream in a task."""
        task = asyncio.get_running_loop().create_task(self._open(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, client: _TcpClient) -> None:
        self._ends.add(client)
        route = self._route()
        now = time.monotonic()
        try:
            endpoint = None if route is None else route.pick(now)
        except Overloaded:
            endpoint = None
        if route is None or endpoint is None:
            client.close()
            self._ends.discard(client)
            return
        attempts = 1
        while True:
            try:
                _, upstream = await self._connector(PipeEnd, endpoint)
                break
            except OSError:
                later = time.monotonic()
                route.on_failure(endpoint, Failure.CONNECT, later - now, later)
                attempts += 1
                retry = route.pick_retry(attempts, later)
                if retry is None:
                    client.close()
                    self._ends.discard(client)
                    return
                endpoint = retry
        latency = time.monotonic() - now
        # The stream is opaque: a connection made counts as the answer (status 200).
        route.on_response(endpoint, 200, latency, now + latency)
        upstream = cast(PipeEnd, upstream)
        self._ends.add(upstream)
        join(client, upstream)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({client.closed, upstream.closed})
        client.close()
        upstream.close()
        self._ends.discard(client)
        self._ends.discard(upstream)

    async def serve(self, host: str, port: int) -> None:
        """Listen on ``host:port``."""
        loop = asyncio.get_running_loop()
        self.requested_port = port
        self._server = await loop.create_server(
            lambda: _TcpClient(self), host, port, reuse_address=True
        )

    async def aclose(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for end in list(self._ends):
            end.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


async def serve_tcp(
    host: str, port: int, route: Callable[[], MeshRoute | None], connector: MeshConnector
) -> TcpServer:
    """Serve one upstream's TCP port; ``route`` returns its current route (or ``None``).

    ``connector`` should offer ALPN ``snapbright-tcp`` so the inbound side pipes the bytes.
    """
    server = TcpServer(route, connector)
    await server.serve(host, port)
    return server
