"""The prober against a real east-west gateway and its probe endpoint, on 127.0.0.1.

The gateway routes ``probe.snapbright.eu-west.demo`` by SNI to its in-process probe server,
which terminates mTLS with the gateway's SVID and answers ``GET /``; the prober must get
through with our SVID, in both exchange modes, and see the gateway go down when it stops.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import pytest
from prometheus_client import CollectorRegistry

from gateway.config.model import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.probe import ProbeServer
from gateway.server import Gateway
from health.probe.core import ProbeSettings, ProbeState
from health.probe.prober import GatewayTarget, ProbeFailed, Prober
from proxy.identity.bundle import TrustBundleSet
from proxy.identity.model import SpiffeId
from snapbright.wan.model import Forward, LinkSettings, WanConfig
from snapbright.wan.server import WanEmulator
from tests.health.probe.test_prober import (
    BUNDLES,
    CONTROL_PLANE,
    EU_CA,
    EU_GATEWAY,
    MESH,
    NOW,
    ROGUE,
    ROGUE_CA,
    US_CA,
    running,
    wait_for_status,
)

SETTINGS = ProbeSettings(interval=0.03, timeout=1.0, down_after=2, up_after=2)


def _config() -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "apiVersion": "snapbright.io/v1alpha1",
            "kind": "GatewayConfig",
            "metadata": {"name": "east-west"},
            "spec": {
                "cluster": "eu-west",
                "mesh": MESH,
                "listen": {"address": "127.0.0.1", "port": 0},
                # Only the presence matters here: the probe server is built from values below.
                "probe": {
                    "certificate": "unused.pem",
                    "key": "unused.key",
                    "bundles": [{"trustDomain": "us-west.demo", "path": "unused.json"}],
                },
            },
        },
        strict=False,
    )


@asynccontextmanager
async def eu_gateway() -> AsyncIterator[Gateway]:
    """eu-west's gateway, accepting probes from us-west's workloads."""
    probe = ProbeServer(EU_GATEWAY, TrustBundleSet([EU_CA.bundle(), US_CA.bundle()]))
    upstream = await probe.start()
    gateway = Gateway(_config(), GatewayMetrics(), probe_upstream=upstream)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.close()
        await probe.close()


def _target(gateway: Gateway, exchange: Literal["handshake", "http"]) -> GatewayTarget:
    host, port = gateway.address
    return GatewayTarget.for_peer("eu-west", MESH, host, port, exchange=exchange)


@pytest.mark.parametrize("exchange", ["handshake", "http"])
async def test_the_prober_reaches_a_gateways_probe_endpoint(
    exchange: Literal["handshake", "http"],
) -> None:
    async with eu_gateway() as gateway:
        prober = Prober(SETTINGS, identity=lambda: (CONTROL_PLANE, BUNDLES))
        rtt = await prober.probe(_target(gateway, exchange))
    assert 0 < rtt < SETTINGS.timeout


async def test_a_caller_the_gateway_does_not_trust_gets_no_200() -> None:
    rogue_svid = ROGUE_CA.issue(SpiffeId.workload(ROGUE, "snapbright", "control-plane"), NOW)
    bundles = TrustBundleSet([ROGUE_CA.bundle(), EU_CA.bundle()])
    async with eu_gateway() as gateway:
        prober = Prober(SETTINGS, identity=lambda: (rogue_svid, bundles))
        with pytest.raises(ProbeFailed):
            await prober.probe(_target(gateway, "http"))


async def test_the_gateway_is_down_after_it_stops_and_up_while_it_runs() -> None:
    registry = CollectorRegistry()
    prober = Prober(SETTINGS, identity=lambda: (CONTROL_PLANE, BUNDLES), registry=registry)
    async with running(prober):
        async with eu_gateway() as gateway:
            prober.set_targets([_target(gateway, "http")])
            up = await wait_for_status(prober, "eu-west", lambda s: s.alive, "up")
            assert registry.get_sample_value("snapbright_gateway_up", {"peer": "eu-west"}) == 1
            rtt = registry.get_sample_value("snapbright_gateway_rtt_seconds", {"peer": "eu-west"})
            assert rtt is not None
            assert 0 < rtt < SETTINGS.timeout
        down = await wait_for_status(
            prober, "eu-west", lambda s: s.state is ProbeState.DOWN, "down"
        )
    assert up.rtt is not None
    assert down.last_error is not None
    assert registry.get_sample_value("snapbright_gateway_up", {"peer": "eu-west"}) == 0
    prober.set_targets([])
    assert registry.get_sample_value("snapbright_gateway_up", {"peer": "eu-west"}) is None


async def test_through_a_40ms_wan_the_rtt_is_one_round_trip_on_a_kept_connection() -> None:
    # The WAN emulator also delays the TCP handshake: a probe that times a new connection's
    # TLS handshake read ~2.5x the link's RTT. The default probe times one request on an
    # established mTLS connection: 80 ms, and a later probe dials nothing.
    link = LinkSettings.model_validate({"between": ("us-west", "eu-west"), "latency": "40ms"})
    async with eu_gateway() as gateway:
        host, port = gateway.address
        wan = await WanEmulator(
            WanConfig(
                admin_port=0,
                links=(link,),
                forwards=(
                    Forward(link=("us-west", "eu-west"), target_host=host, target_port=port),
                ),
                seed=1,
            )
        ).start()
        try:
            target = GatewayTarget.for_peer("eu-west", MESH, "127.0.0.1", wan.listen_ports[0])
            prober = Prober(SETTINGS, identity=lambda: (CONTROL_PLANE, BUNDLES))
            first = await prober.probe(target)
            started = time.perf_counter()
            second = await prober.probe(target)
            took = time.perf_counter() - started
        finally:
            await wan.close()
    assert 0.060 <= first <= 0.100
    assert 0.060 <= second <= 0.100
    assert took < 0.120  # no new connection (that would cost three more round trips)
