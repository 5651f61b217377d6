"""The demo app's knobs and its caller's view of its calls, in virtual time."""

from __future__ import annotations

import random
from typing import Any

import pytest
from pydantic import ValidationError

from snapbright.demo.core import CallWindow, Knobs, KnobsUpdate, plan


def test_no_knobs_means_no_delay_and_no_errors() -> None:
    rng = random.Random(1)
    assert {plan(Knobs(), rng) for _ in range(100)} == {(0.0, False)}


@pytest.mark.parametrize(
    ("latency", "jitter", "low", "high"),
    [(0.1, 0.0, 0.1, 0.1), (0.1, 0.02, 0.08, 0.12), (0.01, 0.05, 0.0, 0.06)],
)
def test_delay_is_latency_plus_or_minus_jitter_and_never_negative(
    latency: float, jitter: float, low: float, high: float
) -> None:
    rng = random.Random(2)
    delays = [plan(Knobs(latency=latency, jitter=jitter), rng).delay for _ in range(2000)]
    assert low <= min(delays)
    assert max(delays) <= high


@pytest.mark.parametrize("error_rate", [0.0, 0.2, 0.5, 1.0])
def test_the_error_rate_is_the_share_of_requests_that_fail(error_rate: float) -> None:
    rng = random.Random(3)
    trials = 10_000
    failed = sum(plan(Knobs(error_rate=error_rate), rng).fail for _ in range(trials))
    assert failed / trials == pytest.approx(error_rate, abs=0.02)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"latency": -1.0}, "latency must be"),
        ({"jitter": float("inf")}, "jitter must be"),
        ({"error_rate": 1.5}, "error rate must be between"),
    ],
)
def test_knobs_refuse_impossible_values(fields: dict[str, float], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        Knobs(**fields)


def test_an_update_changes_only_what_it_names() -> None:
    knobs = Knobs(latency=0.02, jitter=0.005, error_rate=0.1)
    update = KnobsUpdate.model_validate({"latency": "200ms"})
    assert update.apply(knobs, Knobs()) == Knobs(latency=0.2, jitter=0.005, error_rate=0.1)
    update = KnobsUpdate.model_validate({"errorRate": "50%"})
    assert update.apply(knobs, Knobs()).error_rate == 0.5


def test_an_update_with_reset_goes_back_to_the_knobs_at_start() -> None:
    initial = Knobs(latency=0.02)
    changed = Knobs(latency=0.4, error_rate=0.2)
    assert KnobsUpdate.model_validate({"reset": True}).apply(changed, initial) == initial
    again = KnobsUpdate.model_validate({"reset": True, "errorRate": 0.1})
    assert again.apply(changed, initial) == Knobs(latency=0.02, error_rate=0.1)


@pytest.mark.parametrize(
    "body",
    [{"latency": 5}, {"latency": "slow"}, {"errorRate": "150%"}, {"delay": "1ms"}, {"reset": 1}],
)
def test_an_update_with_a_bad_value_is_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        KnobsUpdate.model_validate(body)


def test_the_call_window_counts_errors_latency_and_answering_clusters() -> None:
    window = CallWindow(span=10.0)
    for i in range(100):
        window.record(float(i) / 10, seconds=(i + 1) / 1000, ok=i % 10 != 0, cluster="us-west")
    window.record(9.95, seconds=0.5, ok=False, cluster=None)
    summary = window.summary(now=9.99)
    assert (summary.calls, summary.errors) == (101, 11)
    assert summary.p50 == pytest.approx(0.051)
    assert summary.p99 == pytest.approx(0.100)
    assert summary.clusters == {"us-west": 100}


def test_the_call_window_forgets_calls_older_than_its_span() -> None:
    window = CallWindow(span=5.0)
    window.record(0.0, 0.1, True, "ap-southeast")
    window.record(4.0, 0.2, True, "us-west")
    summary = window.summary(now=6.0)
    assert (summary.calls, summary.clusters) == (1, {"us-west": 1})
    assert window.summary(now=20.0).calls == 0
    assert window.summary(now=20.0).p50 is None


def test_a_summary_reads_as_one_line() -> None:
    window = CallWindow()
    window.record(1.0, 0.161, True, "us-west")
    window.record(1.5, 0.170, True, "ap-southeast")
    line = window.summary(2.0).line("payments")
    assert line == "payments: 2 calls, 0 errors, p50 161ms p99 170ms, by ap-southeast 1, us-west 1"
