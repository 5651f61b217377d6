"""The embedded registry: durable registrations, TTL expiry in virtual time, watch."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation.catalog.model import (
    AdmissionPolicy,
    Catalog,
    DeniedTarget,
    Endpoint,
    Protocol,
    Reason,
    Registration,
    Service,
    Workload,
)
from federation.catalog.store import FILE_NAME, RegistrationRejected, Registry

POLICY = AdmissionPolicy(allow_loopback=True, denied=frozenset({DeniedTarget("127.0.0.1", 9901)}))
T0 = 1_700_000_000.0


def _registration(name: str, address: str = "127.0.0.1", port: int = 18080) -> Registration:
    workload = Workload(name, service_account="pay")
    return Registration(name, workload, Endpoint("pay", address, port, workload=name))


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    opened = Registry.open(tmp_path, POLICY, now=T0)
    yield opened
    opened.close()


def test_fresh_registry_is_ready_with_an_empty_catalog(registry: Registry) -> None:
    assert registry.ready
    current = registry.current()
    assert current is not None
    assert current.endpoints == ()


def test_registration_appears_with_an_implied_service_and_growing_index(
    registry: Registry,
) -> None:
    first = registry.register(_registration("pay-1"), ttl=10, now=T0)
    second = registry.register(_registration("pay-2", port=18081), ttl=10, now=T0)
    assert second > first
    current = registry.current()
    assert current is not None
    assert current.index == second
    assert [e.port for e in current.endpoints_of("pay")] == [18080, 18081]
    assert current.service("pay") == Service("pay")
    assert {w.spiffe_path for w in current.workloads} == {"/ns/default/sa/pay"}


def test_registration_to_an_admin_port_is_refused_and_counted(registry: Registry) -> None:
    with pytest.raises(RegistrationRejected, match="address-denied"):
        registry.register(_registration("evil", port=9901), ttl=10, now=T0)
    assert registry.rejections[Reason.ADDRESS_DENIED] == 1
    current = registry.current()
    assert current is not None
    assert current.endpoints == ()


def test_same_registration_again_does_not_bump_the_index(registry: Registry) -> None:
    index = registry.register(_registration("pay-1"), ttl=10, now=T0)
    assert registry.register(_registration("pay-1"), ttl=10, now=T0 + 5) == index


def test_ttl_expiry_in_virtual_time(registry: Registry) -> None:
    registry.register(_registration("pay-1"), ttl=10, now=T0)
    registry.register(_registration("pay-2", port=18081), ttl=10, now=T0)
    assert registry.heartbeat("pay-2", now=T0 + 8)
    assert registry.expire(now=T0 + 9.9) == ()
    assert registry.expire(now=T0 + 10) == ("pay-1",)
    assert registry.expire(now=T0 + 17.9) == ()
    assert registry.expire(now=T0 + 18) == ("pay-2",)
    assert not registry.heartbeat("pay-2", now=T0 + 19)
    current = registry.current()
    assert current is not None
    assert current.endpoints == ()


def test_deregister_removes_only_what_exists(registry: Registry) -> None:
    registry.register(_registration("pay-1"), ttl=10, now=T0)
    assert registry.deregister("pay-1")
    assert not registry.deregister("pay-1")


def test_reopened_registry_keeps_entries_index_and_gives_a_fresh_ttl(tmp_path: Path) -> None:
    first = Registry.open(tmp_path, POLICY, now=T0)
    first.put_service(Service("cart", protocol=Protocol.GRPC))
    index = first.register(_registration("pay-1"), ttl=10, now=T0)
    first.close()
    # The control plane was down for an hour: the workload gets one TTL to heartbeat.
    second = Registry.open(tmp_path, POLICY, now=T0 + 3600)
    current = second.current()
    assert current is not None
    assert current.index == index
    assert second.registration("pay-1") == _registration("pay-1")
    assert current.service("cart") == Service("cart", protocol=Protocol.GRPC)
    assert second.expire(now=T0 + 3609) == ()
    assert second.expire(now=T0 + 3610) == ("pay-1",)
    assert second.register(_registration("pay-1"), ttl=10, now=T0 + 3611) > index
    second.close()


def test_tampered_rows_are_dropped_and_counted_on_load(tmp_path: Path) -> None:
    Registry.open(tmp_path, POLICY, now=T0).close()
    db = sqlite3.connect(tmp_path / FILE_NAME)
    body = (
        '{"workload": {"name": "x", "namespace": "default", "service_account": "a"},'
        ' "endpoint": {"service": "x", "address": "169.254.169.254", "port": 80, "workload": "x"}}'
    )
    with db:
        db.execute("INSERT INTO registrations VALUES ('x', ?, 10, ?)", (body, T0 + 10))
    db.close()
    registry = Registry.open(tmp_path, POLICY, now=T0)
    assert registry.registration("x") is None
    assert registry.rejections[Reason.ADDRESS_METADATA] == 1
    registry.close()


async def test_watch_yields_current_then_coalesced_changes(registry: Registry) -> None:
    seen: list[Catalog] = []
    got_one = asyncio.Event()

    async def reader() -> None:
        async for catalog in registry.watch():
            seen.append(catalog)
            got_one.set()

    task = asyncio.create_task(reader())
    await asyncio.wait_for(got_one.wait(), 1)
    # Three changes with no await between them reach the reader as one.
    registry.register(_registration("pay-1"), ttl=10, now=T0)
    registry.register(_registration("pay-2", port=18081), ttl=10, now=T0)
    registry.deregister("pay-1")
    for _ in range(5):
        await asyncio.sleep(0)
    registry.close()
    await asyncio.wait_for(task, 1)
    assert [len(c.endpoints) for c in seen] == [0, 1]
    assert seen[-1].index > seen[0].index
    assert seen[-1].endpoints[0].workload == "pay-2"


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from federation.catalog.model import AdmissionPolicy, Endpoint, Registration, Workload
    from federation.catalog.store import Registry

    registry = Registry.open(Path(sys.argv[1]), AdmissionPolicy(allow_loopback=True), now=0.0)
    for i in range(20):
        workload = Workload(f"pay-{i}")
        endpoint = Endpoint("pay", "127.0.0.1", 20000 + i, workload=f"pay-{i}")
        index = registry.register(Registration(f"pay-{i}", workload, endpoint), 60, now=0.0)
        print(f"ack {i} {index}", flush=True)
    time.sleep(60)
    """
)


def test_acknowledged_registrations_survive_kill_9(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[3]
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        assert child.stdout is not None
        acks = [child.stdout.readline().split() for _ in range(20)]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert [a[:2] for a in acks] == [["ack", str(i)] for i in range(20)]
    registry = Registry.open(tmp_path, POLICY, now=1.0)
    current = registry.current()
    assert current is not None
    assert current.index == int(acks[-1][2])
    assert {e.port for e in current.endpoints_of("pay")} == {20000 + i for i in range(20)}
    registry.close()


async def test_expiry_loop_uses_the_injected_clock(registry: Registry) -> None:
    registry.register(_registration("pay-1"), ttl=10, now=T0)
    registry.register(_registration("pay-2", port=18081), ttl=30, now=T0)
    loop_task = asyncio.create_task(registry.run_expiry(interval=0.001, clock=lambda: T0 + 20))
    try:
        async with asyncio.timeout(2):
            while registry.registration("pay-1") is not None:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
    finally:
        loop_task.cancel()
    assert registry.registration("pay-2") is not None
