"""The Board, filled from the real failover core playing the example brownout."""

from __future__ import annotations

import asyncio
import math

import pytest

from health.dashboard.board import Board
from health.dashboard.model import RegionStatus
from health.failover.core import decide
from health.failover.model import ControllerState, Observations, Rule, TargetObservation
from tests.health.dashboard.feed import BROWNOUT_START, example_feed

START = 1_700_000_000.0


def _board(window: float = 300.0) -> Board:
    return Board("us-west", clock=lambda: START + 1000, window=window)


def test_the_brownout_appears_in_the_timeline_as_its_moves_newest_first() -> None:
    board = _board()
    example_feed(board, start=START).run_until(BROWNOUT_START + 8)
    rules = [entry.rule for entry in board.decisions(service="payments")]
    assert rules[-1] is Rule.ENTER_DEGRADED
    assert Rule.HOLD not in rules
    first = board.decisions(service="payments")[-1]
    assert START + BROWNOUT_START < first.at <= START + BROWNOUT_START + 3
    assert first.previous_weights["us-west"] == 10_000 > first.weights["us-west"]
    assert "degraded by latency" in first.explanation
    ids = [entry.id for entry in board.decisions()]
    assert ids == sorted(ids, reverse=True)


def test_noise_makes_no_timeline_entries() -> None:
    board = _board()
    example_feed(board, start=START).run_until(BROWNOUT_START)
    assert board.decisions(service="ledger") == ()


def test_a_start_without_local_data_leaves_the_timeline_empty_until_data_stops() -> None:
    """The real core, before the local copy's statistics arrive, then with them, then stale."""
    board = _board()
    state = ControllerState.initial("us-west")

    def tick(t: float, observed_at: float) -> None:
        nonlocal state
        local = TargetObservation("us-west", observed_at, 100, 3, p95=0.040)
        decision = decide(None, state, Observations("us-west", 50.0, (local,)), t)
        state = decision.state
        board.observe("payments", "us-west", decision, at=START + t)

    for t in range(5):
        tick(t, observed_at=-math.inf)  # nothing has arrived yet
    assert board.decisions() == ()
    for t in range(5, 10):
        tick(t, observed_at=t)
    tick(20, observed_at=9)  # 11 s old: the data stopped
    (entry,) = board.decisions()
    assert entry.rule is Rule.NO_LOCAL_DATA


def test_decisions_page_by_limit_and_after() -> None:
    board = _board()
    example_feed(board, start=START).run_until(BROWNOUT_START + 8)
    every = board.decisions(limit=500)
    assert len(every) >= 2  # the example moves in two steps: enter-degraded, cap-reached
    assert board.decisions(limit=1) == every[:1]
    assert board.decisions(after=every[1].id) == every[:1]
    assert board.decisions(service="nothing-here") == ()


def test_snapshot_holds_current_weights_regions_and_bounded_series() -> None:
    board = _board(window=30.0)
    example_feed(board, start=START).run_until(BROWNOUT_START + 8)
    snapshot = board.snapshot()
    route = next(r for r in snapshot.routes if r.service == "payments")
    assert route.weights["us-west"] < 10_000
    assert route.weights["ap-southeast"] > 0  # nearest: 80ms away beats 150ms
    regions = {r.name: r.status for r in snapshot.regions}
    assert regions == {
        "us-west": RegionStatus.DEGRADED,
        "ap-southeast": RegionStatus.HEALTHY,
        "eu-central": RegionStatus.HEALTHY,
    }
    series = next(s for s in snapshot.series if s.service == "payments")
    times = [t for t, _ in series.weights["us-west"]]
    assert times[-1] - times[0] <= 30.0
    assert series.weights["us-west"][-1][1] == route.weights["us-west"] / 10_000
    assert series.latency["us-west"][-1][1] > 0.4  # the brownout's +400ms, expected latency


def test_snapshot_is_rebuilt_only_when_the_version_moves() -> None:
    board = _board()
    feed = example_feed(board, start=START)
    feed.run(2)
    first = board.snapshot()
    assert board.snapshot() is first
    feed.run(1)
    assert board.snapshot().version > first.version


async def test_changed_wakes_a_waiter_on_the_next_update() -> None:
    board = _board()
    waiter = asyncio.create_task(board.changed(board.version))
    await asyncio.sleep(0)
    assert not waiter.done()
    board.update(regions=())
    assert await asyncio.wait_for(waiter, 1.0) == 1


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="keep_decisions"):
        Board("us-west", keep_decisions=0)
