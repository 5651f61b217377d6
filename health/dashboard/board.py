"""The dashboard's in-memory state: the control plane (or a test) writes it, the server reads it.

:class:`Board` implements :class:`~health.dashboard.model.DashboardState`. Writers replace the
probe and statistics views as they refresh (:meth:`Board.update`) and hand it every failover
decision (:meth:`Board.observe`), which feeds the current weights, the charts' time series, and
the timeline (only decisions worth showing: see :func:`~health.dashboard.model.worth_recording`).
Everything is bounded: the timeline keeps the newest entries, the series the last minutes.
Call it from the event loop's thread only.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from health.dashboard.model import (
    DECISIONS_IN_SNAPSHOT,
    DecisionEntry,
    Region,
    RouteWeights,
    RttLink,
    ServiceSeries,
    ServiceStats,
    Snapshot,
    worth_recording,
)
from health.failover.model import TOTAL_WEIGHT, Decision

__all__ = ["Board"]


@dataclass(slots=True)
class _Route:
    """What the board remembers of one (service, caller)."""

    last: Decision
    weights: RouteWeights
    # (wall time, expected latency per cluster, share per cluster)
    samples: deque[tuple[float, Mapping[str, float], Mapping[str, float]]]


class Board:
    """The live view one control plane's dashboard serves."""

    def __init__(
        self,
        cluster: str,
        *,
        clock: Callable[[], float] = time.time,
        keep_decisions: int = 500,
        window: float = 300.0,
        max_points: int = 300,
    ) -> None:
        if keep_decisions < 1 or max_points < 2 or window <= 0:
            raise ValueError("keep_decisions ≥ 1, max_points ≥ 2 and window > 0 are required")
        self._cluster = cluster
        self._clock = clock
        self._window = window
        self._max_points = max_points
        self._version = 0
        self._changed = asyncio.Event()
        self._regions: tuple[Region, ...] = ()
        self._rtt: tuple[RttLink, ...] = ()
        self._services: tuple[ServiceStats, ...] = ()
        self._routes: dict[tuple[str, str], _Route] = {}
        self._timeline: deque[DecisionEntry] = deque(maxlen=keep_decisions)
        self._next_id = 1
        self._snapshot: Snapshot | None = None

    @property
    def cluster(self) -> str:
        """The cluster whose control plane serves this dashboard."""
        return self._cluster

    @property
    def version(self) -> int:
        """Grows with every change."""
        return self._version

    def update(
        self,
        *,
        regions: Iterable[Region] | None = None,
        rtt: Iterable[RttLink] | None = None,
        services: Iterable[ServiceStats] | None = None,
    ) -> None:
        """Replace the parts given (the probes' and the statistics' latest views)."""
        if regions is not None:
            self._regions = tuple(regions)
        if rtt is not None:
            self._rtt = tuple(rtt)
        if services is not None:
            self._services = tuple(services)
        self._bump()

    def observe(
        self, service: str, caller: str, decision: Decision, *, at: float | None = None
    ) -> DecisionEntry | None:
        """Take one tick's decision for (service, caller); return its timeline entry if it
        made one. ``at`` is the wall-clock time of the tick (now by default)."""
        when = self._clock() if at is None else at
        key = (service, caller)
        route = self._routes.get(key)
        previous = None if route is None else route.last
        since = when if route is None or decision.changed else route.weights.since
        weights = RouteWeights(
            service=service,
            caller=caller,
            weights=dict(decision.weights),
            rule=decision.rule,
            mode=decision.state.mode.value,
            since=since,
        )
        sample = (
            when,
            dict(decision.expected_latency),
            {c: w / TOTAL_WEIGHT for c, w in decision.weights.items()},
        )
        if route is None:
            route = _Route(decision, weights, deque(maxlen=self._max_points))
            self._routes[key] = route
        route.last, route.weights = decision, weights
        route.samples.append(sample)
        while route.samples and route.samples[0][0] < when - self._window:
            route.samples.popleft()
        entry = None
        if worth_recording(previous, decision):
            entry = DecisionEntry.from_decision(self._next_id, service, caller, decision, when)
            self._next_id += 1
            self._timeline.append(entry)
        self._bump()
        return entry

    def snapshot(self) -> Snapshot:
        """The current view (built once per version)."""
        if self._snapshot is None or self._snapshot.version != self._version:
            self._snapshot = Snapshot(
                cluster=self._cluster,
                version=self._version,
                generated_at=self._clock(),
                regions=self._regions,
                rtt=self._rtt,
                services=self._services,
                routes=tuple(self._routes[k].weights for k in sorted(self._routes)),
                decisions=self.decisions(),
                series=tuple(_series(k, self._routes[k]) for k in sorted(self._routes)),
            )
        return self._snapshot

    def decisions(
        self, *, service: str | None = None, limit: int = DECISIONS_IN_SNAPSHOT, after: int = 0
    ) -> tuple[DecisionEntry, ...]:
        """Timeline entries with ``id > after``, of ``service`` if given, newest first."""
        found: list[DecisionEntry] = []
        for entry in reversed(self._timeline):
            if len(found) >= limit or entry.id <= after:
                break
            if service is None or entry.service == service:
                found.append(entry)
        return tuple(found)

    async def changed(self, version: int) -> int:
        """Wait until the version differs from ``version``; return the new one."""
        while self._version == version:
            await self._changed.wait()
        return self._version

    def _bump(self) -> None:
        self._version += 1
        # Wake every waiter, then arm a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()


def _series(key: tuple[str, str], route: _Route) -> ServiceSeries:
    latency: dict[str, list[tuple[float, float]]] = {}
    shares: dict[str, list[tuple[float, float]]] = {}
    for when, expected, weights in route.samples:
        for cluster, value in expected.items():
            latency.setdefault(cluster, []).append((when, value))
        for cluster, share in weights.items():
            shares.setdefault(cluster, []).append((when, share))
    return ServiceSeries(
        service=key[0],
        caller=key[1],
        latency={c: tuple(p) for c, p in latency.items()},
        weights={c: tuple(p) for c, p in shares.items()},
    )
