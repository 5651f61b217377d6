"""Cross-cluster: sidecar (us-west) -> east-west gateway (SNI passthrough) -> sidecar
(ap-southeast) -> app, for HTTP and for a real gRPC call through a TCP port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.config.model import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.server import Gateway
from proxy.sidecar.process import Sidecar
from tests.proxy.http.backend import Backend
from tests.proxy.http.client import Client
from tests.proxy.sidecar.mesh import inbound_port, outbound_port, target
from tests.proxy.sidecar.test_resilience import Mesh, allow_all_of, dead_port
from tests.proxy.sidecar.test_rotation_and_tcp import _call, grpc_app


@dataclass
class Path3:
    caller: Sidecar
    callee: Sidecar
    gateway: Gateway
    app: Backend
    tcp_port: int


async def _through_gateway(mesh: Mesh, app_port: int, app: Backend) -> Path3:
    callee = await mesh.sidecar(
        mesh.east, "payments", app_port, policies=[allow_all_of("us-west.acme")]
    )
    config = GatewayConfig.model_validate(
        {
            "apiVersion": "snapbright.io/v1alpha1",
            "kind": "GatewayConfig",
            "metadata": {"name": "east-west"},
            "spec": {
                "cluster": "ap-southeast",
                "mesh": "acme",
                "listen": {"address": "127.0.0.1", "port": 0},
                "services": [
                    {
                        "name": "payments",
                        "exported": True,
                        "endpoints": [{"address": "127.0.0.1", "port": inbound_port(callee)}],
                    }
                ],
            },
        },
        strict=False,
    )
    gateway = Gateway(config, GatewayMetrics())
    await gateway.start()
    tcp_port = dead_port()
    caller = await mesh.sidecar(
        mesh.west,
        "checkout",
        1,
        upstreams=[
            {
                "service": "payments",
                "tcpPort": tcp_port,
                "targets": [target("ap-southeast", gateway.address[1])],
            }
        ],
    )
    return Path3(caller, callee, gateway, app, tcp_port)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    mesh = Mesh(tmp_path)
    yield mesh
    await mesh.close()


async def test_an_http_call_crosses_the_gateway_with_end_to_end_mtls(mesh: Mesh) -> None:
    app = await Backend().start()
    mesh.apps.append(app)
    path = await _through_gateway(mesh, app.port, app)
    try:
        client = await Client.open(outbound_port(path.caller))
        await client.send(b"GET /far HTTP/1.1\r\nHost: payments\r\n\r\n")
        assert (await client.read()).status == 200
        await client.close()
        assert app.requests[-1].header(b"x-snapbright-peer-id") == (
            b"spiffe://us-west.acme/ns/default/sa/checkout"
        )
    finally:
        await path.gateway.close()


async def test_a_grpc_call_crosses_the_gateway(mesh: Mesh) -> None:
    with grpc_app() as grpc_port:
        idle = await Backend().start()
        mesh.apps.append(idle)
        path = await _through_gateway(mesh, grpc_port, idle)
        try:
            assert await asyncio.to_thread(_call, path.tcp_port) == b"hello|checkout"
        finally:
            await path.gateway.close()
