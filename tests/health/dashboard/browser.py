"""What a person sees on the dashboard, checked in Debian's Chromium through Playwright.

The checks take a page and the dashboard's base URL only, so the same functions run against a
test server here and against a live ``snapbright up`` mesh in the integration tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from playwright.async_api import Browser, ConsoleMessage, Error, Page, Playwright, expect

CHROMIUM: Final = "/usr/bin/chromium"
# No downloads, no background traffic: only 127.0.0.1.
CHROMIUM_ARGS: Final = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
ARTIFACTS: Final = Path(__file__).parents[2] / "artifacts"


async def launch(playwright: Playwright) -> Browser:
    """Debian's Chromium, headless (never a downloaded browser)."""
    return await playwright.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS))


@dataclass
class PageProblems:
    """Script errors and console errors (CSP violations among them) a page reported."""

    errors: list[str]

    @classmethod
    def watch(cls, page: Page) -> PageProblems:
        """Start collecting from ``page``."""
        problems = cls([])

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                problems.errors.append(message.text)

        def on_error(error: Error) -> None:
            problems.errors.append(str(error))

        page.on("console", on_console)
        page.on("pageerror", on_error)
        return problems


async def open_dashboard(page: Page, base_url: str, *, cluster: str | None = None) -> None:
    """Load the page and check that it shows live data in every section: region cards with a
    status in words, the RTT matrix, the service table, weight bars that add up to 100%."""
    await page.goto(base_url)
    await expect(page.locator("#connection")).to_have_attribute("data-status", "live")
    if cluster is not None:
        await expect(page.locator("#cluster")).to_have_text(cluster)
    cards = page.locator(".region-card")
    await expect(cards.first).to_be_visible()
    for card in await cards.all():
        status = await card.get_attribute("data-status")
        assert status in {"healthy", "degraded", "unreachable"}
        # Readable without colour: the status is written out.
        await expect(card.locator(".status-word")).to_have_text(re.compile(status, re.IGNORECASE))
    # Every probed pair shows a round trip or says the link is down.
    assert await page.locator("#rtt td[data-from]").count() > 0
    for cell in await page.locator("#rtt td[data-from]").all():
        await expect(cell).to_have_text(re.compile(r"^(\d+(\.\d+)? m?s|✕ down)$"))
    await expect(page.locator("#services tbody tr[data-service]").first).to_be_visible()
    await expect(page.locator("#weights .bar .segment").first).to_be_visible()
    for route in await page.locator("#weights .route").all():
        service = await route.get_attribute("data-service")
        assert service is not None
        assert sum((await weights_of(page, service)).values()) == 10_000


async def weights_of(page: Page, service: str) -> dict[str, int]:
    """The weight bar of ``service`` as drawn: cluster -> basis points, visible segments only."""
    weights: dict[str, int] = {}
    for route in await page.locator("#weights .route").all():
        if await route.get_attribute("data-service") != service:
            continue
        for segment in await route.locator(".segment").all():
            cluster = await segment.get_attribute("data-cluster")
            weight = await segment.get_attribute("data-weight")
            assert cluster is not None
            assert weight is not None
            weights[cluster] = int(weight)
    return weights


async def newest_decision_id(page: Page) -> int:
    """The id of the newest entry in the timeline (0 when it is empty)."""
    ids = await page.locator("#timeline li[data-decision-id]").evaluate_all(
        "items => items.map(item => Number(item.dataset.decisionId))"
    )
    return max(ids, default=0)


async def wait_for_decision(
    page: Page, after: int, *, timeout_ms: float = 10_000
) -> dict[str, str]:
    """Wait, without reloading, for a timeline entry newer than ``after``; return its time,
    rule, service, weights change and explanation as shown."""
    await page.wait_for_function(
        """after => [...document.querySelectorAll('#timeline li[data-decision-id]')]
            .some(item => Number(item.dataset.decisionId) > after)""",
        arg=after,
        timeout=timeout_ms,
    )
    entry = page.locator("#timeline li[data-decision-id]").first  # newest first
    return {
        "time": await entry.locator("time").inner_text(),
        "rule": await entry.locator(".rule").inner_text(),
        "service": await entry.locator(".decision-service").inner_text(),
        "change": await entry.locator(".weights-change").inner_text(),
        "explanation": await entry.locator(".explanation").inner_text(),
    }


async def screenshot(page: Page, name: str) -> Path:
    """Save what the page shows now as tests/artifacts/``name``."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    await page.screenshot(path=str(path))
    return path
