"""Request statistics the failover controller needs, aggregated per second in memory.

Per upstream service and per target cluster, each second: how many requests ended in each
outcome class (2xx, 3xx, 4xx, 5xx, connect failure, timeout) and a latency histogram. The
histogram has fixed log-spaced buckets shared by every proxy (100 µs to 60 s, each bucket
1.2 times wider than the one before, so any quantile is within ~9 % of the true value), so
histograms from many proxies and many seconds merge by adding counts.

- `StatsRecorder.record` (or `Series.record` on a series looked up once) is on the request
  path: a few integer additions and one logarithm, no allocation.
- `StatsRecorder.drain(now)` returns the closed one-second `StatsWindow`s, ready to stream.
- `SlidingStats` merges the windows of the last few seconds into a `StatsSummary`: rate,
  success rate, p50/p95/p99. The health layer uses it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

__all__ = [
    "MAX_LATENCY_S",
    "MIN_LATENCY_S",
    "RELATIVE_ERROR",
    "Histogram",
    "Outcome",
    "Series",
    "SlidingStats",
    "StatsRecorder",
    "StatsSummary",
    "StatsWindow",
    "outcome_of_status",
]

_log: Final = math.log
_ceil: Final = math.ceil

MIN_LATENCY_S: Final = 1e-4
"""Upper bound of the first bucket: anything this fast or faster is counted as 100 µs."""
MAX_LATENCY_S: Final = 60.0
"""Latencies above the last bucket (about 60.3 s) are counted as that bound."""
_GAMMA: Final = 1.2
RELATIVE_ERROR: Final = (_GAMMA - 1.0) / (_GAMMA + 1.0)
"""Largest relative error of a quantile estimate between the two bounds (about 9.1 %)."""

_LAST_BOUNDED: Final = _ceil(math.log(MAX_LATENCY_S / MIN_LATENCY_S) / math.log(_GAMMA))
# Bucket 0 holds [0, MIN]; bucket i holds (MIN·γ^(i-1), MIN·γ^i]; the last holds the rest.
_BUCKETS: Final = _LAST_BOUNDED + 2
_UPPER: Final = tuple(MIN_LATENCY_S * _GAMMA**i for i in range(_LAST_BOUNDED + 1))
# The estimate for a bucket is the value whose relative error to both bounds is the same.
_ESTIMATE: Final = (
    MIN_LATENCY_S,
    *(2.0 * upper / (_GAMMA + 1.0) for upper in _UPPER[1:]),
    _UPPER[-1],
)
_INV_MIN: Final = 1.0 / MIN_LATENCY_S
_INV_LOG_GAMMA: Final = 1.0 / math.log(_GAMMA)


_TOP: Final = _UPPER[-1]
_OVERFLOW: Final = _LAST_BOUNDED + 1


def _bucket(latency_s: float) -> int:
    if latency_s <= MIN_LATENCY_S:
        return 0
    if latency_s <= _TOP:
        return _ceil(_log(latency_s * _INV_MIN) * _INV_LOG_GAMMA)
    # Beyond the last bound, and also +inf and NaN (no comparison holds for it).
    return _OVERFLOW


class Outcome(IntEnum):
    """How one request ended; the value indexes the per-outcome counts."""

    HTTP_2XX = 0
    HTTP_3XX = 1
    HTTP_4XX = 2
    HTTP_5XX = 3
    CONNECT_FAILURE = 4
    TIMEOUT = 5

    @property
    def label(self) -> str:
        """The name used on the wire and in metrics: ``2xx`` … ``connect-failure``."""
        return _LABELS[self]

    @property
    def succeeded(self) -> bool:
        """Whether this counts as a success: the service answered, and not with a 5xx."""
        return self <= Outcome.HTTP_4XX


_LABELS: Final = ("2xx", "3xx", "4xx", "5xx", "connect-failure", "timeout")
_OUTCOMES: Final = len(_LABELS)
# 1xx only ends a request as 101 Switching Protocols, an upgrade that succeeded.
_BY_STATUS_CLASS: Final = (
    None,
    Outcome.HTTP_2XX,
    Outcome.HTTP_2XX,
    Outcome.HTTP_3XX,
    Outcome.HTTP_4XX,
    Outcome.HTTP_5XX,
)


def outcome_of_status(status: int) -> Outcome:
    """The outcome class of a final response status (100–599)."""
    if 100 <= status <= 599:
        outcome = _BY_STATUS_CLASS[status // 100]
        if outcome is not None:
            return outcome
    raise ValueError(f"not an HTTP status: {status!r}")


class Histogram:
    """Latency counts over the shared log-spaced buckets; merging two adds their counts."""

    __slots__ = ("counts",)

    def __init__(self, counts: list[int] | None = None) -> None:
        if counts is None:
            counts = [0] * _BUCKETS
        elif len(counts) != _BUCKETS:
            raise ValueError(f"a histogram has {_BUCKETS} buckets, not {len(counts)}")
        self.counts = counts

    @classmethod
    def of(cls, latencies_s: Iterable[float]) -> Histogram:
        """A histogram of the given latencies (seconds)."""
        histogram = cls()
        for latency in latencies_s:
            histogram.add(latency)
        return histogram

    def add(self, latency_s: float) -> None:
        """Count one latency (seconds)."""
        self.counts[_bucket(latency_s)] += 1

    @property
    def count(self) -> int:
        """How many latencies were counted."""
        return sum(self.counts)

    def merge(self, other: Histogram) -> Histogram:
        """A new histogram holding both."""
        return Histogram([a + b for a, b in zip(self.counts, other.counts, strict=True)])

    def absorb(self, other: Histogram) -> None:
        """Add the other histogram's counts to this one."""
        counts = self.counts
        for index, value in enumerate(other.counts):
            if value:
                counts[index] += value

    def quantile(self, q: float) -> float | None:
        """The latency at quantile ``q`` (nearest rank), or ``None`` when empty.

        Between 100 µs and 60 s the estimate is within `RELATIVE_ERROR` of the true value.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be between 0 and 1: {q!r}")
        total = self.count
        if total == 0:
            return None
        # The epsilon keeps q × n at an integer rank despite float rounding (0.95 × 100).
        rank = max(1, _ceil(q * total - 1e-9))
        seen = 0
        for index, value in enumerate(self.counts):
            seen += value
            if seen >= rank:
                return _ESTIMATE[index]
        raise AssertionError("unreachable: rank is at most the total count")

    def to_wire(self) -> list[int]:
        """A compact form: the first non-empty bucket, then the counts up to the last one."""
        counts = self.counts
        first = next((index for index, value in enumerate(counts) if value), None)
        if first is None:
            return []
        last = max(index for index, value in enumerate(counts) if value)
        return [first, *counts[first : last + 1]]

    @classmethod
    def from_wire(cls, values: Sequence[int]) -> Histogram:
        """The histogram `to_wire` described; bad input raises `ValueError`."""
        histogram = cls()
        if not values:
            return histogram
        first, *counts = values
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"histogram values must be non-negative integers: {value!r}")
        if first + len(counts) > _BUCKETS:
            raise ValueError(
                f"histogram of {len(counts)} counts from bucket {first} "
                f"does not fit in {_BUCKETS} buckets"
            )
        histogram.counts[first : first + len(counts)] = counts
        return histogram

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Histogram) and self.counts == other.counts

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Histogram.from_wire({self.to_wire()!r})"


@dataclass(frozen=True, slots=True)
class StatsWindow:
    """One closed second of requests from one upstream to one target cluster."""

    start: int
    """The second the window covers: ``[start, start + 1)`` on the recording clock."""
    upstream: str
    target_cluster: str
    counts: tuple[int, ...]
    """Requests per outcome, indexed by `Outcome`."""
    histogram: Histogram

    @property
    def requests(self) -> int:
        """Requests that ended in this second, whatever their outcome."""
        return sum(self.counts)


class Series:
    """The running second for one upstream and target cluster; a handle for the hot path."""

    __slots__ = (
        "_buckets",
        "_closed",
        "_counts",
        "_second",
        "_second_end",
        "target_cluster",
        "upstream",
    )

    def __init__(self, upstream: str, target_cluster: str, closed: list[StatsWindow]) -> None:
        self.upstream = upstream
        self.target_cluster = target_cluster
        self._closed = closed
        self._second = -(2**62)
        self._second_end = -math.inf
        self._counts = [0] * _OUTCOMES
        self._buckets = [0] * _BUCKETS

    def record(self, outcome: Outcome, latency_s: float, now: float) -> None:
        """Count one finished request: its outcome and its latency in seconds."""
        if now >= self._second_end:
            self._close(math.floor(now))
        # A timestamp from an earlier second (late completion) counts in the running one.
        self._counts[outcome] += 1
        # _bucket(latency_s), inlined for the request path.
        if latency_s <= MIN_LATENCY_S:
            self._buckets[0] += 1
        elif latency_s <= _TOP:
            self._buckets[_ceil(_log(latency_s * _INV_MIN) * _INV_LOG_GAMMA)] += 1
        else:
            self._buckets[_OVERFLOW] += 1

    def _close(self, next_second: int) -> None:
        if any(self._counts):
            self._closed.append(
                StatsWindow(
                    self._second,
                    self.upstream,
                    self.target_cluster,
                    tuple(self._counts),
                    Histogram(self._buckets),
                )
            )
            self._counts = [0] * _OUTCOMES
            self._buckets = [0] * _BUCKETS
        self._second = next_second
        self._second_end = next_second + 1.0


class StatsRecorder:
    """Per-second statistics for every upstream and target cluster this proxy calls."""

    __slots__ = ("_closed", "_series")

    def __init__(self) -> None:
        self._closed: list[StatsWindow] = []
        self._series: dict[str, dict[str, Series]] = {}

    def series(self, upstream: str, target_cluster: str) -> Series:
        """The series for one upstream and target cluster, created on first use."""
        by_target = self._series.get(upstream)
        if by_target is None:
            by_target = self._series[upstream] = {}
        series = by_target.get(target_cluster)
        if series is None:
            series = by_target[target_cluster] = Series(upstream, target_cluster, self._closed)
        return series

    def record(
        self,
        upstream: str,
        target_cluster: str,
        outcome: Outcome,
        latency_s: float,
        now: float,
    ) -> None:
        """Count one finished request (outcome, latency in seconds) ending at ``now``."""
        by_target = self._series.get(upstream)
        series = by_target.get(target_cluster) if by_target is not None else None
        if series is None:
            series = self.series(upstream, target_cluster)
        series.record(outcome, latency_s, now)

    def drain(self, now: float) -> list[StatsWindow]:
        """The windows closed by ``now`` and not drained before, oldest first.

        A window ``[s, s + 1)`` is closed once ``now >= s + 1``. Seconds without requests
        produce no window.
        """
        second = math.floor(now)
        for by_target in self._series.values():
            for series in by_target.values():
                if series._second < second:
                    series._close(second)
        closed = sorted(
            self._closed, key=lambda window: (window.start, window.upstream, window.target_cluster)
        )
        self._closed.clear()
        return closed


@dataclass(frozen=True, slots=True)
class StatsSummary:
    """Requests to one target over the last seconds, as the health layer reads them."""

    span_s: int
    requests: int
    counts: tuple[int, ...]
    """Requests per outcome, indexed by `Outcome`."""
    rate_per_s: float
    success_rate: float | None
    """Share of requests answered without a 5xx, connect failure or timeout."""
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None


class SlidingStats:
    """The windows of the last ``span_s`` seconds for one key, merged on demand.

    Windows for the same second (from several proxies) add up. At ``now`` the view covers
    the closed seconds ``[floor(now) - span_s, floor(now))``.
    """

    __slots__ = ("_span", "_windows")

    def __init__(self, span_s: int = 10) -> None:
        if isinstance(span_s, bool) or not isinstance(span_s, int) or span_s < 1:
            raise ValueError(f"span_s must be a whole number of seconds >= 1: {span_s!r}")
        self._span = span_s
        self._windows: dict[int, tuple[list[int], Histogram]] = {}

    def add(self, window: StatsWindow) -> None:
        """Take one window (possibly one of several for the same second)."""
        held = self._windows.get(window.start)
        if held is None:
            self._windows[window.start] = (
                list(window.counts),
                Histogram(list(window.histogram.counts)),
            )
            return
        counts, histogram = held
        for index, value in enumerate(window.counts):
            counts[index] += value
        histogram.absorb(window.histogram)

    def summary(self, now: float) -> StatsSummary:
        """Rate, success rate and latency quantiles over the last ``span_s`` closed seconds."""
        end = math.floor(now)
        begin = end - self._span
        for start in [start for start in self._windows if start < begin]:
            del self._windows[start]
        counts = [0] * _OUTCOMES
        histogram = Histogram()
        for start, (window_counts, window_histogram) in self._windows.items():
            if start < end:
                for index, value in enumerate(window_counts):
                    counts[index] += value
                histogram.absorb(window_histogram)
        requests = sum(counts)
        succeeded = sum(counts[outcome] for outcome in Outcome if outcome.succeeded)
        return StatsSummary(
            span_s=self._span,
            requests=requests,
            counts=tuple(counts),
            rate_per_s=requests / self._span,
            success_rate=succeeded / requests if requests else None,
            p50_s=histogram.quantile(0.5),
            p95_s=histogram.quantile(0.95),
            p99_s=histogram.quantile(0.99),
        )
