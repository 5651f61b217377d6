"""The probe state machine of one target: results in, alive or not (and since when) out.

A target is probed every ``interval``, jittered by up to ``± jitter × interval`` so that many
control planes do not probe in lockstep. It goes **down** after ``down_after`` consecutive
failures and comes back **up** only after ``up_after`` consecutive successes: one lucky probe
never brings a flapping target back (Linkerd recovers on a single success). A target never
probed is ``unknown``; its first success is first contact, not recovery, so it is up at once,
and ``down_after`` failures take it down like any other.

RTT is kept as an EWMA of successful probes (``rtt_alpha`` weighs the newest sample) with the
last ``samples`` values beside it. Failures, timeouts included, carry no RTT.

Everything here is a value: no clock, no sockets. :mod:`health.probe.prober` runs the I/O.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum


class ProbeError(ValueError):
    """Probe settings or results that make no sense; the message names the field."""


class ProbeState(StrEnum):
    """Where a target stands."""

    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    """How often a target is probed, how long a probe may take, and the thresholds."""

    interval: float = 1.0
    timeout: float = 1.0
    jitter: float = 0.1
    """Each delay is ``interval × (1 ± jitter)``, uniformly; a fraction in [0, 1)."""
    down_after: int = 3
    up_after: int = 3
    rtt_alpha: float = 0.3
    samples: int = 10

    def __post_init__(self) -> None:
        if not (math.isfinite(self.interval) and self.interval > 0):
            raise ProbeError(f"interval: must be a positive number of seconds: {self.interval!r}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ProbeError(f"timeout: must be a positive number of seconds: {self.timeout!r}")
        if not 0 <= self.jitter < 1:
            raise ProbeError(f"jitter: must be a fraction of the interval in [0, 1): {self.jitter}")
        for name, value in (
            ("down_after", self.down_after),
            ("up_after", self.up_after),
            ("samples", self.samples),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ProbeError(f"{name}: must be a whole number >= 1: {value!r}")
        if not 0 < self.rtt_alpha <= 1:
            raise ProbeError(f"rtt_alpha: must be in (0, 1]: {self.rtt_alpha!r}")

    def next_probe_at(self, now: float, rng: random.Random) -> float:
        """When to probe next after a probe at ``now``: one interval, jittered."""
        if self.jitter == 0:
            return now + self.interval
        return now + self.interval * (1.0 + rng.uniform(-self.jitter, self.jitter))


@dataclass(frozen=True, slots=True)
class ProbeStatus:
    """What is known about one target after its probes so far."""

    state: ProbeState = ProbeState.UNKNOWN
    since: float | None = None
    """When ``state`` was entered (``None`` while unknown)."""
    rtt: float | None = None
    """The EWMA of successful probes' round trips, in seconds."""
    last_rtt: float | None = None
    recent: tuple[float, ...] = ()
    """The last round trips, oldest first, at most ``ProbeSettings.samples`` of them."""
    successes: int = 0
    """Consecutive successes (0 after a failure)."""
    failures: int = 0
    """Consecutive failures (0 after a success)."""
    last_probe_at: float | None = None
    last_error: str | None = None

    @property
    def alive(self) -> bool:
        """Whether the target counts as up."""
        return self.state is ProbeState.UP

    def succeeded(self, rtt: float, now: float, settings: ProbeSettings) -> ProbeStatus:
        """The status after a probe that answered in ``rtt`` seconds at ``now``."""
        if not (math.isfinite(rtt) and rtt >= 0):
            raise ProbeError(f"rtt: must be a finite number of seconds >= 0: {rtt!r}")
        successes = self.successes + 1
        ewma = (
            rtt
            if self.rtt is None
            else settings.rtt_alpha * rtt + (1 - settings.rtt_alpha) * (self.rtt)
        )
        state, since = self.state, self.since
        # First contact is not recovery; coming back from down needs up_after in a row.
        if self.state is ProbeState.UNKNOWN or (
            self.state is ProbeState.DOWN and successes >= settings.up_after
        ):
            state, since = ProbeState.UP, now
        return replace(
            self,
            state=state,
            since=since,
            rtt=ewma,
            last_rtt=rtt,
            recent=(*self.recent, rtt)[-settings.samples :],
            successes=successes,
            failures=0,
            last_probe_at=now,
            last_error=None,
        )

    def failed(self, reason: str, now: float, settings: ProbeSettings) -> ProbeStatus:
        """The status after a probe that failed (refused, timed out, rejected) at ``now``."""
        failures = self.failures + 1
        state, since = self.state, self.since
        if self.state is not ProbeState.DOWN and failures >= settings.down_after:
            state, since = ProbeState.DOWN, now
        return replace(
            self,
            state=state,
            since=since,
            successes=0,
            failures=failures,
            last_probe_at=now,
            last_error=reason,
        )


@dataclass(frozen=True, slots=True)
class ProbeLatency:
    """Latency percentiles over the recent probe round trips of a service's endpoints: the
    evidence an idle copy has (no callers, so no request statistics)."""

    p50: float
    p95: float
    p99: float
    samples: int


def probe_latency(statuses: Iterable[ProbeStatus]) -> ProbeLatency | None:
    """Percentiles (nearest rank) over the ``recent`` round trips of every endpoint that is up;
    ``None`` without any. A down endpoint's old round trips say nothing about what callers
    would get now, and an unknown one has none."""
    values = sorted(rtt for s in statuses if s.state is ProbeState.UP for rtt in s.recent)
    if not values:
        return None
    return ProbeLatency(
        p50=_nearest_rank(values, 0.50),
        p95=_nearest_rank(values, 0.95),
        p99=_nearest_rank(values, 0.99),
        samples=len(values),
    )


def _nearest_rank(ordered: list[float], q: float) -> float:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
