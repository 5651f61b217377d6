"""`snapbright gateway --config FILE` as a real process: reload, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.gateway.pki import ThrowawayCA

pytestmark = pytest.mark.e2e

PAYMENTS = "payments.default.east.acme"
WAIT = 10.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _config_text(listen: int, admin: int, echo: int) -> str:
    return f"""\
apiVersion: snapbright.io/v1alpha1
kind: GatewayConfig
metadata: {{name: gw}}
spec:
  cluster: east
  mesh: acme
  listen: {{address: 127.0.0.1, port: {listen}}}
  admin: {{address: 127.0.0.1, port: {admin}}}
  drainTimeout: 5s
  services:
    - name: payments
      exported: true
      endpoints: [{{address: 127.0.0.1, port: {echo}}}]
"""


async def _http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        response = (await reader.read()).decode()
    finally:
        writer.close()
    status = int(response.split(" ", 2)[1])
    return status, response.partition("\r\n\r\n")[2]


async def _until_http(port: int, path: str, status: int, contains: str = "") -> None:
    async with asyncio.timeout(WAIT):
        while True:
            with contextlib.suppress(OSError, ValueError, IndexError):
                got, body = await _http_get(port, path)
                if got == status and contains in body:
                    return
            await asyncio.sleep(0.05)


async def _tls_echo(ca: ThrowawayCA) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            while data := await reader.read(65536):
                writer.write(b"echo:" + data)
                await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ca.server_context([PAYMENTS]))


@contextlib.asynccontextmanager
async def _gateway_process(config: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "snapbright",
        "gateway",
        "--config",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_the_gateway_process_reloads_keeps_the_last_good_and_drains_on_sigterm(
    tmp_path: Path,
) -> None:
    ca = ThrowawayCA.create()
    echo = await _tls_echo(ca)
    listen, admin = _free_port(), _free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(_config_text(listen, admin, echo.sockets[0].getsockname()[1]))
    async with _gateway_process(config) as process:
        await _until_http(admin, "/ready", 200)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", listen, ssl=ca.client_context(), server_hostname=PAYMENTS
        )
        writer.write(b"one")
        assert await reader.read(100) == b"echo:one"

        # A bad file is refused on SIGHUP; the last good config keeps routing.
        config.write_text("apiVersion: snapbright.io/v1alpha1\nkind: GatewayConfig\nspec: 3\n")
        process.send_signal(signal.SIGHUP)
        await _until_http(
            admin, "/metrics", 200, 'snapbright_config_reload_total{result="rejected"} 1.0'
        )
        second_reader, second = await asyncio.open_connection(
            "127.0.0.1", listen, ssl=ca.client_context(), server_hostname=PAYMENTS
        )
        second.write(b"two")
        assert await second_reader.read(100) == b"echo:two"
        second.close()

        # SIGTERM: not ready, no new connections, the open one still works, then exit.
        process.send_signal(signal.SIGTERM)
        await _until_http(admin, "/ready", 503)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", listen)
        writer.write(b"three")
        assert await reader.read(100) == b"echo:three"
        assert process.returncode is None
        writer.close()
        async with asyncio.timeout(WAIT):
            assert await process.wait() == 0
    echo.close()


async def test_a_bad_config_stops_the_gateway_at_start_with_the_field_named(
    tmp_path: Path,
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(_config_text(_free_port(), _free_port(), 9).replace("port: 9", "port: 0"))
    async with _gateway_process(config) as process:
        assert process.stderr is not None
        async with asyncio.timeout(WAIT):
            error = (await process.stderr.read()).decode()
            assert await process.wait() == 2
    assert "gateway.yaml:13:46: " in error
    assert "spec.services[0].endpoints[0].port" in error
