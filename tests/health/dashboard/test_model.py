"""The dashboard's values: what goes in the timeline, what is flagged, and the JSON they become."""

from __future__ import annotations

import pytest

from federation.peering.model import HealthSource, ServiceHealth, ServiceKey
from health.dashboard.model import (
    ALL_COPIES_MAX,
    DecisionEntry,
    Metric,
    Region,
    RegionStatus,
    RttLink,
    ServiceStats,
    Snapshot,
    degraded_metrics,
    region_status,
    service_rows,
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
from health.stats.core import HealthView, RegionalStats, RemoteService
from proxy.stats.core import Histogram, Outcome, StatsWindow
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
        pytest.param(
            None, _decision(Rule.NO_LOCAL_DATA, ALL_LOCAL, ALL_LOCAL), False, id="no-data-at-start"
        ),
        pytest.param(
            HOLD, _decision(Rule.NO_LOCAL_DATA, ALL_LOCAL, ALL_LOCAL), True, id="data-stops"
        ),
        pytest.param(
            None, _decision(Rule.NO_HEALTHY_LOCAL, ALL_LOCAL, ALL_LOCAL), True, id="first-news"
        ),
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
        "source": "callers",
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


# --- The services table's rows ---

NOW = 1_000.0


def _served(view: HealthView, service: str, target: str, latency: float, per_second: int) -> None:
    for second in range(990, 1000):
        counts = [0] * len(Outcome)
        counts[Outcome.HTTP_2XX] = per_second
        window = StatsWindow(
            second, service, target, tuple(counts), Histogram.of([latency] * per_second)
        )
        assert view.stats.add(LOCAL, window, second + 1.0)


def _summary(service: str, **fields: object) -> ServiceHealth:
    values: dict[str, object] = {
        "key": ServiceKey("default", service),
        "latency_p50_seconds": 0.010,
        "latency_p95_seconds": 0.020,
        "latency_p99_seconds": 0.030,
        "success_rate": 0.99,
        "request_rate": 40.0,
        "headroom_rps": None,
        "healthy_endpoints": 2,
    }
    values.update(fields)
    return ServiceHealth(**values)  # type: ignore[arg-type]


def test_every_copy_has_a_row_even_one_our_callers_never_call() -> None:
    view = HealthView(LOCAL, RegionalStats())
    _served(view, "payments", LOCAL, 0.020, per_second=5)
    _served(view, "payments", REMOTE, 0.100, per_second=1)
    view.set_remote("payments", RemoteService(REMOTE, 2, _summary("payments"), NOW))
    # Only ap-southeast serves search; nobody here calls it.
    view.set_remote("search", RemoteService(REMOTE, 1, _summary("search"), NOW))
    # eu-central exports it too; no summary has arrived from there yet.
    view.set_remote("search", RemoteService("eu-central", 1))
    rows = {(r.service, r.region): r for r in service_rows(view, NOW, {})}
    assert sorted(rows) == [
        ("payments", REMOTE),
        ("payments", LOCAL),
        ("search", REMOTE),
        ("search", "eu-central"),
    ]
    assert rows["payments", REMOTE].source == "callers"  # ours, network included, wins
    assert rows["payments", REMOTE].request_rate == 1.0
    search = rows["search", REMOTE]
    assert (search.caller, search.source, search.p95, search.request_rate) == (
        LOCAL,
        "peer",
        0.020,
        40.0,
    )
    unknown = rows["search", "eu-central"]
    assert (unknown.p95, unknown.success_rate, unknown.request_rate) == (None, None, 0.0)


def test_past_the_cap_only_copies_of_services_we_serve_or_call_have_rows() -> None:
    view = HealthView(LOCAL, RegionalStats())
    _served(view, "payments", LOCAL, 0.020, per_second=5)
    view.set_remote("payments", RemoteService(REMOTE, 2, _summary("payments"), NOW))
    for index in range(ALL_COPIES_MAX):
        view.set_remote(f"import-{index}", RemoteService(REMOTE, 1, _summary("x"), NOW))
    rows = {(r.service, r.region) for r in service_rows(view, NOW, {})}
    assert rows == {("payments", LOCAL), ("payments", REMOTE)}


def test_an_idle_copys_row_shows_its_probe_latency_and_says_so() -> None:
    view = HealthView(LOCAL, RegionalStats())
    idle = _summary(
        "payments",
        request_rate=0.0,
        success_rate=1.0,
        source=HealthSource.PROBES,
        probe_samples=20,
        latency_p95_seconds=0.004,
    )
    silent = _summary("ledger", request_rate=0.0, success_rate=1.0, latency_p95_seconds=0.0)
    view.set_remote("payments", RemoteService(REMOTE, 2, idle, NOW))
    view.set_remote("ledger", RemoteService(REMOTE, 2, silent, NOW))
    rows = {r.service: r for r in service_rows(view, NOW, {})}
    assert (rows["payments"].source, rows["payments"].p95) == ("probes", 0.004)
    assert rows["payments"].success_rate is None  # probes say nothing of requests' errors
    assert (rows["ledger"].source, rows["ledger"].p95) == ("peer", None)  # zeros: no evidence


def test_a_peer_rows_figures_are_flagged_against_the_policy() -> None:
    view = HealthView(LOCAL, RegionalStats())
    slow = _summary("payments", latency_p95_seconds=0.900, latency_p99_seconds=1.2)
    view.set_remote("payments", RemoteService(REMOTE, 2, slow, NOW))
    policy = load_example("failover-payments.yaml", FailoverPolicy)
    (row,) = service_rows(view, NOW, {"payments": policy})
    assert "p95" in row.degraded
