"""A dashboard served on 127.0.0.1 from a Board that the real failover core fills."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from health.dashboard.board import Board
from health.dashboard.server import DashboardServer, DashboardSettings, start_dashboard
from tests.health.dashboard.feed import BROWNOUT_START, TraceFeed, example_feed

# Quick enough for tests, and still coalescing.
FAST = DashboardSettings(min_interval=0.05, heartbeat=15.0)


@dataclass
class Served:
    """A running dashboard, its board, and the feed that plays the example traces into it."""

    server: DashboardServer
    board: Board
    feed: TraceFeed

    @property
    def url(self) -> str:
        """The page's address (ends with /)."""
        return self.server.url


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start dashboards (closed after the test): the example traces played up to just before
    the brownout, with wall times ending now, so the charts end at the right edge."""
    running: list[DashboardServer] = []

    async def start(
        settings: DashboardSettings = FAST,
        *,
        service: str = "payments",
        until: float = 0.0,
        port: int = 0,
    ) -> Served:
        played = until or BROWNOUT_START - 5
        board = Board("us-west")
        feed = example_feed(board, start=time.time() - played, service=service)
        feed.run_until(played)
        server = await start_dashboard(board, settings=settings, port=port)
        running.append(server)
        return Served(server, board, feed)

    yield start
    for server in running:
        await server.close()
