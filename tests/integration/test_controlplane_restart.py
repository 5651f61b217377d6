"""A control plane killed with -9 and restarted (issue 4, "What this issue must show" 3).

`snapbright up` runs the default mesh; a steady load (~50 requests a second) goes through
us-west's checkout sidecar to ``payments``. us-west's control plane is killed with SIGKILL,
left down for a few seconds, and restarted with the same argv. No request fails during the
outage or after it, the sidecars subscribe again, and nothing acknowledged is lost: the same
CA roots and the same registered endpoints.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (
    LocalMeshRun,
    StartMesh,
    SteadyLoad,
    get_json,
    http,
    wait_for,
)

pytestmark = pytest.mark.e2e

_RATE = 50.0  # requests a second
_OUTAGE = 4.0


def _status(mesh: LocalMeshRun) -> dict[str, Any]:
    status: dict[str, Any] = get_json(f"{mesh.cluster('us-west')['admin']}/api/v1/status")
    return status


def _acknowledged(status: dict[str, Any]) -> dict[str, Any]:
    """What must survive a kill -9: the CA's roots and our trust bundle, and the services and
    endpoints registered in the catalog."""
    own = status["trustDomain"]
    return {
        "authorities": status["certificates"]["authorities"],
        "bundle": [b for b in status["bundles"] if b["trustDomain"] == own],
        "catalog": {k: status["catalog"][k] for k in ("services", "endpoints")},
    }


def _local_endpoints(mesh: LocalMeshRun) -> list[Any]:
    services = get_json(f"{mesh.cluster('us-west')['admin']}/api/v1/services")
    return sorted(str(s) for s in _walk(services) if ":" in s and s.startswith("127.0.0.1"))


def _walk(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _walk(v)]
    if isinstance(value, list):
        return [x for v in value for x in _walk(v)]
    return [value] if isinstance(value, str) else []


def _subscribers(mesh: LocalMeshRun) -> list[str]:
    # A list: replicas of one service may subscribe under the same proxy name.
    return sorted(s["proxy"] for s in _status(mesh)["subscribers"])


def test_sidecars_serve_through_a_kill_9_and_restart_with_nothing_acknowledged_lost(
    start_mesh: StartMesh,
) -> None:
    began = time.monotonic()
    mesh = start_mesh(preferred_base=21200)
    logs = ("us-west.controlplane", "us-west.checkout-0.sidecar", "us-west.payments-0.sidecar")
    sidecar = mesh.sidecar("us-west", "checkout")
    admin = mesh.cluster("us-west")["admin"]
    wait_for(
        "every us-west sidecar subscribed",
        lambda: len(_subscribers(mesh)) >= 3,
        15,
        lambda: mesh.logs(*logs),
    )
    before = _acknowledged(_status(mesh))
    subscribers = _subscribers(mesh)
    endpoints = _local_endpoints(mesh)
    record = mesh.process("us-west.controlplane")
    argv = [sys.executable, "-m", "snapbright", "controlplane", "--config"]
    argv.append(str(mesh.state_dir / "config" / "us-west.controlplane.yaml"))

    load = SteadyLoad(f"http://{sidecar['outbound']}/", "payments")
    load.start()
    try:
        time.sleep(2.0)
        os.kill(record["pid"], signal.SIGKILL)
        killed = time.time()
        time.sleep(_OUTAGE)
        mesh.spawn(argv, Path(record["log"]))
        wait_for(
            "the restarted control plane ready",
            lambda: http("GET", f"{admin}/ready")[0] == 200,
            20,
            lambda: mesh.logs(*logs),
        )
        restarted = time.time()
        wait_for(
            "the sidecars subscribed again",
            lambda: _subscribers(mesh) == subscribers,
            15,
            lambda: f"{subscribers} != {_subscribers(mesh)}\n{mesh.logs(*logs)}",
        )
        time.sleep(3.0)
    finally:
        load.stop()
    after = _acknowledged(_status(mesh))
    assert after == before, f"lost across the restart:\nbefore {before}\nafter  {after}"
    assert _local_endpoints(mesh) == endpoints
    total = sum(load.outcomes.values())
    assert total >= _RATE * (_OUTAGE + 4), f"the load ran short: {load.outcomes}"
    assert load.failures == [], (
        f"{len(load.failures)} of {total} requests failed (killed at {killed:.1f}, restarted "
        f"at {restarted:.1f}): {load.failures[:10]}\n{mesh.logs(*logs)}"
    )
    print(f"outcomes {dict(load.outcomes)}; {time.monotonic() - began:.1f}s")
