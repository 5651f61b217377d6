"""The proxy's discovery client against the real discovery server, over mTLS on 127.0.0.1.

Waits are bounded polls of observable state (never fixed sleeps that hope for the best).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

import pytest

from federation.discovery.server import Discovery, serve
from federation.trust.ca import ClusterCA
from proxy.api.v1 import discovery_pb2 as pb
from proxy.config.source import ConfigRejected
from proxy.discovery.client import DiscoveryClient, NoConfigYet, StatsReporter
from proxy.discovery.core import Backoff
from proxy.identity.bundle import TrustBundleSet
from proxy.identity.svid import Purpose, X509Svid, validate_svid
from proxy.stats.core import Outcome, StatsRecorder, StatsWindow
from tests.federation.discovery.conftest import WEB, ControlPlane, identity

FAST = Backoff(base_s=0.02, cap_s=0.1, stable_s=60.0)
Services = tuple[str, ...]


def _now() -> datetime:
    return datetime.now(UTC)


class _Parser:
    """The proxy's config edge: upstream names, refusing any service called ``broken``."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, snapshot: pb.Snapshot) -> Services:
        self.calls += 1
        names = tuple(upstream.service for upstream in snapshot.upstreams)
        if "broken" in names:
            raise ConfigRejected("upstreams[1].service: 'broken' is not allowed")
        return names


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` for up to five seconds."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting until {what}")


def _client(
    plane: ControlPlane, ca: ClusterCA, parse: _Parser, svid: X509Svid | None = None
) -> DiscoveryClient[Services]:
    return DiscoveryClient(
        plane.target,
        identity(),
        svid or ca.issue(WEB, _now()),
        ca.bundle(),
        parse,
        backoff=FAST,
        rng=random.Random(3),
        connect_timeout_s=0.5,
    )


class _Runnable(Protocol):
    async def run(self) -> None: ...

    def close(self) -> None: ...


Start = Callable[[_Runnable], None]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Runs clients and reporters as tasks; closes and cancels them after the test."""
    tasks: list[tuple[_Runnable, asyncio.Task[None]]] = []

    def _start(item: _Runnable) -> None:
        tasks.append((item, asyncio.create_task(item.run())))

    yield _start
    for item, task in tasks:
        item.close()
        task.cancel()
    await asyncio.gather(*(task for _, task in tasks), return_exceptions=True)


async def test_the_client_applies_a_snapshot_and_acks_it(
    control_plane: ControlPlane, ca: ClusterCA, start: Start
) -> None:
    client = _client(control_plane, ca, _Parser())
    with pytest.raises(NoConfigYet):
        client.current()
    start(client)
    assert await asyncio.wait_for(client.wait_ready(), 5) == ("pay",)
    await _until(
        lambda: (
            [s.acked_version for s in control_plane.discovery.subscribers()] == [client.version]
        ),
        "the server saw the ack",
    )


async def test_updates_yield_each_new_good_config(
    control_plane: ControlPlane, ca: ClusterCA, start: Start
) -> None:
    client = _client(control_plane, ca, _Parser())
    start(client)
    await asyncio.wait_for(client.wait_ready(), 5)
    updates = client.updates()
    control_plane.sources.services = ["pay", "ledger"]
    control_plane.discovery.refresh()
    assert await asyncio.wait_for(anext(updates), 5) == ("pay", "ledger")
    await updates.aclose()


async def test_a_snapshot_the_proxy_cannot_apply_is_nacked_and_the_last_good_stays(
    control_plane: ControlPlane, ca: ClusterCA, start: Start
) -> None:
    client = _client(control_plane, ca, _Parser())
    start(client)
    await asyncio.wait_for(client.wait_ready(), 5)
    good = client.version
    control_plane.sources.services = ["pay", "broken"]
    control_plane.discovery.refresh()
    await _until(lambda: bool(control_plane.discovery.nacks()), "the nack reached the server")
    [nack] = control_plane.discovery.nacks()
    assert nack.reason == "upstreams[1].service: 'broken' is not allowed"
    assert client.rejected == (nack.version, nack.reason)
    assert client.current() == ("pay",)
    assert client.version == good


@pytest.mark.parametrize("fresh_process", [False, True], ids=["grpc-restart", "new-incarnation"])
async def test_the_last_good_config_survives_a_control_plane_restart_and_is_not_resent(
    control_plane: ControlPlane,
    ca: ClusterCA,
    start: Start,
    fresh_process: bool,
) -> None:
    parse = _Parser()
    client = _client(control_plane, ca, parse)
    start(client)
    await asyncio.wait_for(client.wait_ready(), 5)
    held = client.version
    await control_plane.server.stop(grace=None)
    await _until(lambda: client.reconnects >= 1, "the client noticed and retried")
    assert client.current() == ("pay",)  # served from memory while the control plane is away
    if fresh_process:
        control_plane.discovery = Discovery(ca, control_plane.sources.build, coalesce_s=0.01)
    control_plane.server, _ = await serve(control_plane.discovery, control_plane.target)
    await _until(lambda: len(control_plane.discovery.subscribers()) == 1, "the client resubscribed")
    [status] = control_plane.discovery.subscribers()
    assert status.acked_version == held  # the Hello said which version it holds
    assert status.sent_version == ""  # and the unchanged content was not sent again
    assert parse.calls == 1
    # The stream is live: a real change still arrives.
    control_plane.sources.services = ["ledger"]
    control_plane.discovery.refresh()
    await _until(lambda: client.current() == ("ledger",), "the change arrived")


async def test_until_sources_are_ready_the_proxy_has_no_config(
    control_plane: ControlPlane, ca: ClusterCA, start: Start
) -> None:
    control_plane.sources.ready = False
    client = _client(control_plane, ca, _Parser())
    start(client)
    await _until(lambda: bool(control_plane.discovery.subscribers()), "subscribed")
    await asyncio.sleep(0.2)
    with pytest.raises(NoConfigYet):
        client.current()
    control_plane.sources.ready = True
    control_plane.discovery.refresh()
    assert await asyncio.wait_for(client.wait_ready(), 5) == ("pay",)


async def test_the_client_installs_a_renewed_svid_for_its_own_key(
    control_plane: ControlPlane, ca: ClusterCA, start: Start
) -> None:
    bootstrap = ca.issue(WEB, _now() - timedelta(minutes=50), ttl=timedelta(hours=1))
    installed: list[X509Svid] = []
    client = DiscoveryClient(
        control_plane.target,
        identity(),
        bootstrap,
        ca.bundle(),
        _Parser(),
        backoff=FAST,
        on_svid=installed.append,
    )
    start(client)
    await asyncio.wait_for(client.wait_ready(), 5)
    await _until(lambda: bool(installed), "a renewed SVID was installed")
    svid = client.svid
    assert installed == [svid]
    assert svid.serial != bootstrap.serial
    assert svid.key is not bootstrap.key
    assert svid.leaf.public_key() == svid.key.public_key()
    bundles = TrustBundleSet([ca.bundle()])
    assert validate_svid(svid.leaf, svid.chain[1:], bundles, _now(), Purpose.SERVER) == WEB
    assert svid.not_after - _now() > timedelta(hours=23)


async def test_stats_windows_reach_the_control_plane(
    control_plane: ControlPlane,
    ca: ClusterCA,
    start: Start,
) -> None:
    client = _client(control_plane, ca, _Parser())
    recorder = StatsRecorder()
    second = int(_now().timestamp()) - 2
    for latency in (0.01, 0.02, 0.3):
        recorder.record("pay", "ap-southeast", Outcome.HTTP_2XX, latency, second + 0.5)
    recorder.record("pay", "ap-southeast", Outcome.TIMEOUT, 1.0, second + 0.6)
    reporter = StatsReporter(
        client.open_channel, identity(), recorder.drain, interval_s=0.05, backoff=FAST
    )
    start(reporter)
    stats = control_plane.discovery.stats
    await _until(lambda: bool(stats.windows("pay", "ap-southeast")), "the window arrived")
    [window] = stats.windows("pay", "ap-southeast")
    assert window.start == second
    assert window.counts[Outcome.HTTP_2XX] == 3
    assert window.counts[Outcome.TIMEOUT] == 1
    assert window.histogram.count == 4
    assert reporter.sent == 1
    assert reporter.dropped == 0


async def test_stats_wait_in_a_bounded_outbox_while_the_control_plane_is_away(
    control_plane: ControlPlane,
    ca: ClusterCA,
    start: Start,
) -> None:
    client = _client(control_plane, ca, _Parser())
    await control_plane.server.stop(grace=None)
    recorder = StatsRecorder()
    clock = [1_000_000.0]

    def drain(now: float) -> list[StatsWindow]:
        # One new closed second per collection, whatever the wall clock says.
        recorder.record("pay", "us-west", Outcome.HTTP_2XX, 0.01, clock[0])
        clock[0] += 1
        return recorder.drain(clock[0])

    reporter = StatsReporter(
        client.open_channel,
        identity(),
        drain,
        capacity=5,
        interval_s=0.01,
        backoff=FAST,
        connect_timeout_s=0.05,
    )
    start(reporter)
    await _until(lambda: reporter.dropped >= 10, "old windows were dropped")
    assert reporter.waiting <= 5
    assert reporter.sent == 0
