"""Per-second statistics and mergeable latency histograms, in virtual time."""

from __future__ import annotations

import math
from random import Random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.stats.core import (
    MAX_LATENCY_S,
    MIN_LATENCY_S,
    RELATIVE_ERROR,
    Histogram,
    Outcome,
    SlidingStats,
    StatsRecorder,
    StatsWindow,
    outcome_of_status,
)

_BUCKETS = len(Histogram().counts)


def _histogram_of_counts(counts: dict[int, int]) -> Histogram:
    histogram = Histogram()
    for index, count in counts.items():
        histogram.counts[index] = count
    return histogram


# Sparse, as real ones are: a handful of buckets in use.
_histograms = st.dictionaries(st.integers(0, _BUCKETS - 1), st.integers(1, 10**9), max_size=10).map(
    _histogram_of_counts
)
_latencies = st.floats(MIN_LATENCY_S, MAX_LATENCY_S)


def _exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    # Nearest rank: the smallest value with at least q of the data at or below it.
    return ordered[max(1, math.ceil(q * len(ordered) - 1e-9)) - 1]


# --- histogram ----------------------------------------------------------------------------


@given(_histograms, _histograms)
def test_merge_is_commutative(a: Histogram, b: Histogram) -> None:
    assert a.merge(b) == b.merge(a)


@given(_histograms, _histograms, _histograms)
def test_merge_is_associative(a: Histogram, b: Histogram, c: Histogram) -> None:
    assert a.merge(b).merge(c) == a.merge(b.merge(c))


@given(st.lists(_latencies), st.lists(_latencies))
def test_merge_equals_histogram_of_all_values(first: list[float], second: list[float]) -> None:
    assert Histogram.of(first).merge(Histogram.of(second)) == Histogram.of(first + second)


@given(_histograms, _histograms)
def test_absorb_adds_in_place_like_merge(a: Histogram, b: Histogram) -> None:
    expected = a.merge(b)
    a.absorb(b)
    assert a == expected


@given(
    st.lists(_latencies, min_size=1, max_size=500),
    st.sampled_from([0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0]),
)
def test_quantile_is_within_relative_error_of_exact(values: list[float], q: float) -> None:
    estimate = Histogram.of(values).quantile(q)
    exact = _exact_quantile(values, q)
    assert estimate is not None
    assert abs(estimate - exact) <= RELATIVE_ERROR * exact * (1 + 1e-9)


def test_quantiles_of_log_uniform_latencies_are_within_relative_error() -> None:
    rng = Random(42)
    values = [math.exp(rng.uniform(math.log(2e-4), math.log(5.0))) for _ in range(50_000)]
    histogram = Histogram.of(values)
    for q in (0.5, 0.95, 0.99):
        estimate = histogram.quantile(q)
        exact = _exact_quantile(values, q)
        assert estimate is not None
        assert abs(estimate - exact) <= RELATIVE_ERROR * exact


def test_quantile_rank_is_not_pushed_up_by_float_rounding() -> None:
    # 0.55 × 100 is 55.00000000000001 in floats; the 55th value is meant, not the 56th.
    values = [0.001] * 55 + [1.0] * 45
    assert Histogram.of(values).quantile(0.55) == pytest.approx(0.001, rel=RELATIVE_ERROR)


@pytest.mark.parametrize(
    ("latency", "estimate"),
    [
        (0.0, MIN_LATENCY_S),
        (-1.0, MIN_LATENCY_S),
        (5e-5, MIN_LATENCY_S),
        (3600.0, 60.288),
        (math.inf, 60.288),
        (math.nan, 60.288),
    ],
)
def test_latencies_outside_the_range_are_clamped(latency: float, estimate: float) -> None:
    assert Histogram.of([latency]).quantile(0.5) == pytest.approx(estimate, rel=1e-4)


def test_empty_histogram_has_no_quantile() -> None:
    assert Histogram().quantile(0.5) is None


@pytest.mark.parametrize("q", [-0.1, 1.5, math.nan])
def test_quantile_outside_zero_one_is_rejected(q: float) -> None:
    with pytest.raises(ValueError, match="quantile must be between 0 and 1"):
        Histogram.of([0.01]).quantile(q)


@given(st.lists(st.floats(0.0, 100.0)))
def test_wire_round_trip(values: list[float]) -> None:
    histogram = Histogram.of(values)
    assert Histogram.from_wire(histogram.to_wire()) == histogram


@given(_histograms)
def test_wire_round_trip_of_any_counts(histogram: Histogram) -> None:
    assert Histogram.from_wire(histogram.to_wire()) == histogram


def test_wire_form_holds_only_the_used_buckets() -> None:
    assert Histogram().to_wire() == []
    wire = Histogram.of([0.010, 0.010, 0.011]).to_wire()
    assert len(wire) == 2
    assert wire[1:] == [3]
    assert len(Histogram.of([0.001, 0.002, 0.004]).to_wire()) < 12


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        ([3, -1], "non-negative integers"),
        ([-1, 1], "non-negative integers"),
        ([_BUCKETS - 1, 1, 1], "does not fit"),
        ([0] + [1] * (_BUCKETS + 1), "does not fit"),
    ],
)
def test_bad_wire_form_is_rejected(wire: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Histogram.from_wire(wire)


def test_a_float_in_the_wire_form_is_rejected() -> None:
    # Pure Python names the rule (ValueError); compiled (mypyc), the signature refuses it first.
    with pytest.raises((ValueError, TypeError)):
        Histogram.from_wire([0, 1.5])  # type: ignore[list-item]


def test_histogram_of_wrong_size_is_rejected() -> None:
    with pytest.raises(ValueError, match=f"a histogram has {_BUCKETS} buckets"):
        Histogram([0, 1, 2])


# --- outcomes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (101, Outcome.HTTP_2XX),
        (200, Outcome.HTTP_2XX),
        (204, Outcome.HTTP_2XX),
        (304, Outcome.HTTP_3XX),
        (404, Outcome.HTTP_4XX),
        (429, Outcome.HTTP_4XX),
        (500, Outcome.HTTP_5XX),
        (503, Outcome.HTTP_5XX),
        (599, Outcome.HTTP_5XX),
    ],
)
def test_outcome_of_status(status: int, outcome: Outcome) -> None:
    assert outcome_of_status(status) is outcome


@pytest.mark.parametrize("status", [0, 99, 600, 1000, -200])
def test_outcome_of_a_non_status_is_rejected(status: int) -> None:
    with pytest.raises(ValueError, match="not an HTTP status"):
        outcome_of_status(status)


def test_outcome_labels() -> None:
    assert [outcome.label for outcome in Outcome] == [
        "2xx",
        "3xx",
        "4xx",
        "5xx",
        "connect-failure",
        "timeout",
    ]


# --- per-second windows ---------------------------------------------------------------------


def test_window_closes_when_its_second_ends() -> None:
    recorder = StatsRecorder()
    recorder.record("payments", "us-west", Outcome.HTTP_2XX, 0.010, 10.1)
    recorder.record("payments", "us-west", Outcome.HTTP_5XX, 0.020, 10.9)
    assert recorder.drain(10.99) == []
    (window,) = recorder.drain(11.0)
    assert (window.start, window.upstream, window.target_cluster) == (10, "payments", "us-west")
    assert window.counts == (1, 0, 0, 1, 0, 0)
    assert window.requests == 2
    assert window.histogram == Histogram.of([0.010, 0.020])


def test_a_record_in_a_new_second_closes_the_previous_one() -> None:
    recorder = StatsRecorder()
    recorder.record("payments", "us-west", Outcome.HTTP_2XX, 0.010, 10.5)
    recorder.record("payments", "us-west", Outcome.TIMEOUT, 1.0, 11.5)
    recorder.record("payments", "us-west", Outcome.HTTP_2XX, 0.010, 13.0)
    windows = recorder.drain(13.5)
    assert [(window.start, window.counts) for window in windows] == [
        (10, (1, 0, 0, 0, 0, 0)),
        (11, (0, 0, 0, 0, 0, 1)),
    ]
    assert [window.start for window in recorder.drain(14.0)] == [13]


def test_drained_windows_are_not_returned_again() -> None:
    recorder = StatsRecorder()
    recorder.record("payments", "us-west", Outcome.HTTP_2XX, 0.010, 1.0)
    assert len(recorder.drain(2.0)) == 1
    assert recorder.drain(3.0) == []
    assert recorder.drain(60.0) == []


def test_windows_are_kept_apart_per_upstream_and_target_cluster() -> None:
    recorder = StatsRecorder()
    recorder.record("payments", "us-west", Outcome.HTTP_2XX, 0.010, 1.2)
    recorder.record("payments", "ap-southeast", Outcome.CONNECT_FAILURE, 0.150, 1.3)
    recorder.record("orders", "us-west", Outcome.HTTP_4XX, 0.005, 1.4)
    recorder.record("payments", "us-west", Outcome.HTTP_2XX, 0.012, 1.5)
    windows = recorder.drain(2.0)
    assert [(w.upstream, w.target_cluster, w.requests) for w in windows] == [
        ("orders", "us-west", 1),
        ("payments", "ap-southeast", 1),
        ("payments", "us-west", 2),
    ]
    assert windows[1].counts[Outcome.CONNECT_FAILURE] == 1


def test_a_late_timestamp_counts_in_the_running_second() -> None:
    recorder = StatsRecorder()
    recorder.record("payments", "us-west", Outcome.HTTP_2XX, 0.010, 5.5)
    recorder.record("payments", "us-west", Outcome.HTTP_2XX, 0.010, 4.9)
    (window,) = recorder.drain(6.0)
    assert (window.start, window.requests) == (5, 2)


@given(latency=st.floats(allow_nan=True, allow_infinity=True))
def test_series_and_histogram_bucket_any_latency_alike(latency: float) -> None:
    recorder = StatsRecorder()
    recorder.record("payments", "us-west", Outcome.HTTP_2XX, latency, 0.5)
    (window,) = recorder.drain(1.0)
    assert window.histogram == Histogram.of([latency])


def test_series_handle_records_into_the_same_windows() -> None:
    recorder = StatsRecorder()
    series = recorder.series("payments", "us-west")
    assert recorder.series("payments", "us-west") is series
    series.record(Outcome.HTTP_2XX, 0.010, 7.1)
    recorder.record("payments", "us-west", Outcome.HTTP_2XX, 0.010, 7.2)
    (window,) = recorder.drain(8.0)
    assert window.requests == 2


# --- sliding view ---------------------------------------------------------------------------


def _window(start: int, counts: tuple[int, ...], latencies: list[float]) -> StatsWindow:
    return StatsWindow(start, "payments", "us-west", counts, Histogram.of(latencies))


def test_sliding_view_merges_the_last_seconds() -> None:
    view = SlidingStats(span_s=10)
    for start in range(20):
        view.add(_window(start, (9, 0, 1, 0, 0, 0), [0.010] * 9 + [0.500]))
    summary = view.summary(20.5)
    # Seconds 10..19: 100 requests, 90 fast and 10 slow.
    assert summary.requests == 100
    assert summary.rate_per_s == 10.0
    assert summary.success_rate == 1.0
    assert summary.p50_s == pytest.approx(0.010, rel=RELATIVE_ERROR)
    assert summary.p95_s == pytest.approx(0.500, rel=RELATIVE_ERROR)
    assert summary.p99_s == pytest.approx(0.500, rel=RELATIVE_ERROR)


def test_sliding_view_counts_5xx_connect_failures_and_timeouts_as_failures() -> None:
    view = SlidingStats(span_s=2)
    view.add(_window(0, (5, 1, 2, 1, 1, 0), [0.01] * 10))
    view.add(_window(1, (0, 0, 0, 0, 0, 10), [1.0] * 10))
    summary = view.summary(2.0)
    assert summary.counts == (5, 1, 2, 1, 1, 10)
    assert summary.success_rate == pytest.approx(8 / 20)


def test_sliding_view_adds_windows_of_the_same_second() -> None:
    view = SlidingStats(span_s=1)
    view.add(_window(4, (3, 0, 0, 0, 0, 0), [0.010] * 3))
    view.add(_window(4, (0, 0, 0, 1, 0, 0), [0.200]))
    summary = view.summary(5.0)
    assert summary.requests == 4
    assert summary.success_rate == 0.75
    assert summary.p99_s == pytest.approx(0.200, rel=RELATIVE_ERROR)


def test_sliding_view_leaves_out_the_running_and_expired_seconds() -> None:
    view = SlidingStats(span_s=3)
    for start in (1, 2, 3, 4, 5):
        view.add(_window(start, (start, 0, 0, 0, 0, 0), [0.01] * start))
    # At 5.5 the closed seconds in the span are 2, 3 and 4.
    assert view.summary(5.5).requests == 2 + 3 + 4
    assert view.summary(9.0).requests == 0


def test_sliding_view_does_not_change_the_windows_it_was_given() -> None:
    window = _window(0, (1, 0, 0, 0, 0, 0), [0.01])
    view = SlidingStats(span_s=1)
    view.add(window)
    view.add(_window(0, (1, 0, 0, 0, 0, 0), [0.02]))
    assert window.histogram == Histogram.of([0.01])


def test_empty_sliding_view_has_no_rates_or_quantiles() -> None:
    summary = SlidingStats(span_s=5).summary(100.0)
    assert summary.requests == 0
    assert summary.rate_per_s == 0.0
    assert summary.success_rate is None
    assert (summary.p50_s, summary.p95_s, summary.p99_s) == (None, None, None)


# No bool here: compiled (mypyc), an int parameter receives True as the int 1, as typing allows.
@pytest.mark.parametrize("span", [0, -1])
def test_invalid_span_is_rejected(span: int) -> None:
    with pytest.raises(ValueError, match="span_s must be a whole number"):
        SlidingStats(span_s=span)


def test_a_fractional_span_is_rejected() -> None:
    # Pure Python names the rule (ValueError); compiled (mypyc), the signature refuses it first.
    with pytest.raises((ValueError, TypeError)):
        SlidingStats(span_s=2.5)  # type: ignore[arg-type]
