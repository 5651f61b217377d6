"""The failover core, clause by clause, in virtual time (one tick per second)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from health.failover.core import decide
from health.failover.model import (
    TOTAL_WEIGHT,
    ControllerState,
    Decision,
    Direction,
    EvidenceSource,
    FailoverPolicy,
    Mode,
    Observations,
    Rule,
    TargetObservation,
)
from proxy.config.model import API_VERSION

LOCAL, NEAR, FAR = "us-west", "ap-southeast", "eu-central"
RATE = 200.0  # the caller's requests/s
HEALTHY, SLOW, BETWEEN = 0.045, 0.450, 0.200  # p95s: under exit, over enter, in between

Scene = Callable[[float, Mapping[str, int]], Observations]


def _policy(**spec: Any) -> FailoverPolicy:
    """The test policy: p95 enter 300ms / exit 150ms, enterAfter 2s, exitAfter 5s, ramp 25% per
    1s, keep 2%, failback after 10s in 20% steps every 2s; ``spec`` overrides top-level keys."""
    body: dict[str, Any] = {
        "service": "payments",
        "triggers": {
            "latency": {"enter": "300ms", "exit": "150ms", "enterAfter": "2s", "exitAfter": "5s"}
        },
        "ramp": {"step": "25%", "interval": "1s"},
        "keepShare": "2%",
        "failback": {"stableFor": "10s", "step": "20%", "interval": "2s"},
        "evidence": {"minSamples": 20, "maxAge": "5s"},
    }
    body.update(spec)
    return FailoverPolicy.model_validate(
        {
            "apiVersion": API_VERSION,
            "kind": "FailoverPolicy",
            "metadata": {"name": "payments"},
            "spec": body,
        }
    )


def _target(
    cluster: str,
    at: float,
    *,
    p95: float = HEALTHY,
    rtt: float = 0.0,
    errors: float = 0.001,
    headroom: float | None = None,
    healthy: int = 3,
    samples: int = 500,
    age: float = 0.0,
    source: EvidenceSource = "traffic",
) -> TargetObservation:
    return TargetObservation(
        cluster=cluster,
        observed_at=at - age,
        samples=samples,
        healthy_endpoints=healthy,
        p50=p95 / 2,
        p95=p95,
        p99=p95 * 1.5,
        error_rate=errors,
        rtt=rtt,
        headroom=headroom,
        source=source,
    )


def _scene(
    local: Callable[[float], dict[str, Any]],
    near: Callable[[float], dict[str, Any]] = lambda t: {},
    far: Callable[[float], dict[str, Any]] | None = lambda t: {},
    *,
    near_headroom: float | None = None,
) -> Scene:
    """Local us-west, ap-southeast 80ms away (50ms service), eu-central 150ms away (45ms).

    ``near_headroom`` is ap-southeast's room before this caller sends anything; the scene
    reports what is left after the caller's current share, as a real target would."""

    def observe(t: float, weights: Mapping[str, int]) -> Observations:
        headroom = None
        if near_headroom is not None:
            headroom = near_headroom - weights.get(NEAR, 0) / TOTAL_WEIGHT * RATE
        targets = [
            _target(LOCAL, t, **local(t)),
            _target(NEAR, t, **{"p95": 0.050, "rtt": 0.080, "headroom": headroom, **near(t)}),
        ]
        if far is not None:
            targets.append(_target(FAR, t, **{"p95": 0.045, "rtt": 0.150, **far(t)}))
        return Observations(local=LOCAL, request_rate=RATE, targets=tuple(targets))

    return observe


def _brownout(start: float = 10, end: float = math.inf, p95: float = SLOW) -> Scene:
    return _scene(lambda t: {"p95": p95 if start <= t < end else HEALTHY})


def _run(policy: FailoverPolicy | None, scene: Scene, seconds: int) -> list[Decision]:
    state = ControllerState.initial(LOCAL)
    decisions = []
    for tick in range(seconds + 1):
        decision = decide(policy, state, scene(float(tick), state.weights), float(tick))
        assert sum(decision.weights.values()) == TOTAL_WEIGHT
        decisions.append(decision)
        state = decision.state
    return decisions


def _at(decisions: list[Decision], t: int) -> Decision:
    return decisions[t]


def _local(decision: Decision) -> int:
    return decision.weights.get(LOCAL, 0)


def _away(decisions: list[Decision]) -> list[int]:
    return [TOTAL_WEIGHT - _local(d) for d in decisions]


def _transitions(decisions: list[Decision]) -> list[Direction]:
    return [d.transition for d in decisions if d.transition is not None]


# --- Entering: thresholds held for a minimum time ---


def test_nothing_moves_before_the_enter_threshold_has_held_for_enter_after() -> None:
    decisions = _run(_policy(), _brownout(start=10), 11)
    assert _away(decisions) == [0] * 12


def test_traffic_moves_once_the_enter_threshold_has_held_for_enter_after() -> None:
    decision = _at(_run(_policy(), _brownout(start=10), 12), 12)
    assert decision.rule is Rule.ENTER_DEGRADED
    assert decision.weights == {LOCAL: 7500, NEAR: 2500, FAR: 0}
    assert decision.transition is Direction.AWAY


def test_one_bad_sample_moves_nothing() -> None:
    decisions = _run(_policy(), _brownout(start=10, end=11, p95=5.0), 30)
    assert not any(d.changed for d in decisions)


@pytest.mark.parametrize(
    "pattern",
    [
        pytest.param(lambda t: t % 2 == 0, id="every-other-tick"),
        pytest.param(lambda t: t % 3 != 0, id="two-of-three-ticks"),
        pytest.param(lambda t: t % 7 == 0, id="a-spike-every-7s"),
    ],
)
def test_noise_crossing_the_enter_threshold_briefly_causes_zero_transitions(
    pattern: Callable[[float], bool],
) -> None:
    scene = _scene(lambda t: {"p95": 0.900 if pattern(t) else 0.250})
    decisions = _run(_policy(), scene, 120)
    assert _transitions(decisions) == []
    assert not any(d.changed for d in decisions)


def test_error_rate_held_over_enter_moves_traffic_even_to_a_slower_region() -> None:
    policy = _policy(
        triggers={
            "latency": {"enter": "300ms", "exit": "150ms"},
            "errorRate": {"enter": "5%", "exit": "1%", "enterAfter": "2s"},
        }
    )
    scene = _scene(lambda t: {"errors": 0.2 if t >= 10 else 0.001})
    decisions = _run(policy, scene, 12)
    assert _at(decisions, 11).weights[LOCAL] == TOTAL_WEIGHT
    assert _at(decisions, 12).rule is Rule.ENTER_DEGRADED
    assert _at(decisions, 12).weights[NEAR] == 2500


# --- Entering from one-second windows: the short span, dated from when it began ---


def _windowed(
    recent: Callable[[float], float],
    long: Callable[[float], float] | None = None,
    *,
    recent_samples: int = 60,
) -> Scene:
    """Live-like observations: at tick ``t`` the newest closed window is second ``t - 1``
    (``recent``: its p95 then) and the long reading is ``long`` (by default the same)."""
    whole = long if long is not None else recent

    def observe(t: float, weights: Mapping[str, int]) -> Observations:
        base = _scene(lambda _: {"p95": whole(t - 1)})(t, weights)
        local = base.targets[0]
        short = recent(t - 1)
        windowed = TargetObservation(
            **{
                **{f: getattr(local, f) for f in local.__dataclass_fields__},
                "recent_start": t - 1,
                "recent_samples": recent_samples,
                "recent_p50": short / 2,
                "recent_p95": short,
                "recent_p99": short * 1.5,
                "recent_error_rate": local.error_rate,
            }
        )
        return replace(base, targets=(windowed, *base.targets[1:]))

    return observe


def _slow_from(start: float, end: float = math.inf) -> Callable[[float], float]:
    return lambda second: SLOW if start <= second < end else HEALTHY


def test_enter_after_counts_from_the_start_of_the_first_slow_window() -> None:
    # Second 10 is the first slow one; its window is seen at 11. enterAfter (2s) counted from
    # 10 holds at 12; counted from the tick that first saw it, it would hold at 13.
    decisions = _run(_policy(), _windowed(_slow_from(10)), 14)
    assert _away(decisions)[10:14] == [0, 0, 2500, 5000]
    assert decisions[12].rule is Rule.ENTER_DEGRADED
    assert "last 1s 450ms" in decisions[12].explanation


def test_the_short_window_enters_before_the_long_one_has_crossed() -> None:
    # The long window's p95 crosses only after several slow seconds (here 4): entering reads
    # the newest second.
    decisions = _run(_policy(), _windowed(_slow_from(10), _slow_from(14)), 14)
    assert decisions[12].rule is Rule.ENTER_DEGRADED


@pytest.mark.parametrize(
    "slow_seconds",
    [
        pytest.param([10], id="one slow second"),
        pytest.param([10, 12, 14, 16], id="every other second"),
        pytest.param([10, 11, 20, 30, 31], id="two slow seconds with enterAfter 3s"),
    ],
)
def test_short_slow_spells_in_the_newest_window_move_nothing(slow_seconds: list[int]) -> None:
    policy = _policy(
        triggers={
            "latency": {"enter": "300ms", "exit": "150ms", "enterAfter": "3s", "exitAfter": "5s"}
        }
    )
    recent = lambda second: SLOW if second in slow_seconds else HEALTHY  # noqa: E731
    decisions = _run(policy, _windowed(recent), 40)
    assert not any(d.changed for d in decisions)


def test_recovery_is_judged_on_the_long_window_not_the_newest_second() -> None:
    # The newest second is healthy from 30 on, the long window only from 40: the exit clock
    # (exitAfter 5s) starts at 41 (window 40), so recovery is declared at 46, not 36.
    decisions = _run(_policy(), _windowed(_slow_from(10, 30), _slow_from(10, 40)), 50)
    recovered = next(d.at for d in decisions if d.state.mode is Mode.FAILING_BACK)
    assert recovered == 46.0


def test_a_newest_second_with_too_few_samples_falls_back_to_the_long_reading() -> None:
    # 5 samples in the newest second (minSamples 20): the long reading enters, from the tick.
    decisions = _run(_policy(), _windowed(_slow_from(10), recent_samples=5), 14)
    assert _away(decisions)[10:14] == [0, 0, 0, 2500]


# --- Ramping: bounded steps, minimum interval, caps ---


def test_ramp_moves_at_most_one_step_per_interval() -> None:
    policy = _policy(ramp={"step": "10%", "interval": "3s"})
    decisions = _run(policy, _brownout(start=10), 21)
    assert _away(decisions)[12:22] == [1000, 1000, 1000, 2000, 2000, 2000, 3000, 3000, 3000, 4000]


def test_the_share_moved_never_exceeds_max_share() -> None:
    decisions = _run(_policy(maxShare="60%"), _brownout(start=10), 60)
    assert max(_away(decisions)) == 6000
    assert [d.rule for d in decisions if d.changed][-1] is Rule.CAP_REACHED
    assert decisions[-1].state.mode is Mode.DEGRADED_HELD


def test_the_kept_share_stays_on_the_degraded_local_copy() -> None:
    decisions = _run(_policy(maxShare="100%", keepShare="5%"), _brownout(start=10), 60)
    assert min(_local(d) for d in decisions) == 500
    assert _local(decisions[-1]) == 500


# --- Exiting: hysteresis, stable period, gradual failback ---


def test_between_exit_and_enter_thresholds_nothing_changes() -> None:
    scene = _scene(lambda t: {"p95": SLOW if 10 <= t < 20 else BETWEEN})
    decisions = _run(_policy(), scene, 120)
    moved = _away(decisions)[20]
    assert moved == 9800
    assert all(away == moved for away in _away(decisions)[20:])
    assert all(d.state.mode is Mode.DEGRADED_HELD for d in decisions[20:])


def test_recovery_is_declared_only_after_the_exit_threshold_has_held_for_exit_after() -> None:
    decisions = _run(_policy(), _brownout(start=10, end=30), 35)
    assert all(d.state.mode is not Mode.FAILING_BACK for d in decisions[:34])
    assert {d.rule for d in decisions[30:34]} == {Rule.EXIT_PENDING}
    assert decisions[35].state.mode is Mode.FAILING_BACK


def test_failback_waits_for_the_stable_period() -> None:
    decisions = _run(_policy(), _brownout(start=10, end=30), 45)
    # Recovered at 35 (exitAfter 5s); stable for 10s; the first step back at 45.
    assert _away(decisions)[35:45] == [9800] * 10
    assert decisions[45].rule is Rule.FAILBACK_STEP
    assert decisions[45].transition is Direction.BACK


def test_failback_moves_back_in_steps_and_completes() -> None:
    decisions = _run(_policy(), _brownout(start=10, end=30), 70)
    assert _away(decisions)[44:56] == [
        9800, 7800, 7800, 5800, 5800, 3800, 3800, 1800, 1800, 0, 0, 0
    ]  # fmt: skip
    assert decisions[53].rule is Rule.FAILBACK_COMPLETE
    assert decisions[-1].state.mode is Mode.STEADY
    assert _transitions(decisions) == [Direction.AWAY, Direction.BACK]


def _share_scene(rate: float, start: float, end: float) -> Scene:
    """A brownout whose local samples are what this caller's share produces over a 10s window
    at ``rate`` requests/s (the remote copies report their own service-wide statistics)."""

    def observe(t: float, weights: Mapping[str, int]) -> Observations:
        share = weights.get(LOCAL, TOTAL_WEIGHT) / TOTAL_WEIGHT
        local = {"p95": SLOW if start <= t < end else HEALTHY, "samples": round(rate * share * 10)}
        base = _scene(lambda _: local)(t, weights)
        return Observations(local=LOCAL, request_rate=rate, targets=base.targets)

    return observe


def test_the_kept_share_alone_is_enough_evidence_to_fail_back_completely() -> None:
    # 2% of 60 requests/s is ~12 samples per 10s window, below minSamples 20: the requirement
    # scales with the share the local copy is sent, so its recovery is seen.
    decisions = _run(_policy(), _share_scene(60.0, start=10, end=30), 90)
    assert max(_away(decisions)) == 9800
    assert _away(decisions)[-1] == 0
    assert decisions[-1].state.mode is Mode.STEADY
    assert _transitions(decisions) == [Direction.AWAY, Direction.BACK]


@pytest.mark.parametrize(
    ("samples", "recovers"),
    [(4, False), (5, True)],
)
def test_a_kept_share_with_fewer_than_five_samples_is_not_evidence(
    samples: int, recovers: bool
) -> None:
    def observe(t: float, weights: Mapping[str, int]) -> Observations:
        kept = weights.get(LOCAL, TOTAL_WEIGHT) <= 200  # the local copy holds only the kept 2%
        local = {"p95": SLOW if 10 <= t < 30 else HEALTHY, "samples": samples if kept else 500}
        return _scene(lambda _: local)(t, weights)

    decisions = _run(_policy(), observe, 90)
    assert max(_away(decisions)) == 9800
    assert (_away(decisions)[-1] == 0) is recovers
    if not recovers:
        assert "only 4 samples of 5: no evidence" in decisions[-1].explanation


def test_a_kept_share_whose_samples_dip_below_five_now_and_then_fails_back_on_time() -> None:
    # A small share's sample count wanders (1.5% of 60 requests/s: ~9 per 10 s, sometimes 4):
    # a tick without evidence holds the recovery clocks instead of starting them over.
    def observe(samples_when_kept: Callable[[float], int]) -> Scene:
        def scene(t: float, weights: Mapping[str, int]) -> Observations:
            kept = weights.get(LOCAL, TOTAL_WEIGHT) <= 200
            samples = samples_when_kept(t) if kept else 500
            return _scene(lambda _: {"p95": SLOW if 10 <= t < 30 else HEALTHY, "samples": samples})(
                t, weights
            )

        return scene

    steady = _run(_policy(), observe(lambda t: 9), 90)
    dipping = _run(_policy(), observe(lambda t: 4 if int(t) % 4 == 0 else 9), 90)
    home = [
        next(i for i, d in enumerate(run) if i > 30 and _away([d])[0] == 0)
        for run in (steady, dipping)
    ]
    assert home[1] <= home[0] + 2


def test_a_reading_above_exit_during_failback_pauses_it() -> None:
    scene = _scene(lambda t: {"p95": SLOW if 10 <= t < 30 else BETWEEN if t >= 46 else HEALTHY})
    decisions = _run(_policy(), scene, 80)
    assert _away(decisions)[45] == 7800
    assert all(away == 7800 for away in _away(decisions)[46:])


def test_degradation_held_again_during_failback_reenters_degraded() -> None:
    scene = _scene(lambda t: {"p95": SLOW if 10 <= t < 30 or t >= 48 else HEALTHY})
    decisions = _run(_policy(), scene, 50)
    assert decisions[50].rule is Rule.ENTER_DEGRADED
    assert _transitions(decisions) == [Direction.AWAY, Direction.BACK, Direction.AWAY]


# --- Headroom ---


def test_a_target_never_gets_more_than_its_headroom_and_the_rest_spills_to_the_next() -> None:
    scene = _brownout(start=10)
    policy = _policy(targets=[NEAR, FAR])
    limited = _scene(lambda t: {"p95": SLOW if t >= 10 else HEALTHY}, near_headroom=50.0)
    decisions = _run(policy, limited, 40)
    assert max(d.weights[NEAR] for d in decisions) == 2500  # 50 of 200 requests/s
    assert decisions[-1].weights == {LOCAL: 200, NEAR: 2500, FAR: 7300}
    assert _run(policy, scene, 40)[-1].weights[NEAR] == 9800  # no headroom reported: no limit


def test_without_room_anywhere_the_rest_stays_local() -> None:
    policy = _policy(targets=[NEAR])
    scene = _scene(lambda t: {"p95": SLOW if t >= 10 else HEALTHY}, near_headroom=50.0)
    decisions = _run(policy, scene, 40)
    assert decisions[-1].weights[NEAR] == 2500
    assert decisions[-1].weights[LOCAL] == 7500
    assert Rule.HEADROOM_LIMITED in {d.rule for d in decisions}


def test_the_capacity_guard_can_be_turned_off() -> None:
    policy = _policy(targets=[NEAR], capacity={"respectHeadroom": False})
    scene = _scene(lambda t: {"p95": SLOW if t >= 10 else HEALTHY}, near_headroom=50.0)
    assert _run(policy, scene, 40)[-1].weights[NEAR] == 9800


# --- Choosing targets ---


def test_nearest_picks_the_lowest_expected_latency_including_rtt() -> None:
    # ap-southeast: 50ms service + 200ms away = 250ms; eu-central: 120ms + 40ms = 160ms.
    scene = _scene(
        lambda t: {"p95": SLOW if t >= 10 else HEALTHY},
        near=lambda t: {"rtt": 0.200},
        far=lambda t: {"p95": 0.120, "rtt": 0.040},
    )
    decision = _run(_policy(targets="nearest"), scene, 12)[12]
    assert decision.weights[FAR] == 2500
    assert decision.weights[NEAR] == 0
    assert decision.expected_latency[NEAR] == pytest.approx(0.250)
    assert decision.expected_latency[FAR] == pytest.approx(0.160)


def test_a_remote_region_slower_for_this_caller_than_the_degraded_local_copy_is_not_chosen() -> (
    None
):
    # Local p95 450ms; ap-southeast 100ms + 400ms away = 500ms: slower, even though healthy.
    scene = _scene(
        lambda t: {"p95": SLOW if t >= 10 else HEALTHY},
        near=lambda t: {"p95": 0.100, "rtt": 0.400},
        far=None,
    )
    decisions = _run(_policy(), scene, 30)
    assert not any(d.changed for d in decisions)
    assert decisions[12].rule is Rule.NO_TARGET


def test_an_ordered_target_list_is_followed_over_latency() -> None:
    decision = _run(_policy(targets=[FAR, NEAR]), _brownout(start=10), 12)[12]
    assert decision.weights[FAR] == 2500


def test_targets_outside_the_ordered_list_are_never_used() -> None:
    scene = _scene(lambda t: {"p95": SLOW if t >= 10 else HEALTHY}, near=lambda t: {"p95": 0.900})
    decisions = _run(_policy(targets=[NEAR]), scene, 30)
    assert all(d.weights.get(FAR, 0) == 0 for d in decisions)


@pytest.mark.parametrize(
    ("near", "why"),
    [
        ({"p95": 0.400}, "over the enter threshold itself"),
        ({"errors": 0.5}, "erroring (any trigger over enter)"),
        ({"samples": 5}, "too few samples"),
        ({"age": 30.0}, "stale data"),
        ({"healthy": 0}, "no healthy endpoint"),
    ],
)
def test_an_unusable_target_is_skipped_for_the_next(near: dict[str, Any], why: str) -> None:
    policy = _policy(
        triggers={
            "latency": {"enter": "300ms", "exit": "150ms", "enterAfter": "2s"},
            "errorRate": {"enter": "5%", "exit": "1%"},
        }
    )
    scene = _scene(lambda t: {"p95": SLOW if t >= 10 else HEALTHY}, near=lambda t: near)
    decision = _run(policy, scene, 12)[12]
    assert decision.weights[NEAR] == 0, why
    assert decision.weights[FAR] == 2500, why


@pytest.mark.parametrize(
    ("samples", "source", "chosen"),
    [
        (5, "traffic", False),  # requests: minSamples (20) holds
        (19, "traffic", False),
        (5, "probes", True),  # an idle copy's probes: five round trips are evidence
        (4, "probes", False),
    ],
)
def test_probe_evidence_of_an_idle_copy_needs_five_round_trips_not_min_samples(
    samples: int, source: EvidenceSource, chosen: bool
) -> None:
    scene = _scene(
        lambda t: {"p95": SLOW if t >= 10 else HEALTHY},
        near=lambda t: {"samples": samples, "source": source, "p95": 0.004},
        far=None,
    )
    decision = _run(_policy(), scene, 12)[12]
    assert (decision.weights[NEAR] > 0) is chosen


def test_an_explanation_says_when_an_expected_latency_came_from_probes() -> None:
    scene = _scene(
        lambda t: {"p95": SLOW if t >= 10 else HEALTHY},
        near=lambda t: {"samples": 10, "source": "probes", "p95": 0.004},
    )
    moved = next(d for d in _run(_policy(), scene, 12) if d.changed)
    assert "ap-southeast 84ms (probes + RTT: the copy is idle)" in moved.explanation
    assert "eu-central 195ms, " in moved.explanation  # traffic evidence: no mark


def test_share_on_a_target_that_loses_its_endpoints_moves_to_the_next_at_once() -> None:
    scene = _scene(
        lambda t: {"p95": SLOW if t >= 10 else HEALTHY},
        near=lambda t: {"healthy": 0 if t >= 30 else 3},
    )
    decisions = _run(_policy(), scene, 30)
    assert decisions[29].weights[NEAR] == 9800
    assert decisions[30].weights == {LOCAL: 200, NEAR: 0, FAR: 9800}
    assert decisions[30].rule is Rule.TARGET_LOST


def test_a_reshuffled_ranking_moves_nothing_already_placed() -> None:
    # From t=20 eu-central becomes the nearer one; what ap-southeast holds stays there.
    scene = _scene(
        lambda t: {"p95": SLOW if t >= 10 else HEALTHY},
        far=lambda t: {"rtt": 0.010 if t >= 20 else 0.150},
    )
    decisions = _run(_policy(), scene, 40)
    assert decisions[19].weights[NEAR] == 9800
    assert all(d.weights[NEAR] == 9800 for d in decisions[19:])


# --- Availability: no policy, and hard failure ---


def test_without_a_policy_traffic_stays_local_however_slow() -> None:
    decisions = _run(None, _brownout(start=10, p95=5.0), 60)
    assert all(_local(d) == TOTAL_WEIGHT for d in decisions)


def test_without_a_policy_traffic_moves_only_when_no_local_endpoint_is_healthy() -> None:
    scene = _scene(lambda t: {"healthy": 0 if t >= 10 else 3})
    decisions = _run(None, scene, 10)
    assert decisions[9].weights[LOCAL] == TOTAL_WEIGHT
    assert decisions[10].weights == {LOCAL: 0, NEAR: TOTAL_WEIGHT, FAR: 0}
    assert decisions[10].rule is Rule.NO_HEALTHY_LOCAL


def test_when_the_policy_is_removed_shifted_traffic_comes_back_gradually() -> None:
    shifted = _run(_policy(), _brownout(start=10), 20)[-1].state
    assert shifted.weights[LOCAL] == 200
    scene, state, back = _brownout(start=0), shifted, []
    for t in range(21, 60):
        state = decide(None, state, scene(float(t), state.weights), float(t)).state
        back.append(state.weights.get(LOCAL, 0))
    assert back[:10] == [200] * 10  # the default stable period
    assert back[10] == 2200
    assert back[-1] == TOTAL_WEIGHT


def test_hard_failure_moves_everything_at_once_regardless_of_ramp_and_caps() -> None:
    scene = _scene(lambda t: {"healthy": 0 if t >= 10 else 3})
    decision = _run(_policy(maxShare="50%", ramp={"step": "5%", "interval": "10s"}), scene, 10)[10]
    assert decision.weights[LOCAL] == 0
    assert decision.transition is Direction.AWAY


def test_hard_failure_respects_headroom_and_spills() -> None:
    scene = _scene(lambda t: {"healthy": 0 if t >= 10 else 3}, near_headroom=100.0)
    decision = _run(_policy(), scene, 10)[10]
    assert decision.weights == {LOCAL: 0, NEAR: 5000, FAR: 5000}


def test_after_a_hard_failure_traffic_comes_back_gradually() -> None:
    scene = _scene(lambda t: {"healthy": 0 if 10 <= t < 20 else 3})
    decisions = _run(_policy(), scene, 60)
    back = [_local(d) for d in decisions[20:]]
    assert back[:10] == [0] * 10  # the stable period
    steps = [b - a for a, b in itertools.pairwise(back) if b != a]
    assert len(steps) == 5
    assert all(0 < step <= 2000 for step in steps)
    assert back[-1] == TOTAL_WEIGHT
    assert _transitions(decisions) == [Direction.AWAY, Direction.BACK]


# --- Missing data, bad state, explanations ---


def test_without_fresh_local_data_nothing_moves() -> None:
    scene = _scene(lambda t: {"p95": SLOW, "healthy": 0, "age": 60.0})
    decisions = _run(_policy(), scene, 30)
    assert all(_local(d) == TOTAL_WEIGHT for d in decisions)
    assert decisions[-1].rule is Rule.NO_LOCAL_DATA


def test_state_weights_that_do_not_sum_to_the_total_are_rejected() -> None:
    state = ControllerState(weights={LOCAL: 9000})
    with pytest.raises(ValueError, match="sum to 10000"):
        decide(_policy(), state, _brownout()(0.0, state.weights), 0.0)


def test_an_explanation_names_the_inputs_that_mattered_and_the_weights() -> None:
    decision = _run(_policy(), _brownout(start=10), 12)[12]
    text = decision.explanation
    for fragment in ("us-west p95 450ms", "enter 300ms", "us-west 100%→75%", "ap-southeast 0%→25%",
                     "ap-southeast 130ms", "eu-central 195ms"):  # fmt: skip
        assert fragment in text


# --- Invariants over arbitrary observations ---

_target_readings = st.fixed_dictionaries(
    {
        "p95": st.floats(0.001, 3.0),
        "errors": st.floats(0.0, 1.0),
        "healthy": st.integers(0, 3),
        "samples": st.integers(0, 100),
        "age": st.sampled_from([0.0, 0.0, 0.0, 30.0]),
        "headroom": st.one_of(st.none(), st.floats(-100.0, 400.0)),
    }
)


@settings(max_examples=60, deadline=None)
@given(
    ticks=st.lists(st.tuples(_target_readings, _target_readings, _target_readings), max_size=40),
    with_policy=st.booleans(),
)
def test_weights_always_sum_to_the_total_and_are_never_negative(
    ticks: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]], with_policy: bool
) -> None:
    policy = (
        _policy(maxShare="70%", ramp={"step": "30%", "interval": "0s"}) if with_policy else None
    )
    state = ControllerState.initial(LOCAL)
    for t, (local, near, far) in enumerate(ticks):
        local = {**local, "headroom": None}
        observations = Observations(
            local=LOCAL,
            request_rate=RATE,
            targets=(
                _target(LOCAL, t, **local),
                _target(NEAR, t, rtt=0.08, **near),
                _target(FAR, t, rtt=0.15, **far),
            ),
        )
        decision = decide(policy, state, observations, float(t))
        assert sum(decision.weights.values()) == TOTAL_WEIGHT
        assert all(weight >= 0 for weight in decision.weights.values())
        assert sum(decision.state.weights.values()) == TOTAL_WEIGHT
        assert decision == decide(policy, state, observations, float(t))  # deterministic
        state = decision.state
