"""The dashboard's HTTP API on a real server on 127.0.0.1: JSON, the event stream, and headers."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from health.dashboard.board import Board
from health.dashboard.model import ServiceStats, Snapshot
from health.dashboard.server import (
    HUB,
    STATIC,
    DashboardSettings,
    dashboard_app,
    start_dashboard,
)
from tests.health.dashboard.conftest import Serve
from tests.health.dashboard.feed import BROWNOUT_START, example_feed
from tests.health.dashboard.sse import next_event, until

HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=10)
    ) as session:
        yield session


async def test_state_holds_regions_rtt_services_routes_decisions_and_series(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    served = await serve(until=BROWNOUT_START + 6)
    async with http.get(served.url + "api/v1/state") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        state = await response.json()
    assert state["cluster"] == "us-west"
    assert {r["name"]: r["status"] for r in state["regions"]} == {
        "us-west": "degraded",
        "ap-southeast": "healthy",
        "eu-central": "healthy",
    }
    assert any(
        (link["from"], link["to"], link["alive"]) == ("us-west", "ap-southeast", True)
        for link in state["rtt"]
    )
    slow = next(
        s for s in state["services"] if s["service"] == "payments" and s["region"] == "us-west"
    )
    assert slow["p95Ms"] > 400
    assert slow["degraded"] == ["p95"]
    route = next(r for r in state["routes"] if r["service"] == "payments")
    assert sum(w["weight"] for w in route["weights"]) == state["totalWeight"] == 10_000
    assert state["decisions"][-1]["rule"] == "enter-degraded"
    assert [d["id"] for d in state["decisions"]] == sorted(
        (d["id"] for d in state["decisions"]), reverse=True
    )
    assert {s["service"] for s in state["series"]} == {"payments", "ledger"}


@pytest.mark.parametrize(
    ("query", "services", "count"),
    [
        ("", {"payments"}, None),
        ("?service=payments&limit=2", {"payments"}, 2),
        ("?service=ledger", set(), 0),
        ("?limit=1", {"payments"}, 1),
        ("?service=", {"payments"}, None),
    ],
)
async def test_decisions_filter_by_service_and_limit_newest_first(
    serve: Serve, http: aiohttp.ClientSession, query: str, services: set[str], count: int | None
) -> None:
    served = await serve(until=BROWNOUT_START + 8)
    everything = served.board.decisions(limit=500)
    async with http.get(served.url + "api/v1/decisions" + query) as response:
        assert response.status == 200
        body = await response.json()
    entries = body["decisions"]
    assert {e["service"] for e in entries} == services
    assert len(entries) == (count if count is not None else len(everything))
    if entries:
        assert entries[0]["id"] == everything[0].id


async def test_decisions_after_returns_only_newer_entries(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    served = await serve(until=BROWNOUT_START + 8)
    everything = served.board.decisions(limit=500)
    assert len(everything) >= 2  # the example moves away in two steps
    async with http.get(served.url + f"api/v1/decisions?after={everything[1].id}") as response:
        body = await response.json()
    assert [e["id"] for e in body["decisions"]] == [e.id for e in everything[:1]]


@pytest.mark.parametrize("query", ["limit=0", "limit=501", "limit=ten", "limit=-1", "after=x"])
async def test_bad_parameters_get_a_400_that_says_which(
    serve: Serve, http: aiohttp.ClientSession, query: str
) -> None:
    served = await serve()
    async with http.get(served.url + "api/v1/decisions?" + query) as response:
        assert response.status == 400
        body = await response.json()
    assert body["error"].startswith(query.split("=")[0] + " must be an integer")
    assert "Content-Security-Policy" in response.headers


async def test_events_send_the_state_then_a_decision_and_new_state_when_it_changes(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    served = await serve()
    async with http.get(served.url + "api/v1/events") as response:
        assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        first = await until(response, "state")
        assert first.data["decisions"] == []
        served.feed.run_until(BROWNOUT_START + 3)  # the brownout starts: the core moves
        decision = await until(response, "decision")
        assert decision.data["rule"] == "enter-degraded"
        assert decision.event_id == str(decision.data["id"])
        state = await until(response, "state")
        assert state.data["version"] > first.data["version"]
        assert state.data["decisions"][-1]["id"] == decision.data["id"]


async def test_events_replay_the_decisions_a_reconnecting_client_missed(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    served = await serve(until=BROWNOUT_START + 8)
    everything = served.board.decisions(limit=500)
    seen = everything[1].id
    headers = {"Last-Event-ID": str(seen)}
    async with http.get(served.url + "api/v1/events", headers=headers) as response:
        replayed = []
        while (event := await next_event(response)).name != "state":
            if event.name == "decision":
                replayed.append(event.data["id"])
    assert replayed == [everything[0].id]


async def test_events_coalesce_changes_to_one_state_per_interval(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    served = await serve(DashboardSettings(min_interval=0.3))
    async with http.get(served.url + "api/v1/events") as response:
        await until(response, "state")
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(30):  # 30 changes in about 0.6s
            served.feed.run(1)
            await asyncio.sleep(0.02)
        versions: list[int] = []
        while not versions or versions[-1] != served.board.version:
            versions.append((await until(response, "state")).data["version"])
        elapsed = loop.time() - started
    assert len(versions) <= elapsed / 0.3 + 1
    assert versions[-1] == served.board.version  # the last change is never lost


async def test_a_quiet_stream_sends_heartbeat_comments(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    served = await serve(DashboardSettings(heartbeat=0.1))
    async with http.get(served.url + "api/v1/events") as response:
        await until(response, "state")
        event = await next_event(response, within=2.0)
    assert (event.name, event.comment) == ("comment", "heartbeat")


async def test_a_slow_client_is_dropped_without_holding_up_the_others(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    served = await serve(DashboardSettings(min_interval=0.0, client_queue=8))
    hub = served.server.app[HUB]
    # A reader that never reads, with small buffers, so the server's writes back up fast.
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.setblocking(False)
    await asyncio.get_running_loop().sock_connect(slow, ("127.0.0.1", served.server.port))
    reader, writer = await asyncio.open_connection(sock=slow, limit=1024)
    try:
        writer.write(b"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        async with http.get(served.url + "api/v1/events") as fast:
            await until(fast, "state")
            assert hub.clients == 2
            # A reader that keeps up, reading as the changes come.
            versions: list[int] = []

            async def keep_up() -> None:
                while True:
                    versions.append((await until(fast, "state", within=10.0)).data["version"])

            reading = asyncio.create_task(keep_up())
            # Big states: 400 services with long names, each change a few hundred kilobytes.
            bulky = [
                ServiceStats(f"svc-{i}-{'x' * 200}", "us-west", "us-west", 0.1, 0.2, 0.3, 1, 1)
                for i in range(400)
            ]
            for _ in range(40):
                served.board.update(services=bulky)
                await asyncio.sleep(0.01)
            final = served.board.version
            for _ in range(500):
                if versions and versions[-1] == final:
                    break
                await asyncio.sleep(0.02)
            reading.cancel()
            assert versions[-1] == final
        assert hub.dropped == 1
        # The slow reader's connection was cut: after what the buffers held, the stream ends.
        with contextlib.suppress(ConnectionResetError):
            while await asyncio.wait_for(reader.read(65536), 5.0):
                pass
    finally:
        writer.close()


async def test_responses_carry_a_strict_csp_and_no_cors(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    served = await serve()
    headers = {"Origin": "https://evil.example"}
    for path in ["", "api/v1/state", "api/v1/decisions", "static/app.js", "static/style.css"]:
        async with http.get(served.url + path, headers=headers) as response:
            assert response.status == 200, path
            csp = response.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp
            assert "script-src 'self'" in csp
            assert "unsafe-inline" not in csp
            assert "frame-ancestors 'none'" in csp
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert not any(h.lower().startswith("access-control-") for h in response.headers)
    async with http.get(served.url + "static/app.js") as response:
        assert response.content_type in {"text/javascript", "application/javascript"}


async def test_a_foreign_host_name_is_refused(serve: Serve, http: aiohttp.ClientSession) -> None:
    served = await serve()
    # A hostile page whose name was rebound to 127.0.0.1 sends its own name as Host.
    async with http.get(
        served.url + "api/v1/state", headers={"Host": "evil.example:80"}
    ) as response:
        assert response.status == 421
    async with http.get(served.url.replace("127.0.0.1", "localhost") + "api/v1/state") as response:
        assert response.status == 200


async def test_hostile_names_stay_data_in_json_and_cannot_forge_events(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    forged = HOSTILE + "\n\nevent: decision\ndata: {}"
    served = await serve(service=forged, until=BROWNOUT_START + 3)
    async with http.get(served.url + "api/v1/state") as response:
        state = await response.json()
    assert forged in {s["service"] for s in state["services"]}
    async with http.get(served.url + "api/v1/events") as response:
        event = await until(response, "state")
        assert event.data["decisions"][0]["service"] == forged
        served.feed.run(1)
        assert (await next_event(response)).name in {"state", "decision"}


def test_the_page_has_no_inline_script_or_style_and_the_script_never_writes_html() -> None:
    page = (STATIC / "index.html").read_text()
    assert re.findall(r"<script[^>]*>", page) == ['<script type="module" src="static/app.js">']
    assert '<script type="module" src="static/app.js"></script>' in page  # no body
    assert re.search(r"\son\w+=", page) is None
    assert "style=" not in page
    assert "<style" not in page
    lines = (STATIC / "app.js").read_text().splitlines()
    script = "\n".join(line for line in lines if not line.lstrip().startswith("//"))
    for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("]:
        assert sink not in script, sink
    assert 'setAttribute("style"' not in script  # CSSOM only: CSP allows it, attributes not


async def test_mounted_under_a_prefix_on_a_shared_runner(http: aiohttp.ClientSession) -> None:
    board = Board("us-west")
    example_feed(board, start=time.time() - 10).run(10)
    parent = web.Application()
    parent.add_subapp("/dashboard/", dashboard_app(board))
    runner = web.AppRunner(parent, shutdown_within=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        base = f"http://127.0.0.1:{port}/dashboard/"
        async with http.get(base) as response:
            assert "static/app.js" in await response.text()
        async with http.get(base + "api/v1/state") as response:
            assert (await response.json())["cluster"] == "us-west"
        async with http.get(base + "api/v1/events") as response:
            assert (await until(response, "state")).data["cluster"] == "us-west"
    finally:
        await runner.cleanup()


async def test_closing_the_server_ends_open_streams_promptly(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    served = await serve()
    async with http.get(served.url + "api/v1/events") as response:
        await until(response, "state")
        started = time.monotonic()
        await served.server.close()
        assert await response.content.read() == b""
    assert time.monotonic() - started < 1.5


def test_static_files_are_where_the_server_serves_them() -> None:
    names = {p.name for p in Path(STATIC).iterdir()}
    assert {"index.html", "app.js", "style.css"} <= names


class _FlakyBoard(Board):
    """A board whose snapshot fails while ``broken`` is set (a provider bug)."""

    broken = False

    def snapshot(self) -> Snapshot:
        if self.broken:
            raise RuntimeError("provider bug")
        return super().snapshot()


async def test_a_failing_provider_skips_a_version_and_the_stream_goes_on(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    board = _FlakyBoard("us-west")
    feed = example_feed(board, start=time.time() - 10)
    feed.run(10)
    server = await start_dashboard(board, settings=DashboardSettings(min_interval=0.0))
    try:
        async with http.get(server.url + "api/v1/events") as response:
            await until(response, "state")
            board.broken = True
            feed.run(1)
            await asyncio.sleep(0.05)
            board.broken = False
            feed.run(1)
            event = await until(response, "state")
        assert event.data["version"] == board.version
        assert "could not be read" in caplog.text
    finally:
        await server.close()


class _CountingBoard(Board):
    """A real board that counts how often its whole state is built."""

    snapshots = 0

    def snapshot(self) -> Snapshot:
        self.snapshots += 1
        return super().snapshot()


async def test_with_no_stream_connected_the_state_is_not_built_on_every_change(
    http: aiohttp.ClientSession,
) -> None:
    board = _CountingBoard("us-west")
    feed = example_feed(board, start=time.time() - 10)
    server = await start_dashboard(board, settings=DashboardSettings(min_interval=0.0))
    try:
        for _ in range(20):
            feed.run(1)
            await asyncio.sleep(0)  # let the hub see each change
        await asyncio.sleep(0.05)
        assert board.snapshots == 0
        # A stream that connects later still opens with the current state.
        async with http.get(server.url + "api/v1/events") as response:
            event = await until(response, "state")
        assert event.data["version"] == board.version
        assert board.snapshots >= 1
    finally:
        await server.close()
