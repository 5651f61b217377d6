"""Fixtures: real target servers on 127.0.0.1 and WAN emulators in front of them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import pytest
import uvloop

from snapbright.wan.model import Forward, LinkSettings, WanConfig
from snapbright.wan.server import WanEmulator

StartWan = Callable[..., Awaitable[WanEmulator]]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The data path runs on asyncio's own loop and on uvloop (what `snapbright wan` uses)."""
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # Counts what it reads until EOF, then answers with the count.
    count = 0
    try:
        while data := await reader.read(1 << 20):
            count += len(data)
        writer.write(str(count).encode())
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """An echo server's port."""
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


@pytest.fixture
async def sink_port() -> AsyncIterator[int]:
    """A server that counts bytes until EOF, then answers with the count."""
    server = await asyncio.start_server(_sink, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


@pytest.fixture
async def start_wan() -> AsyncIterator[StartWan]:
    """Start an emulator with one forward a → b to ``target_port`` over a link shaped by the
    keyword arguments (as written in a file: ``latency="80ms"``, ``oneWay=True``)."""
    started: list[WanEmulator] = []

    async def start(target_port: int, **link: Any) -> WanEmulator:
        config = WanConfig(
            admin_port=0,
            links=(LinkSettings.model_validate({"between": ("a", "b"), **link}),),
            forwards=(Forward(link=("a", "b"), target_host="127.0.0.1", target_port=target_port),),
            seed=1,
        )
        emulator = await WanEmulator(config).start()
        started.append(emulator)
        return emulator

    yield start
    for emulator in started:
        await emulator.close()


async def set_link(
    emulator: WanEmulator, body: dict[str, Any], pair: str = "a/b"
) -> tuple[int, dict[str, Any]]:
    """POST a change to the emulator's admin API: (status, JSON answer)."""
    url = f"http://127.0.0.1:{emulator.admin_port}/links/{pair}"
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        answer: dict[str, Any] = await response.json()
        return response.status, answer


async def round_trip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes = b"ping"
) -> float:
    """Seconds for ``payload`` to come back through an echo."""
    started = time.monotonic()
    writer.write(payload)
    echoed = await asyncio.wait_for(reader.readexactly(len(payload)), timeout=5)
    assert echoed == payload
    return time.monotonic() - started


@pytest.fixture
async def unused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return port
