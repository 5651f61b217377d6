"""`snapbright sidecar --config FILE` as a real process: ready, serving, metrics, SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.sidecar.process import collect_on_the_second
from tests.proxy.http.backend import Backend
from tests.proxy.http.client import Client
from tests.proxy.sidecar.mesh import (
    Cluster,
    sidecar_document,
    target,
    write_bundle,
    write_config,
    write_svid,
)
from tests.proxy.sidecar.test_resilience import dead_port

SNAPBRIGHT = [sys.executable, "-m", "snapbright"]


@pytest.mark.e2e
async def test_the_process_serves_reports_and_stops_on_sigterm(tmp_path: Path) -> None:
    west = Cluster.create("us-west")
    bundles = {west.trust_domain.name: write_bundle(tmp_path, west.ca.bundle())}
    cert, key = write_svid(tmp_path, "payments", west.issue("payments"))
    app = await Backend().start()
    admin, outbound, inbound = dead_port(), dead_port(), dead_port()
    document = sidecar_document(
        west,
        "payments",
        app.port,
        cert,
        key,
        bundles,
        # It calls its own service through its own inbound listener: the whole path.
        upstreams=[{"service": "payments", "targets": [target("us-west", inbound)]}],
    )
    document["spec"]["listeners"] = {
        "outbound": {"port": outbound},
        "inbound": {"address": "127.0.0.1", "port": inbound},
        "admin": {"port": admin},
    }
    path = write_config(tmp_path / "sidecar.yaml", document)
    process = await asyncio.create_subprocess_exec(
        *SNAPBRIGHT, "sidecar", "--config", str(path), stderr=asyncio.subprocess.PIPE
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            for _ in range(200):
                try:
                    async with session.get(f"http://127.0.0.1:{admin}/ready") as reply:
                        if reply.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the sidecar did not become ready")
            client = await Client.open(outbound)
            await client.send(b"GET /hello HTTP/1.1\r\nHost: payments\r\n\r\n")
            answer = await client.read()
            await client.close()
            assert answer.status == 200
            assert app.requests[-1].header(b"x-snapbright-peer-id") == (
                b"spiffe://us-west.acme/ns/default/sa/payments"
            )
            async with session.get(f"http://127.0.0.1:{admin}/metrics") as reply:
                metrics = await reply.text()
            async with session.get(f"http://127.0.0.1:{admin}/live") as reply:
                assert reply.status == 200
        assert "snapbright_cert_expiry_timestamp_seconds " in metrics
        assert (
            'snapbright_requests_total{destination_cluster="us-west",destination_service='
            '"payments",response_class="2xx",source_cluster="us-west"} 1.0'
        ) in metrics
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10.0) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await app.close()


async def test_a_bad_config_stops_the_process_with_the_place_of_the_mistake(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "apiVersion: snapbright.io/v1alpha1\nkind: SidecarConfig\nmetadata: {name: x}\n"
        "spec:\n  identity: {cluster: us-west, mesh: acme, serviceAccount: x, service: x}\n"
        "  app: {address: 127.0.0.1, port: 0}\n"
    )
    process = await asyncio.create_subprocess_exec(
        *SNAPBRIGHT, "sidecar", "--config", str(path), stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 20.0)
    assert process.returncode == 2
    assert f"{path}:6:" in stderr.decode()


async def test_stats_windows_are_collected_just_after_each_whole_second() -> None:
    now = [1000.73]  # started anywhere in a second
    collected: list[float] = []

    async def fake_sleep(delay: float) -> None:
        now[0] += delay
        if len(collected) == 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await collect_on_the_second(collected.append, clock=lambda: now[0], sleep=fake_sleep)
    assert collected == pytest.approx([1001.02, 1002.02, 1003.02])
