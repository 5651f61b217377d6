"""The sidecar's admin listener: its three pages, and what it refuses, over a real socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.sidecar.admin import AdminServer, start_admin
from proxy.sidecar.metrics import SidecarMetrics


class _Admin:
    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.ready = False


@pytest.fixture
async def admin() -> AsyncIterator[_Admin]:
    metrics = SidecarMetrics("us-west")
    metrics.cert_expiry.set(1234.0)
    holder: list[_Admin] = []
    server = await start_admin("127.0.0.1", 0, metrics, lambda: holder[0].ready)
    holder.append(_Admin(server))
    yield holder[0]
    await server.aclose()


async def _exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5.0)  # the server closes: read to EOF
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(
    ("request_bytes", "status", "body"),
    [
        (b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n", 200, b"live\n"),
        (b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n", 503, b"not ready\n"),
        (b"GET /live?verbose=1 HTTP/1.0\r\n\r\n", 200, b"live\n"),
        (b"HEAD /live HTTP/1.1\r\nHost: x\r\n\r\n", 200, b""),
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404, b"not found\n"),
        (b"POST /live HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi", 405, None),
        (b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 405, None),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, None),
        (b"GET /live HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, None),
    ],
    ids=["live", "not-ready", "query-http10", "head", "unknown-path", "post", "delete",
         "garbage", "huge-head"],
)  # fmt: skip
async def test_each_request_gets_its_status_and_the_connection_closes(
    admin: _Admin, request_bytes: bytes, status: int, body: bytes | None
) -> None:
    got_status, headers, got_body = await _exchange(admin.server.port, request_bytes)
    assert got_status == status
    assert headers["connection"] == "close"
    if body is not None:
        assert got_body == body
    if status == 405:
        assert headers["allow"] == "GET, HEAD"


async def test_ready_follows_the_sidecar_and_metrics_are_prometheus_text(admin: _Admin) -> None:
    admin.ready = True
    status, _, body = await _exchange(admin.server.port, b"GET /ready HTTP/1.1\r\n\r\n")
    assert (status, body) == (200, b"ready\n")
    status, headers, body = await _exchange(admin.server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    assert int(headers["content-length"]) == len(body)
    assert b"snapbright_cert_expiry_timestamp_seconds 1234.0\n" in body


async def test_a_request_head_arriving_in_pieces_is_answered_once_complete(
    admin: _Admin,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.server.port)
    for piece in (b"GET /li", b"ve HTTP/1.1\r\nHo", b"st: x\r\n", b"\r\n"):
        writer.write(piece)
        await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5.0)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert raw.endswith(b"\r\n\r\nlive\n")


async def test_closing_the_server_closes_a_connection_that_sent_nothing(admin: _Admin) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.server.port)
    await asyncio.sleep(0)  # let the server accept it
    await admin.server.aclose()
    assert await asyncio.wait_for(reader.read(), 5.0) == b""
    writer.close()
