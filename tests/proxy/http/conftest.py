"""Fixtures: a real backend and a running outbound listener on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

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
