"""The Consul watcher against the fake: a real HTTP server on 127.0.0.1, short real waits.

Backoff sleeps go through an injected sleep that records the delay and yields, so retries
are immediate and their delays can be asserted; blocking queries use a 0.2 s wait.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest

from federation.catalog.core import Backoff, IndexEvent
from federation.catalog.model import AdmissionPolicy, Catalog, Health, Reason
from federation.catalog.watch import ConsulWatcher, WatchSettings
from tests.federation.catalog.consul_fake import ConsulFake

SETTINGS = WatchSettings(wait=0.2, margin=0.2, backoff=Backoff(base=0.01, cap=0.08))
PAY = "/v1/health/service/pay"


async def _until(condition: Callable[[], bool], within: float = 3.0) -> None:
    """Wait (bounded, real time) until ``condition`` holds."""
    async with asyncio.timeout(within):
        # The conditions are counters and lists owned by the code under test: poll them.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@dataclass
class Running:
    """A watcher under test, what it emitted and the backoff delays it asked for."""

    watcher: ConsulWatcher
    seen: list[Catalog] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)

    def last(self) -> Catalog:
        assert self.seen, "nothing emitted yet"
        return self.seen[-1]

    def ports(self, service: str = "pay") -> list[int]:
        return [e.port for e in self.last().endpoints_of(service)]


@pytest.fixture
async def fake() -> AsyncIterator[ConsulFake]:
    consul = ConsulFake()
    consul.put_service("pay", "10.1.0.1", 8080, service_id="pay-1", zone="zone-a")
    consul.put_service("pay", "10.1.0.2", 8080, service_id="pay-2", zone="zone-b")
    consul.put_service("cart", "10.2.0.1", 9090, service_id="cart-1")
    await consul.start()
    yield consul
    await consul.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@asynccontextmanager
async def _start(
    fake: ConsulFake,
    http: aiohttp.ClientSession,
    *,
    wait_ready: bool = True,
    settings: WatchSettings = SETTINGS,
) -> AsyncIterator[Running]:
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        await asyncio.sleep(0.001)

    watcher = ConsulWatcher(
        fake.url, http, AdmissionPolicy(), settings=settings, rng=random.Random(4), sleep=sleep
    )
    running = Running(watcher, delays=delays)

    async def read() -> None:
        async for catalog in watcher.watch():
            running.seen.append(catalog)

    tasks = [asyncio.create_task(watcher.run()), asyncio.create_task(read())]
    try:
        if wait_ready:
            await _until(lambda: bool(running.seen))
        yield running
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
async def running(fake: ConsulFake, http: aiohttp.ClientSession) -> AsyncIterator[Running]:
    async with _start(fake, http) as value:
        yield value


def _never_empty(running: Running) -> None:
    assert all(c.endpoints for c in running.seen), "an empty catalog was emitted"


async def _wait_for_new_request(fake: ConsulFake, path: str) -> None:
    before = fake.counters.requests.get(f"GET {path}", 0)
    await _until(lambda: fake.counters.requests.get(f"GET {path}", 0) > before)


async def test_first_catalog_holds_every_service_with_zone_and_health(running: Running) -> None:
    first = running.seen[0]
    assert [s.name for s in first.services] == ["cart", "pay"]
    assert [(e.address, e.zone, e.health) for e in first.endpoints_of("pay")] == [
        ("10.1.0.1", "zone-a", Health.PASSING),
        ("10.1.0.2", "zone-b", Health.PASSING),
    ]
    assert running.watcher.ready


async def test_steady_updates_arrive_in_order(fake: ConsulFake, running: Running) -> None:
    fake.put_service("pay", "10.1.0.3", 8081, service_id="pay-3")
    await _until(lambda: running.ports() == [8080, 8080, 8081])
    fake.set_status("pay-1", "critical")
    await _until(lambda: running.last().endpoints_of("pay")[0].health is Health.CRITICAL)
    fake.remove_service("cart-1")
    await _until(lambda: running.last().service("cart") is None)
    indexes = [c.index for c in running.seen]
    assert indexes == sorted(set(indexes))


async def test_hostile_entries_are_dropped_and_counted_the_rest_kept(
    fake: ConsulFake, running: Running
) -> None:
    fake.put_service("../admin", "10.9.9.9", 80, service_id="evil-name")
    fake.put_service("pay", "169.254.169.254", 80, service_id="evil-metadata")
    fake.put_service("pay", "10.1.0.9", 0, service_id="evil-port")
    fake.put_service("pay", "10.1.0.8", 80, service_id="evil-tag", tags=['x",le="1'])
    fake.put_service("pay", "10.1.0.7", 8080, service_id="pay-7")
    await _until(lambda: 8080 in running.ports() and len(running.ports()) == 3)
    rejections = running.watcher.rejections
    assert rejections[Reason.NAME_NOT_DNS_LABEL] == 1
    assert rejections[Reason.ADDRESS_METADATA] >= 1
    assert rejections[Reason.PORT_OUT_OF_RANGE] >= 1
    assert rejections[Reason.TAG_UNSAFE] >= 1
    assert {e.address for e in running.last().endpoints_of("pay")} == {
        "10.1.0.1",
        "10.1.0.2",
        "10.1.0.7",
    }
    assert [s.name for s in running.last().services] == ["cart", "pay"]


async def test_our_own_mirror_write_back_is_not_a_local_endpoint(
    fake: ConsulFake, running: Running
) -> None:
    mirror = {"snapbright-mirror-of": "pay@ap-southeast"}
    fake.put_service("pay", "10.8.0.1", 8443, service_id="m-pay", meta=mirror)
    fake.put_service("search", "10.8.0.1", 8443, service_id="m-search", meta=mirror)
    fake.put_service("pay", "10.1.0.4", 8080, service_id="pay-4")
    await _until(lambda: len(running.ports()) == 3)
    assert "10.8.0.1" not in {e.address for e in running.last().endpoints}
    assert running.last().service("search") is None


async def test_index_reset_to_zero_refetches_and_sees_new_state(
    fake: ConsulFake, running: Running
) -> None:
    fake.reset_index(0)
    fake.put_service("pay", "10.1.0.5", 8085, service_id="pay-5")
    await _until(lambda: 8085 in running.ports())
    assert running.watcher.index_events[IndexEvent.BACKWARDS] >= 1
    _never_empty(running)


async def test_index_going_backwards_resets_and_sees_new_state(
    fake: ConsulFake, running: Running
) -> None:
    fake.reset_index(1)
    fake.remove_service("pay-2")
    await _until(lambda: running.ports() == [8080])
    assert running.watcher.index_events[IndexEvent.BACKWARDS] >= 1
    _never_empty(running)


async def test_reported_index_zero_is_treated_as_one(fake: ConsulFake, running: Running) -> None:
    fake.report_index_next(PAY, 0, times=2)
    fake.wake_spuriously()
    await _until(lambda: running.watcher.index_events[IndexEvent.NOT_POSITIVE] >= 1)
    fake.put_service("pay", "10.1.0.6", 8086, service_id="pay-6")
    await _until(lambda: 8086 in running.ports())
    _never_empty(running)


async def test_spurious_wake_ups_emit_nothing(fake: ConsulFake, running: Running) -> None:
    emitted = len(running.seen)
    events = running.watcher.index_events
    for wakes in range(1, 4):
        fake.wake_spuriously()
        await _until(lambda: events[IndexEvent.UNCHANGED] >= wakes)  # noqa: B023
    assert len(running.seen) == emitted


async def test_a_change_under_an_unchanged_index_is_still_applied(
    fake: ConsulFake, running: Running
) -> None:
    # A write lands on the index the watcher already holds (as after an index reset):
    # the query returns at its wait with the same index, and the new body still counts.
    held = fake.service_index["pay"]
    fake.put_service("pay", "10.1.0.3", 8081, service_id="pay-3")
    fake.reset_index(held)
    await _until(lambda: 8081 in running.ports())
    assert running.watcher.index_events[IndexEvent.UNCHANGED] >= 1


async def test_429_and_500_back_off_with_growing_jittered_delays_then_recover(
    fake: ConsulFake, running: Running
) -> None:
    fake.fail_next(PAY, 429, times=2)
    fake.fail_next(PAY, 500, times=2)
    fake.wake_spuriously()
    await _until(lambda: running.watcher.failures["http-500"] == 2)
    fake.put_service("pay", "10.1.0.3", 8081, service_id="pay-3")
    await _until(lambda: 8081 in running.ports())
    assert running.watcher.failures["http-429"] == 2
    assert len(running.delays) == 4
    for failures, delay in enumerate(running.delays, start=1):
        ceiling = min(0.08, 0.01 * 2 ** (failures - 1))
        assert ceiling / 2 <= delay <= ceiling
    _never_empty(running)


async def test_truncated_json_is_retried_not_applied(fake: ConsulFake, running: Running) -> None:
    fake.truncate_next(PAY)
    fake.wake_spuriously()
    await _wait_for_new_request(fake, PAY)
    fake.put_service("pay", "10.1.0.3", 8081, service_id="pay-3")
    await _until(lambda: 8081 in running.ports())
    assert running.watcher.failures["invalid-json"] == 1
    _never_empty(running)


HOSTILE_BODIES = [
    ("deeply nested brackets", b"[" * 50_000, "invalid-json"),
    ("not UTF-8", b"\xff\xfe[]", "invalid-json"),
    ("an object where a list belongs", b'{"Service": {}}', "bad-shape"),
    ("larger than the body cap", b"[" + b" " * 70_000 + b"]", "too-large"),
]


@pytest.mark.parametrize(
    ("body", "kind"), [b[1:] for b in HOSTILE_BODIES], ids=[b[0] for b in HOSTILE_BODIES]
)
async def test_hostile_response_bodies_are_retried_not_applied(
    fake: ConsulFake, http: aiohttp.ClientSession, body: bytes, kind: str
) -> None:
    settings = WatchSettings(wait=0.2, margin=0.2, backoff=SETTINGS.backoff, max_body=65_536)
    async with _start(fake, http, settings=settings) as running:
        fake.body_next(PAY, body)
        fake.wake_spuriously()
        await _until(lambda: running.watcher.failures[kind] == 1)
        fake.put_service("pay", "10.1.0.3", 8081, service_id="pay-3")
        await _until(lambda: 8081 in running.ports())
        _never_empty(running)


async def test_hang_shorter_than_the_client_timeout_is_not_a_failure(
    fake: ConsulFake, running: Running
) -> None:
    fake.hang_next(PAY, 0.15)
    fake.wake_spuriously()
    await _wait_for_new_request(fake, PAY)
    fake.put_service("pay", "10.1.0.3", 8081, service_id="pay-3")
    await _until(lambda: 8081 in running.ports())
    assert not running.watcher.failures


async def test_hang_longer_than_the_client_timeout_is_retried(
    fake: ConsulFake, running: Running
) -> None:
    fake.hang_next(PAY, 1.0)
    fake.wake_spuriously()
    await _until(lambda: running.watcher.failures["timeout"] == 1)
    fake.put_service("pay", "10.1.0.3", 8081, service_id="pay-3")
    await _until(lambda: 8081 in running.ports())
    _never_empty(running)


async def test_outage_keeps_the_last_catalog_and_recovery_brings_the_new_state(
    fake: ConsulFake, running: Running
) -> None:
    before = running.last()
    await fake.stop()
    fake.remove_service("pay-1")
    fake.put_service("pay", "10.1.0.3", 8081, service_id="pay-3")
    await _until(lambda: running.watcher.failures["unreachable"] >= 3)
    assert running.last() is before
    assert running.watcher.current() is before
    await fake.start()
    await _until(lambda: running.ports() == [8080, 8081])
    assert [e.address for e in running.last().endpoints_of("pay")] == ["10.1.0.2", "10.1.0.3"]
    _never_empty(running)


async def test_a_new_watcher_is_not_ready_until_its_first_full_read(
    fake: ConsulFake, http: aiohttp.ClientSession
) -> None:
    await fake.stop()
    fake.fail_next("/v1/health/service/cart", 500, times=3)
    async with _start(fake, http, wait_ready=False) as running:
        await _until(lambda: running.watcher.failures["unreachable"] >= 2)
        assert not running.watcher.ready
        assert running.watcher.current() is None
        await fake.start()
        await _until(lambda: running.watcher.failures["http-500"] == 3)
        await _until(lambda: running.watcher.ready)
        # The first catalog is whole: cart's failed reads did not let a partial one out.
        assert all(c.service("cart") is not None for c in running.seen)
        assert running.ports() == [8080, 8080]


async def test_declared_workload_identity_is_admitted_or_drops_its_endpoint(
    fake: ConsulFake, running: Running
) -> None:
    identity = {"snapbright-workload": "pay-7", "snapbright-service-account": "pay"}
    fake.put_service("pay", "10.1.0.7", 8080, service_id="pay-7", meta=identity)
    hostile = {"snapbright-workload": "pay-8", "snapbright-service-account": "Admin"}
    fake.put_service("pay", "10.1.0.8", 8080, service_id="pay-8", meta=hostile)
    await _until(lambda: len(running.ports()) == 3)
    assert [w.spiffe_path for w in running.last().workloads] == ["/ns/default/sa/pay"]
    assert "10.1.0.8" not in {e.address for e in running.last().endpoints}
    assert running.watcher.rejections[Reason.NAME_NOT_DNS_LABEL] == 1
