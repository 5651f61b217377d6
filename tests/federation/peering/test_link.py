"""PeerLink's own rules, over an in-memory stream that stands in for a grpc.aio call."""

from __future__ import annotations

import asyncio
import random

from federation.api.v1 import peering_pb2 as pb
from federation.peering.core import (
    Effect,
    ExportBook,
    ExportsChanged,
    PeerIdentity,
    PeeringSession,
    SessionSettings,
    Withdraw,
)
from federation.peering.model import (
    Close,
    ExportedService,
    Heartbeat,
    Open,
    PeeringMessage,
    PeerState,
    ServiceKey,
)
from federation.peering.stream import DELETED_REASON, PeerLink
from federation.peering.wire import to_proto
from proxy.identity.model import TrustDomain

A = PeerIdentity("a", "acme", TrustDomain("a.acme"))
B = PeerIdentity("b", "acme", TrustDomain("b.acme"))
T0 = 1_800_000_000.0
WAIT = 2.0  # bound on every wait below; the link answers within milliseconds


class Pipe:
    """One Exchange call in memory: the test feeds what the link reads and sees what it sends.

    With ``reads=False`` the far end never reads, so every write blocks (a stuck peer)."""

    def __init__(self, *, reads: bool = True) -> None:
        self.incoming: asyncio.Queue[pb.PeeringMessage | None] = asyncio.Queue()
        self.sent: list[pb.PeeringMessage] = []
        self.finished = asyncio.Event()
        self._reads = reads

    async def read(self) -> pb.PeeringMessage | None:
        return await self.incoming.get()

    async def write(self, message: pb.PeeringMessage) -> None:
        if not self._reads:
            await asyncio.Event().wait()
        self.sent.append(message)

    async def finish(self) -> None:
        self.finished.set()

    def feed(self, message: PeeringMessage | pb.PeeringMessage) -> None:
        raw = message if isinstance(message, pb.PeeringMessage) else to_proto(message)
        self.incoming.put_nowait(raw)

    def end(self) -> None:
        self.incoming.put_nowait(None)

    def bodies(self) -> list[str | None]:
        return [m.WhichOneof("body") for m in self.sent]


class Harness:
    """A's end of a peering with B (A accepts), driven by a clock the test moves."""

    def __init__(self, max_queued: int = 10_000) -> None:
        self.now = T0
        self.effects: list[Effect] = []
        book = ExportBook(cluster="a", mesh="acme")
        self.exports = book.add_peer("b")
        book.set_service(ServiceKey("shop", "pay"), healthy_endpoints=1, exported_to=["b"])
        session = PeeringSession(
            local=A,
            peer=B,
            exports=self.exports,
            local_bundle=None,
            dialer=False,
            rng=random.Random(7),
            settings=SessionSettings(heartbeat_interval=1.0),
        )
        self.link = PeerLink(
            session,
            clock=lambda: self.now,
            on_effect=lambda _link, effect: self.effects.append(effect),
            vet=lambda _link, _message: None,
            name="b",
            max_queued=max_queued,
        )

    def start(self, pipe: Pipe) -> asyncio.Task[str]:
        return asyncio.ensure_future(self.link.run(pipe))


def state(harness: Harness) -> PeerState:
    return harness.link.session.state


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def open_b() -> Open:
    return Open("b", "acme", TrustDomain("b.acme"))


async def test_an_invalid_message_is_answered_with_a_close_and_ends_the_stream() -> None:
    harness, pipe = Harness(), Pipe()
    run = harness.start(pipe)
    pipe.feed(open_b())
    await settle()
    assert state(harness) is PeerState.ACTIVE
    bad = pb.PeeringMessage(services_delta=pb.ServicesDelta(from_version=0, version=1))
    bad.services_delta.removed.append("no-slash")
    pipe.feed(bad)
    reason = await asyncio.wait_for(run, WAIT)
    assert "invalid message" in reason
    assert pipe.bodies()[-1] == "close"
    assert pipe.finished.is_set()
    assert state(harness) is PeerState.DISCONNECTED


async def test_peering_deleted_from_the_peer_withdraws_here_too() -> None:
    harness, pipe = Harness(), Pipe()
    run = harness.start(pipe)
    pipe.feed(open_b())
    pipe.feed(Close(DELETED_REASON))
    await asyncio.wait_for(run, WAIT)
    assert state(harness) is PeerState.DELETED
    withdrawn = [e for e in harness.effects if isinstance(e, Withdraw)]
    assert [w.peer for w in withdrawn] == ["b"]


async def test_any_other_close_only_disconnects() -> None:
    harness, pipe = Harness(), Pipe()
    run = harness.start(pipe)
    pipe.feed(open_b())
    pipe.feed(Close("maintenance"))
    reason = await asyncio.wait_for(run, WAIT)
    assert reason == "peer closed the stream: maintenance"
    assert state(harness) is PeerState.DISCONNECTED
    assert not any(isinstance(e, Withdraw) for e in harness.effects)


async def test_a_new_stream_replaces_the_old_one_and_the_old_ones_messages_are_dropped() -> None:
    harness, first, second = Harness(), Pipe(), Pipe()
    old = harness.start(first)
    first.feed(open_b())
    await settle()
    new = harness.start(second)
    await asyncio.wait_for(old, WAIT)
    assert first.finished.is_set()
    first.feed(Heartbeat(1, 1))  # nobody reads the old stream any more
    second.feed(open_b())
    await settle()
    assert state(harness) is PeerState.ACTIVE
    assert harness.link.connected
    # The new stream got its own Open, and the exports again from what b says it holds.
    assert second.bodies()[0] == "open"
    assert second.sent[1].services_delta.upserted[0].name == "pay"
    second.end()
    await asyncio.wait_for(new, WAIT)


async def test_a_peer_that_stops_reading_is_dropped_instead_of_queueing_forever() -> None:
    harness, pipe = Harness(max_queued=3), Pipe(reads=False)
    run = harness.start(pipe)
    pipe.feed(open_b())
    await settle()
    for _ in range(5):  # heartbeats pile up behind the first blocked write
        harness.now += 1.0
        pipe.feed(Heartbeat(1, 1))  # the peer still talks, so it is not silent
        await settle()
        harness.link.tick()
    reason = await asyncio.wait_for(run, WAIT)
    assert "not reading" in reason
    assert not harness.link.connected
    assert state(harness) is PeerState.DISCONNECTED


async def test_exports_that_change_while_connected_go_out_as_a_delta() -> None:
    harness, pipe = Harness(), Pipe()
    run = harness.start(pipe)
    pipe.feed(open_b())
    await settle()
    harness.exports.upsert(ExportedService(ServiceKey("shop", "cart"), "cart.shop.a.acme", 1))
    harness.link.handle(ExportsChanged(harness.now))
    await settle()
    assert pipe.bodies()[-1] == "services_delta"
    pipe.end()
    await asyncio.wait_for(run, WAIT)
