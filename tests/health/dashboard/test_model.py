"""The dashboard's values: what goes in the timeline, what is flagged, and the JSON they become."""

from __future__ import annotations

import pytest

from health.dashboard.model import (
    DecisionEntry,
    Metric,
    Region,
    RegionStatus,
    RttLink,
    ServiceStats,
    Snapshot,
    degraded_metrics,
    region_status,
    snapshot_json,
    worth_recording,
)
from health.failover.model import (
    ControllerState,
    Decision,
    Direction,
    FailoverPolicy,
    Rule,
)
from tests.health.dashboard.feed import load_example

LOCAL, REMOTE = "us-west", "ap-southeast"
ALL_LOCAL = {LOCAL: 10_000, REMOTE: 0}
SHIFTED = {LOCAL: 6_500, REMOTE: 3_500}


def _decision(
    rule: Rule,
    weights: dict[str, int],
    previous: dict[str, int],
    transition: Direction | None = None,
) -> Decision:
    return Decision(
        at=1.0,
        rule=rule,
        weights=weights,
        previous_weights=previous,
        state=ControllerState.initial(LOCAL),
        explanation="why",
        transition=transition,
    )


HOLD = _decision(Rule.HOLD, ALL_LOCAL, ALL_LOCAL)
PENDING = _decision(Rule.EXIT_PENDING, SHIFTED, SHIFTED)


@pytest.mark.parametrize(
    ("previous", "decision", "recorded"),
    [
        pytest.param(None, HOLD, False, id="first-hold"),
        pytest.param(HOLD, HOLD, False, id="hold-after-hold"),
        pytest.param(
            HOLD,
            _decision(Rule.ENTER_DEGRADED, SHIFTED, ALL_LOCAL, Direction.AWAY),
            True,
            id="shift",
        ),
        pytest.param(
            _decision(Rule.RAMP_STEP, SHIFTED, ALL_LOCAL), HOLD, False, id="hold-after-step"
        ),
        pytest.param(HOLD, PENDING, True, id="exit-pending-starts"),
        pytest.param(PENDING, PENDING, False, id="exit-pending-continues"),
        pytest.param(
            PENDING, _decision(Rule.FAILBACK_STEP, ALL_LOCAL, SHIFTED), True, id="failback"
        ),
        pytest.param(None, _decision(Rule.NO_LOCAL_DATA, ALL_LOCAL, ALL_LOCAL), True, id="no-data"),
    ],
)
def test_the_timeline_takes_moves_and_new_rules_not_every_held_tick(
    previous: Decision | None, decision: Decision, recorded: bool
) -> None:
    assert worth_recording(previous, decision) is recorded


@pytest.mark.parametrize(
    ("p95", "success", "flagged"),
    [
        (0.045, 0.999, set()),
        (0.301, 0.999, {"p95"}),
        (0.300, 0.999, set()),  # the enter threshold itself is not past it
        (0.045, 0.90, {"successRate"}),
        (0.450, 0.90, {"p95", "successRate"}),
        (None, None, set()),
    ],
)
def test_metrics_past_the_policys_enter_thresholds_are_flagged(
    p95: float | None, success: float | None, flagged: set[Metric]
) -> None:
    policy = load_example("failover-payments.yaml", FailoverPolicy)
    found = degraded_metrics(policy, p50=0.02, p95=p95, p99=0.9, success_rate=success)
    assert found == flagged


def test_without_a_policy_nothing_is_flagged() -> None:
    assert degraded_metrics(None, p50=9.0, p95=9.0, p99=9.0, success_rate=0.0) == frozenset()


@pytest.mark.parametrize(
    ("reachable", "degraded", "status"),
    [
        (True, 0, RegionStatus.HEALTHY),
        (True, 2, RegionStatus.DEGRADED),
        (False, 0, RegionStatus.UNREACHABLE),
        (False, 3, RegionStatus.UNREACHABLE),
    ],
)
def test_region_status(reachable: bool, degraded: int, status: RegionStatus) -> None:
    assert region_status(reachable=reachable, degraded_services=degraded) is status


def test_json_speaks_milliseconds_basis_points_and_camel_case() -> None:
    decision = _decision(Rule.ENTER_DEGRADED, SHIFTED, ALL_LOCAL, Direction.AWAY)
    snapshot = Snapshot(
        cluster=LOCAL,
        version=3,
        generated_at=100.0,
        regions=(Region(LOCAL, RegionStatus.DEGRADED, local=True, detail="slow"),),
        rtt=(RttLink(LOCAL, REMOTE, 0.0805), RttLink(REMOTE, LOCAL, None)),
        services=(
            ServiceStats(
                "payments", LOCAL, LOCAL, 0.42, 0.45, None, 0.999, 60.0, frozenset({"p95"})
            ),
        ),
        decisions=(DecisionEntry.from_decision(7, "payments", LOCAL, decision, at=99.5),),
    )
    data = snapshot_json(snapshot)
    assert data["rtt"] == [
        {"from": LOCAL, "to": REMOTE, "rttMs": 80.5, "alive": True},
        {"from": REMOTE, "to": LOCAL, "rttMs": None, "alive": False},
    ]
    assert data["services"][0] | {} == {
        "service": "payments",
        "caller": LOCAL,
        "region": LOCAL,
        "p50Ms": 420.0,
        "p95Ms": 450.0,
        "p99Ms": None,
        "successRate": 0.999,
        "requestRate": 60.0,
        "degraded": ["p95"],
    }
    (entry,) = data["decisions"]
    assert entry["id"] == 7
    assert entry["at"] == 99.5
    assert entry["transition"] == "away"
    assert entry["weights"] == [
        {"cluster": REMOTE, "weight": 3_500},
        {"cluster": LOCAL, "weight": 6_500},
    ]
    assert entry["previousWeights"][1] == {"cluster": LOCAL, "weight": 10_000}
