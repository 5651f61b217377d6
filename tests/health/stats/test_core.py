"""Regional statistics over generated traffic, the observations the core sees, and summaries."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import replace

import pytest

from federation.peering.model import HealthSource, HealthSummaries, ServiceHealth, ServiceKey
from federation.peering.wire import from_proto, to_proto
from health.failover.core import decide
from health.failover.model import (
    TOTAL_WEIGHT,
    ControllerState,
    Evidence,
    FailoverPolicy,
    Rule,
    Triggers,
)
from health.probe.core import ProbeLatency, ProbeSettings, ProbeStatus, probe_latency
from health.stats.core import (
    LONG_SPAN_S,
    PUBLISHED_MIN_SAMPLES,
    SHORT_SPAN_S,
    HealthView,
    LocalService,
    RegionalStats,
    RemoteService,
    TrafficKey,
    health_summary,
    observations,
)
from proxy.config.model import API_VERSION
from proxy.stats.core import RELATIVE_ERROR, Histogram, Outcome, StatsWindow

US, EU, AP = "us-west", "eu-west", "ap-south"
PAYMENTS = "payments"
KEY = ServiceKey("default", PAYMENTS)


def _window(
    start: int,
    latencies: Sequence[float],
    *,
    target: str = US,
    service: str = PAYMENTS,
    outcomes: dict[Outcome, int] | None = None,
) -> StatsWindow:
    """One second of requests: each latency a 2xx unless ``outcomes`` recounts them."""
    counts = [0] * len(Outcome)
    if outcomes is None:
        counts[Outcome.HTTP_2XX] = len(latencies)
    else:
        assert sum(outcomes.values()) == len(latencies)
        for outcome, count in outcomes.items():
            counts[outcome] = count
    return StatsWindow(start, service, target, tuple(counts), Histogram.of(latencies))


def _steady(
    stats: RegionalStats, seconds: range, per_second: int, latency: float, **kw: str
) -> None:
    for second in seconds:
        caller = kw.get("caller", US)
        window = _window(second, [latency] * per_second, target=kw.get("target", US))
        assert stats.add(caller, window, second + 1.0)


def _exact(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered) - 1e-9)) - 1]


# --- Sliding windows ---


def test_spans_cover_the_last_closed_seconds() -> None:
    stats = RegionalStats()
    _steady(stats, range(100), per_second=10, latency=0.020)
    short = stats.stats(PAYMENTS, US, US, 100.4, SHORT_SPAN_S)
    long = stats.stats(PAYMENTS, US, US, 100.4, LONG_SPAN_S)
    assert (short.requests, short.rate_per_s) == (100, 10.0)
    assert (long.requests, long.rate_per_s) == (600, 10.0)


def test_a_window_slides_out_of_the_span() -> None:
    stats = RegionalStats()
    _steady(stats, range(5), per_second=10, latency=0.020)
    assert stats.stats(PAYMENTS, US, US, 10.0, 10).requests == 50
    assert stats.stats(PAYMENTS, US, US, 14.0, 10).requests == 10  # only second 4 is left
    assert stats.stats(PAYMENTS, US, US, 15.0, 10).requests == 0


def test_windows_of_the_same_second_from_several_sidecars_add_up() -> None:
    stats = RegionalStats()
    assert stats.add(US, _window(3, [0.010] * 6), 4.0)
    assert stats.add(US, _window(3, [0.900] * 4), 4.2)
    merged = stats.stats(PAYMENTS, US, US, 4.5, 1)
    assert merged.requests == 10
    assert merged.p50 == pytest.approx(0.010, rel=RELATIVE_ERROR)
    assert merged.p95 == pytest.approx(0.900, rel=RELATIVE_ERROR)


@pytest.mark.parametrize(
    ("start", "now", "kept"),
    [
        (9, 10.0, True),  # just closed
        (10, 10.5, True),  # closed by the sidecar's clock, a hair ahead of ours
        (11, 10.0, True),  # a second ahead: still skew
        (12, 10.0, False),  # from the future
        (0, 60.0, True),  # the oldest second of the horizon
        (0, 61.0, False),  # older than the horizon
    ],
)
def test_windows_within_the_horizon_and_the_skew_are_kept(
    start: int, now: float, kept: bool
) -> None:
    stats = RegionalStats(horizon_s=60)
    assert stats.add(US, _window(start, [0.01]), now) is kept
    assert (stats.windows_held == 1) is kept


def test_a_window_ahead_of_our_clock_counts_once_its_second_closes_here() -> None:
    stats = RegionalStats()
    assert stats.add(US, _window(10, [0.01] * 5), 10.97)
    assert stats.stats(PAYMENTS, US, US, 10.99, 10).requests == 0
    assert stats.stats(PAYMENTS, US, US, 11.0, 10).requests == 5


def test_a_window_ahead_does_not_evict_the_oldest_second_of_the_horizon() -> None:
    stats = RegionalStats(horizon_s=60)
    _steady(stats, range(60), per_second=1, latency=0.02)  # seconds 0..59, now 60
    assert stats.add(US, _window(61, [0.01]), 60.5)
    assert stats.stats(PAYMENTS, US, US, 60.5, 60).requests == 60


# --- Percentiles from merged histograms ---


def test_percentiles_from_merged_histograms_match_exact_ones() -> None:
    rng = random.Random(42)
    stats = RegionalStats()
    everything: list[float] = []
    for second in range(50, 60):
        for _sidecar in range(3):
            latencies = [rng.lognormvariate(math.log(0.040), 0.6) for _ in range(200)]
            everything += latencies
            assert stats.add(US, _window(second, latencies), 60.0)
    merged = stats.stats(PAYMENTS, US, US, 60.0, 10)
    assert merged.requests == len(everything) == 6000
    for q, value in (
        (0.50, merged.p50),
        (0.90, merged.p90),
        (0.95, merged.p95),
        (0.99, merged.p99),
    ):
        assert value == pytest.approx(_exact(everything, q), rel=RELATIVE_ERROR)


def test_a_slow_second_owns_the_p95_where_averaging_percentiles_would_hide_it() -> None:
    stats = RegionalStats()
    everything: list[float] = []
    for second in range(10):
        latencies = [0.500 if second == 9 else 0.010] * 100
        everything += latencies
        stats.add(US, _window(second, latencies), 10.0)
    merged = stats.stats(PAYMENTS, US, US, 10.0, 10)
    averaged = (
        sum(Histogram.of([0.5 if s == 9 else 0.01] * 100).quantile(0.95) or 0 for s in range(10))
        / 10
    )
    assert merged.p95 == pytest.approx(_exact(everything, 0.95), rel=RELATIVE_ERROR)
    assert merged.p95 is not None
    assert merged.p95 > 0.4 > averaged  # the average of per-second p95s says ~59 ms


# --- Success rate, rate, freshness ---


def test_failures_are_5xx_connect_failures_and_timeouts_not_4xx() -> None:
    stats = RegionalStats()
    outcomes = {
        Outcome.HTTP_2XX: 80,
        Outcome.HTTP_3XX: 2,
        Outcome.HTTP_4XX: 8,
        Outcome.HTTP_5XX: 5,
        Outcome.CONNECT_FAILURE: 3,
        Outcome.TIMEOUT: 2,
    }
    stats.add(US, _window(0, [0.01] * 100, outcomes=outcomes), 1.0)
    result = stats.stats(PAYMENTS, US, US, 1.0, 1)
    assert result.failures == 10
    assert result.success_rate == pytest.approx(0.90)
    assert result.error_rate == pytest.approx(0.10)


def test_no_requests_means_no_rate_no_success_rate_no_latency() -> None:
    result = RegionalStats().stats(PAYMENTS, US, US, 100.0, 10)
    assert (result.requests, result.rate_per_s) == (0, 0.0)
    assert result.success_rate is None
    assert result.error_rate is None
    assert (result.p50, result.p95, result.p99) == (None, None, None)
    assert result.last_at is None


def test_freshness_is_the_end_of_the_newest_second_with_requests() -> None:
    stats = RegionalStats(horizon_s=60)
    _steady(stats, range(10, 20), per_second=5, latency=0.02)
    assert stats.stats(PAYMENTS, US, US, 20.0, 10).last_at == 20.0
    # Traffic stopped: the short span is empty but we still know when it was last seen.
    later = stats.stats(PAYMENTS, US, US, 45.0, 10)
    assert (later.requests, later.last_at) == (0, 20.0)
    assert stats.stats(PAYMENTS, US, US, 81.0, 10).last_at is None


def test_stats_merge_per_service_over_callers_and_per_caller_over_targets() -> None:
    stats = RegionalStats()
    _steady(stats, range(10), per_second=10, latency=0.02, caller=US, target=US)
    _steady(stats, range(10), per_second=4, latency=0.02, caller=EU, target=US)
    _steady(stats, range(10), per_second=6, latency=0.10, caller=US, target=EU)
    assert stats.service_stats(PAYMENTS, US, 10.0, 10).rate_per_s == 14.0
    assert stats.caller_stats(PAYMENTS, US, 10.0, 10).rate_per_s == 16.0
    assert stats.traffic_keys() == {
        TrafficKey(PAYMENTS, US, US),
        TrafficKey(PAYMENTS, EU, US),
        TrafficKey(PAYMENTS, US, EU),
    }


def test_counts_only_stats_are_the_full_ones_without_latencies() -> None:
    stats = RegionalStats()
    _steady(stats, range(10), per_second=10, latency=0.02, caller=US, target=US)
    failing = {Outcome.HTTP_2XX: 3, Outcome.CONNECT_FAILURE: 2}
    stats.add(US, _window(9, [0.03] * 5, outcomes=failing), 10.0)
    for full, counted in (
        (
            stats.stats(PAYMENTS, US, US, 10.0, 5),
            stats.stats(PAYMENTS, US, US, 10.0, 5, latency=False),
        ),
        (
            stats.service_stats(PAYMENTS, US, 10.0, 5),
            stats.service_stats(PAYMENTS, US, 10.0, 5, latency=False),
        ),
        (
            stats.caller_stats(PAYMENTS, US, 10.0, 5),
            stats.caller_stats(PAYMENTS, US, 10.0, 5, latency=False),
        ),
    ):
        assert full.p95 is not None
        assert counted == replace(full, p50=None, p90=None, p95=None, p99=None)
        assert (counted.requests, counted.connect_failures) == (55, 2)


# --- Bounded memory ---


def test_memory_is_bounded_by_the_horizon() -> None:
    stats = RegionalStats(horizon_s=60)
    _steady(stats, range(1000), per_second=3, latency=0.02)
    assert stats.windows_held <= 62
    assert stats.stats(PAYMENTS, US, US, 1000.0, 60).requests == 180


def test_idle_keys_are_pruned_after_a_horizon() -> None:
    stats = RegionalStats(horizon_s=60)
    _steady(stats, range(10), per_second=1, latency=0.02, target=EU)
    _steady(stats, range(100), per_second=1, latency=0.02, target=US)
    stats.prune(100.0)
    assert stats.traffic_keys() == {TrafficKey(PAYMENTS, US, US)}


def test_new_keys_beyond_the_cap_are_refused() -> None:
    stats = RegionalStats(max_keys=2)
    assert stats.add(US, _window(0, [0.01], service="a"), 1.0)
    assert stats.add(US, _window(0, [0.01], service="b"), 1.0)
    assert not stats.add(US, _window(0, [0.01], service="c"), 1.0)
    assert stats.add(US, _window(1, [0.01], service="a"), 2.0)  # known keys keep going
    # Once a key is idle for a horizon, its place is free again.
    assert stats.add(US, _window(100, [0.01], service="c"), 101.0)


@pytest.mark.parametrize("span", [0, 61, 2.5, True])
def test_a_span_outside_the_horizon_is_refused(span: int) -> None:
    with pytest.raises(ValueError, match="span_s"):
        RegionalStats(horizon_s=60).stats(PAYMENTS, US, US, 10.0, span)


@pytest.mark.parametrize("horizon", [0, -1, 1.5])
def test_a_bad_horizon_is_refused(horizon: int) -> None:
    with pytest.raises(ValueError, match="horizon_s"):
        RegionalStats(horizon_s=horizon)


# --- Observations for the failover core ---

ALIVE_GATEWAY = ProbeStatus().succeeded(0.080, 0.0, ProbeSettings())
NOW = 100.0


def _summary(
    *,
    p95: float = 0.050,
    success: float = 0.999,
    rate: float = 50.0,
    headroom: float | None = 200.0,
) -> ServiceHealth:
    return ServiceHealth(KEY, p95 / 2, p95, p95 * 1.5, success, rate, headroom, 4)


def _local_traffic(p95_latency: float = 0.030, per_second: int = 20) -> RegionalStats:
    stats = RegionalStats()
    _steady(stats, range(80, 100), per_second=per_second, latency=p95_latency)
    return stats


def _policy() -> FailoverPolicy:
    return FailoverPolicy.model_validate(
        {
            "apiVersion": API_VERSION,
            "kind": "FailoverPolicy",
            "metadata": {"name": PAYMENTS},
            "spec": {
                "service": PAYMENTS,
                "triggers": {"latency": {"enter": "300ms", "exit": "150ms"}},
            },
        }
    )


def test_the_local_target_is_what_our_callers_measured() -> None:
    stats = _local_traffic(0.030, per_second=20)
    seen = observations(
        stats, PAYMENTS, US, NOW, local=LocalService(3, NOW - 0.5, capacity_rps=50.0)
    )
    (local,) = seen.targets
    assert seen.local == US
    assert seen.request_rate == 20.0
    assert local.cluster == US
    assert local.samples == 200
    assert local.p95 == pytest.approx(0.030, rel=RELATIVE_ERROR)
    assert (local.rtt, local.healthy_endpoints, local.error_rate) == (0.0, 3, 0.0)
    assert local.headroom == 30.0  # declared 50/s, 20/s in use
    assert local.observed_at == NOW  # the newest window closed at 100


def test_the_local_target_carries_the_newest_second_apart_for_entering() -> None:
    # Nine healthy seconds, then a quarter of second 99 slow: the 10s p95 stays low (2.5 %
    # slow), the newest second's is slow, and its span starts at 99, when the slowness began.
    stats = RegionalStats()
    _steady(stats, range(80, 99), per_second=40, latency=0.030)
    assert stats.add(US, _window(99, [0.450] * 10 + [0.030] * 30), NOW)
    (local,) = observations(stats, PAYMENTS, US, NOW + 0.25, local=LocalService(3, NOW)).targets
    assert local.p95 == pytest.approx(0.030, rel=RELATIVE_ERROR)
    assert local.recent_p95 == pytest.approx(0.450, rel=RELATIVE_ERROR)
    assert (local.recent_start, local.recent_samples) == (99.0, 40)


def test_local_endpoints_from_probes_count_all_but_the_down_ones() -> None:
    settings = ProbeSettings(down_after=1)
    up = ProbeStatus().succeeded(0.001, 0.0, settings)
    failing_once = (
        ProbeStatus(failures=0)
        .succeeded(0.001, 0.0, ProbeSettings())
        .failed("status 503", 1.0, ProbeSettings())
    )
    down = up.failed("refused", 1.0, settings)
    local = LocalService.from_probes([up, failing_once, down, ProbeStatus()], NOW, 80.0)
    assert local == LocalService(3, NOW, 80.0)


def test_local_headroom_is_unknown_without_a_declared_capacity() -> None:
    (local,) = observations(_local_traffic(), PAYMENTS, US, NOW, local=LocalService(3, NOW)).targets
    assert local.headroom is None


def test_a_remote_targets_expected_latency_is_its_own_latency_plus_the_rtt() -> None:
    remote = RemoteService(EU, 4, _summary(p95=0.050), received_at=NOW - 1)
    seen = observations(
        _local_traffic(0.400),
        PAYMENTS,
        US,
        NOW,
        local=LocalService(3, NOW),
        remotes=[remote],
        gateways={EU: ALIVE_GATEWAY},
    )
    target = seen.targets[1]
    assert (target.cluster, target.p95, target.rtt) == (EU, 0.050, 0.080)
    assert target.samples == 500  # 50/s over the summary's 10 s
    assert target.observed_at == NOW - 1
    assert target.headroom == 200.0
    assert target.error_rate == pytest.approx(0.001)
    decision = decide(_policy(), ControllerState.initial(US), seen, NOW)
    assert decision.expected_latency[EU] == pytest.approx(0.130)


def test_a_remote_without_a_summary_is_no_evidence() -> None:
    seen = observations(
        _local_traffic(),
        PAYMENTS,
        US,
        NOW,
        local=LocalService(3, NOW),
        remotes=[RemoteService(EU, 4)],
        gateways={EU: ALIVE_GATEWAY},
    )
    target = seen.targets[1]
    assert target.samples == 0
    assert target.p95 is None
    assert target.healthy_endpoints == 4  # still reachable if everything local dies
    decision = decide(_policy(), ControllerState.initial(US), seen, NOW)
    assert EU not in decision.expected_latency


def test_a_remote_without_an_rtt_yet_is_no_evidence() -> None:
    target = observations(
        _local_traffic(),
        PAYMENTS,
        US,
        NOW,
        local=LocalService(3, NOW),
        remotes=[RemoteService(EU, 4, _summary(), received_at=NOW)],
        gateways={EU: ProbeStatus()},  # never answered
    ).targets[1]
    assert target.samples == 0


def test_a_remote_behind_a_dead_gateway_has_no_healthy_endpoint() -> None:
    settings = ProbeSettings(down_after=1)
    dead = ALIVE_GATEWAY.failed("connect: refused", 1.0, settings)
    target = observations(
        _local_traffic(),
        PAYMENTS,
        US,
        NOW,
        local=LocalService(3, NOW),
        remotes=[RemoteService(EU, 4, _summary(), received_at=NOW)],
        gateways={EU: dead},
    ).targets[1]
    assert target.healthy_endpoints == 0


def test_our_own_errors_to_a_remote_count_when_we_have_enough_of_them() -> None:
    stats = _local_traffic()
    outcomes = {Outcome.HTTP_2XX: 15, Outcome.CONNECT_FAILURE: 5}
    stats.add(US, _window(99, [0.1] * 20, target=EU, outcomes=outcomes), NOW)
    remote = RemoteService(EU, 4, _summary(success=0.99), received_at=NOW)

    def eu_errors(min_samples: int) -> float:
        seen = observations(
            stats,
            PAYMENTS,
            US,
            NOW,
            local=LocalService(3, NOW),
            remotes=[remote],
            gateways={EU: ALIVE_GATEWAY},
            min_samples=min_samples,
        )
        return seen.targets[1].error_rate

    assert eu_errors(min_samples=10) == pytest.approx(0.25)  # the path fails, the peer can't see
    assert eu_errors(min_samples=50) == pytest.approx(0.01)  # too few of ours: the summary's


def test_the_request_rate_counts_every_target_the_caller_used() -> None:
    stats = _local_traffic(per_second=20)
    _steady(stats, range(90, 100), per_second=5, latency=0.1, target=EU)
    seen = observations(
        stats, PAYMENTS, US, NOW, local=LocalService(3, NOW), remotes=[RemoteService(EU, 1)]
    )
    assert seen.request_rate == 25.0


def test_a_cluster_listed_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        observations(
            RegionalStats(),
            PAYMENTS,
            US,
            NOW,
            local=LocalService(3, NOW),
            remotes=[RemoteService(EU, 1), RemoteService(EU, 2)],
        )


def test_without_traffic_the_local_target_is_fresh_but_without_evidence() -> None:
    (local,) = observations(RegionalStats(), PAYMENTS, US, NOW, local=LocalService(0, NOW)).targets
    assert (local.samples, local.observed_at, local.healthy_endpoints) == (0, NOW, 0)
    assert local.p95 is None


# --- What we publish ---


def test_the_published_summary_covers_every_caller_of_our_copy() -> None:
    stats = RegionalStats()
    _steady(stats, range(90, 100), per_second=30, latency=0.020, caller=US, target=US)
    _steady(stats, range(90, 100), per_second=10, latency=0.300, caller=EU, target=US)
    _steady(stats, range(90, 100), per_second=50, latency=0.900, caller=US, target=EU)
    summary = health_summary(stats, KEY, US, NOW, healthy_endpoints=3, capacity_rps=100.0)
    assert summary.key == KEY
    assert summary.request_rate == 40.0
    assert summary.headroom_rps == 60.0
    assert summary.latency_p50_seconds == pytest.approx(0.020, rel=RELATIVE_ERROR)
    assert summary.latency_p95_seconds == pytest.approx(0.300, rel=RELATIVE_ERROR)
    assert summary.success_rate == 1.0
    assert summary.healthy_endpoints == 3


@pytest.mark.parametrize(("capacity", "headroom"), [(None, None), (10.0, 0.0), (100.0, 80.0)])
def test_published_headroom_is_capacity_minus_rate_or_unknown(
    capacity: float | None, headroom: float | None
) -> None:
    stats = _local_traffic(per_second=20)
    summary = health_summary(stats, KEY, US, NOW, healthy_endpoints=1, capacity_rps=capacity)
    assert summary.headroom_rps == headroom


def test_a_summary_without_traffic_reads_as_no_evidence_on_the_other_side() -> None:
    summary = health_summary(RegionalStats(), KEY, EU, NOW, healthy_endpoints=2)
    assert summary.request_rate == 0.0
    target = observations(
        _local_traffic(),
        PAYMENTS,
        US,
        NOW,
        local=LocalService(3, NOW),
        remotes=[RemoteService(EU, 2, summary, received_at=NOW)],
        gateways={EU: ALIVE_GATEWAY},
    ).targets[1]
    assert target.samples == 0


def test_a_summary_published_by_a_peer_becomes_its_target_observation() -> None:
    theirs = RegionalStats()
    _steady(theirs, range(90, 100), per_second=40, latency=0.060, caller=EU, target=EU)
    published = health_summary(theirs, KEY, EU, NOW, healthy_endpoints=5, capacity_rps=100.0)
    target = observations(
        _local_traffic(),
        PAYMENTS,
        US,
        NOW,
        local=LocalService(3, NOW),
        remotes=[RemoteService(EU, 1, published, received_at=NOW)],
        gateways={EU: ALIVE_GATEWAY},
    ).targets[1]
    assert target.p95 == pytest.approx(0.060, rel=RELATIVE_ERROR)
    assert (target.samples, target.headroom, target.healthy_endpoints) == (400, 60.0, 5)


# --- An idle copy: probe evidence ---

PROBED = ProbeLatency(p50=0.003, p95=0.004, p99=0.006, samples=20)


def test_an_idle_copy_publishes_its_probe_latency_marked_as_probes() -> None:
    stats = RegionalStats()
    _steady(stats, range(95, 100), per_second=1, latency=0.500, caller=EU, target=EU)  # 5 < 20
    summary = health_summary(stats, KEY, EU, NOW, healthy_endpoints=2, probes=PROBED)
    assert summary.source is HealthSource.PROBES
    assert summary.probe_samples == 20
    assert (summary.latency_p50_seconds, summary.latency_p95_seconds) == (0.003, 0.004)
    assert summary.latency_p99_seconds == 0.006
    assert summary.request_rate == 0.5  # what did reach it is still said


@pytest.mark.parametrize(
    ("requests", "source"),
    [
        (PUBLISHED_MIN_SAMPLES - 1, HealthSource.PROBES),
        (PUBLISHED_MIN_SAMPLES, HealthSource.TRAFFIC),
    ],
)
def test_a_copy_with_enough_requests_publishes_them_whatever_the_probes_say(
    requests: int, source: HealthSource
) -> None:
    stats = RegionalStats()
    assert stats.add(EU, _window(99, [0.060] * requests, target=EU), NOW)
    summary = health_summary(stats, KEY, EU, NOW, healthy_endpoints=2, probes=PROBED)
    assert summary.source is source
    if source is HealthSource.TRAFFIC:
        assert summary.probe_samples == 0
        assert summary.latency_p95_seconds == pytest.approx(0.060, rel=RELATIVE_ERROR)


def test_probe_evidence_becomes_the_targets_latency_with_the_probe_count_as_samples() -> None:
    published = health_summary(RegionalStats(), KEY, EU, NOW, healthy_endpoints=2, probes=PROBED)
    target = observations(
        _local_traffic(),
        PAYMENTS,
        US,
        NOW,
        local=LocalService(3, NOW),
        remotes=[RemoteService(EU, 2, published, received_at=NOW)],
        gateways={EU: ALIVE_GATEWAY},
    ).targets[1]
    assert (target.source, target.samples, target.p95, target.rtt) == ("probes", 20, 0.004, 0.080)


def test_an_idle_remote_copy_is_chosen_on_its_probes_through_the_peering_wire() -> None:
    """End to end of the pieces: eu-west's copy has no callers; its cluster probes it, and the
    summary crosses the wire to us-west, whose controller shifts a slow local copy to it."""
    theirs = ProbeStatus()
    for second in range(10):
        theirs = theirs.succeeded(0.004, float(second), ProbeSettings())
    probes = probe_latency([theirs])
    summary = health_summary(RegionalStats(), KEY, EU, NOW, healthy_endpoints=1, probes=probes)
    message = from_proto(to_proto(HealthSummaries(1, (summary,))))
    assert isinstance(message, HealthSummaries)
    (received,) = message.services
    view = HealthView(US, _local_traffic(p95_latency=0.450, per_second=40))
    view.set_local(PAYMENTS, LocalService(3, NOW))
    view.set_remote(PAYMENTS, RemoteService(EU, 1, received, received_at=NOW))
    view.set_gateways({EU: ALIVE_GATEWAY})
    state = ControllerState.initial(US)
    decisions = []
    for tick in range(3):
        decision = decide(_policy(), state, view.observe(PAYMENTS, US, NOW + tick), NOW + tick)
        decisions.append(decision)
        state = decision.state
    moved = next(d for d in decisions if d.changed)
    assert moved.rule is Rule.ENTER_DEGRADED
    assert moved.weights[EU] > 0
    assert moved.expected_latency[EU] == pytest.approx(0.084)
    assert "eu-west 84ms (probes + RTT: the copy is idle)" in moved.explanation


# --- When a brownout is acted on: whole-second windows, ticks 0.25 s after them ---


def _first_shift(fault_offset: float, enter_after: str) -> float:
    """A caller at 60 requests/s (20 ms answers, +400 ms from ``100 + fault_offset``); windows
    hold answers by the second they completed in and arrive just after it; the loop ticks at
    every whole second + 0.25 s, as the control plane does. Seconds from fault to first shift."""
    fault = 100.0 + fault_offset
    sent = [90.0 + i / 60 for i in range(60 * 20)]
    done = [(t + (0.420 if t >= fault else 0.020)) for t in sent]
    policy = _policy().model_copy(
        update={
            "spec": _policy().spec.model_copy(
                update={
                    "triggers": Triggers.model_validate(
                        {"latency": {"enter": "300ms", "exit": "150ms", "enterAfter": enter_after}}
                    )
                }
            )
        }
    )
    stats = RegionalStats()
    view = HealthView(US, stats)
    view.set_local(PAYMENTS, LocalService(3, 0.0))
    view.set_remote(PAYMENTS, RemoteService(EU, 3, _summary(rate=50.0), received_at=0.0))
    view.set_gateways({EU: ALIVE_GATEWAY})
    state = ControllerState.initial(US)
    for second in range(91, 110):
        latencies = [d - t for t, d in zip(sent, done, strict=True) if second - 1 <= d < second]
        assert stats.add(US, _window(second - 1, latencies), second + 0.02)
        now = second + 0.25
        view.set_local(PAYMENTS, LocalService(3, now))
        view.set_remote(PAYMENTS, RemoteService(EU, 3, _summary(rate=50.0), received_at=now))
        decision = decide(policy, state, view.observe(PAYMENTS, US, now), now)
        state = decision.state
        if decision.changed:
            return round(now - fault, 2)
    raise AssertionError("never shifted")


@pytest.mark.parametrize(
    ("fault_offset", "after_2s", "after_1s"),
    [
        (0.10, 2.15, 1.15),  # the first slow answers (+0.42 s) land in the fault's own second
        (0.40, 1.85, 0.85),
        (0.80, 2.45, 1.45),  # they land in the next second: it is the first slow window
    ],
)
def test_the_first_shift_depends_on_where_in_its_second_a_brownout_starts(
    fault_offset: float, after_2s: float, after_1s: float
) -> None:
    """enterAfter 2s acts on the second slow window: within 2 s of the fault only when it
    starts between ~0.25 s and ~0.55 s into a second. 1s acts on the first, always within
    ~1.75 s, but then one slow second (a blip) moves traffic too."""
    assert _first_shift(fault_offset, "2s") == after_2s
    assert _first_shift(fault_offset, "1s") == after_1s


# --- The view the loop reads ---


def test_the_view_decides_for_services_we_serve_import_or_call() -> None:
    stats = RegionalStats()
    view = HealthView(US, stats)
    view.set_local("orders", LocalService(2, NOW))
    view.set_remote("payments", RemoteService(EU, 3))
    stats.add(US, _window(99, [0.01], service="search", target=AP), NOW)
    stats.add(EU, _window(99, [0.01], service="eu-only"), NOW)  # another caller's traffic
    assert view.pairs(NOW) == [("orders", US), (PAYMENTS, US), ("search", US)]


@pytest.mark.parametrize(("enter_span_s", "samples"), [(1, 20), (3, 60)])
def test_the_view_reads_the_short_span_it_was_given(enter_span_s: int, samples: int) -> None:
    view = HealthView(US, _local_traffic(per_second=20), enter_span_s=enter_span_s)
    view.set_local(PAYMENTS, LocalService(3, NOW))
    (local,) = view.observe(PAYMENTS, US, NOW).targets
    assert (local.recent_start, local.recent_samples) == (NOW - enter_span_s, samples)


def test_a_service_with_a_policy_is_observed_with_the_policys_enter_span() -> None:
    view = HealthView(US, _local_traffic(per_second=20))
    view.set_local(PAYMENTS, LocalService(3, NOW))
    view.set_local("orders", LocalService(3, NOW))
    three = _policy().model_copy(
        update={
            "spec": _policy().spec.model_copy(
                update={"evidence": Evidence.model_validate({"enterSpan": "3s"})}
            )
        }
    )
    view.set_policies([three])
    (local,) = view.observe(PAYMENTS, US, NOW).targets
    assert (local.recent_start, local.recent_samples) == (NOW - 3, 60)
    (other,) = view.observe("orders", US, NOW).targets
    assert other.recent_start == NOW - 1  # no policy: the view's default
    view.set_policies([])
    (local,) = view.observe(PAYMENTS, US, NOW).targets
    assert local.recent_start == NOW - 1


def test_the_view_observes_with_its_local_remote_and_gateway_knowledge() -> None:
    view = HealthView(US, _local_traffic())
    view.set_local(PAYMENTS, LocalService(3, NOW))
    view.set_remote(PAYMENTS, RemoteService(EU, 4, _summary(), received_at=NOW))
    view.set_gateways({EU: ALIVE_GATEWAY})
    seen = view.observe(PAYMENTS, US, NOW)
    assert [t.cluster for t in seen.targets] == [US, EU]
    assert seen.targets[1].rtt == 0.080
    view.remove_remote(PAYMENTS, EU)
    assert [t.cluster for t in view.observe(PAYMENTS, US, NOW).targets] == [US]
    assert view.pairs(NOW) == [(PAYMENTS, US)]  # still served here


def test_a_service_we_do_not_serve_has_no_healthy_local_endpoint() -> None:
    view = HealthView(US, RegionalStats())
    view.set_remote(PAYMENTS, RemoteService(EU, 4))
    local = view.observe(PAYMENTS, US, NOW).targets[0]
    assert (local.cluster, local.healthy_endpoints, local.observed_at) == (US, 0, NOW)


@pytest.mark.parametrize(
    ("local", "now", "rule", "local_weight"),
    [
        (None, NOW, Rule.NO_LOCAL_DATA, TOTAL_WEIGHT),  # nothing registered yet: no data
        (LocalService(0, NOW), NOW, Rule.NO_HEALTHY_LOCAL, 0),  # registered, all unhealthy
        (LocalService(2, NOW), NOW, Rule.HOLD, TOTAL_WEIGHT),  # registered: decided as usual
        (None, NOW + 5, Rule.NO_HEALTHY_LOCAL, 0),  # after the grace: really none
    ],
    ids=["unregistered in grace", "unhealthy is evidence", "registered in grace", "after grace"],
)
def test_a_restarted_control_plane_moves_nothing_until_local_services_had_time_to_register(
    local: LocalService | None, now: float, rule: Rule, local_weight: int
) -> None:
    # Our callers' traffic is in the stats, a healthy remote is imported; the catalog was
    # read at NOW - 1 with a 5 s registration TTL, so the grace ends at NOW + 4.
    view = HealthView(US, _local_traffic(), local_from=NOW + 4)
    view.set_local(PAYMENTS, local)
    view.set_remote(PAYMENTS, RemoteService(EU, 4, _summary(), received_at=now))
    view.set_gateways({EU: ALIVE_GATEWAY})
    decision = decide(None, ControllerState.initial(US), view.observe(PAYMENTS, US, now), now)
    assert decision.rule is rule
    assert decision.weights.get(US, 0) == local_weight


@pytest.mark.parametrize(
    ("recent", "healthy"),
    [
        ({Outcome.CONNECT_FAILURE: 4}, 0),  # every recent call found nobody to connect to
        ({Outcome.CONNECT_FAILURE: 2}, 2),  # too few to say (one dead endpoint, retried)
        ({Outcome.CONNECT_FAILURE: 4, Outcome.HTTP_2XX: 1}, 2),  # a live endpoint answered
        ({Outcome.CONNECT_FAILURE: 2, Outcome.HTTP_5XX: 2}, 2),  # reached, answered badly
    ],
    ids=["all connect failures", "too few", "one answered", "5xx is reached"],
)
def test_local_calls_that_all_fail_to_connect_mean_no_healthy_local_endpoint(
    recent: dict[Outcome, int], healthy: int
) -> None:
    # The registry still lists two endpoints (their TTL has not run out); they answered
    # until three seconds ago.
    stats = RegionalStats()
    _steady(stats, range(80, 97), per_second=20, latency=0.030)
    stats.add(US, _window(99, [0.001] * sum(recent.values()), outcomes=recent), NOW)
    seen = observations(stats, PAYMENTS, US, NOW, local=LocalService(2, NOW))
    assert seen.targets[0].healthy_endpoints == healthy
