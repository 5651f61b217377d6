"""Pure decisions of the catalog sources: blocking-query index steps, backoff, expiry.

Nothing here reads a clock or a socket: callers pass ``now`` and an ``rng``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from proxy.resilience.core import jittered_backoff


class IndexEvent(StrEnum):
    """What a blocking query's returned ``X-Consul-Index`` says about the response."""

    ADVANCED = "advanced"
    UNCHANGED = "unchanged"
    BACKWARDS = "backwards"
    NOT_POSITIVE = "not-positive"


@dataclass(frozen=True, slots=True)
class IndexStep:
    """The index to send next, and whether the response body is a view to use."""

    next_index: int
    use_body: bool
    event: IndexEvent


def step_index(previous: int, reported: int) -> IndexStep:
    """Apply Consul's blocking-query rules (HTTP API docs, "Blocking Queries").

    - An index lower than the one we sent went backwards (a snapshot restore, a new
      cluster, a server that lags): reset to 0 and re-fetch, without trusting this body.
    - An index of 0 or less is a Consul bug that would make every later query return at
      once: use the body, and carry on from 1.
    - The same index is a wake-up with no change. The body is still used: after a reset a
      write can land on the index we already hold, and the catalog feed drops a view whose
      entries did not change, so nothing is emitted for a true no-op.
    """
    if previous > 0 and reported < previous:
        return IndexStep(0, use_body=False, event=IndexEvent.BACKWARDS)
    if reported <= 0:
        return IndexStep(1, use_body=True, event=IndexEvent.NOT_POSITIVE)
    if reported == previous:
        return IndexStep(previous, use_body=True, event=IndexEvent.UNCHANGED)
    return IndexStep(reported, use_body=True, event=IndexEvent.ADVANCED)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Jittered exponential backoff: the n-th consecutive failure waits between half and all
    of ``min(cap, base * 2**(n-1))``, so replicas that failed together do not retry together."""

    base: float = 0.1
    cap: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError("backoff needs 0 < base <= cap")

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after ``failures`` consecutive failures (``failures >= 1``)."""
        if failures < 1:
            raise ValueError("failures must be at least 1")
        return jittered_backoff(failures, self.base, self.cap, rng)


def blocking_timeout(wait: float, margin: float) -> float:
    """How long a client waits for a blocking query before calling it hung.

    Consul holds a query up to ``wait`` plus a random ``wait/16`` of its own jitter; anything
    longer than that plus ``margin`` is a hang.
    """
    if wait <= 0 or margin <= 0:
        raise ValueError("wait and margin must be positive")
    return wait + wait / 16 + margin


def expired(deadlines: Mapping[str, float], now: float) -> tuple[str, ...]:
    """The registrations whose deadline has passed at ``now``, in a stable order."""
    return tuple(sorted(key for key, deadline in deadlines.items() if deadline <= now))


def deadline(now: float, ttl: float) -> float:
    """When a registration made or renewed at ``now`` with ``ttl`` seconds expires."""
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    return now + ttl
