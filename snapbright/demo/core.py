"""The demo app's decisions: how slow and how flaky to be, and what its calls looked like.

- `Knobs`: added latency (fixed ± uniform jitter, never below zero) and an error rate; `plan`
  draws one request's delay and whether it fails. Changed at runtime by a `KnobsUpdate`.
- `CallWindow`: the caller's own view of its upstream calls over the last few seconds (count,
  errors, p50/p99 latency, which cluster answered), for the demo's "caller in one region".
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from pydantic import ConfigDict

from proxy.config.model import Duration, Share, Spec

__all__ = ["CallSummary", "CallWindow", "Knobs", "KnobsUpdate", "Plan", "plan"]


@dataclass(frozen=True, slots=True)
class Knobs:
    """How the app misbehaves: ``latency`` ± ``jitter`` seconds added to each request, and
    the share of requests answered with an error."""

    latency: float = 0.0
    jitter: float = 0.0
    error_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("latency", "jitter"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite duration >= 0, not {value!r}")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error rate must be between 0% and 100%, not {self.error_rate!r}")

    def to_json(self) -> dict[str, Any]:
        """As the knobs endpoint shows them."""
        return {
            "latency": _ms(self.latency),
            "jitter": _ms(self.jitter),
            "errorRate": self.error_rate,
        }


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000, 3):g}ms"


class Plan(NamedTuple):
    """What to do to one request: wait ``delay`` seconds, then fail or answer."""

    delay: float
    fail: bool


def plan(knobs: Knobs, rng: random.Random) -> Plan:
    """Draw one request's added delay and whether it fails."""
    delay = knobs.latency
    if knobs.jitter > 0.0:
        delay = max(0.0, delay + rng.uniform(-knobs.jitter, knobs.jitter))
    fail = knobs.error_rate > 0.0 and rng.random() < knobs.error_rate
    return Plan(delay, fail)


class KnobsUpdate(Spec):
    """A change to the knobs (``{"latency": "200ms", "errorRate": "20%"}``): only the fields
    given change; ``reset`` first goes back to the knobs the app started with."""

    model_config = ConfigDict(validate_by_name=True)

    latency: Duration | None = None
    jitter: Duration | None = None
    error_rate: Share | None = None
    reset: bool = False

    def apply(self, knobs: Knobs, initial: Knobs) -> Knobs:
        """``knobs`` (or ``initial``, on reset) with this change; `ValueError` if invalid."""
        changes = {
            name: value
            for name in ("latency", "jitter", "error_rate")
            if (value := getattr(self, name)) is not None
        }
        return replace(initial if self.reset else knobs, **changes)


class CallSummary(NamedTuple):
    """The caller's calls to one upstream over the window."""

    calls: int
    errors: int
    p50: float | None
    p99: float | None
    clusters: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        """As the caller reports it."""
        return {
            "calls": self.calls,
            "errors": self.errors,
            "p50": None if self.p50 is None else _ms(self.p50),
            "p99": None if self.p99 is None else _ms(self.p99),
            "clusters": dict(sorted(self.clusters.items())),
        }

    def line(self, upstream: str) -> str:
        """One log line: ``payments: 20 calls, 0 errors, p50 161ms p99 170ms, by us-west 20``."""
        latency = "" if self.p50 is None else f", p50 {_ms(self.p50)} p99 {_ms(self.p99 or 0.0)}"
        where = ", ".join(f"{cluster} {n}" for cluster, n in sorted(self.clusters.items()))
        return (
            f"{upstream}: {self.calls} calls, {self.errors} errors{latency}"
            f"{', by ' + where if where else ''}"
        )


class _Call(NamedTuple):
    at: float
    seconds: float
    ok: bool
    cluster: str | None


@dataclass(slots=True)
class CallWindow:
    """Calls to one upstream within the last ``span`` seconds."""

    span: float = 10.0
    _calls: deque[_Call] = field(default_factory=deque)

    def record(self, now: float, seconds: float, ok: bool, cluster: str | None) -> None:
        """A call that ended at ``now`` after ``seconds``; ``cluster`` that answered, if any."""
        self._calls.append(_Call(now, seconds, ok, cluster))
        self._expire(now)

    def summary(self, now: float) -> CallSummary:
        """Count, errors, latency percentiles and answering clusters over the window."""
        self._expire(now)
        durations = sorted(call.seconds for call in self._calls)
        clusters = Counter(call.cluster for call in self._calls if call.cluster is not None)
        return CallSummary(
            calls=len(self._calls),
            errors=sum(1 for call in self._calls if not call.ok),
            p50=_percentile(durations, 0.50),
            p99=_percentile(durations, 0.99),
            clusters=dict(clusters),
        )

    def _expire(self, now: float) -> None:
        while self._calls and self._calls[0].at <= now - self.span:
            self._calls.popleft()


def _percentile(ordered: list[float], q: float) -> float | None:
    # Nearest rank: the smallest value with at least q of the values at or below it.
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
