"""Passing bytes both ways between a client and its upstream, once routing is done.

Two engines with one contract (:class:`Link`):

- :class:`SpliceLink` moves bytes with ``os.splice`` through a pipe per direction, so payload
  never enters user space (Linux). It runs on raw non-blocking sockets, driven by the event
  loop's ``add_reader``/``add_writer``. A direction reads only when its pipe is empty, so the
  pipe is the whole buffer: a slow receiver stops the sender (backpressure).
- :class:`RelayLink` uses asyncio Protocols (uvloop's native transports when installed):
  ``data_received`` writes to the other transport, and a full write buffer pauses the other
  side's reading.

Both keep half-closes: a FIN one way is passed on with ``shutdown(SHUT_WR)`` and the other
direction keeps flowing until it ends too. An error on either side closes both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from typing import cast

_CHUNK = 65536  # the default pipe capacity: one splice fills at most one pipe
_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)

SPLICE_AVAILABLE = hasattr(os, "splice")
"""Whether this platform can splice (Linux)."""


class Link:
    """A client connection joined to its upstream; ``on_closed`` runs once when both end.

    :attr:`up` and :attr:`down` are the bytes passed each way so far. The hot path only adds
    to a plain integer per direction; the gateway's sweep reads the totals to spot idle links
    and to move byte counts into the metrics.
    """

    __slots__ = ("_closed", "_on_closed", "idle_sweeps", "reported_down", "reported_up", "seen")

    def __init__(self, on_closed: Callable[[Link], None]) -> None:
        self._on_closed = on_closed
        self._closed = False
        # Bookkeeping for the gateway's sweep: bytes at the last sweep, idle sweeps since,
        # and bytes already counted in the metrics.
        self.seen = -1
        self.idle_sweeps = 0
        self.reported_up = 0
        self.reported_down = 0

    @property
    def closed(self) -> bool:
        """Whether the link has ended (its ``on_closed`` has run)."""
        return self._closed

    @property
    def up(self) -> int:
        """Bytes passed from the client to the upstream."""
        raise NotImplementedError

    @property
    def down(self) -> int:
        """Bytes passed from the upstream to the client."""
        raise NotImplementedError

    def close(self) -> None:
        """Close both sides now (idle timeout, drain deadline, or an error)."""
        raise NotImplementedError

    def _closed_once(self) -> None:
        if not self._closed:
            self._closed = True
            self._on_closed(self)


class _Direction:
    """One way of a :class:`SpliceLink`: ``src`` socket → pipe → ``dst`` socket."""

    __slots__ = (
        "_dst",
        "_dst_fd",
        "_link",
        "_loop",
        "_pending",
        "_pipe_r",
        "_pipe_w",
        "_reading",
        "_src",
        "_src_fd",
        "_writing",
        "done",
        "eof",
        "moved",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        src: socket.socket,
        dst: socket.socket,
        link: SpliceLink,
    ) -> None:
        self._loop = loop
        self._src, self._dst = src, dst
        self._src_fd, self._dst_fd = src.fileno(), dst.fileno()
        self._pipe_r, self._pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._link = link
        self._pending = 0
        self.moved = 0
        self._reading = False
        self._writing = False
        self.eof = False
        self.done = False

    def start(self) -> None:
        self._reading = True
        self._loop.add_reader(self._src_fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            moved = os.splice(self._src_fd, self._pipe_w, _CHUNK, None, None, _FLAGS)
        except BlockingIOError:
            return
        except OSError:
            self._link.close()
            return
        if moved == 0:
            self.eof = True
            self._reading = False
            self._loop.remove_reader(self._src_fd)
            if not self._pending:
                self._finish()
            return
        self.moved += moved
        # The common case, inline: the receiver takes it all at once.
        try:
            sent = os.splice(self._pipe_r, self._dst_fd, moved, None, None, _FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._link.close()
            return
        if sent != moved:
            self._pending = moved - sent
            self._flush()

    def _flush(self) -> None:
        while self._pending:
            try:
                moved = os.splice(self._pipe_r, self._dst_fd, self._pending, None, None, _FLAGS)
            except BlockingIOError:
                # The receiver is slow: stop reading until the pipe drains (backpressure).
                if self._reading:
                    self._reading = False
                    self._loop.remove_reader(self._src_fd)
                if not self._writing:
                    self._writing = True
                    self._loop.add_writer(self._dst_fd, self._flush)
                return
            except OSError:
                self._link.close()
                return
            self._pending -= moved
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._dst_fd)
        if self.eof:
            self._finish()
        elif not self._reading:
            self._reading = True
            self._loop.add_reader(self._src_fd, self._on_readable)

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        with contextlib.suppress(OSError):
            self._dst.shutdown(socket.SHUT_WR)
        self._link.direction_done()

    def stop(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._src_fd)
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._dst_fd)
        os.close(self._pipe_r)
        os.close(self._pipe_w)


class SpliceLink(Link):
    """Zero-copy forwarding with ``os.splice`` between two connected non-blocking sockets."""

    __slots__ = ("_client", "_down", "_up", "_upstream")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        upstream: socket.socket,
        on_closed: Callable[[Link], None],
    ) -> None:
        super().__init__(on_closed)
        self._client, self._upstream = client, upstream
        self._up = _Direction(loop, client, upstream, self)
        self._down = _Direction(loop, upstream, client, self)
        self._up.start()
        self._down.start()

    @property
    def up(self) -> int:
        """Bytes passed from the client to the upstream."""
        return self._up.moved

    @property
    def down(self) -> int:
        """Bytes passed from the upstream to the client."""
        return self._down.moved

    def direction_done(self) -> None:
        """One direction ended cleanly; when both have, the connection is over."""
        if self._up.done and self._down.done:
            self.close()

    def close(self) -> None:
        """Stop both directions and close both sockets."""
        if self._closed:
            return
        self._up.stop()
        self._down.stop()
        self._client.close()
        self._upstream.close()
        self._closed_once()


class _Relay(asyncio.Protocol):
    """One side of a :class:`RelayLink`: what it receives is written to its peer."""

    __slots__ = (
        "_early",
        "_early_eof",
        "_link",
        "_write",
        "eof",
        "peer",
        "received",
        "transport",
    )

    def __init__(self, link: RelayLink) -> None:
        self._link = link
        self.peer: _Relay | None = None
        self.transport: asyncio.Transport | None = None
        self._write: Callable[[bytes], object] = self._early_write
        self._early: list[bytes] = []
        self._early_eof = False
        self.received = 0
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = writer = cast(asyncio.Transport, transport)
        for data in self._early:
            writer.write(data)
        self._early.clear()
        if self._early_eof and writer.can_write_eof():
            writer.write_eof()
        if self.peer is not None:
            self.peer._write = writer.write

    def _early_write(self, data: bytes) -> None:
        # The peer's transport does not exist yet: keep the bytes for its connection_made.
        assert self.peer is not None
        self.peer._early.append(data)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self._write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        assert peer is not None
        if peer.transport is None:
            peer._early_eof = True
        elif peer.transport.can_write_eof():
            peer.transport.write_eof()
        if peer.eof:
            self._link.close()
        return True  # keep the other direction open (half-close)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._link.close()


class RelayLink(Link):
    """Forwarding through asyncio Protocols; build it with :meth:`open`."""

    __slots__ = ("_client", "_upstream")

    def __init__(self, on_closed: Callable[[Link], None]) -> None:
        super().__init__(on_closed)
        self._client = _Relay(self)
        self._upstream = _Relay(self)
        self._client.peer = self._upstream
        self._upstream.peer = self._client

    @property
    def up(self) -> int:
        """Bytes passed from the client to the upstream."""
        return self._client.received

    @property
    def down(self) -> int:
        """Bytes passed from the upstream to the client."""
        return self._upstream.received

    @classmethod
    async def open(
        cls,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        upstream: socket.socket,
        first_bytes: bytes,
        on_closed: Callable[[Link], None],
    ) -> RelayLink:
        """Wrap both connected sockets in transports; ``first_bytes`` go upstream first."""
        link = cls(on_closed)
        link._upstream._early.append(first_bytes)
        await loop.create_connection(lambda: link._upstream, sock=upstream)
        await loop.connect_accepted_socket(lambda: link._client, sock=client)
        if link._closed and link._client.transport is not None:
            link._client.transport.close()  # the upstream ended while the client was wrapped
        return link

    def close(self) -> None:
        """Close both transports."""
        if self._closed:
            return
        for side in (self._client, self._upstream):
            if side.transport is not None:
                side.transport.close()
        self._closed_once()
