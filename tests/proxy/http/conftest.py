"""Fixtures: a real backend and a running outbound listener on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping

import pytest
import uvloop

from proxy.http import Limits, OutboundServer, Timeouts, serve_outbound
from tests.proxy.http.backend import Backend

SHORT = Timeouts(connect=1.0, request=2.0, header=1.0, idle=5.0, upstream_idle=5.0)


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    server = await Backend().start()
    yield server
    await server.close()


@pytest.fixture
async def sidecar(backend: Backend) -> AsyncIterator[OutboundServer]:
    server = await serve_outbound(
        "127.0.0.1",
        0,
        {"svc": [("127.0.0.1", backend.port)]},
        limits=Limits(max_body=64 * 1024 * 1024),
        timeouts=SHORT,
    )
    yield server
    await server.aclose(grace=1.0)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every test runs on asyncio's own loop and on uvloop (what the sidecar runs on)."""
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
