"""The probe state machine in virtual time: thresholds, jitter, RTT."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from health.probe.core import (
    ProbeError,
    ProbeLatency,
    ProbeSettings,
    ProbeState,
    ProbeStatus,
    probe_latency,
)

SETTINGS = ProbeSettings(interval=1.0, down_after=3, up_after=3, rtt_alpha=0.5, samples=4)


def _run(script: str, status: ProbeStatus | None = None, start: float = 0.0) -> ProbeStatus:
    """Apply ``s`` (success, 10 ms) and ``f`` (failure) results, one per second."""
    status = status if status is not None else ProbeStatus()
    for index, result in enumerate(script):
        now = start + index
        if result == "s":
            status = status.succeeded(0.010, now, SETTINGS)
        else:
            status = status.failed("refused", now, SETTINGS)
    return status


def test_a_new_target_is_unknown_and_not_alive() -> None:
    assert ProbeStatus().state is ProbeState.UNKNOWN
    assert not ProbeStatus().alive


def test_first_contact_is_up_at_once() -> None:
    status = _run("s")
    assert status.alive
    assert status.since == 0.0


@pytest.mark.parametrize(
    ("script", "state"),
    [
        ("sf", ProbeState.UP),
        ("sff", ProbeState.UP),
        ("sfff", ProbeState.DOWN),
        ("sffsff", ProbeState.UP),  # failures must be consecutive
        ("fff", ProbeState.DOWN),
        ("ff", ProbeState.UNKNOWN),
    ],
)
def test_down_only_after_down_after_consecutive_failures(script: str, state: ProbeState) -> None:
    assert _run(script).state is state


@pytest.mark.parametrize(
    ("script", "state"),
    [
        ("sffffs", ProbeState.DOWN),  # never recovery on one success
        ("sffffss", ProbeState.DOWN),
        ("sffffsss", ProbeState.UP),
        ("sffffssfss", ProbeState.DOWN),  # a failure restarts the count
        ("sffffssfsss", ProbeState.UP),
    ],
)
def test_up_again_only_after_up_after_consecutive_successes(script: str, state: ProbeState) -> None:
    assert _run(script).state is state


def test_since_marks_the_transition_not_the_latest_probe() -> None:
    status = _run("sfffffsss")
    assert status.state is ProbeState.UP
    assert status.since == 8.0  # the third success after going down at t=3
    down = _run("sfffff")
    assert down.since == 3.0
    assert down.last_probe_at == 5.0
    assert down.last_error == "refused"


def test_rtt_is_an_ewma_of_successes_with_recent_samples() -> None:
    status = ProbeStatus()
    for now, rtt in enumerate([0.010, 0.030, 0.020]):
        status = status.succeeded(rtt, float(now), SETTINGS)
    # alpha 0.5: 10 → 20 → 20 ms
    assert status.rtt == pytest.approx(0.020)
    assert status.last_rtt == 0.020
    assert status.recent == (0.010, 0.030, 0.020)


def test_failures_carry_no_rtt_and_keep_the_estimate() -> None:
    status = ProbeStatus().succeeded(0.050, 0.0, SETTINGS).failed("timeout", 1.0, SETTINGS)
    assert status.rtt == 0.050
    assert status.recent == (0.050,)


def test_recent_samples_are_bounded() -> None:
    status = ProbeStatus()
    for now in range(10):
        status = status.succeeded(now / 1000, float(now), SETTINGS)
    assert status.recent == (0.006, 0.007, 0.008, 0.009)


def test_ewma_converges_to_a_new_level() -> None:
    status = ProbeStatus().succeeded(0.010, 0.0, SETTINGS)
    for now in range(1, 20):
        status = status.succeeded(0.090, float(now), SETTINGS)
    assert status.rtt == pytest.approx(0.090, abs=1e-4)


@given(
    interval=st.floats(min_value=0.01, max_value=60),
    jitter=st.floats(min_value=0, max_value=0.99),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_jittered_delay_stays_within_bounds(interval: float, jitter: float, seed: int) -> None:
    settings = ProbeSettings(interval=interval, jitter=jitter)
    rng = random.Random(seed)
    for _ in range(20):
        delay = settings.next_probe_at(100.0, rng) - 100.0
        assert interval * (1 - jitter) - 1e-9 <= delay <= interval * (1 + jitter) + 1e-9
        assert delay > 0


def test_jitter_spreads_probes() -> None:
    settings = ProbeSettings(interval=1.0, jitter=0.2)
    rng = random.Random(7)
    delays = [settings.next_probe_at(0.0, rng) for _ in range(200)]
    assert min(delays) < 0.85
    assert max(delays) > 1.15


def test_no_jitter_is_exact() -> None:
    assert ProbeSettings(interval=2.0, jitter=0).next_probe_at(5.0, random.Random(1)) == 7.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("interval", 0.0),
        ("interval", float("nan")),
        ("timeout", -1.0),
        ("jitter", 1.0),
        ("down_after", 0),
        ("up_after", 0),
        ("samples", 0),
        ("rtt_alpha", 0.0),
    ],
)
def test_bad_settings_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ProbeError, match=f"^{field}:"):
        ProbeSettings(**{field: value})  # type: ignore[arg-type]


def test_a_negative_rtt_is_rejected() -> None:
    with pytest.raises(ProbeError, match="rtt"):
        ProbeStatus().succeeded(-0.001, 0.0, SETTINGS)


# --- Probe latency: the evidence an idle copy publishes ---


def _up_with(*rtts: float) -> ProbeStatus:
    status = ProbeStatus()
    for index, rtt in enumerate(rtts):
        status = status.succeeded(rtt, float(index), ProbeSettings(samples=10))
    return status


def test_probe_latency_reads_percentiles_over_every_up_endpoints_recent_round_trips() -> None:
    fast = _up_with(*[0.002] * 9, 0.050)  # one slow probe of ten
    other = _up_with(*[0.003] * 10)
    latency = probe_latency([fast, other])
    assert latency == ProbeLatency(p50=0.003, p95=0.003, p99=0.050, samples=20)


def test_probe_latency_ignores_down_and_unknown_endpoints() -> None:
    down = _up_with(0.500, 0.500)
    for second in range(3):
        down = down.failed("refused", 10.0 + second, ProbeSettings())
    assert down.state is ProbeState.DOWN
    latency = probe_latency([down, ProbeStatus(), _up_with(0.004)])
    assert latency == ProbeLatency(p50=0.004, p95=0.004, p99=0.004, samples=1)


def test_no_probe_latency_without_an_up_endpoint() -> None:
    assert probe_latency([ProbeStatus()]) is None
    assert probe_latency([]) is None
