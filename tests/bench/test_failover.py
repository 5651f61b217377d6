"""The failover benchmark's figures, derived from a recorded timeline written here by hand."""

from __future__ import annotations

from bench.failover import Outcome, Recording, WeightSample, figures, verdicts

MARKS = {
    "static_baseline": 0.0,
    "static_fault": 10.0,
    "static_recovered": 30.0,
    "static_end": 40.0,
    "noise_start": 40.0,
    "noise_end": 60.0,
    "baseline": 60.0,
    "fault": 70.0,
    "recovered": 90.0,
    "recovery_end": 120.0,
    "hard_baseline": 120.0,
    "killed": 125.0,
    "end": 135.0,
}
# Local share (basis points) from these times on.
WEIGHTS = [
    (0.0, 10_000),
    (71.5, 6_500),  # first step 1.5 s into the brownout
    (72.5, 3_000),
    (73.5, 200),  # the kept share: 98 % moved, 3.5 s in
    (101.0, 2_200),  # failback in steps after the stable period
    (103.0, 4_200),
    (105.0, 10_000),
]


def _recording(*, hard_failures: int = 0) -> Recording:
    record = Recording(marks=dict(MARKS))
    record.transitions = {
        "noise_start": 0.0,
        "noise_end": 0.0,
        "brownout_start": 0.0,
        "brownout_end": 2.0,
    }
    for at in (x * 0.25 for x in range(540)):
        local = next(w for t, w in reversed(WEIGHTS) if t <= at)
        record.weights.append(WeightSample(at, {"us-west": local, "ap-southeast": 10_000 - local}))
    for step in range(1350):
        at = step * 0.1
        static_slow = MARKS["static_fault"] <= at < MARKS["static_recovered"]
        shifted = MARKS["fault"] + 3.5 <= at < MARKS["recovered"]
        slow = MARKS["fault"] <= at < MARKS["fault"] + 3.5
        if static_slow or slow:
            record.outcomes.append(Outcome(at, 0.42, True, "us-west"))
        elif shifted:
            record.outcomes.append(Outcome(at, 0.11, True, "ap-southeast"))
        elif MARKS["killed"] <= at and step % 100 < hard_failures:
            record.outcomes.append(Outcome(at, 5.0, False, None))
        else:
            record.outcomes.append(Outcome(at, 0.03, True, "us-west"))
    return record


def test_figures_come_from_the_weight_and_request_timelines() -> None:
    result, rows = figures(_recording())

    assert result["first_shift_s"] == 1.5
    assert result["shift_90_s"] == 3.5
    assert result["failback_s"] == 15.0
    assert result["p95_brownout_static_ms"] == 420.0
    # 3.5 s of 20 s slow: more than 5 % of the window, so the p95 is still the slow one.
    assert result["p95_brownout_ms"] == 420.0
    assert result["transitions_brownout"] == 2
    assert result["failed_requests_hard_failure"] == 0
    assert (
        "failback complete after recovery",
        "15.00 s",
        "local share 2% → 22% → 42% → 100%",
    ) in rows


def test_targets_are_judged_and_a_missing_figure_is_not_met() -> None:
    result, _ = figures(_recording(hard_failures=3))

    met = verdicts(result)

    assert result["failed_requests_hard_failure"] > 0
    assert met["failed_requests_hard_failure"] is False
    assert met["first_shift_s"] is True
    assert met["transitions_noise"] is True
    assert verdicts({**result, "first_shift_s": None})["first_shift_s"] is False
