"""Deltas over real gRPC and mTLS on 127.0.0.1: after a complete snapshot, only what changed.

The builder here returns a :class:`ClassContent` over an :class:`UpstreamTable` the test
changes one upstream at a time, as the control plane's view does.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
import grpc.aio
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from federation.discovery.core import ProxyClass
from federation.discovery.server import ClassContent, Discovery, UpstreamTable, serve
from federation.trust.ca import ClusterCA
from proxy.api.v1 import discovery_pb2 as pb
from proxy.api.v1 import discovery_pb2_grpc as pb_grpc
from proxy.config.source import ConfigRejected
from proxy.discovery.client import DiscoveryClient, hello_request
from proxy.discovery.core import Backoff
from proxy.identity.bundle import format_bundle
from tests.federation.discovery.conftest import TD, WEB, channel, identity

QUIET_S = 0.3
Call = grpc.aio.StreamStreamCall[pb.SubscribeRequest, pb.Snapshot]


def _now() -> datetime:
    return datetime.now(UTC)


def _upstream(name: str, port: int = 1) -> pb.Upstream:
    return pb.Upstream(
        service=name,
        namespace="shop",
        targets=[
            pb.Target(
                name=name,
                cluster="us-west",
                weight=10_000,
                endpoints=[pb.Endpoint(address="127.0.0.1", port=port, healthy=True)],
            )
        ],
    )


@dataclass
class _Incremental:
    ca: ClusterCA
    table: UpstreamTable = field(default_factory=UpstreamTable)
    ready: bool = True

    def build(self, _proxy_class: ProxyClass) -> ClassContent | None:
        if not self.ready:
            return None
        bundle = self.ca.bundle()
        rest = pb.Snapshot(
            trust_bundles=[
                pb.TrustBundle(
                    trust_domain=TD.name,
                    sequence=self.ca.sequence,
                    spiffe_bundle_json=format_bundle(bundle),
                )
            ]
        )
        return ClassContent(rest, self.table)


@dataclass
class _Plane:
    discovery: Discovery
    sources: _Incremental
    target: str


@pytest.fixture
async def plane(ca: ClusterCA) -> AsyncIterator[_Plane]:
    sources = _Incremental(ca)
    for name in ("pay", "ledger", "cart"):
        sources.table.put(_upstream(name))
    discovery = Discovery(ca, sources.build, coalesce_s=0.01)
    server, port = await serve(discovery, "127.0.0.1:0")
    try:
        yield _Plane(discovery, sources, f"127.0.0.1:{port}")
    finally:
        await server.stop(grace=None)


class _Stream:
    def __init__(self, call: Call) -> None:
        self.call = call
        self._inbox: asyncio.Queue[pb.Snapshot | BaseException] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read_all())

    async def _read_all(self) -> None:
        try:
            async for message in self.call:
                self._inbox.put_nowait(message)
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as error:
            self._inbox.put_nowait(error)

    async def read(self) -> pb.Snapshot:
        async with asyncio.timeout(5):
            message = await self._inbox.get()
        if isinstance(message, BaseException):
            raise message
        return message

    async def silent(self) -> bool:
        await asyncio.sleep(QUIET_S)
        return self._inbox.empty()

    async def ack(self, version: str) -> None:
        await self.call.write(pb.SubscribeRequest(ack=pb.Ack(version=version)))

    async def nack(self, version: str) -> None:
        await self.call.write(pb.SubscribeRequest(nack=pb.Nack(version=version, reason="no")))


async def _subscribe(ch: grpc.aio.Channel, known: str = "", deltas: bool = True) -> _Stream:
    key = ec.generate_private_key(ec.SECP256R1())
    call: Call = pb_grpc.DiscoveryStub(ch).Subscribe()
    await call.write(hello_request(identity(), known, key, accepts_deltas=deltas))
    return _Stream(call)


def _names(snapshot: pb.Snapshot) -> list[str]:
    return [u.service for u in snapshot.upstreams]


def _removed(snapshot: pb.Snapshot) -> list[str]:
    return [u.service for u in snapshot.removed_upstreams]


async def test_after_a_complete_snapshot_a_change_arrives_as_a_delta(
    plane: _Plane, ca: ClusterCA
) -> None:
    async with channel(plane.target, ca.issue(WEB, _now()), ca.bundle()) as ch:
        stream = await _subscribe(ch)
        first = await stream.read()
        await stream.ack(first.version)
        plane.sources.table.put(_upstream("pay", port=2))
        plane.sources.table.put(_upstream("search"))
        plane.sources.table.remove("shop", "cart")
        plane.discovery.refresh()
        delta = await stream.read()
    assert (first.from_version, sorted(_names(first))) == ("", ["cart", "ledger", "pay"])
    assert delta.from_version == first.version
    assert delta.version != first.version
    assert sorted(_names(delta)) == ["pay", "search"]
    assert _removed(delta) == ["cart"]
    # Everything but the upstreams is complete in a delta.
    assert [b.trust_domain for b in delta.trust_bundles] == [TD.name]


async def test_a_proxy_that_does_not_take_deltas_gets_complete_snapshots(
    plane: _Plane, ca: ClusterCA
) -> None:
    async with channel(plane.target, ca.issue(WEB, _now()), ca.bundle()) as ch:
        stream = await _subscribe(ch, deltas=False)
        first = await stream.read()
        await stream.ack(first.version)
        plane.sources.table.put(_upstream("search"))
        plane.discovery.refresh()
        second = await stream.read()
    assert second.from_version == ""
    assert sorted(_names(second)) == ["cart", "ledger", "pay", "search"]


@pytest.mark.parametrize(
    ("known", "expect_delta"),
    [("", False), ("7.0123456789abcdef01234567", False), ("held", True)],
    ids=["no-version", "unknown-version", "recent-version"],
)
async def test_a_reconnecting_proxy_gets_a_delta_only_from_a_version_we_can_place(
    plane: _Plane, ca: ClusterCA, known: str, expect_delta: bool
) -> None:
    async with channel(plane.target, ca.issue(WEB, _now()), ca.bundle()) as ch:
        first_stream = await _subscribe(ch)
        first = await first_stream.read()
        await first_stream.ack(first.version)
        first_stream.call.cancel()
        plane.sources.table.put(_upstream("search"))
        plane.discovery.refresh()
        await asyncio.sleep(0.05)
        stream = await _subscribe(ch, known=first.version if known == "held" else known)
        message = await stream.read()
    if expect_delta:
        assert (message.from_version, _names(message)) == (first.version, ["search"])
    else:
        assert message.from_version == ""
        assert sorted(_names(message)) == ["cart", "ledger", "pay", "search"]


async def test_a_proxy_behind_the_change_log_gets_a_complete_snapshot(ca: ClusterCA) -> None:
    sources = _Incremental(ca, UpstreamTable(capacity=2))
    for name in ("pay", "ledger", "cart", "search", "orders"):
        sources.table.put(_upstream(name))
    discovery = Discovery(ca, sources.build, coalesce_s=0.01)
    server, port = await serve(discovery, "127.0.0.1:0")
    try:
        async with channel(f"127.0.0.1:{port}", ca.issue(WEB, _now()), ca.bundle()) as ch:
            stream = await _subscribe(ch)
            first = await stream.read()
            await stream.ack(first.version)
            sources.table.put(_upstream("pay", port=2))
            sources.table.put(_upstream("pay", port=3))
            sources.table.put(_upstream("pay", port=4))  # three changes; the log holds two
            discovery.refresh()
            message = await stream.read()
    finally:
        await server.stop(grace=None)
    assert message.from_version == ""
    assert len(message.upstreams) == 5


async def test_a_nacked_delta_is_followed_by_a_complete_snapshot(
    plane: _Plane, ca: ClusterCA
) -> None:
    async with channel(plane.target, ca.issue(WEB, _now()), ca.bundle()) as ch:
        stream = await _subscribe(ch)
        first = await stream.read()
        await stream.ack(first.version)
        plane.sources.table.put(_upstream("search"))
        plane.discovery.refresh()
        delta = await stream.read()
        await stream.nack(delta.version)
        complete = await stream.read()
        await stream.ack(complete.version)
        assert await stream.silent()
    assert delta.from_version == first.version
    assert complete.version == delta.version
    assert complete.from_version == ""
    assert sorted(_names(complete)) == ["cart", "ledger", "pay", "search"]
    # Not a rejection of the content: nothing for `snapbright check` to show.
    assert plane.discovery.nacks() == []


async def test_an_unreachable_source_sends_no_delta_and_nothing_is_withdrawn(
    plane: _Plane, ca: ClusterCA
) -> None:
    async with channel(plane.target, ca.issue(WEB, _now()), ca.bundle()) as ch:
        stream = await _subscribe(ch)
        first = await stream.read()
        await stream.ack(first.version)
        plane.sources.ready = False
        plane.discovery.refresh()
        assert await stream.silent()
        # Back, with one real change: the delta carries just it, no removals.
        plane.sources.ready = True
        plane.sources.table.put(_upstream("ledger", port=9))
        plane.discovery.refresh()
        delta = await stream.read()
    assert (delta.from_version, _names(delta), _removed(delta)) == (
        first.version,
        ["ledger"],
        [],
    )


async def test_an_unchanged_put_is_no_change_and_sends_nothing(
    plane: _Plane, ca: ClusterCA
) -> None:
    async with channel(plane.target, ca.issue(WEB, _now()), ca.bundle()) as ch:
        stream = await _subscribe(ch)
        first = await stream.read()
        await stream.ack(first.version)
        assert not plane.sources.table.put(_upstream("pay"))
        plane.discovery.refresh()
        assert await stream.silent()


# -- the client applying deltas -------------------------------------------------------------

FAST = Backoff(base_s=0.02, cap_s=0.1, stable_s=60.0)
Names = tuple[str, ...]


def _parse(snapshot: pb.Snapshot) -> Names:
    names = tuple(sorted(u.service for u in snapshot.upstreams))
    if "broken" in names:
        raise ConfigRejected("'broken' is not allowed")
    return names


def _parse_delta(previous: Names, delta: pb.Snapshot) -> Names:
    names = set(previous) - {u.service for u in delta.removed_upstreams}
    names |= {u.service for u in delta.upstreams}
    if "broken" in names:
        raise ConfigRejected("'broken' is not allowed")
    return tuple(sorted(names))


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting until {what}")


@pytest.mark.parametrize("incremental", [True, False], ids=["parse_delta", "rebuilt"])
async def test_the_client_applies_deltas_to_its_last_good_config(
    plane: _Plane, ca: ClusterCA, incremental: bool
) -> None:
    client: DiscoveryClient[Names] = DiscoveryClient(
        plane.target,
        identity(),
        ca.issue(WEB, _now()),
        ca.bundle(),
        _parse,
        parse_delta=_parse_delta if incremental else None,
        backoff=FAST,
        rng=random.Random(1),
    )
    task = asyncio.create_task(client.run())
    try:
        assert await client.wait_ready() == ("cart", "ledger", "pay")
        plane.sources.table.put(_upstream("search"))
        plane.sources.table.remove("shop", "cart")
        plane.discovery.refresh()
        await _until(lambda: client.current() == ("ledger", "pay", "search"), "a delta")
        assert client.deltas == 1
        # A delta the proxy refuses: nacked, the last good stays, and it is recorded.
        good = client.version
        plane.sources.table.put(_upstream("broken"))
        plane.discovery.refresh()
        await _until(lambda: bool(plane.discovery.nacks()), "a nack")
        assert client.current() == ("ledger", "pay", "search")
        assert client.version == good
        # Fixed: the next delta applies on top of the last good.
        plane.sources.table.remove("shop", "broken")
        plane.sources.table.put(_upstream("orders"))
        plane.discovery.refresh()
        await _until(lambda: client.current() == ("ledger", "orders", "pay", "search"), "fix")
        # ...from the version it kept, so it needs no complete snapshot to get there.
        assert client.deltas == 2
    finally:
        client.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_delta_from_a_version_the_client_does_not_hold_is_nacked_not_refused(
    ca: ClusterCA,
) -> None:
    client: DiscoveryClient[Names] = DiscoveryClient(
        "127.0.0.1:1", identity(), ca.issue(WEB, _now()), ca.bundle(), _parse
    )
    bundle = pb.TrustBundle(
        trust_domain=TD.name, sequence=ca.sequence, spiffe_bundle_json=format_bundle(ca.bundle())
    )
    full = pb.Snapshot(version="1.a", upstreams=[_upstream("pay")], trust_bundles=[bundle])
    assert client.apply(full).WhichOneof("kind") == "ack"
    stray = pb.Snapshot(
        version="3.c", from_version="2.b", upstreams=[_upstream("x")], trust_bundles=[bundle]
    )
    assert client.apply(stray).WhichOneof("kind") == "nack"
    assert (client.current(), client.version) == (("pay",), "1.a")
    # The complete snapshot of that version that follows is parsed, not refused unseen.
    complete = pb.Snapshot(
        version="3.c", upstreams=[_upstream("pay"), _upstream("x")], trust_bundles=[bundle]
    )
    assert client.apply(complete).WhichOneof("kind") == "ack"
    assert client.current() == ("pay", "x")
    assert client.rejected == ("", "")


def test_removing_an_upstream_the_client_does_not_have_is_a_no_op(ca: ClusterCA) -> None:
    client: DiscoveryClient[Names] = DiscoveryClient(
        "127.0.0.1:1", identity(), ca.issue(WEB, _now()), ca.bundle(), _parse
    )
    bundle = pb.TrustBundle(
        trust_domain=TD.name, sequence=ca.sequence, spiffe_bundle_json=format_bundle(ca.bundle())
    )
    full = pb.Snapshot(version="1.a", upstreams=[_upstream("pay")], trust_bundles=[bundle])
    assert client.apply(full).WhichOneof("kind") == "ack"
    # "broken" was added and removed again since 1.a: the delta names it as removed.
    delta = pb.Snapshot(
        version="3.c",
        from_version="1.a",
        upstreams=[_upstream("orders")],
        removed_upstreams=[pb.UpstreamName(namespace="shop", service="broken")],
        trust_bundles=[bundle],
    )
    assert client.apply(delta).WhichOneof("kind") == "ack"
    assert client.current() == ("orders", "pay")
