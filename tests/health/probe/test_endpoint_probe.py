"""The prober against a real sidecar inbound listener in front of an app, on 127.0.0.1.

A local endpoint is probed as callers reach it: mTLS to its sidecar with the control plane's
SVID, the sidecar's identity checked against our own trust domain, ``GET /healthz`` through
to the app. Its round trips are what an idle copy publishes as latency evidence.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from health.probe.core import ProbeSettings, ProbeState, ProbeStatus, probe_latency
from health.probe.prober import (
    EndpointTarget,
    ProbeFailed,
    Prober,
    endpoint_statuses,
    gateway_statuses,
)
from proxy.identity.bundle import TrustBundleSet
from proxy.identity.model import SpiffeId
from proxy.identity.svid import X509Svid
from proxy.sidecar.inbound import Inbound
from proxy.sidecar.tls import MeshTls, TlsHolder
from tests.health.probe.test_prober import (
    BUNDLES,
    CONTROL_PLANE,
    EU,
    EU_CA,
    FAST,
    NOW,
    US,
    US_CA,
    health_server,
    running,
    wait_for_status,
)

PAYMENTS = US_CA.issue(SpiffeId.workload(US, "shop", "payments"), NOW)
ELSEWHERE = EU_CA.issue(SpiffeId.workload(EU, "shop", "payments"), NOW)


@asynccontextmanager
async def sidecar(app_port: int, svid: X509Svid = PAYMENTS) -> AsyncIterator[Inbound]:
    """A sidecar's inbound listener (no AuthorizationPolicy) in front of ``app_port``."""
    tls = TlsHolder(MeshTls(svid, TrustBundleSet([US_CA.bundle(), EU_CA.bundle()])))
    inbound = Inbound(tls, ("127.0.0.1", app_port), US)
    await inbound.serve("127.0.0.1", 0)
    try:
        yield inbound
    finally:
        await inbound.aclose(grace=0.1)


async def test_an_endpoint_probe_goes_through_the_sidecar_to_the_apps_health_path() -> None:
    async with health_server() as app, sidecar(app.port) as inbound:
        target = EndpointTarget.for_endpoint("payments", "127.0.0.1", inbound.port, US)
        prober = Prober(FAST, identity=lambda: (CONTROL_PLANE, BUNDLES))
        prober.set_targets([target])
        async with running(prober):
            assert target.name == f"payments@127.0.0.1:{inbound.port}"
            status = await wait_for_status(
                prober, target.name, lambda s: len(s.recent) >= 3, "probed three times"
            )
            assert status.state is ProbeState.UP
            latency = probe_latency([status])
            assert latency is not None
            assert latency.samples >= 3
            assert 0 < latency.p95 < 0.5
            app.healthy = False  # the app's health path fails: so does the probe
            await wait_for_status(prober, target.name, lambda s: s.state is ProbeState.DOWN, "down")


async def test_an_endpoint_proving_another_trust_domain_fails_the_probe() -> None:
    async with health_server() as app, sidecar(app.port, ELSEWHERE) as inbound:
        target = EndpointTarget.for_endpoint("payments", "127.0.0.1", inbound.port, US)
        prober = Prober(FAST, identity=lambda: (CONTROL_PLANE, BUNDLES))
        with pytest.raises(ProbeFailed, match=r"^(tls|identity):"):
            await prober.probe(target)


def test_a_probers_statuses_split_into_gateways_by_cluster_and_endpoints_by_service() -> None:
    up = ProbeStatus().succeeded(0.002, 0.0, ProbeSettings())
    down = ProbeStatus(state=ProbeState.DOWN)
    statuses = {
        "eu-west": up,
        "payments@127.0.0.1:9001": up,
        "payments@127.0.0.1:9002": down,
        "payments-v2@127.0.0.1:9003": down,
    }
    assert gateway_statuses(statuses) == {"eu-west": up}
    assert endpoint_statuses(statuses, "payments") == [up, down]
    assert endpoint_statuses(statuses, "ledger") == []
