"""A control plane whose catalog is Consul (the fake of tests/federation/catalog)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.federation.catalog.consul_fake import ConsulFake
from tests.snapbright.controlplane.conftest import (
    control_plane,
    next_snapshot,
    sidecar,
    until,
    write_config,
)


async def test_nothing_is_pushed_until_consul_was_read_and_an_outage_changes_nothing(
    tmp_path: Path,
) -> None:
    consul = ConsulFake()
    consul.put_service("pay", "10.1.0.1", 8080, service_id="pay-1")
    await consul.start()
    await consul.stop()  # Consul is down when the control plane starts
    config = write_config(
        tmp_path,
        "us-west",
        catalog=f"{{backend: consul, consul: {{address: '{consul.url}', leaderKey: cp/leader}}}}",
    )
    try:
        async with control_plane(config) as plane:
            client = sidecar(plane.ca(), plane.discovery_target, "us-west", "web")
            task = asyncio.create_task(client.run())
            try:
                await until(lambda: bool(plane.discovery.subscribers()))
                await asyncio.sleep(0.5)
                assert client.version == ""  # no catalog read yet: nothing, not an empty set

                await consul.start()
                snapshot = await next_snapshot(client)
                (upstream,) = snapshot.upstreams
                assert [(e.address, e.port) for e in upstream.targets[0].endpoints] == [
                    ("10.1.0.1", 8080)
                ]

                await consul.stop()
                await asyncio.sleep(0.5)
                assert client.version == snapshot.version  # the outage pushes nothing
                assert plane.ready
            finally:
                client.close()
                task.cancel()
    finally:
        await consul.stop()
