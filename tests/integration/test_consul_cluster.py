"""A Consul-backed cluster against the Consul API fake (issue 4, "What this issue must show" 2).

The fake runs in this process on its own port; the control plane reads its catalog from it
and peers with an embedded-registry control plane that exports ``pay``; a sidecar's discovery
client subscribes to the Consul-backed one and records every configuration it is handed.
Then Consul's index resets, then Consul is down for 30 s while a service changes: at no point
does the subscriber get an empty or smaller configuration, and after the outage the change
arrives. The peer's ``pay`` is written back into Consul as a mirror with Snapbright metadata.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from federation.catalog.consul import MIRROR_TAG, PEER_META
from proxy.api.v1 import discovery_pb2 as pb
from proxy.discovery.client import DiscoveryClient
from proxy.discovery.core import Backoff
from proxy.identity.model import SpiffeId, TrustDomain
from snapbright.controlplane.process import ControlPlane
from tests.federation.catalog.consul_fake import ConsulFake
from tests.snapbright.controlplane.conftest import (
    MESH,
    call,
    control_plane,
    registration,
    until,
    write_config,
)

pytestmark = pytest.mark.e2e

_OUTAGE = 30.0
_EXPORT_PAY = """\
apiVersion: snapbright.io/v1alpha1
kind: ExportPolicy
metadata: {name: exports}
spec:
  exports:
    - {service: pay, peers: [us-west]}
"""

Config = frozenset[tuple[str, str, str]]


def _config(snapshot: pb.Snapshot) -> Config:
    """A configuration as the set of (upstream, target, endpoint) it routes to."""
    return frozenset(
        (upstream.service, target.name, f"{endpoint.address}:{endpoint.port}")
        for upstream in snapshot.upstreams
        for target in upstream.targets
        for endpoint in target.endpoints
    )


class _Recorder:
    """Every complete configuration the subscriber was handed, in order, with its version."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Config]] = []
        self.marks: list[str] = []
        self.phase = "start"

    def __call__(self, snapshot: pb.Snapshot) -> pb.Snapshot:
        self.seen.append((snapshot.version, _config(snapshot)))
        self.marks.append(f"{snapshot.version} at {self.phase}")
        return snapshot

    def latest(self) -> Config:
        return self.seen[-1][1] if self.seen else frozenset()

    def shrinks(self) -> list[str]:
        """Each version that was empty or dropped something the one before it had."""
        found = []
        for (_, before), (version, after) in zip(self.seen, self.seen[1:], strict=False):
            if not after or not before <= after:
                found.append(f"{version}: lost {sorted(before - after)}")
        if self.seen and not self.seen[0][1]:
            found.append(f"{self.seen[0][0]}: empty")
        return found


def _subscriber(plane: ControlPlane, recorder: _Recorder) -> DiscoveryClient[pb.Snapshot]:
    """A checkout sidecar's discovery client (as the controlplane tests build one) whose
    parser records every complete snapshot handed to it."""
    trust_domain = TrustDomain.for_cluster("us-west", MESH)
    svid = plane.ca().issue(
        SpiffeId.workload(trust_domain, "default", "checkout"),
        datetime.now(UTC),
        timedelta(hours=1),
    )
    identity = pb.ProxyIdentity(
        role=pb.ProxyIdentity.ROLE_SIDECAR,
        cluster="us-west",
        namespace="default",
        service_account="checkout",
        workload="checkout-1",
        service="checkout",
    )
    return DiscoveryClient(
        plane.discovery_target,
        identity,
        svid,
        plane.ca().bundle(),
        recorder,
        backoff=Backoff(base_s=0.05, cap_s=0.5, stable_s=1.0),
    )


async def test_consul_cluster_never_pushes_an_empty_or_smaller_config_through_reset_and_outage(
    tmp_path: Path,
) -> None:
    began = time.monotonic()
    consul = ConsulFake()
    consul.put_service("web", "10.1.0.1", 8080, service_id="web-1")
    consul.put_service("web", "10.1.0.2", 8080, service_id="web-2")
    consul.put_service("ledger", "10.1.0.3", 7070, service_id="ledger-1")
    await consul.start()
    west = write_config(
        tmp_path / "west",
        "us-west",
        catalog=f"{{backend: consul, consul: {{address: '{consul.url}', leaderKey: cp/leader}}}}",
    )
    east = write_config(tmp_path / "east", "ap-southeast")
    (tmp_path / "east" / "policies" / "exports.yaml").write_text(_EXPORT_PAY)
    recorder = _Recorder()
    try:
        async with control_plane(east) as exporter, control_plane(west) as plane:
            # No sidecar heartbeats this registration: it must outlive the test.
            body = {**registration("pay-1", "pay", 9001), "ttl": "10m"}
            assert (await call("POST", f"{exporter.admin_url}/api/v1/registrations", body))[
                0
            ] == 200
            client = _subscriber(plane, recorder)
            task = asyncio.create_task(client.run())
            try:
                # The Consul services reach the subscriber.
                local = {
                    ("web", "web", "10.1.0.1:8080"),
                    ("web", "web", "10.1.0.2:8080"),
                    ("ledger", "ledger", "10.1.0.3:7070"),
                }
                await until(
                    lambda: local <= {(u, t.split("@")[0], e) for u, t, e in recorder.latest()}, 15
                )

                # A peer's export is mirrored, and written back into Consul with our metadata.
                recorder.phase = "peering"
                token = (await call("POST", f"{exporter.admin_url}/api/v1/peering/token", {}))[1]
                status, answer = await call(
                    "POST", f"{plane.admin_url}/api/v1/peering/establish", {"token": token["token"]}
                )
                assert status == 200, answer
                await until(
                    lambda: any(t == "pay@ap-southeast" for _, t, _ in recorder.latest()), 15
                )
                await until(lambda: any(MIRROR_TAG in s.tags for s in consul.services.values()), 15)
                (mirror,) = [s for s in consul.services.values() if MIRROR_TAG in s.tags]
                assert (mirror.name, mirror.meta[PEER_META]) == ("pay", "ap-southeast")
                # The write-back is not read back as a local copy of pay.
                assert [t for u, t, _ in recorder.latest() if u == "pay"] == ["pay@ap-southeast"]

                # The index goes back to 1 (a restore); a change after it still arrives.
                recorder.phase = "index reset"
                consul.reset_index(1)
                # A real restore abandons the state store, which returns every blocked query
                # (the fake leaves them blocked until their 30 s wait runs out).
                consul.wake_spuriously()
                consul.put_service("web", "10.1.0.4", 8080, service_id="web-3")
                await until(lambda: ("web", "web", "10.1.0.4:8080") in recorder.latest(), 15)

                # Consul is down for 30 s; a change made meanwhile arrives after it is back.
                recorder.phase = "outage"
                await consul.stop()
                down = time.monotonic()
                consul.put_service("ledger", "10.1.0.5", 7070, service_id="ledger-2")
                seen_before = len(recorder.seen)
                await asyncio.sleep(_OUTAGE)
                during = recorder.seen[seen_before:]
                await consul.start()
                recorder.phase = "back"
                # The watcher retries with jittered backoff capped at 30 s.
                await until(lambda: ("ledger", "ledger", "10.1.0.5:7070") in recorder.latest(), 40)
                arrived = time.monotonic() - down - _OUTAGE
                assert plane.ready
            finally:
                client.close()
                task.cancel()
    finally:
        await consul.stop()
    assert all(config for _, config in during), f"pushed while Consul was down: {during}"
    assert recorder.shrinks() == [], f"versions: {recorder.marks}"
    print(
        f"{len(recorder.seen)} versions, change arrived {arrived:.1f}s after Consul returned, "
        f"{time.monotonic() - began:.1f}s"
    )
