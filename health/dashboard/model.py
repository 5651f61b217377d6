"""What the regional health dashboard shows, as values, and the JSON the API serves them as.

The control plane fills a :class:`DashboardState` from its pieces (gateway probes, regional
statistics, the failover loop's journal); the server only reads it. A :class:`Snapshot` is one
consistent view: the regions and their status, the RTT between clusters, per service and region
latency percentiles, success and request rates, the current weights per caller cluster, the
recent decisions with their explanations, and short time series for the charts.

Every name in here (clusters, services, explanations) may come from a remote cluster: the page
renders all of it as text. JSON keys are camelCase; latencies are milliseconds, times are Unix
seconds, weights are basis points summing to 10000, rates are between 0 and 1 or per second.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Literal, Protocol

from federation.peering.model import HealthSource
from health.failover.model import TOTAL_WEIGHT, Decision, FailoverPolicy, Rule
from health.stats.core import SHORT_SPAN_S, HealthView

Metric = Literal["p50", "p95", "p99", "successRate", "requestRate"]
"""A column of the service table that can be flagged as degraded."""

RowSource = Literal["callers", "peer", "probes"]
"""What a service row's figures rest on: our callers' requests to that region; the region's
own published summary (our callers sent it nothing); or that summary resting on its probes of
an idle copy."""

Point = tuple[float, float]
"""A time series point: (Unix seconds, value)."""

DECISIONS_IN_SNAPSHOT: Final = 50
"""How many of the newest decisions a snapshot carries (the API pages further)."""


class RegionStatus(StrEnum):
    """How a region looks from this cluster; the page shows it in words and icons, not colour
    alone."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class Region:
    """One cluster of the mesh as this cluster sees it; ``detail`` says why in a few words."""

    name: str
    status: RegionStatus
    local: bool = False
    detail: str = ""


@dataclass(frozen=True, slots=True)
class RttLink:
    """The round trip from one cluster's gateway to another's; ``rtt`` is ``None`` when the
    probe has no answer (the link is down)."""

    source: str
    target: str
    rtt: float | None

    @property
    def alive(self) -> bool:
        """Whether the last probes answered."""
        return self.rtt is not None


@dataclass(frozen=True, slots=True)
class ServiceStats:
    """A service served from ``region`` as seen by callers in ``caller``, over the stats window.

    Latencies in seconds (``None`` when nothing was measured); ``degraded`` names the metrics
    past the service's failover thresholds, which the page highlights. ``source`` says what the
    figures rest on (see :data:`RowSource`); with ``peer`` or ``probes`` they are the region's
    own (without the network between) and ``request_rate`` is all of its callers'.
    """

    service: str
    caller: str
    region: str
    p50: float | None
    p95: float | None
    p99: float | None
    success_rate: float | None
    request_rate: float
    degraded: frozenset[Metric] = frozenset()
    source: RowSource = "callers"


@dataclass(frozen=True, slots=True)
class RouteWeights:
    """Where one caller cluster's traffic for a service goes now, and the rule that set it."""

    service: str
    caller: str
    weights: Mapping[str, int]
    rule: Rule
    mode: str
    since: float


@dataclass(frozen=True, slots=True)
class DecisionEntry:
    """One failover decision in the timeline: when, which rule, old and new weights, and why.

    ``id`` increases with every entry, so a client can ask for what it missed.
    """

    id: int
    service: str
    caller: str
    at: float
    rule: Rule
    previous_weights: Mapping[str, int]
    weights: Mapping[str, int]
    explanation: str
    transition: str | None = None
    expected_latency: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_decision(
        cls, entry_id: int, service: str, caller: str, decision: Decision, at: float
    ) -> DecisionEntry:
        """An entry for ``decision``; ``at`` is the wall-clock time (the core's ``now`` may be a
        loop clock)."""
        return cls(
            id=entry_id,
            service=service,
            caller=caller,
            at=at,
            rule=decision.rule,
            previous_weights=dict(decision.previous_weights),
            weights=dict(decision.weights),
            explanation=decision.explanation,
            transition=None if decision.transition is None else decision.transition.value,
            expected_latency=dict(decision.expected_latency),
        )


@dataclass(frozen=True, slots=True)
class ServiceSeries:
    """The last minutes of one (service, caller): expected latency (seconds) and share of
    traffic (0..1) per target cluster."""

    service: str
    caller: str
    latency: Mapping[str, tuple[Point, ...]]
    weights: Mapping[str, tuple[Point, ...]]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent view of everything the dashboard shows. ``version`` grows on every
    change."""

    cluster: str
    version: int
    generated_at: float
    regions: tuple[Region, ...] = ()
    rtt: tuple[RttLink, ...] = ()
    services: tuple[ServiceStats, ...] = ()
    routes: tuple[RouteWeights, ...] = ()
    decisions: tuple[DecisionEntry, ...] = ()
    series: tuple[ServiceSeries, ...] = ()


class DashboardState(Protocol):
    """What the dashboard server reads; the control plane (or a test) provides it."""

    @property
    def cluster(self) -> str:
        """The cluster whose control plane serves this dashboard."""
        ...

    @property
    def version(self) -> int:
        """Grows whenever anything in :meth:`snapshot` changes."""
        ...

    def snapshot(self) -> Snapshot:
        """The current view (its ``decisions`` are the newest first, at most
        :data:`DECISIONS_IN_SNAPSHOT`)."""
        ...

    def decisions(
        self, *, service: str | None = None, limit: int = DECISIONS_IN_SNAPSHOT, after: int = 0
    ) -> tuple[DecisionEntry, ...]:
        """Recorded decisions with ``id > after``, of ``service`` if given, newest first."""
        ...

    async def changed(self, version: int) -> int:
        """Wait until the version differs from ``version``; return the new version."""
        ...


# --- Deriving what the page highlights ---

# The table has no p90 column; p95 is the nearest (and never below p90).
_LATENCY_COLUMN: Final[Mapping[str, Literal["p50", "p95", "p99"]]] = {
    "p50": "p50",
    "p90": "p95",
    "p95": "p95",
    "p99": "p99",
}


def worth_recording(previous: Decision | None, decision: Decision) -> bool:
    """Whether a tick's decision belongs in the timeline: it moved weights, started a
    transition, or fired a new rule other than ``hold`` (so a waiting state such as
    ``exit-pending`` shows once, not every second, and plain holds not at all).

    ``no-local-data`` as a route's first decision is a start-up (nothing has arrived yet), not
    news: it shows only when data that was there stops."""
    if decision.changed or decision.transition is not None:
        return True
    if decision.rule is Rule.HOLD:
        return False
    if previous is None:
        return decision.rule is not Rule.NO_LOCAL_DATA
    return decision.rule is not previous.rule


ALL_COPIES_MAX = 200


def service_rows(
    view: HealthView,
    now: float,
    policies: Mapping[str, FailoverPolicy],
    *,
    span_s: int = SHORT_SPAN_S,
) -> tuple[ServiceStats, ...]:
    """Every row of the services table at ``now``: per (service, caller, region) what our
    callers measured over the last ``span_s`` seconds, then every peer's copy that our callers
    sent nothing to, from the summary its cluster publishes (no figures before one arrives): a
    copy only a peer serves, or one we do not call there, still has its row."""
    rows: list[ServiceStats] = []
    for key in sorted(
        view.stats.traffic_keys(), key=lambda k: (k.service, k.caller_cluster, k.target_cluster)
    ):
        traffic = view.stats.stats(key.service, key.caller_cluster, key.target_cluster, now, span_s)
        rows.append(
            _row(
                key.service,
                key.caller_cluster,
                key.target_cluster,
                (traffic.p50, traffic.p95, traffic.p99),
                traffic.success_rate,
                traffic.rate_per_s,
                policies.get(key.service),
                "callers",
            )
        )
    measured = {(r.service, r.caller, r.region) for r in rows}
    # Beyond ALL_COPIES_MAX imported services, only the copies of services we serve or call:
    # a cluster importing ten thousand services it never calls neither builds nor shows a row
    # for each of them every second.
    wanted = None
    if view.remote_count() > ALL_COPIES_MAX:
        wanted = {r.service for r in rows} | {*view.local_services()}
    for service, copy in view.remote_copies(wanted):
        if (service, view.cluster, copy.cluster) in measured:
            continue
        summary = copy.summary
        latencies: tuple[float | None, float | None, float | None] = (None, None, None)
        success: float | None = None
        rate = 0.0
        source: RowSource = "peer"
        if summary is not None:
            rate = summary.request_rate
            if summary.source is HealthSource.PROBES:
                source = "probes"
            if summary.source is HealthSource.PROBES or summary.request_rate > 0:
                # Without requests or probes a summary's zeros mean "nothing measured".
                latencies = (
                    summary.latency_p50_seconds,
                    summary.latency_p95_seconds,
                    summary.latency_p99_seconds,
                )
            if summary.request_rate > 0:
                success = summary.success_rate
        rows.append(
            _row(
                service,
                view.cluster,
                copy.cluster,
                latencies,
                success,
                rate,
                policies.get(service),
                source,
            )
        )
    return tuple(rows)


def _row(
    service: str,
    caller: str,
    region: str,
    latencies: tuple[float | None, float | None, float | None],
    success_rate: float | None,
    request_rate: float,
    policy: FailoverPolicy | None,
    source: RowSource,
) -> ServiceStats:
    p50, p95, p99 = latencies
    return ServiceStats(
        service=service,
        caller=caller,
        region=region,
        p50=p50,
        p95=p95,
        p99=p99,
        success_rate=success_rate,
        request_rate=request_rate,
        degraded=degraded_metrics(policy, p50=p50, p95=p95, p99=p99, success_rate=success_rate),
        source=source,
    )


def degraded_metrics(
    policy: FailoverPolicy | None,
    *,
    p50: float | None,
    p95: float | None,
    p99: float | None,
    success_rate: float | None,
) -> frozenset[Metric]:
    """The metrics past the policy's enter thresholds: its latency percentile (a p90 trigger is
    read on the p95 column, the nearest) and its error rate (on the success rate)."""
    if policy is None:
        return frozenset()
    triggers = policy.spec.triggers
    flagged: set[Metric] = set()
    if triggers.latency is not None:
        column = _LATENCY_COLUMN[triggers.latency.percentile]
        value = {"p50": p50, "p95": p95, "p99": p99}[column]
        if value is not None and value > triggers.latency.enter:
            flagged.add(column)
    if (
        triggers.error_rate is not None
        and success_rate is not None
        and 1.0 - success_rate > triggers.error_rate.enter
    ):
        flagged.add("successRate")
    return frozenset(flagged)


def region_status(*, reachable: bool, degraded_services: int) -> RegionStatus:
    """Unreachable without a live gateway; degraded when any service there is past its
    thresholds; healthy otherwise."""
    if not reachable:
        return RegionStatus.UNREACHABLE
    return RegionStatus.DEGRADED if degraded_services else RegionStatus.HEALTHY


# --- JSON (the shapes deploy/openapi/dashboard.yaml documents) ---


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _weights_json(weights: Mapping[str, int]) -> list[dict[str, Any]]:
    return [{"cluster": c, "weight": w} for c, w in sorted(weights.items())]


def _points(points: tuple[Point, ...], scale: float) -> list[list[float]]:
    return [[round(t, 3), round(v * scale, 3)] for t, v in points]


def decision_json(entry: DecisionEntry) -> dict[str, Any]:
    """One timeline entry as the API serves it."""
    return {
        "id": entry.id,
        "service": entry.service,
        "caller": entry.caller,
        "at": round(entry.at, 3),
        "rule": entry.rule.value,
        "transition": entry.transition,
        "previousWeights": _weights_json(entry.previous_weights),
        "weights": _weights_json(entry.weights),
        "explanation": entry.explanation,
        "expectedLatencyMs": {c: _ms(v) for c, v in sorted(entry.expected_latency.items())},
    }


def snapshot_json(snapshot: Snapshot) -> dict[str, Any]:
    """The whole view as ``GET /api/v1/state`` serves it."""
    return {
        "cluster": snapshot.cluster,
        "version": snapshot.version,
        "generatedAt": round(snapshot.generated_at, 3),
        "totalWeight": TOTAL_WEIGHT,
        "regions": [
            {"name": r.name, "status": r.status.value, "local": r.local, "detail": r.detail}
            for r in snapshot.regions
        ],
        "rtt": [
            {"from": link.source, "to": link.target, "rttMs": _ms(link.rtt), "alive": link.alive}
            for link in snapshot.rtt
        ],
        "services": [
            {
                "service": s.service,
                "caller": s.caller,
                "region": s.region,
                "p50Ms": _ms(s.p50),
                "p95Ms": _ms(s.p95),
                "p99Ms": _ms(s.p99),
                "successRate": s.success_rate,
                "requestRate": round(s.request_rate, 3),
                "degraded": sorted(s.degraded),
                "source": s.source,
            }
            for s in snapshot.services
        ],
        "routes": [
            {
                "service": r.service,
                "caller": r.caller,
                "weights": _weights_json(r.weights),
                "rule": r.rule.value,
                "mode": r.mode,
                "since": round(r.since, 3),
            }
            for r in snapshot.routes
        ],
        "decisions": [decision_json(d) for d in snapshot.decisions],
        "series": [
            {
                "service": s.service,
                "caller": s.caller,
                "latencyMs": {c: _points(p, 1000.0) for c, p in sorted(s.latency.items())},
                "weights": {c: _points(p, 1.0) for c, p in sorted(s.weights.items())},
            }
            for s in snapshot.series
        ],
    }
