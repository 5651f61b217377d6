"""The WAN emulator's decisions: what one link does to the bytes that cross it.

Every decision takes values, ``now`` (seconds on a monotonic clock) and an ``rng``, so the
emulator's behaviour is tested in virtual time. The forwarder (`snapbright.wan.forwarder`) reads
the loop clock, calls these, and moves bytes.

- **Latency and jitter** form a delay line: each chunk is due at ``arrival + delay``, with the
  delay drawn uniformly from ``latency ± jitter`` (never below zero). Chunks are not sent one
  at a time: any number are in flight at once, so throughput is not capped by latency.
  Order within a connection is kept, as TCP keeps it: a chunk is never due before the one
  ahead of it (``max(previous due time, arrival + delay)``).
- **Loss**: TCP cannot lose bytes, it retransmits them. A chunk stands for
  ``ceil(size / MSS)`` segments; if any of them is lost (each with probability ``loss``), the
  chunk arrives one retransmission timeout late (200 ms, Linux's minimum RTO) and, since order
  is kept, so does everything behind it (head-of-line blocking).
- **Bandwidth**: a token bucket per direction of a link, shared by every connection crossing
  it. A chunk leaves when the bucket has paid for it, then travels for its delay.
- **Partition** is applied by the forwarder: chunks are held, not lost, until the link heals.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "MSS",
    "RTO",
    "DelayLine",
    "LinkShape",
    "Scheduled",
    "TokenBucket",
    "chunk_lost",
    "sample_delay",
]

RTO = 0.2
"""The delay a lost segment costs: Linux's minimum retransmission timeout (TCP_RTO_MIN)."""

MSS = 1448
"""Bytes of payload per segment (a 1500-byte MTU less IP and TCP headers with timestamps)."""


@dataclass(frozen=True, slots=True)
class LinkShape:
    """What one direction of an emulated link does: the same units as a topology's WanLink.

    ``latency`` and ``jitter`` are one-way seconds; ``loss`` is the share of segments lost;
    ``bandwidth`` is bits per second (``None``: as fast as loopback); ``partition`` holds all
    traffic; ``reset`` makes a partition reset connections instead of stalling them.
    """

    latency: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    bandwidth: float | None = None
    partition: bool = False
    reset: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency) and self.latency >= 0):
            raise ValueError(f"latency must be a finite duration >= 0, not {self.latency!r}")
        if not (math.isfinite(self.jitter) and self.jitter >= 0):
            raise ValueError(f"jitter must be a finite duration >= 0, not {self.jitter!r}")
        if self.jitter > self.latency:
            raise ValueError(
                f"jitter ({self.jitter * 1000:g}ms) must not exceed latency "
                f"({self.latency * 1000:g}ms): a delay is never negative"
            )
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), not {self.loss!r}")
        if self.bandwidth is not None and not (
            math.isfinite(self.bandwidth) and self.bandwidth > 0
        ):
            raise ValueError(f"bandwidth must be above 0 bits/s, not {self.bandwidth!r}")


def chunk_lost(loss: float, size: int, rng: random.Random) -> bool:
    """Whether any of the segments a chunk of ``size`` bytes stands for is lost."""
    if loss <= 0.0 or size <= 0:
        return False
    segments = -(-size // MSS)
    return rng.random() < 1.0 - (1.0 - loss) ** segments


def sample_delay(shape: LinkShape, size: int, rng: random.Random) -> float:
    """One chunk's one-way delay: latency ± jitter, plus one RTO if a segment of it is lost."""
    delay = _jittered(shape, rng)
    return delay + RTO if chunk_lost(shape.loss, size, rng) else delay


def _jittered(shape: LinkShape, rng: random.Random) -> float:
    if shape.jitter <= 0.0:
        return shape.latency
    return max(0.0, shape.latency + rng.uniform(-shape.jitter, shape.jitter))


class TokenBucket:
    """Bandwidth of one direction of a link: ``rate`` bytes per second, ``burst`` bytes deep.

    `reserve` never refuses: a chunk that finds the bucket short puts it in debt, and leaves
    when the debt is paid. Chunks therefore leave in the order they were reserved, each at the
    link's rate, whichever connection they belong to.
    """

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be above 0 bytes/s, not {rate!r}")
        if not (math.isfinite(burst) and burst > 0):
            raise ValueError(f"burst must be above 0 bytes, not {burst!r}")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    @classmethod
    def for_bandwidth(cls, bits_per_second: float, now: float) -> TokenBucket:
        """A bucket for a link of that many bits per second, ~10 ms (at least 16 KiB) deep."""
        rate = bits_per_second / 8.0
        return cls(rate, max(16 * 1024.0, rate * 0.01), now)

    def reserve(self, size: int, now: float) -> float:
        """Take ``size`` bytes' worth of tokens; the time at which the chunk has left."""
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
        self._tokens -= size
        if self._tokens >= 0:
            return now
        return self._stamp + -self._tokens / self.rate


class Scheduled(NamedTuple):
    """When a chunk leaves (bandwidth paid), when it is due, and whether it was retransmitted."""

    leaves: float
    due: float
    lost: bool


class DelayLine:
    """The due times of one direction of one connection.

    ``opens_at`` is when the sender may first send: a new connection's data waits for its
    handshake (SYN there, SYN-ACK back), which a forwarder on loopback would otherwise skip.
    """

    __slots__ = ("_last", "opens_at")

    def __init__(self, opens_at: float = 0.0) -> None:
        self.opens_at = opens_at
        self._last = -math.inf

    @property
    def last(self) -> float:
        """The due time of the latest chunk scheduled (``-inf`` before the first)."""
        return self._last

    def schedule(
        self,
        arrival: float,
        size: int,
        shape: LinkShape,
        bucket: TokenBucket | None,
        rng: random.Random,
    ) -> Scheduled:
        """Schedule a chunk of ``size`` bytes that arrived at ``arrival``.

        It leaves when the link's bandwidth lets it go (the forwarder stops reading while that
        is far ahead), and is due after its delay, never before the chunk ahead of it.
        """
        sent = max(arrival, self.opens_at)
        leaves = sent if bucket is None else bucket.reserve(size, sent)
        lost = chunk_lost(shape.loss, size, rng)
        delay = _jittered(shape, rng) + (RTO if lost else 0.0)
        due = max(self._last, leaves + delay)
        self._last = due
        return Scheduled(leaves, due, lost)
