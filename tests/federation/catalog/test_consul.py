"""Leader election and mirror write-back through py-consul, against the Consul fake."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest

from federation.catalog.consul import (
    MIRROR_TAG,
    ConsulClient,
    ConsulRejected,
    ConsulUnavailable,
    LeaderElection,
    MirrorEntry,
    MirrorWriter,
)
from federation.catalog.core import Backoff
from federation.catalog.model import AdmissionPolicy, CatalogEntryError, DeniedTarget, Reason
from tests.federation.catalog.consul_fake import ConsulFake

KEY = "snapbright/us-west/leader"


async def _until(condition: Callable[[], bool], within: float = 3.0) -> None:
    """Wait (bounded, real time) until ``condition`` holds."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.fixture
async def fake() -> AsyncIterator[ConsulFake]:
    consul = ConsulFake()
    consul.put_service("pay", "10.1.0.1", 8080, service_id="pay-1")
    await consul.start()
    yield consul
    await consul.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@asynccontextmanager
async def _replicas(
    fake: ConsulFake,
    http: aiohttp.ClientSession,
    names: list[str],
    changes: list[tuple[str, bool]] | None = None,
) -> AsyncIterator[dict[str, LeaderElection]]:
    def recorder(name: str) -> Callable[[bool], None]:
        return lambda leading: None if changes is None else changes.append((name, leading))

    elections = {
        name: LeaderElection(
            ConsulClient(http, fake.url),
            KEY,
            name,
            ttl=10,
            lock_delay=0,
            renew_every=0.1,
            backoff=Backoff(base=0.01, cap=0.05),
            rng=random.Random(name),
            on_change=recorder(name),
        )
        for name in names
    }
    tasks = [asyncio.create_task(e.run()) for e in elections.values()]
    try:
        yield elections
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _leaders(elections: dict[str, LeaderElection]) -> list[str]:
    return [name for name, election in elections.items() if election.is_leader]


async def test_two_replicas_elect_exactly_one_leader(
    fake: ConsulFake, http: aiohttp.ClientSession
) -> None:
    async with _replicas(fake, http, ["a", "b"]) as elections:
        await _until(lambda: len(_leaders(elections)) == 1)
        await asyncio.sleep(0.3)  # several renewals later, still exactly one
        assert len(_leaders(elections)) == 1
        leader = elections[_leaders(elections)[0]]
        assert fake.keys[KEY].session == leader.session_id
        assert fake.keys[KEY].value.decode() == _leaders(elections)[0]


async def test_destroyed_session_steps_the_leader_down_at_once_and_the_other_takes_over(
    fake: ConsulFake, http: aiohttp.ClientSession
) -> None:
    changes: list[tuple[str, bool]] = []
    async with _replicas(fake, http, ["a", "b"], changes) as elections:
        await _until(lambda: len(_leaders(elections)) == 1)
        (old,) = _leaders(elections)
        (new,) = set(elections) - {old}
        session = elections[old].session_id
        both: list[bool] = []
        async with http.put(f"{fake.url}/v1/session/destroy/{session}") as response:
            assert response.status == 200

        def taken_over() -> bool:
            both.append(len(_leaders(elections)) == 2)
            return _leaders(elections) == [new]

        # Far under the 10 s TTL: the leader saw its key change, it did not wait to expire.
        await _until(taken_over, within=1.0)
        assert not any(both)
        assert fake.keys[KEY].session == elections[new].session_id
    assert changes[:3] == [(old, True), (old, False), (new, True)]


async def test_leader_steps_down_when_consul_is_unreachable_and_leads_again_after(
    fake: ConsulFake, http: aiohttp.ClientSession
) -> None:
    async with _replicas(fake, http, ["solo"]) as elections:
        await _until(lambda: elections["solo"].is_leader)
        await fake.stop()
        await _until(lambda: not elections["solo"].is_leader, within=2.0)
        await fake.start()
        # Its session outlived the outage, so it takes the key back without a lock-delay.
        await _until(lambda: elections["solo"].is_leader)


async def test_cancelled_replica_releases_the_key(
    fake: ConsulFake, http: aiohttp.ClientSession
) -> None:
    async with _replicas(fake, http, ["a"]) as elections:
        await _until(lambda: elections["a"].is_leader)
    assert fake.keys[KEY].session is None
    assert not fake.sessions


def _is_leader(election: LeaderElection) -> Callable[[], bool]:
    return lambda: election.is_leader


def _mirrors(*addresses: str) -> list[MirrorEntry]:
    return [MirrorEntry("pay", "ap-southeast", address, 8443) for address in addresses]


def _mirrored(fake: ConsulFake) -> dict[str, str]:
    return {
        s.address: s.meta["snapbright-mirror-of"]
        for s in fake.services.values()
        if "snapbright-mirror-of" in s.meta
    }


async def test_only_the_leader_writes_mirrors_and_a_new_leader_reconciles(
    fake: ConsulFake, http: aiohttp.ClientSession
) -> None:
    async with _replicas(fake, http, ["a", "b"]) as elections:
        await _until(lambda: len(_leaders(elections)) == 1)
        (old,) = _leaders(elections)
        (new,) = set(elections) - {old}
        writers = {
            name: MirrorWriter(ConsulClient(http, fake.url), _is_leader(e), AdmissionPolicy())
            for name, e in elections.items()
        }
        assert await writers[old].sync(_mirrors("10.8.0.1", "10.8.0.2"))
        assert not await writers[new].sync(_mirrors("10.9.9.9"))
        assert _mirrored(fake) == {
            "10.8.0.1": "pay@ap-southeast",
            "10.8.0.2": "pay@ap-southeast",
        }
        registered = fake.counters.requests["PUT /v1/agent/service/register"]
        assert await writers[old].sync(_mirrors("10.8.0.1", "10.8.0.2"))
        assert fake.counters.requests["PUT /v1/agent/service/register"] == registered

        async with http.put(
            f"{fake.url}/v1/session/destroy/{elections[old].session_id}"
        ) as response:
            assert response.status == 200
        await _until(lambda: _leaders(elections) == [new])
        assert not await writers[old].sync(_mirrors("10.7.7.7"))
        assert await writers[new].sync(_mirrors("10.8.0.2", "10.8.0.3"))
        assert _mirrored(fake) == {
            "10.8.0.2": "pay@ap-southeast",
            "10.8.0.3": "pay@ap-southeast",
        }
        entry = next(s for s in fake.services.values() if s.address == "10.8.0.3")
        assert entry.name == "pay"
        assert entry.tags == [MIRROR_TAG]
        assert entry.meta["snapbright-peer"] == "ap-southeast"
        assert fake.services["pay-1"].address == "10.1.0.1"  # local instances untouched


def test_mirror_entries_validate_their_fields() -> None:
    with pytest.raises(CatalogEntryError, match="name-not-dns-label"):
        MirrorEntry("pay", "AP/evil", "10.0.0.1", 8443)
    with pytest.raises(CatalogEntryError, match="port-out-of-range"):
        MirrorEntry("pay", "ap", "10.0.0.1", 70000)


async def test_client_maps_consul_failures_to_ours(
    fake: ConsulFake, http: aiohttp.ClientSession
) -> None:
    client = ConsulClient(http, fake.url)
    fake.fail_next("/v1/catalog/services", 429)
    with pytest.raises(ConsulUnavailable, match="429"):
        await client.services()
    fake.fail_next("/v1/catalog/services", 500)
    with pytest.raises(ConsulUnavailable, match="500"):
        await client.services()
    with pytest.raises(ConsulRejected, match="Missing service name"):
        await client.register_service("x", "", "10.0.0.1", 80)
    with pytest.raises(ConsulUnavailable, match="invalid session"):
        await client.kv_acquire("k", "v", "no-such-session")  # Consul answers 500
    assert not await client.session_renew("00000000-0000-0000-0000-000000000000")
    assert not await client.deregister_service("never-registered")
    assert await client.services() == {"pay": []}
    await fake.stop()
    with pytest.raises(ConsulUnavailable):
        await client.services()


async def test_mirror_writer_refuses_entries_aimed_at_our_admin_ports(
    fake: ConsulFake, http: aiohttp.ClientSession
) -> None:
    policy = AdmissionPolicy(denied=frozenset({DeniedTarget("0.0.0.0", 8502)}))
    writer = MirrorWriter(ConsulClient(http, fake.url), lambda: True, policy)
    entries = [
        MirrorEntry("pay", "ap-southeast", "10.8.0.1", 8443),
        MirrorEntry("pay", "ap-southeast", "10.8.0.2", 8502),
        MirrorEntry("pay", "ap-southeast", "169.254.169.254", 80),
    ]
    assert await writer.sync(entries)
    assert _mirrored(fake) == {"10.8.0.1": "pay@ap-southeast"}
    assert writer.rejections == {Reason.ADDRESS_DENIED: 1, Reason.ADDRESS_METADATA: 1}
