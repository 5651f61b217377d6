"""Async gateway tests run on asyncio's own loop and on uvloop (what the process runs)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Both loops: uvloop's transports and sockets differ from asyncio's in small ways.

    Process tests drive a separate process (which runs uvloop), so one loop is enough there.
    """
    if item.path.name == "test_process.py":
        return {"asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
