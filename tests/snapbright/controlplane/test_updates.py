"""A peer's change reaches a sidecar as a delta, recomputing O(1) upstreams in the control
plane: the whole composition (peering callbacks -> view -> discovery), a real peer on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from federation.peering.credentials import control_plane_server_name
from federation.peering.manager import PeeringManager
from federation.peering.model import GatewayAddress, ServiceKey
from federation.trust.ca import create_ca
from proxy.discovery.core import control_plane_host, control_plane_id
from proxy.identity.model import TrustDomain
from proxy.identity.svid import X509Svid
from tests.snapbright.controlplane.conftest import MESH, control_plane, sidecar, until, write_config

PEER = "ap-southeast"


@asynccontextmanager
async def _peer(directory: Path) -> AsyncIterator[PeeringManager]:
    """Another cluster's peering, alone: what it exports is set by the test."""
    ca = create_ca(TrustDomain.for_cluster(PEER, MESH), datetime.now(UTC) - timedelta(minutes=1))
    key = ec.generate_private_key(ec.SECP256R1())
    spiffe_id = control_plane_id(ca.trust_domain)
    chain = ca.sign_svid(
        spiffe_id,
        key.public_key(),
        datetime.now(UTC),
        timedelta(hours=1),
        dns_names=(control_plane_server_name(PEER, MESH), control_plane_host(ca.trust_domain)),
    )
    manager = PeeringManager(
        cluster=PEER,
        mesh=MESH,
        svid=X509Svid(spiffe_id, chain, key),
        bundle=ca.bundle(),
        state_dir=directory,
    )
    await manager.start()
    try:
        port = await manager.serve("127.0.0.1:0")
        manager.gateways = (GatewayAddress("127.0.0.1", port),)
        yield manager
    finally:
        await manager.close()


def _export(peer: PeeringManager, name: str) -> None:
    peer.set_service(ServiceKey("default", name), healthy_endpoints=1, exported_to=["us-west"])


async def test_one_exported_service_more_recomputes_one_upstream_and_arrives_as_a_delta(
    tmp_path: Path,
) -> None:
    # A 1 s TTL: the failover loop may call "no local copy" one TTL after the catalog's read.
    config = write_config(tmp_path / "west", "us-west", catalog="{registrationTtl: 1s}")
    async with _peer(tmp_path / "peer") as peer, control_plane(config) as plane:
        for index in range(50):
            _export(peer, f"svc-{index}")
        await plane.peering.establish(peer.generate_token())
        client = sidecar(plane.ca(), plane.discovery_target, "us-west", "web")
        task = asyncio.create_task(client.run())
        try:
            await until(lambda: bool(client.version) and len(client.current().upstreams) == 50)
            work, deltas = plane.view.upstreams_federated, client.deltas
            _export(peer, "new-one")
            await until(lambda: "new-one" in {u.service for u in client.current().upstreams})
            arrived = time.time()
            await until(lambda: (plane.failover.ticked_at or 0.0) > arrived)
            # The import itself only: nobody here calls these services and none has a policy,
            # so the failover loop decides none of them (no weights, no recompute).
            assert plane.view.upstreams_federated - work == 1
            assert plane.view.weights == {}
            assert client.deltas > deltas
        finally:
            client.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
