"""The gateway listener: accept, peek the ClientHello, route by SNI, connect, pass bytes.

Per connection, a short setup task reads the client's first bytes (the socket is
non-blocking; the bytes are kept, not consumed from the stream's point of view: they are the
first thing sent upstream, which for a gateway that never terminates TLS is the same as
``MSG_PEEK`` and simpler), asks :func:`~gateway.sni.core.parse_client_hello` for a verdict,
resolves the name in the :class:`~gateway.route.core.RoutingTable`, connects to the chosen
upstream, replays the bytes and hands both sockets to a :mod:`gateway.forward` link.

The whole peek is bounded by ``peekTimeout`` (not reset by new bytes, so a client that
trickles a hello byte by byte is closed like one that sends nothing). A periodic sweep closes
links idle for ``idleTimeout`` and moves byte counts into the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import random
import socket

from gateway.config.model import GatewayConfig
from gateway.forward import SPLICE_AVAILABLE, Link, RelayLink, SpliceLink
from gateway.metrics import GatewayMetrics
from gateway.route.core import Balancer, RoutingTable
from gateway.route.model import ProbeTarget, Refusal, ServiceTarget, Upstream
from gateway.sni.core import ClientHello, NeedMore, Rejection, parse_client_hello

_ACCEPTS_PER_WAKEUP = 64
_RECV_SIZE = 65536
_BACKLOG = 1024
_ACCEPT_PAUSE = 0.1  # after EMFILE/ENFILE, so a full fd table does not spin the loop


class Gateway:
    """One SNI-routing listener and the connections it carries."""

    def __init__(
        self,
        config: GatewayConfig,
        metrics: GatewayMetrics,
        *,
        rng: random.Random | None = None,
        probe_upstream: Upstream | None = None,
    ) -> None:
        self._spec = config.spec
        self._table = RoutingTable.from_spec(config.spec)
        self._metrics = metrics
        self._rng = rng if rng is not None else random.Random()
        self._probe_upstream = probe_upstream
        self._balancer = Balancer()
        self._links: set[Link] = set()
        self._setups: set[asyncio.Task[None]] = set()
        self._listener: socket.socket | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._accepting = False
        self._active = 0
        self._all_closed: asyncio.Event | None = None  # set by drain() to wait for the last
        self._splice = self._spec.forwarding == "splice" and SPLICE_AVAILABLE

    @property
    def address(self) -> tuple[str, int]:
        """The address the listener is bound to (its real port when configured as 0)."""
        assert self._listener is not None, "start() first"
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def accepting(self) -> bool:
        """True while new connections are accepted (false once draining starts)."""
        return self._accepting

    @property
    def active_connections(self) -> int:
        """Client connections open now, peeking or forwarding."""
        return self._active

    async def start(self) -> None:
        """Bind the listener and start accepting."""
        listen = self._spec.listen
        family = (
            socket.AF_INET6 if ipaddress.ip_address(listen.address).version == 6 else socket.AF_INET
        )
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((listen.address, listen.port))
            listener.listen(_BACKLOG)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._resume_accepting()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def apply(self, config: GatewayConfig) -> None:
        """Take a new config: routes, balancing and limits apply to new connections.

        The listen and admin addresses are bound at start; changing them needs a restart.
        """
        self._spec = config.spec
        self._table = RoutingTable.from_spec(config.spec)
        self._splice = config.spec.forwarding == "splice" and SPLICE_AVAILABLE

    def stop_accepting(self) -> None:
        """Close the listener: new connections are refused by the kernel from now on."""
        self._pause_accepting()
        if self._listener is not None:
            self._listener.close()

    async def drain(self, grace: float) -> int:
        """Stop accepting, let open connections finish for up to ``grace`` seconds, then
        close the rest; return how many had to be closed."""
        self.stop_accepting()
        if self._active:
            self._all_closed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._all_closed.wait()
        forced = self._active
        await self.close()
        return forced

    async def close(self) -> None:
        """Close the listener and every connection now."""
        self.stop_accepting()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for task in list(self._setups):
            task.cancel()
        for task in list(self._setups):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for link in list(self._links):
            link.close()
        self._report_bytes()

    # --- accepting -----------------------------------------------------------------------

    def _resume_accepting(self) -> None:
        if self._listener is None or self._listener.fileno() < 0 or self._accepting:
            return
        self._accepting = True
        asyncio.get_running_loop().add_reader(self._listener.fileno(), self._on_acceptable)

    def _pause_accepting(self) -> None:
        if self._accepting and self._listener is not None:
            self._accepting = False
            asyncio.get_running_loop().remove_reader(self._listener.fileno())

    def _on_acceptable(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting()
                    loop.call_later(_ACCEPT_PAUSE, self._resume_accepting)
                return
            if self._active >= self._spec.limits.max_connections:
                client.close()
                self._metrics.reject("over-limit")
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._active += 1
            self._metrics.active.inc()
            task = loop.create_task(self._setup(client))
            self._setups.add(task)
            task.add_done_callback(self._setups.discard)

    def _connection_ended(self) -> None:
        self._active -= 1
        self._metrics.active.dec()
        if not self._active and self._all_closed is not None:
            self._all_closed.set()

    # --- one connection's setup ----------------------------------------------------------

    async def _setup(self, client: socket.socket) -> None:
        handed_over = False
        try:
            handed_over = await self._route(client)
        finally:
            if not handed_over:
                client.close()
                self._connection_ended()

    async def _route(self, client: socket.socket) -> bool:
        spec = self._spec
        try:
            async with asyncio.timeout(spec.limits.peek_timeout):
                verdict, first_bytes = await _peek(client)
        except TimeoutError:
            self._metrics.reject("peek-timeout")
            return False
        except OSError:
            self._metrics.reject("truncated")
            return False
        if isinstance(verdict, Rejection):
            self._metrics.reject(verdict.reason)
            return False
        target = self._table.resolve(verdict.server_name)
        if isinstance(target, Refusal):
            self._metrics.reject(target.reason)
            return False
        balanced = isinstance(target, ServiceTarget)
        if isinstance(target, ServiceTarget):
            upstream = self._balancer.pick(target, self._rng)
        elif isinstance(target, ProbeTarget):
            if self._probe_upstream is None:
                self._metrics.reject("unknown-name")
                return False
            upstream = self._probe_upstream
        else:
            upstream = target.upstream
        return await self._forward(client, upstream, first_bytes, balanced)

    async def _forward(
        self, client: socket.socket, upstream: Upstream, first_bytes: bytes, balanced: bool
    ) -> bool:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in upstream.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        handed_over = False
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.timeout(self._spec.limits.connect_timeout):
                await loop.sock_connect(sock, (upstream.host, upstream.port))
                if self._splice:
                    await loop.sock_sendall(sock, first_bytes)
            on_closed = _LinkClosed(self, upstream if balanced else None)
            link: Link
            if self._splice:
                link = SpliceLink(loop, client, sock, on_closed)
            else:
                link = await RelayLink.open(loop, client, sock, first_bytes, on_closed)
            handed_over = True
        except (OSError, TimeoutError):
            self._metrics.upstream_failed.inc()
            return False
        finally:
            if not handed_over:
                sock.close()
                if balanced:
                    self._balancer.release(upstream)
        self._metrics.forwarded.inc()
        if not link.closed:  # either side may already have gone while the link was built
            self._links.add(link)
        return True

    def _link_closed(self, link: Link, balanced: Upstream | None) -> None:
        self._links.discard(link)
        if balanced is not None:
            self._balancer.release(balanced)
        self._report_link_bytes(link)
        self._connection_ended()

    # --- the sweep: idle links and byte counters -----------------------------------------

    async def _sweep(self) -> None:
        while True:
            idle_timeout = self._spec.limits.idle_timeout
            period = min(max(idle_timeout / 4, 0.01), 5.0)
            await asyncio.sleep(period)
            sweeps_to_idle = max(1, round(idle_timeout / period))
            for link in list(self._links):
                passed = link.up + link.down
                if passed != link.seen:
                    link.seen = passed
                    link.idle_sweeps = 0
                else:
                    link.idle_sweeps += 1
                    if link.idle_sweeps >= sweeps_to_idle:
                        link.close()
            self._report_bytes()

    def _report_bytes(self) -> None:
        for link in self._links:
            self._report_link_bytes(link)

    def _report_link_bytes(self, link: Link) -> None:
        up, down = link.up, link.down
        if up != link.reported_up:
            self._metrics.bytes_upstream.inc(up - link.reported_up)
            link.reported_up = up
        if down != link.reported_down:
            self._metrics.bytes_downstream.inc(down - link.reported_down)
            link.reported_down = down


class _LinkClosed:
    """The callback a link runs once when it ends (a class: cheaper than a closure per link)."""

    __slots__ = ("_balanced", "_gateway")

    def __init__(self, gateway: Gateway, balanced: Upstream | None) -> None:
        self._gateway = gateway
        self._balanced = balanced

    def __call__(self, link: Link) -> None:
        self._gateway._link_closed(link, self._balanced)


async def _peek(client: socket.socket) -> tuple[ClientHello | Rejection, bytes]:
    """Read until the ClientHello has a verdict; return it with every byte read so far."""
    loop = asyncio.get_running_loop()
    buffer = bytearray()
    wanted = 1
    while True:
        chunk = await loop.sock_recv(client, _RECV_SIZE)
        if not chunk:
            verdict = parse_client_hello(buffer, eof=True)
            assert not isinstance(verdict, NeedMore)
            return verdict, bytes(buffer)
        buffer += chunk
        if len(buffer) < wanted:
            continue
        verdict = parse_client_hello(buffer)
        if isinstance(verdict, NeedMore):
            wanted = len(buffer) + verdict.more
            continue
        return verdict, bytes(buffer)
