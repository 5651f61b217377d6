"""The WAN emulator's decisions, in virtual time."""

from __future__ import annotations

import random

import pytest

from snapbright.wan.core import (
    MSS,
    RTO,
    DelayLine,
    LinkShape,
    TokenBucket,
    chunk_lost,
    sample_delay,
)


def test_delay_line_delivers_each_chunk_one_latency_after_it_arrived() -> None:
    line = DelayLine()
    shape = LinkShape(latency=0.08)
    rng = random.Random(1)
    dues = [line.schedule(t, 1000, shape, None, rng).due for t in (0.0, 0.01, 0.5)]
    assert dues == pytest.approx([0.08, 0.09, 0.58])


def test_delay_line_keeps_many_chunks_in_flight_so_latency_does_not_cap_throughput() -> None:
    # 1000 chunks of 64 KiB arriving 1 ms apart over a 100 ms link: a stop-and-wait line would
    # need 1000 x 100 ms; a delay line delivers the last 100 ms after it arrived.
    line = DelayLine()
    shape = LinkShape(latency=0.1)
    rng = random.Random(1)
    arrivals = [i * 0.001 for i in range(1000)]
    dues = [line.schedule(t, 64 * 1024, shape, None, rng).due for t in arrivals]
    assert dues[-1] == pytest.approx(0.999 + 0.1)
    in_flight_at_half_a_second = sum(1 for a, d in zip(arrivals, dues, strict=True) if a <= 0.5 < d)
    assert in_flight_at_half_a_second == 100


def test_jitter_never_reorders_chunks_of_a_connection() -> None:
    line = DelayLine()
    shape = LinkShape(latency=0.05, jitter=0.04)
    rng = random.Random(7)
    arrivals = [i * 0.001 for i in range(2000)]
    dues = [line.schedule(t, 100, shape, None, rng).due for t in arrivals]
    assert dues == sorted(dues)
    assert all(d >= a + 0.01 for a, d in zip(arrivals, dues, strict=True))
    assert max(d - a for a, d in zip(arrivals, dues, strict=True)) <= 0.09 + 1e-9
    assert len({round(d - a, 6) for a, d in zip(arrivals, dues, strict=True)}) > 100


@pytest.mark.parametrize(("latency", "jitter"), [(0.05, 0.02), (0.01, 0.01), (0.0, 0.0)])
def test_jittered_delay_stays_within_latency_plus_or_minus_jitter(
    latency: float, jitter: float
) -> None:
    rng = random.Random(3)
    shape = LinkShape(latency=latency, jitter=jitter)
    delays = [sample_delay(shape, 100, rng) for _ in range(5000)]
    assert min(delays) >= max(0.0, latency - jitter)
    assert max(delays) <= latency + jitter
    if jitter:
        assert max(delays) - min(delays) > jitter  # spread over most of the range


def test_a_lost_chunk_arrives_one_rto_late_and_holds_the_chunks_behind_it() -> None:
    line = DelayLine()
    shape = LinkShape(latency=0.05, loss=0.3)
    rng = random.Random(11)
    scheduled = [line.schedule(i * 0.001, 100, shape, None, rng) for i in range(200)]
    lost = [i for i, s in enumerate(scheduled) if s.lost]
    assert 30 < len(lost) < 90
    first = lost[0]
    assert scheduled[first].due == pytest.approx(first * 0.001 + 0.05 + RTO)
    # The next chunk, not lost itself, waits behind the retransmission (head-of-line).
    following = scheduled[first + 1]
    assert following.due >= scheduled[first].due


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (MSS, 0.01),
        (10 * MSS, 1 - 0.99**10),
        (100 * MSS, 1 - 0.99**100),
    ],
)
def test_a_chunk_is_lost_when_any_of_its_segments_is(size: int, expected: float) -> None:
    rng = random.Random(5)
    trials = 20_000
    share = sum(chunk_lost(0.01, size, rng) for _ in range(trials)) / trials
    assert share == pytest.approx(expected, abs=0.015)


def test_no_loss_means_no_chunk_is_ever_lost() -> None:
    rng = random.Random(5)
    assert not any(chunk_lost(0.0, 64 * 1024, rng) for _ in range(1000))


def test_token_bucket_lets_a_burst_through_then_holds_to_its_rate() -> None:
    bucket = TokenBucket(rate=1000.0, burst=500.0, now=0.0)
    assert bucket.reserve(500, 0.0) == 0.0
    # Empty now: each further 100 bytes leaves 0.1 s after the one before.
    leaves = [bucket.reserve(100, 0.0) for _ in range(5)]
    assert leaves == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=1000.0, burst=500.0, now=0.0)
    bucket.reserve(500, 0.0)
    assert bucket.reserve(200, 0.2) == 0.2  # 200 bytes refilled in 0.2 s
    assert bucket.reserve(400, 10.0) == 10.0  # full again, not more than the burst
    assert bucket.reserve(200, 10.0) == pytest.approx(10.1)


def test_token_bucket_carries_a_link_at_its_rate_over_many_chunks() -> None:
    bucket = TokenBucket.for_bandwidth(8_000_000, now=0.0)  # 1 MB/s
    last = 0.0
    for _ in range(1000):  # 10 MB offered at once
        last = bucket.reserve(10_000, 0.0)
    assert last == pytest.approx((10_000_000 - bucket.burst) / 1_000_000)


def test_bandwidth_delays_the_delivery_of_the_chunks_it_queues() -> None:
    line = DelayLine()
    bucket = TokenBucket(rate=1000.0, burst=100.0, now=0.0)
    shape = LinkShape(latency=0.05, bandwidth=8000.0)
    rng = random.Random(1)
    first = line.schedule(0.0, 100, shape, bucket, rng)
    second = line.schedule(0.0, 100, shape, bucket, rng)
    assert (first.leaves, first.due) == pytest.approx((0.0, 0.05))
    assert (second.leaves, second.due) == pytest.approx((0.1, 0.15))


def test_chunks_sent_before_the_handshake_completes_leave_when_it_does() -> None:
    line = DelayLine(opens_at=0.16)
    shape = LinkShape(latency=0.08)
    rng = random.Random(1)
    assert line.schedule(0.0, 100, shape, None, rng).due == pytest.approx(0.24)
    assert line.schedule(0.3, 100, shape, None, rng).due == pytest.approx(0.38)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"latency": -0.001}, "latency must be"),
        ({"latency": float("nan")}, "latency must be"),
        ({"latency": 0.01, "jitter": 0.02}, "must not exceed latency"),
        ({"loss": 1.0}, r"loss must be in \[0, 1\)"),
        ({"loss": -0.1}, "loss must be"),
        ({"bandwidth": 0.0}, "bandwidth must be above 0"),
        ({"bandwidth": float("inf")}, "bandwidth must be above 0"),
    ],
)
def test_link_shape_rejects_impossible_values(fields: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LinkShape(**fields)  # type: ignore[arg-type]


def test_token_bucket_rejects_a_rate_or_burst_of_zero() -> None:
    with pytest.raises(ValueError, match="rate must be above 0"):
        TokenBucket(rate=0.0, burst=1.0, now=0.0)
    with pytest.raises(ValueError, match="burst must be above 0"):
        TokenBucket(rate=1.0, burst=0.0, now=0.0)
