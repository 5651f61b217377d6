"""Opaque bytes both ways between two connections, with flow control (TCP ports, gRPC).

Each side is a `PipeEnd` protocol; a full write buffer on one side pauses reading on the
other. A half-close passes through (write_eof) so request/response protocols see their end;
when both directions ended, or either side is lost, both close.
"""

from __future__ import annotations

import asyncio
from typing import cast

__all__ = ["PipeEnd", "join"]


class PipeEnd(asyncio.Protocol):
    """One side of a pipe. Bytes read before the other side is joined are held."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: PipeEnd | None = None
        self._early: list[bytes] = []
        self._early_eof = False
        self._eof = False
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self._early.append(data)
            return
        peer.transport.write(data)

    def eof_received(self) -> bool | None:
        self._eof = True
        peer = self.peer
        if peer is None:
            self._early_eof = True
            return True
        if peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
        if peer._eof:
            self.close()
            peer.close()
            return None
        return True

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)
        peer = self.peer
        if peer is not None:
            peer.close()

    def close(self) -> None:
        """Close this side (its peer follows when it notices)."""
        transport = self.transport
        if transport is not None:
            transport.close()

    def flush_early(self) -> None:
        """Pass on what was read before the peer was joined."""
        peer = self.peer
        if peer is None or peer.transport is None:
            return
        early, self._early = self._early, []
        if early:
            peer.transport.writelines(early)
        if self._early_eof:
            self._early_eof = False
            self.eof_received()


def join(a: PipeEnd, b: PipeEnd) -> None:
    """Connect two ends: from now on bytes pass both ways."""
    a.peer = b
    b.peer = a
    a.flush_early()
    b.flush_early()
    if a.transport is None:
        b.close()
    elif b.transport is None:
        a.close()
