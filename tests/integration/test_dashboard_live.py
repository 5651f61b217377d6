"""The dashboard of a live mesh in Debian's Chromium: `snapbright up` (the default two-region
topology plus the example FailoverPolicy for payments), us-west's page open while a caller
loop sends requests to payments; a brownout of us-west's payments arrives on the page as a
decision over server-sent events, and the weight bars move, without a reload."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from playwright.async_api import Page, async_playwright, expect

from snapbright.topology.files import DEFAULT_TOPOLOGY
from tests.health.dashboard.browser import (
    PageProblems,
    launch,
    newest_decision_id,
    open_dashboard,
    screenshot,
    wait_for_decision,
    weights_of,
)
from tests.integration.conftest import LocalMeshRun, StartMesh

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "deploy" / "examples" / "failover-payments.yaml"
TOPOLOGY = REPO / "snapbright" / "topology" / DEFAULT_TOPOLOGY
BOUND_S = 90.0
"""Seconds the test may take once the mesh is up."""
# Enough samples per second for the policy's evidence (minSamples 20 over maxAge 5 s).
CALLS_PER_SECOND = 25.0


def _topology_with_policy(directory: Path) -> Path:
    """The default topology, with the example FailoverPolicy listed next to it."""
    document = yaml.safe_load(TOPOLOGY.read_text())
    document["spec"]["policies"] = [POLICY.name]
    shutil.copyfile(POLICY, directory / POLICY.name)
    path = directory / "mesh.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


async def _call_payments(outbound: str, answered: dict[str, int]) -> None:
    """us-west's checkout calls payments through its sidecar at a steady pace, and counts
    which cluster answered."""
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        pending: set[asyncio.Task[None]] = set()

        async def one() -> None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with session.get(f"http://{outbound}/", headers={"Host": "payments"}) as r:
                    cluster = str((await r.json(content_type=None)).get("cluster"))
                    answered[cluster] = answered.get(cluster, 0) + 1

        try:
            while True:
                task = asyncio.create_task(one())
                pending.add(task)
                task.add_done_callback(pending.discard)
                await asyncio.sleep(1 / CALLS_PER_SECOND)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


async def _request_rate(page: Page, region: str) -> float:
    cell = page.locator(
        f"#services tr[data-service=payments][data-region={region}] td[data-metric=requestRate]"
    )
    return float(await cell.inner_text())


async def test_a_brownout_on_the_live_mesh_shows_up_as_a_decision_and_moved_weights(
    start_mesh: StartMesh, tmp_path: Path
) -> None:
    # `snapbright up` has its own bound (the fixture's); the test's work after it has BOUND_S.
    run: LocalMeshRun = await asyncio.to_thread(start_mesh, _topology_with_policy(tmp_path), 21400)
    started = time.monotonic()
    us_west = run.cluster("us-west")
    answered: dict[str, int] = {}
    callers = [
        asyncio.create_task(
            _call_payments(run.sidecar("us-west", "checkout")["outbound"], answered)
        ),
        # ap-southeast's own users of its payments: the health it publishes to us-west then
        # carries evidence (an idle copy publishes none, and is not a usable target).
        asyncio.create_task(
            _call_payments(run.sidecar("ap-southeast", "payments")["outbound"], {})
        ),
    ]
    try:
        async with async_playwright() as playwright:
            browser = await launch(playwright)
            try:
                page = await browser.new_page(viewport={"width": 1920, "height": 1080})
                problems = PageProblems.watch(page)
                await open_dashboard(page, us_west["dashboard"], cluster="us-west")
                await page.evaluate("window.sameDocument = true")

                # Live data from the mesh: both regions, a measured round trip between them
                # (80 ms emulated), and payments served locally at a real request rate.
                await expect(page.locator(".region-card")).to_have_count(2)
                rtt = page.locator("#rtt td[data-from=us-west][data-to=ap-southeast]")
                await expect(rtt).to_have_text(re.compile(r"^\d+(\.\d+)? ms$"))
                assert 60 <= float((await rtt.inner_text()).split()[0]) <= 250
                # The rate is averaged over a sliding window: it climbs to the caller's pace.
                await page.wait_for_function(
                    """least => Number(document.querySelector(
                        '#services tr[data-service=payments][data-region=us-west] '
                        + 'td[data-metric=requestRate]')?.textContent) >= least""",
                    arg=CALLS_PER_SECOND / 2,
                    timeout=15_000,
                )
                assert await _request_rate(page, "us-west") < CALLS_PER_SECOND * 3
                assert await weights_of(page, "payments") == {"us-west": 10_000}
                before = await newest_decision_id(page)

                # us-west's payments replicas get slow: the controller moves traffic away.
                await asyncio.to_thread(
                    run.cli,
                    *("fault", "set", "--cluster", "us-west", "--service", "payments"),
                    *("--latency", "400ms", "--via", "app", "--state-dir", str(run.state_dir)),
                )
                decision = await wait_for_decision(page, before, timeout_ms=20_000)
                assert decision["service"] == "payments"
                assert decision["rule"] == "enter-degraded"
                assert re.search(r"us-west 100(\.0)?% → \d", decision["change"])
                await expect(
                    page.locator("#weights .route[data-service=payments] .segment")
                ).not_to_have_count(1)
                moved = await weights_of(page, "payments")
                assert moved["us-west"] < 10_000
                assert moved["ap-southeast"] > 0
                await expect(page.locator(".region-card[data-region=us-west]")).to_have_attribute(
                    "data-status", "degraded"
                )
                assert await page.evaluate("window.sameDocument") is True  # no reload
                # The sidecar gets the new weights through the discovery stream within a second
                # or so of the decision: ap-southeast starts answering checkout's calls.
                for _ in range(50):
                    if answered.get("ap-southeast", 0) > 0:
                        break
                    await asyncio.sleep(0.1)
                assert answered.get("ap-southeast", 0) > 0, answered

                await page.wait_for_timeout(1_000)  # the bars' width transition
                path = await screenshot(page, "dashboard-live.png")
                assert path.stat().st_size > 10_000
                assert problems.errors == []
            finally:
                await browser.close()
    finally:
        for caller in callers:
            caller.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
    elapsed = time.monotonic() - started
    assert elapsed < BOUND_S, f"{elapsed:.0f}s after the mesh was up"
