"""Control planes on 127.0.0.1 (in-process or as `snapbright controlplane` subprocesses), and
sidecar subscribers with real SVIDs from their CA."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from federation.trust.ca import ClusterCA
from proxy.api.v1 import discovery_pb2 as pb
from proxy.discovery.client import DiscoveryClient
from proxy.discovery.core import Backoff
from proxy.identity.model import SpiffeId, TrustDomain
from snapbright.controlplane.process import ControlPlane, load_config, running

MESH = "acme"

GOOD_POLICY = """\
apiVersion: snapbright.io/v1alpha1
kind: TrafficPolicy
metadata: {name: pay}
spec:
  service: pay
  timeouts: {request: 2s}
"""

BAD_POLICY = """\
apiVersion: snapbright.io/v1alpha1
kind: TrafficPolicy
metadata: {name: pay}
spec:
  service: pay
  timeouts: {request: soon}
"""


def write_config(
    directory: Path,
    cluster: str,
    *,
    extra: str = "",
    policies: bool = True,
    ports: tuple[int, int, int] = (0, 0, 0),
    catalog: str = "{registrationTtl: 30s}",
) -> Path:
    """A ControlPlaneConfig for ``cluster`` in ``directory``; ``ports`` are discovery, peering
    and admin (0: picked by the OS)."""
    directory.mkdir(parents=True, exist_ok=True)
    if policies:
        (directory / "policies").mkdir(exist_ok=True)
    text = f"""\
apiVersion: snapbright.io/v1alpha1
kind: ControlPlaneConfig
metadata: {{name: {cluster}}}
spec:
  cluster: {cluster}
  mesh: {MESH}
  stateDir: state
  listen:
    discovery: {{address: 127.0.0.1, port: {ports[0]}}}
    peering: {{address: 127.0.0.1, port: {ports[1]}}}
    admin: {{address: 127.0.0.1, port: {ports[2]}}}
  catalog: {catalog}
  admission: {{allowLoopback: true}}
  probeGateways: false
  failover: {{interval: 200ms}}
{"  policyDirectory: policies" if policies else ""}
{extra}"""
    path = directory / "controlplane.yaml"
    path.write_text(text)
    return path


@asynccontextmanager
async def control_plane(config: Path) -> AsyncIterator[ControlPlane]:
    """The control plane of ``config``, in this process and loop."""
    async with running(
        load_config(config), config.parent, policy_poll_interval=0.05, expiry_interval=0.05
    ) as plane:
        yield plane


def sidecar(
    ca: ClusterCA,
    target: str,
    cluster: str,
    service: str,
    namespace: str = "default",
    *,
    role: pb.ProxyIdentity.Role.ValueType = pb.ProxyIdentity.ROLE_SIDECAR,
) -> DiscoveryClient[pb.Snapshot]:
    """A proxy's discovery client (a sidecar's unless ``role`` says otherwise), with the SVID
    `snapbright ca issue` would have written."""
    trust_domain = TrustDomain.for_cluster(cluster, MESH)
    svid = ca.issue(
        SpiffeId.workload(trust_domain, namespace, service),
        datetime.now(UTC),
        timedelta(hours=1),
    )
    identity = pb.ProxyIdentity(
        role=role,
        cluster=cluster,
        namespace=namespace,
        service_account=service,
        workload=f"{service}-1",
        service=service,
    )
    return DiscoveryClient(
        target,
        identity,
        svid,
        ca.bundle(),
        lambda snapshot: snapshot,
        backoff=Backoff(base_s=0.05, cap_s=0.2, stable_s=1.0),
    )


def registration(
    name: str, service: str, port: int, *, address: str = "127.0.0.1"
) -> dict[str, Any]:
    """A registration body as a sidecar sends it."""
    return {
        "id": name,
        "workload": {"name": name, "namespace": "default", "serviceAccount": service},
        "endpoint": {"service": service, "address": address, "port": port},
    }


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """One admin API call (blocking: run it in a thread from async tests)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - loopback
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:  # noqa: S310
            raw = response.read()
            return response.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, json.loads(raw) if raw else {}


async def call(
    method: str, url: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """:func:`http` off the event loop."""
    return await asyncio.to_thread(http, method, url, body)


async def until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Wait until ``predicate()`` holds, checking every 20 ms; fail after ``within`` seconds."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - polling another process's state
            await asyncio.sleep(0.02)


async def next_snapshot(
    client: DiscoveryClient[pb.Snapshot], after: str = "", within: float = 10.0
) -> pb.Snapshot:
    """The first snapshot in force whose version differs from ``after``."""
    await until(lambda: client.version not in ("", after), within)
    return client.current()
