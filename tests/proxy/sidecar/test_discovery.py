"""Discovery mode end to end: two `snapbright sidecar` processes and a real control plane.

The callee's sidecar registers its inbound listener through the control plane's admin API
(and deregisters at SIGTERM); the caller's sidecar takes its upstreams, policies, bundles and
SVID from the discovery stream, and calls the callee over mTLS.
"""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from proxy.identity.model import SpiffeId, TrustDomain
from snapbright.controlplane.process import ControlPlane
from tests.proxy.http.backend import Backend
from tests.proxy.http.client import Client
from tests.proxy.sidecar.mesh import write_bundle, write_config, write_svid
from tests.proxy.sidecar.test_process import SNAPBRIGHT
from tests.proxy.sidecar.test_resilience import dead_port
from tests.snapbright.controlplane.conftest import call, control_plane, until
from tests.snapbright.controlplane.conftest import write_config as write_plane_config

POLICY = """\
apiVersion: snapbright.io/v1alpha1
kind: TrafficPolicy
metadata: {name: payments}
spec:
  service: payments
  retries: {attempts: 2}
"""


def _document(
    plane: ControlPlane, tmp: Path, service: str, app_port: int, ports: tuple[int, int, int]
) -> dict[str, Any]:
    ca = plane.ca()
    svid = ca.issue(
        SpiffeId.workload(TrustDomain.for_cluster("us-west", "acme"), "default", service),
        datetime.now(UTC),
        timedelta(hours=1),
    )
    cert, key = write_svid(tmp, service, svid)
    bundle = write_bundle(tmp, ca.bundle())
    host, port = plane.discovery_target.rsplit(":", 1)
    return {
        "apiVersion": "snapbright.io/v1alpha1",
        "kind": "SidecarConfig",
        "metadata": {"name": service},
        "spec": {
            "identity": {
                "cluster": "us-west",
                "mesh": "acme",
                "serviceAccount": service,
                "service": service,
            },
            "app": {"address": "127.0.0.1", "port": app_port},
            "listeners": {
                "outbound": {"port": ports[0]},
                "inbound": {"address": "127.0.0.1", "port": ports[1]},
                "admin": {"port": ports[2]},
            },
            "tls": {
                "certificate": cert,
                "key": key,
                "bundles": [{"trustDomain": "us-west.acme", "path": bundle}],
            },
            "controlPlane": {"address": host, "port": int(port), "adminUrl": plane.admin_url},
            "drainTimeout": "1s",
        },
    }


@pytest.mark.e2e
async def test_sidecars_in_discovery_mode_register_and_call_each_other(tmp_path: Path) -> None:
    plane_config = write_plane_config(tmp_path / "plane", "us-west")
    (tmp_path / "plane" / "policies" / "payments.yaml").write_text(POLICY)
    app = await Backend().start()
    processes: list[asyncio.subprocess.Process] = []
    async with control_plane(plane_config) as plane:
        try:
            callee_ports = (dead_port(), dead_port(), dead_port())
            caller_ports = (dead_port(), dead_port(), dead_port())
            for service, app_port, ports in (
                ("payments", app.port, callee_ports),
                ("checkout", 1, caller_ports),
            ):
                path = write_config(
                    tmp_path / f"{service}.yaml",
                    _document(plane, tmp_path, service, app_port, ports),
                )
                processes.append(
                    await asyncio.create_subprocess_exec(
                        *SNAPBRIGHT, "sidecar", "--config", str(path)
                    )
                )
            registry = plane.registry
            assert registry is not None
            status = 0
            for _ in range(300):
                try:
                    client = await Client.open(caller_ports[0])
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                await client.send(b"GET /via-discovery HTTP/1.1\r\nHost: payments\r\n\r\n")
                status = (await client.read()).status
                await client.close()
                if status == 200:
                    break
                await asyncio.sleep(0.05)
            assert status == 200
            assert app.requests[-1].header(b"x-snapbright-peer-id") == (
                b"spiffe://us-west.acme/ns/default/sa/checkout"
            )
            services = (await call("GET", f"{plane.admin_url}/api/v1/services"))[1]
            assert "payments" in str(services)
            assert str(callee_ports[1]) in str(registry.current())
            callee = processes[0]
            callee.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(callee.wait(), 10.0) == 0

            # Deregistered at shutdown: the registry no longer lists its inbound endpoint.
            await until(lambda: str(callee_ports[1]) not in str(registry.current()))
        finally:
            for process in processes:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                    try:
                        await asyncio.wait_for(process.wait(), 10.0)
                    except TimeoutError:
                        process.kill()
                        await process.wait()
            await app.close()
