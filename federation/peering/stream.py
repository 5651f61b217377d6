"""The peering stream's I/O shell: one :class:`PeerLink` drives one ``PeeringSession`` over
whichever grpc.aio ``Peering.Exchange`` stream currently connects us to that peer.

The link only translates. It reads the loop's clock, turns each received protobuf into a
value (``wire.from_proto``) and the value into a session event, and carries out the effects
the session returns: ``Send`` goes to the stream's write queue, ``CloseStream`` ends the
stream after what is queued has been written, ``Reconnect`` tells the dialer when to dial
again, and everything else (imports, health, trust bundles, stale marks, withdraw) goes to
the owner's ``on_effect`` callback. A timer feeds ``Tick`` so heartbeats go out and a silent
peer is noticed.

Rules of the shell (the session's own rules are in ``core.py``):

1. One stream at a time. A new stream for the same peer replaces the old one, which is
   closed; events from a stream that is no longer current are dropped.
2. A peer that stops reading is dropped once :data:`MAX_QUEUED` messages wait for it, rather
   than queueing without bound; the session then reconnects or waits to be redialed.
3. A message that fails validation (``WireError``), or that the owner's ``vet`` refuses (an
   unparseable trust bundle), is answered with a Close and ends the stream, as a protocol
   error in the session would.
4. A Close whose reason is ``peering deleted`` means the peer deleted the peering: the link
   treats it as a local delete (``Deleted``), so our mirrors of the peer and our trust in it
   are withdrawn too, instead of being kept as stale while we redial in vain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from typing import Protocol

import grpc
import grpc.aio

from federation.api.v1 import peering_pb2 as pb
from federation.peering.core import (
    CloseStream,
    Connected,
    Deleted,
    Disconnected,
    Effect,
    Event,
    PeeringSession,
    Reconnect,
    Send,
    Tick,
    received,
)
from federation.peering.model import Close, PeeringMessage, PeerState
from federation.peering.wire import WireError, from_proto, to_proto

DELETED_REASON = "peering deleted"
"""The Close reason the session sends when a peering is deleted (see ``core._deleted``)."""
MAX_QUEUED = 10_000
"""Messages waiting for a peer that does not read: past this the stream is dropped."""
FLUSH_SECONDS = 3.0
"""How long a closing stream may take to deliver what is queued (the Close, typically): a
Close that a reset overtakes is lost, and a peer that misses "peering deleted" keeps our
mirrors as stale until its grace period ends."""

_log = logging.getLogger(__name__)


class MessageStream(Protocol):
    """Either end of a ``Peering.Exchange`` call, as the link uses it."""

    async def read(self) -> pb.PeeringMessage | None:
        """The next message, or None when the other side has finished."""

    async def write(self, message: pb.PeeringMessage) -> None:
        """Send one message."""

    async def finish(self) -> None:
        """End our side of the stream (after the last write)."""


class ClientStream:
    """The dialer's end: a grpc.aio stream-stream call."""

    def __init__(self, call: grpc.aio.StreamStreamCall[pb.PeeringMessage, pb.PeeringMessage]):
        self._call = call

    async def read(self) -> pb.PeeringMessage | None:
        """The next message, or None at the end of the stream."""
        message = await self._call.read()
        return message if isinstance(message, pb.PeeringMessage) else None

    async def write(self, message: pb.PeeringMessage) -> None:
        """Send one message."""
        await self._call.write(message)

    async def finish(self) -> None:
        """Half-close, let the peer end the call (so what we wrote reaches it before any
        reset), and cancel it if the peer takes too long."""
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self._call.done_writing()
        ended = asyncio.ensure_future(self._call.code())
        try:
            await asyncio.wait([ended], timeout=FLUSH_SECONDS - 0.5)
        finally:
            ended.cancel()
            self._call.cancel()


class ServerStream:
    """The acceptor's end: the servicer context of an ``Exchange`` call."""

    def __init__(
        self, context: grpc.aio.ServicerContext[pb.PeeringMessage, pb.PeeringMessage]
    ) -> None:
        self._context = context

    async def read(self) -> pb.PeeringMessage | None:
        """The next message, or None at the end of the stream."""
        message = await self._context.read()
        return None if message is grpc.aio.EOF else message  # type: ignore[comparison-overlap]

    async def write(self, message: pb.PeeringMessage) -> None:
        """Send one message."""
        await self._context.write(message)

    async def finish(self) -> None:
        """Nothing to do: the call ends when the handler (``PeerLink.run``) returns."""


class _Attached:
    """One stream while it is the link's current one."""

    __slots__ = ("done", "queue", "stream", "stuck", "write_error")

    def __init__(self, stream: MessageStream) -> None:
        self.stream = stream
        self.queue: asyncio.Queue[pb.PeeringMessage | None] = asyncio.Queue()
        self.done = asyncio.Event()
        self.write_error = ""
        self.stuck = False


class PeerLink:
    """Drives one peer's session over the current stream; see the module docstring.

    ``clock`` gives seconds since the epoch (heartbeats carry Unix milliseconds).
    ``vet(message)`` returns a reason to refuse the message, or None; it runs before the
    session sees the message. ``on_effect`` receives every effect the link does not carry out
    itself (everything but Send, CloseStream and Reconnect).
    """

    def __init__(
        self,
        session: PeeringSession,
        *,
        clock: Callable[[], float],
        on_effect: Callable[[PeerLink, Effect], None],
        vet: Callable[[PeerLink, PeeringMessage], str | None],
        on_state: Callable[[PeerLink, PeerState], None] | None = None,
        name: str,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self.session = session
        self.name = name
        self._clock = clock
        self._on_effect = on_effect
        self._vet = vet
        self._on_state = on_state
        self._max_queued = max_queued
        self._current: _Attached | None = None
        self.received: Counter[str] = Counter()
        """Messages received, by body name (``services_snapshot``, ``heartbeat``…)."""
        self.reconnect_after: float | None = None
        """Set by the session's ``Reconnect`` effect: when the dialer should dial again."""
        self.last_disconnect = ""
        """Why the last stream ended, in words (for logs and a failed establish)."""

    @property
    def connected(self) -> bool:
        """True while a stream is attached."""
        return self._current is not None

    def handle(self, event: Event) -> None:
        """Feed ``event`` to the session and carry out its effects."""
        before = self.session.state
        if isinstance(event, Disconnected):
            self.last_disconnect = event.reason
        self._apply(self.session.handle(event))
        after = self.session.state
        if after is not before and self._on_state is not None:
            self._on_state(self, after)

    def tick(self) -> None:
        """Time passed (the timer calls this): heartbeats, silence detection."""
        self.handle(Tick(self._clock()))

    def send(self, message: PeeringMessage) -> bool:
        """Send a message the session does not produce (health summaries); False if offline."""
        if self._current is None:
            return False
        self._enqueue(self._current, message)
        return True

    async def run(self, stream: MessageStream, first: pb.PeeringMessage | None = None) -> str:
        """Attach ``stream`` and pump it until it ends; ``first`` was already read from it.
        Return why it ended."""
        if self._current is not None:
            self._detach()
        attached = _Attached(stream)
        self._current = attached
        self.reconnect_after = None
        reason = "stream closed"
        writer = asyncio.ensure_future(self._write_all(attached))
        reader: asyncio.Future[str] | None = None
        try:
            self.handle(Connected(self._clock()))
            if first is not None:
                self._receive(attached, first)
            reader = asyncio.ensure_future(self._read_all(attached))
            await attached.done.wait()
            if reader.done() and not reader.cancelled() and reader.exception() is None:
                reason = reader.result()
            elif attached.write_error:
                reason = attached.write_error
            if self._current is attached:
                # The stream ended under us: stop writing to it at once.
                self._current = None
                attached.queue.put_nowait(None)
                self.handle(Disconnected(self._clock(), reason))
            # Give what is queued (a Close) a moment to reach the peer. (Not wait_for: on
            # Python 3.11 it loses a cancellation that lands as the writer finishes.)
            if not attached.stuck:
                await asyncio.wait([writer], timeout=FLUSH_SECONDS)
        finally:
            tasks = [task for task in (reader, writer) if task is not None]
            for task in tasks:
                task.cancel()
            # asyncio.wait, not `await task` under suppress(CancelledError): a cancellation
            # of run() itself must go on propagating, or the dial loop would never stop.
            await asyncio.wait(tasks)
            for task in tasks:
                if not task.cancelled():
                    task.exception()  # retrieved: a failed stream is already reported
            if self._current is attached:
                self._current = None
                self.handle(Disconnected(self._clock(), "stream cancelled"))
        return self.last_disconnect

    async def _read_all(self, attached: _Attached) -> str:
        try:
            while self._current is attached:
                message = await attached.stream.read()
                if message is None:
                    return "the peer ended the stream"
                self._receive(attached, message)
            return "stream closed here"
        except grpc.aio.AioRpcError as error:
            return f"stream failed: {_describe(error)}"
        finally:
            attached.done.set()

    async def _write_all(self, attached: _Attached) -> None:
        try:
            while True:
                message = await attached.queue.get()
                if message is None:
                    await attached.stream.finish()
                    return
                await attached.stream.write(message)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, RuntimeError) as error:
            attached.write_error = f"write failed: {_describe(error)}"
            _log.debug("peering %s: %s", self.name, attached.write_error)
        finally:
            attached.done.set()

    def _receive(self, attached: _Attached, raw: pb.PeeringMessage) -> None:
        if self._current is not attached:
            return
        body = raw.WhichOneof("body") or "empty"
        self.received[body] += 1
        now = self._clock()
        try:
            message = from_proto(raw)
        except WireError as error:
            self._refuse(now, f"invalid message: {error.reason}")
            return
        refusal = self._vet(self, message)
        if refusal is not None:
            self._refuse(now, refusal)
            return
        if isinstance(message, Close):
            # A Close ends the stream: the session hears of it once, here.
            self.handle(
                Deleted(now) if message.reason == DELETED_REASON else received(message, now)
            )
            self._detach()
            return
        self.handle(received(message, now))

    def _refuse(self, now: float, reason: str) -> None:
        self._apply([Send(Close(reason))])
        self._detach()
        self.handle(Disconnected(now, reason))

    def _enqueue(self, attached: _Attached, message: PeeringMessage) -> None:
        if attached.queue.qsize() < self._max_queued:
            attached.queue.put_nowait(to_proto(message))
            return
        # The writer is stuck behind a peer that does not read: drop the stream at once.
        self._current = None
        attached.stuck = True
        attached.done.set()
        reason = f"the peer is not reading ({self._max_queued} messages wait for it)"
        self.handle(Disconnected(self._clock(), reason))

    def _detach(self) -> None:
        attached, self._current = self._current, None
        if attached is not None:
            # The writer finishes the stream after what is queued; the run loop then ends.
            attached.queue.put_nowait(None)

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case Send(message):
                    if self._current is not None:
                        self._enqueue(self._current, message)
                case CloseStream(reason):
                    _log.info("peering %s: closing the stream: %s", self.name, reason)
                    self._detach()
                case Reconnect(after):
                    self.reconnect_after = after
                case _:
                    self._on_effect(self, effect)


def _describe(error: Exception) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__
