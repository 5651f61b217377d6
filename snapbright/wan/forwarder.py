"""The WAN emulator's data path: one TCP forwarder per forward, bytes through delay lines.

A connection accepted on a forward's listener crosses the link ``from`` → ``to``; its replies
cross ``to`` → ``from``. Each direction of each connection is a `_Pipe`: chunks read from one
socket are scheduled by `snapbright.wan.core` and written to the other when due. Reading is
not paused while chunks are in flight, only when:

- the other socket's write buffer is full (its transport's ``pause_writing``);
- more than ``_MAX_IN_FLIGHT`` (16 MiB) wait in the line: memory stays bounded, and one
  connection still carries up to 16 MiB per one-way latency (160 MiB/s at 100 ms);
- the link's bandwidth has queued the data more than ``_QUEUE_AHEAD`` ahead (a bottleneck
  holds a little, then slows the sender, as a router queue does).

Time is ``time.monotonic()``, read when bytes arrive and again when a timer fires: uvloop's
loop clock and timers tick in milliseconds, so a timer is only a wake-up and a chunk is written
once the clock says it is due, never early.

A new connection pays for its handshake: the target is dialled at once, but the client's first
bytes are sent only after SYN there and SYN-ACK back, the target's after the SYN.

Partition (chosen behaviour): traffic is held, not lost. New connections are accepted and
blackholed: the target is not dialled until the link heals, so callers see a timeout, as
behind a real partition, not a refusal. Data of existing connections (in flight or new) stalls
and is delivered after the heal. With ``reset``, a partition instead resets every connection
crossing the link and every new one (RST), as a firewall rejecting traffic would.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import random
import socket
import struct
import time
from collections import deque
from typing import Final, cast

from snapbright.wan.core import DelayLine, LinkShape, TokenBucket, sample_delay
from snapbright.wan.model import Forward

__all__ = ["Forwarder", "Link"]

_MAX_IN_FLIGHT: Final = 16 * 1024 * 1024
_RESUME_IN_FLIGHT: Final = 8 * 1024 * 1024
_QUEUE_AHEAD: Final = 0.05

# Why reading from a pipe's source is paused (bits).
_P_DEST: Final = 1
_P_IN_FLIGHT: Final = 2
_P_BANDWIDTH: Final = 4


class _End(enum.Enum):
    """How a source ended: the marker travels through the line after the data."""

    EOF = "eof"
    CLOSE = "close"
    ABORT = "abort"


_HELD: Final = math.inf
_Payload = bytes | _End


class _Chunk:
    """Bytes (or an end marker) in a delay line, and when they are due (``inf``: held)."""

    __slots__ = ("due", "payload")

    def __init__(self, due: float, payload: _Payload) -> None:
        self.due = due
        self.payload = payload


_LINGER_RST: Final = struct.pack("ii", 1, 0)


class Link:
    """One direction of an emulated link at run time: its shape, its bandwidth bucket, the
    pipes crossing it, and what it has carried."""

    __slots__ = ("bucket", "delivered", "destination", "pipes", "retransmits", "shape", "source")

    def __init__(self, source: str, destination: str, shape: LinkShape, now: float) -> None:
        self.source = source
        self.destination = destination
        self.shape = shape
        self.bucket = _bucket(shape, now)
        self.pipes: set[_Pipe] = set()
        self.delivered = 0
        self.retransmits = 0

    def reshape(self, shape: LinkShape, now: float) -> None:
        """Apply a new shape: to chunks that arrive from now on; a partition or its healing
        applies to held and in-flight chunks too."""
        old, self.shape = self.shape, shape
        if shape.bandwidth != old.bandwidth:
            self.bucket = _bucket(shape, now)
        if shape.partition and shape.reset:
            for pipe in list(self.pipes):
                pipe.connection.reset()
        elif shape.partition and not old.partition:
            for pipe in self.pipes:
                pipe.hold()
        elif old.partition and not shape.partition:
            for pipe in self.pipes:
                if pipe.connection.opened:
                    pipe.release(now)


def _bucket(shape: LinkShape, now: float) -> TokenBucket | None:
    return None if shape.bandwidth is None else TokenBucket.for_bandwidth(shape.bandwidth, now)


class _Pipe:
    """One direction of one connection: a delay line from ``source`` to ``dest``."""

    __slots__ = (
        "_bandwidth_timer",
        "_loop",
        "_paused",
        "_queue",
        "_rng",
        "_timer",
        "connection",
        "dest",
        "in_flight",
        "line",
        "link",
        "source",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        link: Link,
        rng: random.Random,
        connection: _Connection,
    ) -> None:
        self._loop = loop
        self.link = link
        self._rng = rng
        self.connection = connection
        self.line = DelayLine()
        self.source: asyncio.Transport | None = None
        self.dest: asyncio.Transport | None = None
        self._queue: deque[_Chunk] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._bandwidth_timer: asyncio.TimerHandle | None = None
        self._paused = 0
        self.in_flight = 0
        link.pipes.add(self)

    def feed(self, data: bytes) -> None:
        """A chunk read from the source: schedule it (or hold it across a partition)."""
        now = time.monotonic()
        link = self.link
        size = len(data)
        self.in_flight += size
        if self.held:
            self._queue.append(_Chunk(_HELD, data))
        else:
            leaves, due, lost = self.line.schedule(now, size, link.shape, link.bucket, self._rng)
            link.retransmits += lost
            self._queue.append(_Chunk(due, data))
            if len(self._queue) == 1:
                self._arm()
            if leaves - now > _QUEUE_AHEAD:
                self._pause_for_bandwidth(leaves - _QUEUE_AHEAD)
        if self.in_flight > _MAX_IN_FLIGHT:
            self._pause(_P_IN_FLIGHT)

    def end(self, payload: _Payload) -> None:
        """The source ended (EOF, close or reset): pass that on after the data ahead of it."""
        if self.held:
            self._queue.append(_Chunk(_HELD, payload))
            return
        scheduled = self.line.schedule(time.monotonic(), 0, self.link.shape, None, self._rng)
        self._queue.append(_Chunk(scheduled.due, payload))
        if len(self._queue) == 1:
            self._arm()

    @property
    def held(self) -> bool:
        """Whether chunks are held: across a partition, or before the target is dialled."""
        return self.link.shape.partition or not self.connection.opened

    def hold(self) -> None:
        """Partitioned: nothing more is delivered until `release`."""
        for chunk in self._queue:
            chunk.due = _HELD
        self._disarm()

    def release(self, now: float) -> None:
        """Healed: held chunks go out as if sent now, in order."""
        link = self.link
        for chunk in self._queue:
            if chunk.due == _HELD:
                payload = chunk.payload
                size = len(payload) if isinstance(payload, bytes) else 0
                scheduled = self.line.schedule(now, size, link.shape, link.bucket, self._rng)
                link.retransmits += scheduled.lost
                chunk.due = scheduled.due
        self._disarm()
        self._arm()

    def connect(self, dest: asyncio.Transport) -> None:
        """The destination socket is there: deliver what is due."""
        self.dest = dest
        self._arm()

    def dest_paused(self, paused: bool) -> None:
        """The destination's write buffer is full (or has drained)."""
        if paused:
            self._pause(_P_DEST)
        else:
            self._resume(_P_DEST)

    def source_ready(self, source: asyncio.Transport) -> None:
        """The source socket is there; apply any pause decided before it was."""
        self.source = source
        if self._paused:
            source.pause_reading()

    def close(self) -> None:
        """Forget everything: the connection is gone."""
        self._disarm()
        if self._bandwidth_timer is not None:
            self._bandwidth_timer.cancel()
            self._bandwidth_timer = None
        self._queue.clear()
        self.link.pipes.discard(self)

    def _arm(self) -> None:
        if self._timer is None and self._queue and self.dest is not None:
            due = self._queue[0].due
            if due != _HELD:
                self._timer = self._loop.call_later(due - time.monotonic(), self._deliver)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deliver(self) -> None:
        self._timer = None
        dest = self.dest
        assert dest is not None
        now = time.monotonic()
        queue = self._queue
        delivered = 0
        while queue:
            if queue[0].due > now:
                break
            payload = queue.popleft().payload
            if isinstance(payload, bytes):
                delivered += len(payload)
                if not dest.is_closing():
                    dest.write(payload)
            else:
                self.connection.deliver_end(dest, payload)
        if delivered:
            self.in_flight -= delivered
            self.link.delivered += delivered
            if self._paused & _P_IN_FLIGHT and self.in_flight <= _RESUME_IN_FLIGHT:
                self._resume(_P_IN_FLIGHT)
        self._arm()

    def _pause_for_bandwidth(self, until: float) -> None:
        if self._bandwidth_timer is not None:
            self._bandwidth_timer.cancel()
        self._pause(_P_BANDWIDTH)
        self._bandwidth_timer = self._loop.call_later(
            until - time.monotonic(), self._bandwidth_paid
        )

    def _bandwidth_paid(self) -> None:
        self._bandwidth_timer = None
        self._resume(_P_BANDWIDTH)

    def _pause(self, reason: int) -> None:
        if not self._paused and self.source is not None and not self.source.is_closing():
            self.source.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        was = self._paused
        self._paused &= ~reason
        if was and not self._paused and self.source is not None and not self.source.is_closing():
            self.source.resume_reading()


class _Connection:
    """A client connection and its target connection, joined by two pipes."""

    __slots__ = (
        "_client_lost",
        "_open",
        "_target_lost",
        "client",
        "down",
        "forwarder",
        "target",
        "up",
    )

    def __init__(self, forwarder: Forwarder, client: asyncio.Transport) -> None:
        self.forwarder = forwarder
        loop = forwarder.loop
        self.client = client
        self.target: asyncio.Transport | None = None
        self._open = False
        self._client_lost = False
        self._target_lost = False
        self.up = _Pipe(loop, forwarder.up, forwarder.rng, self)
        self.down = _Pipe(loop, forwarder.down, forwarder.rng, self)
        self.up.source_ready(client)
        self.down.connect(client)

    def open(self) -> None:
        """Dial the target, charging the handshake to both lines."""
        self._open = True
        forwarder = self.forwarder
        now = time.monotonic()
        syn = sample_delay(forwarder.up.shape, 0, forwarder.rng)
        syn_ack = sample_delay(forwarder.down.shape, 0, forwarder.rng)
        self.down.line.opens_at = now + syn
        self.up.line.opens_at = now + syn + syn_ack
        self.up.release(now)
        forwarder.dial(self)

    @property
    def opened(self) -> bool:
        """Whether the target has been dialled (a blackholed connection has not)."""
        return self._open

    def target_made(self, target: asyncio.Transport) -> None:
        """The target accepted: the pipes have both ends."""
        self.target = target
        self.down.source_ready(target)
        self.up.connect(target)

    def target_failed(self) -> None:
        """The target could not be reached: the client is reset, as by a refused SYN."""
        self._target_lost = True
        _reset(self.client)
        self._forget_when_done()

    def deliver_end(self, dest: asyncio.Transport, payload: _Payload) -> None:
        """An end marker is due on ``dest``."""
        if dest.is_closing():
            return
        if payload is _End.ABORT:
            _reset(dest)
        elif payload is _End.EOF and dest.can_write_eof():
            dest.write_eof()
        else:
            dest.close()

    def reset(self) -> None:
        """Reset both sides now (a partition with ``reset``)."""
        _reset(self.client)
        if self.target is not None:
            _reset(self.target)

    def client_lost(self) -> None:
        """The client socket is gone."""
        self._client_lost = True
        self._forget_when_done()

    def target_lost(self) -> None:
        """The target socket is gone."""
        self._target_lost = True
        self._forget_when_done()

    def _forget_when_done(self) -> None:
        # A blackholed connection never dialled has no target to wait for.
        if self._client_lost and (self._target_lost or not self._open):
            self.up.close()
            self.down.close()
            self.forwarder.forget(self)


def _reset(transport: asyncio.Transport) -> None:
    # SO_LINGER 0 makes the close send RST rather than FIN.
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


class _ClientSide(asyncio.Protocol):
    __slots__ = ("connection", "forwarder")

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self.connection: _Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.connection = self.forwarder.accept(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        assert self.connection is not None
        self.connection.up.feed(data)

    def eof_received(self) -> bool:
        assert self.connection is not None
        self.connection.up.end(_End.EOF)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connection is not None:
            self.connection.up.end(_End.CLOSE if exc is None else _End.ABORT)
            self.connection.client_lost()

    def pause_writing(self) -> None:
        assert self.connection is not None
        self.connection.down.dest_paused(True)

    def resume_writing(self) -> None:
        assert self.connection is not None
        self.connection.down.dest_paused(False)


class _TargetSide(asyncio.Protocol):
    __slots__ = ("connection",)

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connection.target_made(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self.connection.down.feed(data)

    def eof_received(self) -> bool:
        self.connection.down.end(_End.EOF)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection.down.end(_End.CLOSE if exc is None else _End.ABORT)
        self.connection.target_lost()

    def pause_writing(self) -> None:
        self.connection.up.dest_paused(True)

    def resume_writing(self) -> None:
        self.connection.up.dest_paused(False)


class Forwarder:
    """One forward's listener and its connections, crossing ``up`` out and ``down`` back."""

    def __init__(
        self,
        forward: Forward,
        up: Link,
        down: Link,
        rng: random.Random,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.forward = forward
        self.up = up
        self.down = down
        self.rng = rng
        self.loop = loop
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._dials: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listen; the port bound."""
        self._server = await self.loop.create_server(
            lambda: _ClientSide(self),
            self.forward.listen_host,
            self.forward.listen_port,
            reuse_address=True,
        )
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def partitioned(self) -> bool:
        """Whether a handshake cannot cross (either direction is partitioned)."""
        return self.up.shape.partition or self.down.shape.partition

    def accept(self, client: asyncio.Transport) -> _Connection:
        """A client connected: open, blackhole or reset it, depending on the partition."""
        connection = _Connection(self, client)
        self.connections.add(connection)
        with contextlib.suppress(OSError):
            client.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.partitioned:
            connection.open()
        elif self.up.shape.reset or self.down.shape.reset:
            connection.reset()
        return connection

    def healed(self) -> None:
        """Links changed: dial the blackholed connections if a handshake can cross now."""
        if self.partitioned:
            return
        for connection in list(self.connections):
            if not connection.opened:
                connection.open()

    def dial(self, connection: _Connection) -> None:
        """Connect to the target in the background."""
        task = self.loop.create_task(self._dial(connection))
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)

    async def _dial(self, connection: _Connection) -> None:
        forward = self.forward
        try:
            transport, _ = await self.loop.create_connection(
                lambda: _TargetSide(connection), forward.target_host, forward.target_port
            )
        except OSError:
            connection.target_failed()
            return
        with contextlib.suppress(OSError):
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def forget(self, connection: _Connection) -> None:
        """A connection is over."""
        self.connections.discard(connection)

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._dials):
            task.cancel()
        for connection in list(self.connections):
            connection.client.abort()
            if connection.target is not None:
                connection.target.abort()
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.gather(*self._dials, return_exceptions=True)
