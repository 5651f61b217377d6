"""Regional statistics: what callers see of each service, per caller and target cluster.

The sidecars stream one :class:`~proxy.stats.core.StatsWindow` per second, per upstream
service and target cluster; the control plane adds the caller cluster (the sidecar's own) and
keeps them in :class:`RegionalStats`. For each (service, caller cluster, target cluster) it
holds a ring of per-second merged windows, ``horizon_s`` seconds long (plus the slack for
clock skew below): memory is bounded by the horizon times the number of keys, and keys idle
for a whole horizon are dropped. A query
over a sliding span (e.g. the last 10 s, the last 60 s) merges the histograms of those seconds
and reads the percentiles from the merged histogram: percentiles are never averaged.

From those statistics, the gateway probes and the summaries peers publish,
:func:`observations` builds what the failover core sees for one (service, caller cluster),
and :func:`health_summary` builds what this cluster publishes about its own copy of a service.

**Expected latency of a remote target.** The core adds a target's ``rtt`` to its service
latency. For a remote target the service latency is the remote cluster's *own* published
percentile for the service (from its health summary), and the RTT is our gateway probe's
EWMA to that peer. We do not use what our callers measured to the remote target minus the
RTT: in steady state our callers send it nothing (all traffic is local), so exactly when the
controller must decide whether to move there would be no evidence; the summary rests on all
of the remote cluster's own traffic. Consequences, each tested:

- no summary from the peer (or no RTT yet) is no evidence: the target is not chosen for
  latency, though a hard local failure may still send it traffic while its gateway is up;
- the summary's evidence is its request rate times its span; its freshness is when we
  received it, on our clock;
- a gateway probe that is down makes the target unusable (0 healthy endpoints);
- errors on the path (the gateway, the WAN) are invisible to the peer: when our callers have
  sent the target enough requests themselves, the higher of the two error rates counts.

**An idle copy.** A remote copy with no callers of its own has no request statistics, so its
summary would carry no evidence and it would never be chosen, however slow our local copy
gets. Its cluster probes its local endpoints (:class:`~health.probe.prober.EndpointTarget`);
when fewer than ``min_samples`` requests reached the copy in the span, :func:`health_summary`
publishes the probes' round trips instead, marked ``source: probes`` with their count. The
receiver reads them as the service latency (plus the RTT, as for any remote target) with the
probe count as its evidence, and the controller's explanation says the figure came from
probes.

**Local endpoints that cannot be reached.** Registrations lapse only after their TTL, but our
sidecars see dead local replicas at once: a refused connect is counted (``connect-failure``)
and the endpoint taken out of rotation. When over the last ``UNREACHABLE_SPAN_S`` seconds our
callers' requests to the local copy were all connect failures, at least
``UNREACHABLE_MIN_FAILURES`` of them, the local copy counts as having no healthy endpoint,
whatever the registry still says. (One dead endpoint among live ones never does this: the
others answer; and since a sidecar retries and then avoids a dead endpoint, the callers'
requests themselves did not fail.)

Everything here is pure: ``now`` is passed in, on the same clock as the windows' seconds (the
stream server re-stamps windows on receipt when a sidecar's clock is not ours). A window up
to ``SKEW_S`` ahead of our clock is kept (a sidecar closes its second by its own clock, a hair
before ours); queries count only seconds closed on our clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from operator import add

from federation.peering.model import HealthSource, ServiceHealth, ServiceKey
from health.failover.model import FailoverPolicy, Observations, TargetObservation
from health.probe.core import ProbeLatency, ProbeState, ProbeStatus
from proxy.stats.core import Histogram, Outcome, StatsWindow

SHORT_SPAN_S = 10
"""The span the controller decides on and summaries are published over."""
LONG_SPAN_S = 60
"""The longer view, for people and the dashboard."""

ENTER_SPAN_S = 1
"""The short span the controller reads to *enter* degraded by default: the newest closed
second (a FailoverPolicy sets its own, ``evidence.enterSpan``). Longer spans would keep a
one-second spike in view (and over the threshold) for as many ticks."""

PUBLISHED_MIN_SAMPLES = 20
"""Below this many requests in the span, a summary publishes our probes' latencies instead
(when we probe the copy). A receiver's policy needs ``evidence.minSamples`` requests to read
request latencies (the example's 20): a copy between this and that is known by neither, so
keep this at least as high as the policies in the mesh ask."""

SKEW_S = 1
"""How many seconds ahead of ``now`` a window may start and still be kept."""
UNREACHABLE_SPAN_S = 3
"""Recent seconds in which our callers' local requests all failing to connect means down."""
UNREACHABLE_MIN_FAILURES = 3
"""At least this many connect failures in that span (one dead endpoint is not the copy)."""

_OUTCOMES = len(Outcome)
_SUCCEEDED = tuple(outcome for outcome in Outcome if outcome.succeeded)


@dataclass(frozen=True, slots=True)
class TrafficKey:
    """Requests from callers in ``caller_cluster`` to ``service`` served in ``target_cluster``."""

    service: str
    caller_cluster: str
    target_cluster: str


@dataclass(frozen=True, slots=True)
class TrafficStats:
    """Requests over the last ``span_s`` closed seconds, from merged per-second histograms."""

    span_s: int
    requests: int
    failures: int
    """Requests answered with a 5xx, a connect failure or a timeout."""
    rate_per_s: float
    success_rate: float | None
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None
    last_at: float | None
    """The end of the newest second with requests in the horizon (freshness), if any."""
    connect_failures: int = 0
    """Requests whose endpoint could not be connected to (among ``failures``)."""

    @property
    def error_rate(self) -> float | None:
        """The share of failed requests, or ``None`` without requests."""
        return None if self.success_rate is None else 1.0 - self.success_rate


class _Ring:
    """``size`` slots of per-second merged windows, slot = second mod size."""

    __slots__ = ("counts", "histograms", "newest", "seconds")

    def __init__(self, size: int) -> None:
        self.seconds: list[int | None] = [None] * size
        self.counts: list[list[int]] = [[0] * _OUTCOMES for _ in range(size)]
        self.histograms: list[Histogram] = [Histogram() for _ in range(size)]
        self.newest: int | None = None

    def add(self, window: StatsWindow) -> None:
        slot = window.start % len(self.seconds)
        held = self.seconds[slot]
        if held is not None and held > window.start:
            return  # older than the horizon this slot already moved past
        if held != window.start:
            # Reuse the slot's lists: the ring allocates nothing after its first horizon.
            self.seconds[slot] = window.start
            self.counts[slot][:] = [0] * _OUTCOMES
            self.histograms[slot].counts[:] = [0] * len(self.histograms[slot].counts)
        counts = self.counts[slot]
        counts[:] = map(add, counts, window.counts)
        self.histograms[slot].absorb(window.histogram)
        if self.newest is None or window.start > self.newest:
            self.newest = window.start

    def merge_into(
        self, begin: int, end: int, counts: list[int], histogram: Histogram | None
    ) -> None:
        """Add the seconds in [begin, end) to ``counts``, and to ``histogram`` unless None."""
        size = len(self.seconds)
        # Visit only the span's slots: a 10 s query reads 10 slots, not the whole ring.
        for second in range(max(begin, end - size), end):
            slot = second % size
            if self.seconds[slot] == second:
                counts[:] = map(add, counts, self.counts[slot])
                if histogram is not None:
                    histogram.absorb(self.histograms[slot])

    @property
    def held(self) -> int:
        return sum(second is not None for second in self.seconds)


class RegionalStats:
    """Per (service, caller cluster, target cluster): a bounded ring of per-second windows."""

    def __init__(self, horizon_s: int = LONG_SPAN_S, *, max_keys: int = 10_000) -> None:
        if isinstance(horizon_s, bool) or not isinstance(horizon_s, int) or horizon_s < 1:
            raise ValueError(f"horizon_s must be a whole number of seconds >= 1: {horizon_s!r}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1: {max_keys!r}")
        self._horizon = horizon_s
        self._max_keys = max_keys
        self._rings: dict[TrafficKey, _Ring] = {}
        # Queries are per service: this keeps them from scanning every key in the mesh.
        self._by_service: dict[str, set[TrafficKey]] = {}

    @property
    def horizon_s(self) -> int:
        """How many seconds are kept per key."""
        return self._horizon

    def add(self, caller_cluster: str, window: StatsWindow, now: float) -> bool:
        """Take one closed second from a sidecar in ``caller_cluster``.

        Returns ``False`` (and keeps nothing) for a window older than the horizon, one more
        than ``SKEW_S`` ahead of ``now``, or a new key beyond ``max_keys``.
        """
        second = math.floor(now)
        if not second - self._horizon <= window.start <= second + SKEW_S:
            return False
        key = TrafficKey(window.upstream, caller_cluster, window.target_cluster)
        ring = self._rings.get(key)
        if ring is None:
            if len(self._rings) >= self._max_keys:
                self.prune(now)
                if len(self._rings) >= self._max_keys:
                    return False
            # The slack keeps windows from ahead of our clock from evicting the oldest second.
            ring = self._rings[key] = _Ring(self._horizon + SKEW_S + 1)
            self._by_service.setdefault(key.service, set()).add(key)
        ring.add(window)
        return True

    def prune(self, now: float) -> None:
        """Forget keys without requests for a whole horizon."""
        oldest = math.floor(now) - self._horizon
        idle = [k for k, r in self._rings.items() if r.newest is None or r.newest < oldest]
        for key in idle:
            del self._rings[key]
            keys = self._by_service[key.service]
            keys.discard(key)
            if not keys:
                del self._by_service[key.service]

    def traffic_keys(self) -> frozenset[TrafficKey]:
        """Every key with windows held."""
        return frozenset(self._rings)

    @property
    def windows_held(self) -> int:
        """How many per-second windows are held in all (at most horizon + 2 per key)."""
        return sum(ring.held for ring in self._rings.values())

    def stats(
        self,
        service: str,
        caller_cluster: str,
        target_cluster: str,
        now: float,
        span_s: int,
        *,
        latency: bool = True,
    ) -> TrafficStats:
        """Requests from ``caller_cluster`` to ``service`` in ``target_cluster`` over the last
        ``span_s`` closed seconds at ``now``.

        ``latency=False`` leaves the histograms out (p50…p99 are None): for a caller that
        reads only counts and rates, at a fraction of the cost."""
        key = TrafficKey(service, caller_cluster, target_cluster)
        return self._merged([key], now, span_s, latency)

    def service_stats(
        self, service: str, target_cluster: str, now: float, span_s: int, *, latency: bool = True
    ) -> TrafficStats:
        """Requests from every caller cluster to ``service`` in ``target_cluster``."""
        keys = [k for k in self._by_service.get(service, ()) if k.target_cluster == target_cluster]
        return self._merged(keys, now, span_s, latency)

    def caller_stats(
        self, service: str, caller_cluster: str, now: float, span_s: int, *, latency: bool = True
    ) -> TrafficStats:
        """Requests from ``caller_cluster`` to ``service``, whichever cluster served them."""
        keys = [k for k in self._by_service.get(service, ()) if k.caller_cluster == caller_cluster]
        return self._merged(keys, now, span_s, latency)

    def _merged(
        self, keys: Iterable[TrafficKey], now: float, span_s: int, latency: bool
    ) -> TrafficStats:
        if (
            isinstance(span_s, bool)
            or not isinstance(span_s, int)
            or not 1 <= span_s <= self._horizon
        ):
            raise ValueError(f"span_s must be a whole number of seconds in [1, {self._horizon}]")
        end = math.floor(now)
        begin = end - span_s
        counts = [0] * _OUTCOMES
        histogram = Histogram() if latency else None
        newest: int | None = None
        for key in keys:
            ring = self._rings.get(key)
            if ring is None:
                continue
            ring.merge_into(begin, end, counts, histogram)
            if ring.newest is not None and ring.newest >= end - self._horizon:
                newest = ring.newest if newest is None else max(newest, ring.newest)
        requests = sum(counts)
        succeeded = sum(counts[outcome] for outcome in _SUCCEEDED)
        return TrafficStats(
            span_s=span_s,
            requests=requests,
            failures=requests - succeeded,
            rate_per_s=requests / span_s,
            success_rate=succeeded / requests if requests else None,
            p50=None if histogram is None else histogram.quantile(0.50),
            p90=None if histogram is None else histogram.quantile(0.90),
            p95=None if histogram is None else histogram.quantile(0.95),
            p99=None if histogram is None else histogram.quantile(0.99),
            last_at=None if newest is None else float(newest + 1),
            connect_failures=counts[Outcome.CONNECT_FAILURE],
        )


# --- What the failover core sees ---


@dataclass(frozen=True, slots=True)
class LocalService:
    """The caller cluster's own copy of a service: endpoint health and declared capacity."""

    healthy_endpoints: int
    observed_at: float
    """When the endpoint health was last known, on our clock."""
    capacity_rps: float | None = None
    """Requests/s the local copy is declared to take, or ``None`` (headroom unknown)."""

    @classmethod
    def from_probes(
        cls,
        endpoints: Iterable[ProbeStatus],
        observed_at: float,
        capacity_rps: float | None = None,
    ) -> LocalService:
        """Our copy as its endpoints' probes see it: every endpoint not down counts as
        healthy. A registered endpoint not probed yet counts: presuming it dead would move all
        traffic away at every control-plane start; three failed probes take it out."""
        healthy = sum(status.state is not ProbeState.DOWN for status in endpoints)
        return cls(healthy, observed_at, capacity_rps)


@dataclass(frozen=True, slots=True)
class RemoteService:
    """A peer cluster's copy of a service: what its import and its health summary say."""

    cluster: str
    healthy_endpoints: int
    """From the import (the peer's export), used until a summary says otherwise."""
    summary: ServiceHealth | None = None
    received_at: float | None = None
    """When ``summary`` arrived, on our clock."""
    summary_span_s: float = SHORT_SPAN_S
    """The span the summary's rates cover: evidence = request rate × span."""


def observations(
    stats: RegionalStats,
    service: str,
    caller_cluster: str,
    now: float,
    *,
    local: LocalService,
    remotes: Iterable[RemoteService] = (),
    gateways: Mapping[str, ProbeStatus] | None = None,
    span_s: int = SHORT_SPAN_S,
    enter_span_s: int = ENTER_SPAN_S,
    min_samples: int = 10,
) -> Observations:
    """What the failover core sees for ``service`` called from ``caller_cluster`` at ``now``.

    ``gateways`` holds the probe status of each peer's gateway, by cluster. ``min_samples``
    is how many of our own requests to a remote target make our error rate count too. The
    local copy also carries our callers' statistics over the last ``enter_span_s`` closed
    seconds (``recent_*``), which the controller reads to enter degraded.
    """
    gateways = gateways or {}
    mine = stats.stats(service, caller_cluster, caller_cluster, now, span_s)
    short = stats.stats(service, caller_cluster, caller_cluster, now, enter_span_s)
    headroom = None
    if local.capacity_rps is not None:
        everyone = stats.service_stats(service, caller_cluster, now, span_s, latency=False)
        headroom = max(0.0, local.capacity_rps - everyone.rate_per_s)
    freshest = max(local.observed_at, mine.last_at if mine.last_at is not None else -math.inf)
    healthy = local.healthy_endpoints
    recent = stats.stats(
        service, caller_cluster, caller_cluster, now, UNREACHABLE_SPAN_S, latency=False
    )
    if recent.connect_failures >= UNREACHABLE_MIN_FAILURES and recent.connect_failures == (
        recent.requests
    ):
        healthy = 0  # every recent call found no local endpoint to connect to
    targets = [
        TargetObservation(
            cluster=caller_cluster,
            observed_at=freshest,
            samples=mine.requests,
            healthy_endpoints=healthy,
            p50=mine.p50,
            p90=mine.p90,
            p95=mine.p95,
            p99=mine.p99,
            error_rate=mine.error_rate or 0.0,
            rtt=0.0,
            headroom=headroom,
            recent_start=float(math.floor(now) - enter_span_s),
            recent_samples=short.requests,
            recent_p50=short.p50,
            recent_p90=short.p90,
            recent_p95=short.p95,
            recent_p99=short.p99,
            recent_error_rate=short.error_rate or 0.0,
        )
    ]
    seen = {caller_cluster}
    for remote in remotes:
        if remote.cluster in seen:
            raise ValueError(f"cluster {remote.cluster!r} is listed twice for {service}")
        seen.add(remote.cluster)
        measured = stats.stats(service, caller_cluster, remote.cluster, now, span_s)
        targets.append(_remote(remote, gateways.get(remote.cluster), measured, now, min_samples))
    return Observations(
        local=caller_cluster,
        request_rate=stats.caller_stats(
            service, caller_cluster, now, span_s, latency=False
        ).rate_per_s,
        targets=tuple(targets),
    )


def _remote(
    remote: RemoteService,
    gateway: ProbeStatus | None,
    measured: TrafficStats,
    now: float,
    min_samples: int,
) -> TargetObservation:
    healthy = remote.healthy_endpoints
    summary = remote.summary
    if summary is not None:
        healthy = summary.healthy_endpoints
    if gateway is not None and gateway.state is ProbeState.DOWN:
        healthy = 0  # unreachable, whatever the peer says about itself
    rtt = gateway.rtt if gateway is not None and gateway.alive else None
    if summary is None or rtt is None:
        # No summary or no RTT: the expected latency cannot be known, so no evidence.
        return TargetObservation(
            cluster=remote.cluster,
            observed_at=now,
            samples=0,
            healthy_endpoints=healthy,
            rtt=rtt or 0.0,
        )
    error_rate = 1.0 - summary.success_rate
    if measured.requests >= min_samples and measured.error_rate is not None:
        error_rate = max(error_rate, measured.error_rate)
    probed = summary.source is HealthSource.PROBES
    return TargetObservation(
        cluster=remote.cluster,
        observed_at=remote.received_at if remote.received_at is not None else -math.inf,
        samples=(
            summary.probe_samples if probed else round(summary.request_rate * remote.summary_span_s)
        ),
        healthy_endpoints=healthy,
        p50=summary.latency_p50_seconds,
        p90=None,  # summaries carry p50/p95/p99 only
        p95=summary.latency_p95_seconds,
        p99=summary.latency_p99_seconds,
        error_rate=error_rate,
        rtt=rtt,
        headroom=summary.headroom_rps,
        source="probes" if probed else "traffic",
    )


# --- What this cluster publishes ---


def health_summary(
    stats: RegionalStats,
    key: ServiceKey,
    cluster: str,
    now: float,
    *,
    healthy_endpoints: int,
    capacity_rps: float | None = None,
    span_s: int = SHORT_SPAN_S,
    probes: ProbeLatency | None = None,
    min_samples: int = PUBLISHED_MIN_SAMPLES,
) -> ServiceHealth:
    """The health of our copy of ``key`` (served in ``cluster``) that we publish to peers.

    Latencies, success rate and request rate cover every caller cluster's requests to our
    copy over the last ``span_s`` seconds. Headroom is the declared capacity minus the current
    rate (at least 0), or unknown without a declared capacity. With fewer than
    ``min_samples`` requests and ``probes`` (our probes of the copy's endpoints), the
    latencies are the probes', marked ``source: probes`` with their count. Without requests or
    probes the latencies read 0 and the success rate 1 with a request rate of 0: receivers
    see no evidence.
    """
    served = stats.service_stats(key.name, cluster, now, span_s)
    headroom = None if capacity_rps is None else max(0.0, capacity_rps - served.rate_per_s)
    if probes is not None and served.requests < min_samples:
        return ServiceHealth(
            key=key,
            latency_p50_seconds=probes.p50,
            latency_p95_seconds=probes.p95,
            latency_p99_seconds=probes.p99,
            success_rate=served.success_rate if served.success_rate is not None else 1.0,
            request_rate=served.rate_per_s,
            headroom_rps=headroom,
            healthy_endpoints=healthy_endpoints,
            source=HealthSource.PROBES,
            probe_samples=probes.samples,
        )
    return ServiceHealth(
        key=key,
        latency_p50_seconds=served.p50 or 0.0,
        latency_p95_seconds=served.p95 or 0.0,
        latency_p99_seconds=served.p99 or 0.0,
        success_rate=served.success_rate if served.success_rate is not None else 1.0,
        request_rate=served.rate_per_s,
        headroom_rps=headroom,
        healthy_endpoints=healthy_endpoints,
    )


# --- Everything the controller reads, in one place ---


class HealthView:
    """What this cluster knows about its services' health, for the failover loop.

    The I/O around it feeds it: stats windows from the sidecars (into ``stats``), the local
    endpoint health per service, the imports and health summaries from peers, the gateway
    probes. :meth:`pairs` and :meth:`observe` are what
    :class:`~health.failover.loop.FailoverLoop` calls every tick.

    **No data is not a failure.** A service with no local registration counts as having no
    healthy local endpoint only from ``local_from`` on: a (re)started control plane sets it to
    when its catalog was first read plus a grace period for local services to (re)register
    (one registration TTL). Before that, it is reported with no fresh observation of the
    local cluster, so the controller holds (``no-local-data``) instead of moving everything
    away. Registered endpoints that are unhealthy are evidence, and count at once. The
    default (``-inf``) trusts the view from the start.
    """

    def __init__(
        self,
        cluster: str,
        stats: RegionalStats,
        *,
        span_s: int = SHORT_SPAN_S,
        enter_span_s: int = ENTER_SPAN_S,
        min_samples: int = 10,
        local_from: float = -math.inf,
    ) -> None:
        self.cluster = cluster
        self.stats = stats
        self.local_from = local_from
        """From when a missing or endpoint-less local copy counts as down (see above)."""
        self._span = span_s
        self._enter_span = enter_span_s
        self._min_samples = min_samples
        self._enter_spans: Mapping[str, int] = {}
        self._local: dict[str, LocalService] = {}
        self._remote: dict[str, dict[str, RemoteService]] = {}
        self._gateways: dict[str, ProbeStatus] = {}

    def set_policies(self, policies: Iterable[FailoverPolicy]) -> None:
        """The policies in force: a service with one is observed with its ``evidence.enterSpan``
        (the others with the view's ``enter_span_s``)."""
        self._enter_spans = {p.spec.service: int(p.spec.evidence.enter_span) for p in policies}

    def set_local(self, service: str, local: LocalService | None) -> None:
        """Our own copy of ``service`` (``None``: we have none)."""
        if local is None:
            self._local.pop(service, None)
        else:
            self._local[service] = local

    def set_remote(self, service: str, remote: RemoteService) -> None:
        """A peer's copy of ``service`` (replacing what we knew of that cluster's copy)."""
        self._remote.setdefault(service, {})[remote.cluster] = remote

    def remove_remote(self, service: str, cluster: str) -> None:
        """``cluster`` no longer offers ``service`` (its export was withdrawn)."""
        by_cluster = self._remote.get(service, {})
        by_cluster.pop(cluster, None)
        if not by_cluster:
            self._remote.pop(service, None)

    def remote_copies(
        self, services: Iterable[str] | None = None
    ) -> list[tuple[str, RemoteService]]:
        """Every peer's copy of ``services`` (default: every service we know of), as
        (service, copy), sorted."""
        remote = self._remote
        names = sorted(remote) if services is None else sorted(set(services) & remote.keys())
        return [
            (service, remote[service][cluster])
            for service in names
            for cluster in sorted(remote[service])
        ]

    def remote_count(self) -> int:
        """How many services peers export to us."""
        return len(self._remote)

    def local_services(self) -> list[str]:
        """The services this cluster serves itself."""
        return list(self._local)

    def set_gateways(self, statuses: Mapping[str, ProbeStatus]) -> None:
        """The latest probe status of each peer's gateway, by cluster."""
        self._gateways = dict(statuses)

    def pairs(self, now: float) -> list[tuple[str, str]]:
        """Every (service, caller cluster) to decide for: services we serve, import, or call."""
        services = set(self._local) | set(self._remote)
        services |= {
            k.service for k in self.stats.traffic_keys() if k.caller_cluster == self.cluster
        }
        return [(service, self.cluster) for service in sorted(services)]

    def observe(self, service: str, caller_cluster: str, now: float) -> Observations:
        """The observations of ``service`` from ``caller_cluster`` at ``now``."""
        # A service we do not serve has no healthy local endpoint, as of now.
        registered = self._local.get(service)
        local = registered or LocalService(0, now)
        seen = observations(
            self.stats,
            service,
            caller_cluster,
            now,
            local=local,
            remotes=self._remote.get(service, {}).values(),
            gateways=self._gateways,
            span_s=self._span,
            enter_span_s=self._enter_spans.get(service, self._enter_span),
            min_samples=self._min_samples,
        )
        if registered is None and now < self.local_from:
            # Still starting: "none registered yet" is no data, never evidence of failure.
            mine = replace(seen.targets[0], observed_at=-math.inf)
            return replace(seen, targets=(mine, *seen.targets[1:]))
        return seen
