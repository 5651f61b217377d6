"""The dashboard in a real browser: Debian's Chromium, driven by Playwright, on 127.0.0.1.

The board is filled by the real failover core playing the example brownout; the test feeds it
the brownout's first ticks while the page is open and watches the decision arrive over
server-sent events, without a reload.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from health.dashboard.model import ServiceStats
from health.dashboard.server import DashboardSettings
from health.failover.core import decide
from health.failover.model import ControllerState, Observations, TargetObservation
from tests.health.dashboard.browser import (
    PageProblems,
    launch,
    newest_decision_id,
    open_dashboard,
    screenshot,
    wait_for_decision,
    weights_of,
)
from tests.health.dashboard.conftest import Serve
from tests.health.dashboard.feed import BROWNOUT_START

pytestmark = pytest.mark.e2e

HOSTILE = "<img src=x onerror=alert(1)>"
# The server's default pace: what a person sees.
LIVE = DashboardSettings()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await launch(playwright)
        try:
            yield chromium
        finally:
            await chromium.close()


async def _page(browser: Browser, width: int, height: int) -> Page:
    return await browser.new_page(viewport={"width": width, "height": height})


async def test_a_brownout_decision_arrives_live_and_the_weights_move(
    serve: Serve, browser: Browser
) -> None:
    served = await serve(LIVE)
    page = await _page(browser, 1920, 1080)
    problems = PageProblems.watch(page)
    await open_dashboard(page, served.url, cluster="us-west")
    assert await weights_of(page, "payments") == {"us-west": 10_000}
    before = await newest_decision_id(page)
    await page.evaluate("window.sameDocument = true")

    # The brownout starts: feed the real core tick by tick until it decides to move.
    while not served.board.decisions(after=before):
        assert served.feed.now <= BROWNOUT_START + 5, "the core never moved"
        served.feed.run(1)
        await asyncio.sleep(0.1)

    decision = await wait_for_decision(page, before)
    assert decision["rule"] == "enter-degraded"
    assert decision["service"] == "payments"
    assert re.search(r"us-west 100(\.0)?% → \d", decision["change"])
    assert "degraded by latency" in decision["explanation"]
    assert re.fullmatch(r"\d\d:\d\d:\d\d", decision["time"])
    await expect(page.locator("#weights .route[data-service=payments] .segment")).not_to_have_count(
        1
    )
    moved = await weights_of(page, "payments")
    assert moved["us-west"] < 10_000
    assert moved["ap-southeast"] > 0
    await expect(page.locator(".region-card[data-region=us-west]")).to_have_attribute(
        "data-status", "degraded"
    )
    await expect(
        page.locator("#services tr[data-service=payments][data-region=us-west] td.bad")
    ).to_have_count(1)
    assert await page.evaluate("window.sameDocument") is True  # no reload happened

    # Let the ramp finish so the picture shows the whole story, then keep it.
    while served.feed.now <= BROWNOUT_START + 9:
        served.feed.run(1)
        await asyncio.sleep(0.05)
    await expect(page.locator("#weights .route[data-service=payments] .mode")).to_have_text(
        "degraded held"
    )
    await page.wait_for_timeout(700)  # the bars' width transition
    path = await screenshot(page, "dashboard.png")
    assert path.stat().st_size > 10_000
    assert problems.errors == []


async def test_the_page_reads_at_1366x768(serve: Serve, browser: Browser) -> None:
    served = await serve(LIVE, until=BROWNOUT_START + 9)
    page = await _page(browser, 1366, 768)
    problems = PageProblems.watch(page)
    await open_dashboard(page, served.url, cluster="us-west")
    # Regions, the service table and the newest decision are above the fold.
    for selector in [".region-card", "#services tbody tr", "#timeline li[data-decision-id]"]:
        box = await page.locator(selector).first.bounding_box()
        assert box is not None
        assert box["y"] + box["height"] <= 768, selector
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 1366  # nothing forces a sideways scroll
    await page.wait_for_timeout(700)
    await screenshot(page, "dashboard-1366.png")
    assert problems.errors == []


async def test_hostile_service_names_are_shown_as_text(serve: Serve, browser: Browser) -> None:
    served = await serve(LIVE, service=HOSTILE, until=BROWNOUT_START + 4)
    page = await _page(browser, 1366, 768)
    problems = PageProblems.watch(page)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    await open_dashboard(page, served.url)
    await expect(page.locator("#services tbody th.service-name", has_text=HOSTILE)).to_have_count(1)
    await expect(page.locator(".decision-service", has_text=HOSTILE).first).to_be_visible()
    assert await page.locator("main img").count() == 0
    assert dialogs == []
    assert problems.errors == []


async def test_the_page_says_stale_then_reconnects_after_the_server_comes_back(
    serve: Serve, browser: Browser
) -> None:
    served = await serve(LIVE)
    page = await _page(browser, 1366, 768)
    await page.clock.install()
    await open_dashboard(page, served.url)
    connection = page.locator("#connection")
    # Nothing changes in the mesh for longer than the page waits: it says so.
    await page.clock.run_for(12_000)
    await expect(connection).to_have_attribute("data-status", "stale")
    await expect(page.locator("#connection-label")).to_have_text(re.compile("Stale"))
    # The control plane goes away: the page backs off and retries.
    port = served.server.port
    await served.server.close()
    await expect(connection).to_have_attribute("data-status", "reconnecting")
    restarted = await serve(LIVE, port=port)
    # Virtual time in steps, so a retry that fired too early is followed by the next one
    # (a single long step left the next retry to real time, past the wait, on a busy machine).
    for _ in range(24):
        await page.clock.run_for(5_000)
        if await connection.get_attribute("data-status") == "live":
            break
    await expect(connection).to_have_attribute("data-status", "live", timeout=10_000)
    restarted.feed.run(1)
    await expect(page.locator("#cluster")).to_have_text("us-west")


async def test_small_latencies_get_distinct_axis_labels_and_peer_rows_say_whose(
    serve: Serve, browser: Browser
) -> None:
    served = await serve(LIVE)
    # checkout: calls answered in well under a millisecond (the chart once read 1/1/0 ms).
    state = ControllerState.initial("us-west")
    for tick in range(5):
        local = TargetObservation("us-west", tick, 100, 1, p95=0.0004)
        decision = decide(None, state, Observations("us-west", 10.0, (local,)), float(tick))
        state = decision.state
        served.board.observe("checkout", "us-west", decision, at=time.time() - 5 + tick)
    # search: only ap-southeast serves it, and its copy is idle (known by its probes).
    idle = ServiceStats("search", "us-west", "ap-southeast", 0.002, 0.004, 0.006, None, 0.0)
    served.board.update(
        services=[*served.board.snapshot().services, replace(idle, source="probes")]
    )
    page = await _page(browser, 1366, 768)
    problems = PageProblems.watch(page)
    await open_dashboard(page, served.url, cluster="us-west")
    chart = page.locator('figure.chart-pair[data-service="checkout"] svg').first
    labels = await chart.locator("text.axis").all_text_contents()
    grid = [label for label in labels if label.endswith(" ms")]
    assert grid == ["0 ms", "0.25 ms", "0.5 ms"] or grid == ["0.5 ms", "0.25 ms", "0 ms"], labels
    row = page.locator('#services tbody tr[data-service="search"][data-region="ap-southeast"]')
    await expect(row).to_have_count(1)
    await expect(row.locator(".source-mark")).to_have_text(" probes")
    assert problems.errors == []
