"""Fixtures: demo apps running on 127.0.0.1, on asyncio's loop and on uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TextIO

import pytest
import uvloop

from snapbright.demo.server import DemoApp, DemoSettings

StartDemo = Callable[..., Awaitable[DemoApp]]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """`snapbright demo-app` runs on uvloop; the app must work on asyncio's loop too."""
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture
async def start_demo() -> AsyncIterator[StartDemo]:
    """Start a demo replica on free ports (HTTP and gRPC); keyword arguments go to
    `DemoSettings` (``name`` defaults to pay, ``cluster`` to us-west); ``out`` takes the
    caller's reports."""
    started: list[DemoApp] = []

    async def start(out: TextIO | None = None, **settings: Any) -> DemoApp:
        fields: dict[str, Any] = {"name": "pay", "cluster": "us-west", "grpc_port": 0}
        app = await DemoApp(DemoSettings(**(fields | settings)), out=out).start()
        started.append(app)
        return app

    yield start
    for app in started:
        await app.close()
