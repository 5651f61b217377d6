"""The mesh router: proxy/http's `Router` seam, fed by a `SidecarState`.

Per request, on the Host the app called: TrafficPolicy fault injection first (an abort is
answered at once, a delay holds the request before it is sent), then the upstream's
`WeightedTargets` picks a target
cluster, `p2c_pick` an endpoint of it (peak-EWMA × outstanding), the target's circuit breaker
takes a request slot (refused: 503 with ``x-snapbright-overload``), and the retry budget
counts the request. Each pick is reported back once (`on_response` / `on_failure`): the
endpoint's load and latency, the breaker slot, outlier detection, the per-second stats
(`proxy.stats.core`) and the Prometheus children of that (upstream, target), looked up once
when the target is built.

Updates: `MeshRouter.apply` builds a new plan per upstream and swaps it in with one
assignment; `MeshRoute` objects (which client connections cache) stay, so every connection
sees the new plan on its next request. Targets, their endpoints (with their learned
latency), breakers and outlier records are kept for what remains, so that requests in flight
are accounted on the objects that counted them.

What a TrafficPolicy sets here: the connect timeout (per target, enforced by the mTLS
connector), retries of connect failures within the budget (`pick_retry`, called by the
forwarder; nothing was sent, so the method does not matter), circuit-breaker request
limits, outlier detection and fault injection. Not yet: the request and idle timeouts are
the listener's (`proxy.http.model.Timeouts`), and 5xx/reset retries of idempotent requests
would need the forwarder to hold the response back.

Hard failures, as Envoy's priority failover with ``previous_priorities`` retries:

- A connect failure takes the endpoint out of rotation at once (1 s, doubling per failure in
  a row up to 16 s, reset by a response), whatever outlier detection's share cap says: a
  refused or timed-out connect is an endpoint that is not there, not a sick one.
- The retry after a connect failure goes to another target cluster that has an endpoint in
  rotation (in weight order, weight 0 included: a mirrored target is a failover priority), and
  only if none has, to another endpoint of the same target; local failures are often
  correlated (a whole deployment gone), the next priority is not.
- A pick whose target has no endpoint in rotation (all out, or none left) goes to the next
  target that has one, so requests stop paying for dead endpoints before the control plane
  moves the weights. With no endpoint in rotation anywhere, the weighted target's endpoints
  are tried anyway (panic: better than refusing, and it is how recovery is seen).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from random import Random
from typing import Final, Protocol

from proxy.balance.core import Endpoint, WeightedTargets, p2c_pick
from proxy.http.core import InjectedFault, Overloaded, Route, cached_route
from proxy.http.model import Failure
from proxy.policy.model import TrafficPolicy, TrafficPolicySpec
from proxy.resilience.core import (
    CircuitBreaker,
    FailureClass,
    FaultSpec,
    OutlierDetector,
    RetryBudget,
    RetryPolicy,
    decide_fault,
)
from proxy.sidecar.model import SidecarState, TargetState, UpstreamState
from proxy.stats.core import Outcome, Series, StatsRecorder, outcome_of_status

__all__ = ["MeshEndpoint", "MeshRoute", "MeshRouter", "RequestMetrics", "TargetRuntime"]

_FAILURE_OUTCOME: Final = {
    Failure.CONNECT: Outcome.CONNECT_FAILURE,
    Failure.TIMEOUT: Outcome.TIMEOUT,
    Failure.RESET: Outcome.HTTP_5XX,
    Failure.PROTOCOL: Outcome.HTTP_5XX,
}
_DEFAULT_POLICY: Final = TrafficPolicySpec(service="default")


class RequestMetrics(Protocol):
    """Where finished requests are counted for Prometheus (children resolved once)."""

    def target(
        self, service: str, cluster: str
    ) -> tuple[Callable[[Outcome, float], None], Callable[[], None]]:
        """A recorder for one (upstream, target) and a function that drops its children."""
        ...


class TargetRuntime:
    """One target cluster of one upstream while it is in the config: endpoints and their load,
    breaker, outlier records, stats series, and the SNI and trust domain new connections use."""

    __slots__ = (
        "breaker",
        "cluster",
        "connect_timeout",
        "drop_metrics",
        "endpoints",
        "name",
        "outliers",
        "record",
        "series",
        "service",
        "sni",
        "trust_domain",
    )

    def __init__(
        self, service: str, target: TargetState, series: Series, metrics: RequestMetrics | None
    ) -> None:
        self.service = service
        self.name = target.name
        self.cluster = target.cluster
        self.sni = target.sni
        self.trust_domain = target.trust_domain
        self.connect_timeout = _DEFAULT_POLICY.timeouts.connect
        self.endpoints: tuple[MeshEndpoint, ...] = ()
        self.breaker = CircuitBreaker()
        self.outliers = OutlierDetector()
        self.series = series
        if metrics is not None:
            self.record, self.drop_metrics = metrics.target(service, target.cluster)
        else:
            self.record, self.drop_metrics = _ignore, _nothing

    def update(
        self, target: TargetState, policy: TrafficPolicySpec, now: float, *, new_policy: bool
    ) -> None:
        """Take the target's new endpoints (keeping those that remain) and policy limits."""
        self.sni = target.sni
        self.trust_domain = target.trust_domain
        kept = {(ep.host, ep.port): ep for ep in self.endpoints}
        self.endpoints = tuple(
            kept.get(address) or MeshEndpoint(address[0], address[1], now, self)
            for address in target.endpoints
        )
        # New connections (and their TLS handshake) to this target must be made in time.
        self.connect_timeout = policy.timeouts.connect
        limits = policy.circuit_breaker
        # The breaker keeps its counts of slots in flight: only its limits change.
        self.breaker.max_connections = limits.max_connections
        self.breaker.max_pending = limits.max_pending_requests
        self.breaker.max_requests = limits.max_requests
        if new_policy:
            outlier = policy.outlier_detection
            self.outliers = OutlierDetector(
                consecutive_failures=outlier.consecutive_failures,
                base_ejection_s=outlier.base_ejection_time,
                max_ejection_s=outlier.max_ejection_time,
                max_ejected_share=outlier.max_ejected_share,
            )
        self.outliers.set_endpoints(self.endpoints)


class MeshEndpoint(Endpoint):
    """An endpoint of a target: its load (balance core) and the target it belongs to."""

    __slots__ = ("connect_failures", "target")

    def __init__(self, host: str, port: int, now: float, target: TargetRuntime) -> None:
        super().__init__(host, port, now)
        self.target = target
        self.connect_failures = 0
        """Connect failures in a row (each doubles the time out of rotation)."""


_CONNECT_EJECTION_S: Final = 1.0
_CONNECT_EJECTION_MAX_S: Final = 16.0


def _ignore(outcome: Outcome, latency: float) -> None:
    """No metrics."""


def _nothing() -> None:
    """No metrics to drop."""


class _Plan:
    """An upstream's configuration as one value: swapped whole on each update."""

    __slots__ = ("budget", "fault", "order", "retry", "targets", "weighted")

    def __init__(
        self,
        weighted: WeightedTargets,
        targets: Mapping[str, TargetRuntime],
        retry: RetryPolicy,
        budget: RetryBudget,
        fault: FaultSpec | None = None,
        order: tuple[TargetRuntime, ...] = (),
    ) -> None:
        self.weighted = weighted
        self.targets = targets
        self.retry = retry
        self.budget = budget
        self.fault = fault
        self.order = order
        """Failover priorities: the heaviest target first, weight 0 last."""


_EMPTY: Final = _Plan(WeightedTargets({}), {}, RetryPolicy(), RetryBudget())


class MeshRoute:
    """The route of one upstream: implements proxy/http's `Route` (and `pick_retry`)."""

    __slots__ = ("_failed", "_rng", "_wall", "plan", "policy", "request_timeout", "service")

    def __init__(self, service: str, rng: Random, wall_offset: float) -> None:
        self.service = service
        self.plan = _EMPTY
        self.policy: TrafficPolicySpec | None = None
        # The TrafficPolicy's request timeout (None: the listener's default).
        self.request_timeout: float | None = None
        self._rng = rng
        self._wall = wall_offset
        # The target of the latest connect failure: the forwarder asks `pick_retry` right
        # after `on_failure`, in the same callback, so this is the attempt being retried.
        self._failed: TargetRuntime | None = None

    def pick(self, now: float) -> MeshEndpoint | None:
        """A target by weight, an endpoint by P2C, a breaker slot; ``None`` if none."""
        plan = self.plan
        if plan.fault is not None:
            return self._pick_with_fault(plan, plan.fault, now)
        endpoint = self._pick(plan, now)
        if endpoint is not None:
            plan.budget.record_request(now)
        return endpoint

    def _pick_with_fault(self, plan: _Plan, fault: FaultSpec, now: float) -> MeshEndpoint | None:
        """Fault injection: abort (counted for the target picked) or delay, by share."""
        delay, abort = decide_fault(fault, self._rng)
        if abort is not None:
            name = plan.weighted.pick(self._rng)
            if name is not None:
                target = plan.targets[name]
                outcome = outcome_of_status(abort)
                target.series.record(outcome, 0.0, now + self._wall)
                target.record(outcome, 0.0)
            raise InjectedFault(status=abort)
        endpoint = self._pick(plan, now)
        if endpoint is None:
            return None
        plan.budget.record_request(now)
        if delay:
            raise InjectedFault(delay=delay, endpoint=endpoint)
        return endpoint

    def _pick(
        self, plan: _Plan, now: float, avoid: TargetRuntime | None = None
    ) -> MeshEndpoint | None:
        rng = self._rng
        name = plan.weighted.pick(rng)
        if name is None:
            return None
        target = plan.targets[name]
        endpoint = None
        if target is not avoid:
            endpoint = p2c_pick(target.endpoints, rng, now)
        if endpoint is None:
            # Failover: the next target (by priority) with an endpoint in rotation.
            for other in plan.order:
                if other is not target and other is not avoid:
                    endpoint = p2c_pick(other.endpoints, rng, now)
                    if endpoint is not None:
                        break
        if endpoint is None and avoid is not None:
            endpoint = p2c_pick(avoid.endpoints, rng, now)
        if endpoint is None:
            if not target.endpoints:
                return None
            # Panic: nothing in rotation anywhere; trying beats refusing, and shows recovery.
            endpoint = target.endpoints[rng.randrange(len(target.endpoints))]
        target = endpoint.target  # type: ignore[attr-defined]  # a MeshEndpoint
        refused = target.breaker.try_acquire()
        if refused is not None:
            raise Overloaded(refused)
        endpoint.start()
        return endpoint  # type: ignore[return-value]

    def pick_retry(self, attempts: int, now: float) -> MeshEndpoint | None:
        """After a connect failure: the endpoint for attempt ``attempts``, if the retry policy
        and budget allow it (retried at once: nothing was sent, another endpoint is tried)."""
        plan = self.plan
        delay = plan.retry.plan_retry(
            "GET",
            FailureClass.CONNECT_FAILURE,
            attempts=attempts - 1,
            body_replayable=True,
            budget=plan.budget,
            now=now,
            rng=self._rng,
        )
        if delay is None:
            return None
        avoid, self._failed = self._failed, None
        try:
            return self._pick(plan, now, avoid)
        except Overloaded:
            return None

    def on_response(self, endpoint: object, status: int, latency: float, now: float) -> None:
        """Response headers came: load, latency, breaker, outliers, stats, metrics."""
        ep: MeshEndpoint = endpoint  # type: ignore[assignment]
        target = ep.target
        ep.end()
        ep.observe(latency, now)
        target.breaker.release()
        ep.connect_failures = 0
        if status >= 500:
            target.outliers.record_failure(ep, now)
        else:
            target.outliers.record_success(ep)
        outcome = outcome_of_status(status)
        target.series.record(outcome, latency, now + self._wall)
        target.record(outcome, latency)

    def on_failure(self, endpoint: object, failure: Failure, latency: float, now: float) -> None:
        """No response: load, breaker, outliers (connect failures and resets), stats."""
        ep: MeshEndpoint = endpoint  # type: ignore[assignment]
        target = ep.target
        ep.end()
        target.breaker.release()
        outcome = _FAILURE_OUTCOME.get(failure)
        if outcome is None:
            # The caller went away: says nothing about the endpoint.
            return
        if failure is not Failure.TIMEOUT:
            target.outliers.record_failure(ep, now)
        if failure is Failure.CONNECT:
            # Out of rotation at once (no share cap): a connect that fails finds nobody.
            out = _CONNECT_EJECTION_S * 2.0 ** min(ep.connect_failures, 4)
            ep.connect_failures += 1
            ep.ejected_until = max(ep.ejected_until, now + min(out, _CONNECT_EJECTION_MAX_S))
            self._failed = target
        target.series.record(outcome, latency, now + self._wall)
        target.record(outcome, latency)


class MeshRouter:
    """Maps the Host the app called to its upstream's `MeshRoute`; `apply` swaps configs."""

    __slots__ = ("_cache", "_metrics", "_rng", "_routes", "_targets", "_wall", "stats")

    def __init__(
        self,
        *,
        rng: Random | None = None,
        metrics: RequestMetrics | None = None,
    ) -> None:
        self._rng = rng or Random()
        self._metrics = metrics
        self._routes: dict[str, MeshRoute] = {}
        self._targets: dict[tuple[str, str], TargetRuntime] = {}
        self._cache: dict[bytes, MeshRoute | None] = {}
        self._wall = time.time() - time.monotonic()
        self.stats = StatsRecorder()
        """Per (upstream, target cluster) one-second windows, for the control plane."""

    def route(self, authority: bytes) -> Route | None:
        """The route of the upstream named by ``authority`` (``svc``, ``svc.namespace``)."""
        return cached_route(self._cache, self._routes, authority)

    def upstream(self, service: str) -> MeshRoute | None:
        """The route of ``service`` (for the TCP ports)."""
        return self._routes.get(service)

    def targets(self) -> list[TargetRuntime]:
        """Every target in force."""
        return list(self._targets.values())

    def apply(self, state: SidecarState, now: float | None = None) -> None:
        """Take a new state: new plans swapped in, targets and endpoints kept where they stay."""
        now = time.monotonic() if now is None else now
        routes: dict[str, MeshRoute] = {}
        targets: dict[tuple[str, str], TargetRuntime] = {}
        for service, upstream in state.upstreams.items():
            route = self._routes.get(service) or MeshRoute(service, self._rng, self._wall)
            policy = state.traffic.get(service)
            route.plan = self._plan(upstream, policy, route, targets, now)
            route.policy = policy.spec if policy is not None else None
            route.request_timeout = policy.spec.timeouts.request if policy is not None else None
            routes[service] = route
        for key, target in self._targets.items():
            if key not in targets:
                target.drop_metrics()
        kept = {id(route) for route in routes.values()}
        for route in self._routes.values():
            if id(route) not in kept:
                # Connections that cached it now get 503 (no target) until they ask again.
                route.plan = _EMPTY
        aliases = dict(routes)
        for service, upstream in state.upstreams.items():
            aliases.setdefault(f"{service}.{upstream.namespace}", routes[service])
        self._routes = aliases
        self._targets = targets
        self._cache.clear()

    def _plan(
        self,
        upstream: UpstreamState,
        policy: TrafficPolicy | None,
        route: MeshRoute,
        targets: dict[tuple[str, str], TargetRuntime],
        now: float,
    ) -> _Plan:
        spec = policy.spec if policy is not None else _DEFAULT_POLICY
        new_policy = spec != route.policy or route.plan is _EMPTY
        by_name: dict[str, TargetRuntime] = {}
        for target in upstream.targets:
            key = (upstream.service, target.name)
            runtime = self._targets.get(key)
            fresh = runtime is None
            if runtime is None:
                series = self.stats.series(upstream.service, target.cluster)
                runtime = TargetRuntime(upstream.service, target, series, self._metrics)
            runtime.update(target, spec, now, new_policy=new_policy or fresh)
            targets[key] = runtime
            by_name[target.name] = runtime
        weighted = WeightedTargets({t.name: t.weight for t in upstream.targets})
        retries = spec.retries
        retry = RetryPolicy(
            max_attempts=retries.attempts,
            retry_on=retries.retry_on,
            methods=retries.methods,
            base_backoff_s=retries.backoff.base,
            max_backoff_s=retries.backoff.max,
        )
        budget = route.plan.budget
        if new_policy:
            budget = RetryBudget(
                ratio=retries.budget.ratio,
                min_per_s=retries.budget.min_retries_per_second,
                window_s=retries.budget.window,
            )
        faults = spec.faults
        fault = None
        if faults.delay is not None or faults.abort is not None:
            fault = FaultSpec(
                delay_s=faults.delay.duration if faults.delay else 0.0,
                delay_share=faults.delay.percentage if faults.delay else 0.0,
                abort_status=faults.abort.status if faults.abort else 503,
                abort_share=faults.abort.percentage if faults.abort else 0.0,
            )
        weights = {target.name: target.weight for target in upstream.targets}
        order = tuple(sorted(by_name.values(), key=lambda target: -weights[target.name]))
        return _Plan(weighted, by_name, retry, budget, fault, order)
