"""Large bodies stream through with bounded memory, both ways, under flow control."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest

from proxy.http import OutboundServer, serve_outbound
from tests.proxy.http.backend import Backend, Received
from tests.proxy.http.client import Client

SIZE = 20 * 1024 * 1024
BLOCK = bytes(range(256)) * 256  # 64 KiB
# The sidecar may hold a few reads and its write buffers' high-water marks, not the body.
BOUND = 2 * 1024 * 1024


async def sample_buffered(server: OutboundServer, peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], server.buffered_bytes())
        await asyncio.sleep(0.001)


@pytest.fixture
async def peak(sidecar: OutboundServer) -> AsyncIterator[list[int]]:
    seen = [0]
    task = asyncio.create_task(sample_buffered(sidecar, seen))
    yield seen
    task.cancel()


async def test_20_mib_upload_streams_to_a_slow_reader_with_bounded_buffers(
    sidecar: OutboundServer, peak: list[int]
) -> None:
    digest = hashlib.sha256()
    received = 0

    async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await reader.readuntil(b"\r\n\r\n")
        while received < SIZE:
            data = await reader.read(256 * 1024)
            if not data:
                break
            digest.update(data)
            received += len(data)
            await asyncio.sleep(0.002)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(slow_reader, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    server = await serve_outbound("127.0.0.1", 0, {"svc": [("127.0.0.1", port)]})
    seen = [0]
    sampler = asyncio.create_task(sample_buffered(server, seen))
    client = await Client.open(server.port)
    client.writer.write(b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % SIZE)
    sent = hashlib.sha256()
    for _ in range(SIZE // len(BLOCK)):
        client.writer.write(BLOCK)
        sent.update(BLOCK)
        await client.writer.drain()
    answer = await client.read(within=30)
    sampler.cancel()
    assert answer.body == b"ok"
    assert received == SIZE
    assert digest.digest() == sent.digest()
    assert 0 < seen[0] < BOUND, f"sidecar held {seen[0]} bytes"
    await client.close()
    await server.aclose(grace=0.5)
    upstream.close()


async def test_20_mib_chunked_upload_is_reframed_and_delivered_intact(
    backend: Backend, sidecar: OutboundServer, peak: list[int]
) -> None:
    client = await Client.open(sidecar.port)
    client.writer.write(b"POST /big HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n")
    sent = hashlib.sha256()
    for _ in range(SIZE // len(BLOCK)):
        client.writer.write(b"%x\r\n%s\r\n" % (len(BLOCK), BLOCK))
        sent.update(BLOCK)
        await client.writer.drain()
    client.writer.write(b"0\r\n\r\n")
    answer = await client.read(within=30)
    assert answer.status == 200
    body = backend.requests[0].body
    assert len(body) == SIZE
    assert hashlib.sha256(body).digest() == sent.digest()
    assert peak[0] < BOUND, f"sidecar held {peak[0]} bytes"
    await client.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_20_mib_download_to_a_slow_client_holds_bounded_buffers(
    backend: Backend, sidecar: OutboundServer, peak: list[int], chunked: bool
) -> None:
    async def big(request: Received, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        if chunked:
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        else:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % SIZE)
        for _ in range(SIZE // len(BLOCK)):
            w.write(b"%x\r\n%s\r\n" % (len(BLOCK), BLOCK) if chunked else BLOCK)
            await w.drain()
        if chunked:
            w.write(b"0\r\n\r\n")
        await w.drain()
        return True

    backend.handler = big
    client = await Client.open(sidecar.port)
    await client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    digest = hashlib.sha256()
    got = 0
    if chunked:
        while True:
            size = int((await client.reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                await client.reader.readexactly(2)
                break
            data = await client.reader.readexactly(size)
            await client.reader.readexactly(2)
            digest.update(data)
            got += size
            await asyncio.sleep(0.0005)
    else:
        while got < SIZE:
            data = await client.reader.read(256 * 1024)
            digest.update(data)
            got += len(data)
            await asyncio.sleep(0.002)
    assert got == SIZE
    assert digest.digest() == hashlib.sha256(BLOCK * (SIZE // len(BLOCK))).digest()
    assert 0 < peak[0] < BOUND, f"sidecar held {peak[0]} bytes"
    await client.close()
