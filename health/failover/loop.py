"""The failover loop: the thin shell around ``decide`` that ticks, applies and records.

Every tick (default 1 s, on an injectable clock and sleep), for each (service, caller
cluster) that needs a decision (below): build the observations, call
:func:`~health.failover.core.decide` with the policy in force (or none: default behaviour),
keep the new controller state, and

- when the weights differ from those last applied, call ``apply(service, caller, weights)``
  (the control plane pushes them to the caller's sidecars through the discovery stream); if
  ``apply`` raises, the weights are offered again on the next tick;
- record the decision in the :class:`~health.failover.record.Journal` when it changed the
  weights or the mode, or fired a rule other than ``hold`` that the previous tick did not
  fire (a rule that repeats with nothing changed, such as ``exit-pending`` counting down or
  ``no-local-data`` for an idle service, is the same story going on, and would otherwise
  push the interesting records out of the bounded journal);
- hand every decision, holds included, to ``on_decision`` (the dashboard's live view);
- update the metrics: ``snapbright_route_weight`` (share 0..1 per target, set when the
  weights change), ``snapbright_failover_transitions_total`` (each time traffic starts
  moving the other way), ``snapbright_failover_decisions_total`` (every decision, by rule:
  not by service, whose story is in the journal; a per-service counter touched every tick
  is a series per service for every scrape) and ``snapbright_failover_pairs`` (how many
  pairs the last tick decided).

**Which pairs are decided.** Deciding every service every second is O(services) of work
per tick, although most imported services are called by nobody here. A pair is decided
when

- ``pairs(now)`` names it: the control plane's are the services called from this cluster
  (statistics held for them) and those with a local copy and a remote one (a failure of the
  local copy can move traffic);
- its service has a policy (for callers in this cluster);
- or the loop holds it and its traffic is not settled: traffic away from a healthy local
  copy must come home (failback), so the pair stays until it is (mode ``steady``, all
  local) or the local copy is down (``local-down``: nothing to fail back to).

Any other pair is left to discovery's default weights (all local while a local endpoint
is healthy, else the healthy remote copies): what a controller without a policy would
choose for it, give or take which remote copy, and nobody calls it. A pair the loop held
and no longer decides is released: its state and gauges are forgotten, and if weights were
applied for it, ``apply(service, caller, {})`` hands it back to the default (retried on
the next ticks if that raises). A pair that needs a decision again starts from the initial
state. So a tick costs O(decided pairs), and the metrics change only with the weights.

Policies are swapped in whole by :meth:`FailoverLoop.set_policies`; a tick reads the set once,
so it never sees half of an update. A removed policy means default behaviour from the next
tick, with the controller state kept (traffic that was moved away comes home gradually).

**Ticks follow the windows.** With ``phase`` set, ticks fall at ``k × interval + phase`` on
the clock (Unix time in the control plane), not wherever the loop happened to start: the
sidecars close their stats windows on whole seconds and send them at once, so a tick just
after a whole second sees the window that just closed. The delay from a slow response to
the controller acting on it, with the control plane's settings (interval 1 s, phase 0.25 s):

====================================================  ==============  ===================
step                                                  typical         at most
====================================================  ==============  ===================
the response completes (a +400 ms brownout)           +0.4 s          +0.4 s
its one-second window closes (sidecar clock)          +0.5 s          +1.0 s
the sidecar drains and streams it (aligned, +20 ms)   +0.02 s         +0.05 s
gRPC to the control plane, into RegionalStats         < 0.01 s        < 0.05 s
the next tick (0.25 s after the whole second)         +0.23 s         +0.2 s (waits ≤ 1 s
                                                                      if the window came
                                                                      late)
the trigger's ``enterAfter`` (ticks, 1 per window)    +enterAfter     +enterAfter
weights to the sidecars (discovery push)              < 0.1 s         < 0.2 s
====================================================  ==============  ===================

The enter trigger reads the newest closed second (``evidence.enterSpan``, default 1 s) and
dates a new degradation from the start of its first slow window, so the controller acts at
the tick that sees the ``enterAfter``-th slow window: a fault that starts ``f`` seconds into
a whole second moves traffic ``enterAfter + 0.25 − f`` seconds later, or one second more when
its own second holds under 5 % slow answers (at +400 ms, when ``f`` > ~0.55). With the
example policy (``enterAfter: 2s``) that is 1.75–2.75 s (pinned in virtual time by
tests/health/stats); ``enterAfter: 1s`` gives 0.85–1.45 s at the price of one slow second
moving traffic. ``shift_90_s`` is the first shift plus the ramp: 50 % per 1 s, so + 1 s.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import MappingProxyType

from prometheus_client import CollectorRegistry, Counter, Gauge

from health.failover.core import decide
from health.failover.model import (
    TOTAL_WEIGHT,
    ControllerState,
    Decision,
    Direction,
    FailoverPolicy,
    Mode,
    Observations,
    Rule,
)
from health.failover.record import DecisionRecord, Journal

_log = logging.getLogger(__name__)

Pair = tuple[str, str]
"""(service, caller cluster)."""

Apply = Callable[[str, str, Mapping[str, int]], None]
"""Push ``weights`` (basis points by target cluster) for a service to a caller's sidecars;
empty weights hand the service back to discovery's default weights."""


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.route_weight = Gauge(
            "snapbright_route_weight",
            "Share (0..1) of a caller cluster's traffic to a service sent to a target cluster.",
            ["service", "source_cluster", "target_cluster"],
            registry=registry,
        )
        self.transitions = Counter(
            "snapbright_failover_transitions_total",
            "Times traffic for a service started moving between clusters, by direction.",
            ["service", "from_cluster", "to_cluster", "reason"],
            registry=registry,
        )
        self.decisions = Counter(
            "snapbright_failover_decisions_total",
            "Failover controller decisions, by the rule that fired.",
            ["rule"],
            registry=registry,
        )
        self.pairs = Gauge(
            "snapbright_failover_pairs",
            "(service, caller cluster) pairs the failover controller decided in its last tick.",
            registry=registry,
        )


class FailoverLoop:
    """Runs the failover controller for the (service, caller cluster) pairs of one cluster
    that need a decision (see the module's docstring)."""

    def __init__(
        self,
        cluster: str,
        *,
        pairs: Callable[[float], Iterable[Pair]],
        observe: Callable[[str, str, float], Observations],
        apply: Apply,
        journal: Journal,
        registry: CollectorRegistry,
        policies: Iterable[FailoverPolicy] = (),
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        interval: float = 1.0,
        phase: float | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_decision: Callable[[str, str, Decision], None] | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be above 0s: {interval!r}")
        if phase is not None and not 0 <= phase < interval:
            raise ValueError(f"phase must be in [0s, interval): {phase!r}")
        self.cluster = cluster
        self._pairs = pairs
        self._observe = observe
        self._apply = apply
        self._journal = journal
        self._metrics = _Metrics(registry)
        self._clock = clock
        self._wall_clock = wall_clock
        self._interval = interval
        self._phase = phase
        self._sleep = sleep
        self._on_decision = on_decision
        self._policies: Mapping[str, FailoverPolicy] = MappingProxyType({})
        self._last: dict[Pair, Decision] = {}  # its state is what the next tick starts from
        self._unsettled: set[Pair] = set()  # held pairs whose traffic must still come home
        self._applied: dict[Pair, dict[str, int]] = {}  # absent: none given (the default)
        self._releasing: set[Pair] = set()  # released pairs whose ``apply({})`` failed
        self._gauged: dict[Pair, Mapping[str, int]] = {}
        self._ticked_at: float | None = None
        self.set_policies(policies)

    # --- Policies ---

    def set_policies(self, policies: Iterable[FailoverPolicy]) -> None:
        """Swap in a whole new policy set (one policy per service) at once."""
        by_service: dict[str, FailoverPolicy] = {}
        for policy in policies:
            service = policy.spec.service
            if service in by_service:
                raise ValueError(
                    f"two FailoverPolicies for service {service!r}: "
                    f"{by_service[service].metadata.name} and {policy.metadata.name}"
                )
            by_service[service] = policy
        self._policies = MappingProxyType(by_service)

    @property
    def policies(self) -> Mapping[str, FailoverPolicy]:
        """The policy in force per service."""
        return self._policies

    # --- What the controller holds ---

    def state(self, service: str, caller_cluster: str) -> ControllerState | None:
        """The controller state of a pair, if it is decided for."""
        last = self._last.get((service, caller_cluster))
        return None if last is None else last.state

    def last_decision(self, service: str, caller_cluster: str) -> Decision | None:
        """The latest decision of a pair (hold included): the live end of its chain; None
        for a pair not decided (its weights are discovery's default)."""
        return self._last.get((service, caller_cluster))

    @property
    def ticked_at(self) -> float | None:
        """When the last tick ran, on the loop's clock (None before the first)."""
        return self._ticked_at

    @property
    def journal(self) -> Journal:
        """The decision journal."""
        return self._journal

    # --- Running ---

    async def run(self) -> None:
        """Tick every ``interval`` on the clock until cancelled; a late tick does not burst.

        The first tick is at once; with a ``phase``, the next ones at ``k × interval +
        phase``."""
        next_at = self._clock()
        while True:
            self.tick(self._clock())
            next_at += self._interval
            now = self._clock()
            if self._phase is not None:
                # The next aligned instant after this tick (a late one skips, no burst).
                step = math.floor((now - self._phase) / self._interval) + 1
                next_at = step * self._interval + self._phase
            elif next_at <= now:
                # Late (a slow tick or a stalled loop): skip the missed ticks, no burst.
                next_at = now + self._interval
            await self._sleep(next_at - now)

    def tick(self, now: float | None = None) -> dict[Pair, Decision]:
        """One tick at ``now`` (default: the clock): every pair that needs a decision
        decided, applied, recorded; pairs that no longer need one released."""
        now = self._clock() if now is None else now
        policies = self._policies  # one consistent set for the whole tick
        pairs = dict.fromkeys(self._pairs(now))
        pairs.update(dict.fromkeys((service, self.cluster) for service in policies))
        pairs.update(dict.fromkeys(self._unsettled))
        for pair in [pair for pair in self._releasing if pair not in pairs]:
            self._hand_back(pair)  # a release that failed before: offered again
        for gone in [pair for pair in self._last if pair not in pairs]:
            self._release(gone)
        decisions: dict[Pair, Decision] = {}
        rules: dict[Rule, int] = {}
        for pair in pairs:
            self._releasing.discard(pair)
            try:
                decision = decisions[pair] = self._tick_one(pair, policies.get(pair[0]), now)
            except Exception:
                # One broken pair must not stop failover for every other service.
                _log.exception("failover tick for %s from %s failed", *pair)
                continue
            rules[decision.rule] = rules.get(decision.rule, 0) + 1
        for rule, count in rules.items():
            self._metrics.decisions.labels(rule.value).inc(count)
        self._metrics.pairs.set(len(decisions))
        self._ticked_at = now
        return decisions

    def _tick_one(self, pair: Pair, policy: FailoverPolicy | None, now: float) -> Decision:
        service, caller = pair
        last = self._last.get(pair)
        state = last.state if last is not None else ControllerState.initial(caller)
        inputs = self._observe(service, caller, now)
        decision = decide(policy, state, inputs, now)
        self._last[pair] = decision
        if _settled(decision, caller):
            self._unsettled.discard(pair)
        else:
            self._unsettled.add(pair)
        self._gauge(pair, decision)
        if decision.transition is not None:
            origin, destination = _transition_ends(decision, caller)
            self._metrics.transitions.labels(
                service, origin, destination, decision.rule.value
            ).inc()
        previous_rule = last.rule if last is not None else None
        if (
            decision.changed
            or decision.state.mode is not state.mode
            or (decision.rule is not Rule.HOLD and decision.rule is not previous_rule)
        ):
            name = policy.metadata.name if policy is not None else None
            self._journal.record(
                DecisionRecord.of(service, caller, name, decision, inputs, self._wall_clock())
            )
        self._push(pair, decision)
        if self._on_decision is not None:
            try:
                self._on_decision(service, caller, decision)
            except Exception:
                _log.exception("decision observer failed for %s from %s", *pair)
        return decision

    def _push(self, pair: Pair, decision: Decision) -> None:
        weights = {c: w for c, w in decision.weights.items() if w > 0}
        applied = self._applied.get(pair, {pair[1]: TOTAL_WEIGHT})
        if weights == applied:
            return
        try:
            self._apply(pair[0], pair[1], dict(weights))
        except Exception:
            _log.exception("applying weights %s for %s from %s failed; retrying", weights, *pair)
            return
        self._applied[pair] = weights

    def _gauge(self, pair: Pair, decision: Decision) -> None:
        gauged = self._gauged.get(pair)
        if gauged == decision.weights:
            return  # the gauges already read these weights
        service, caller = pair
        for cluster in set(gauged or ()) - set(decision.weights):
            self._metrics.route_weight.remove(service, caller, cluster)
        for cluster, weight in decision.weights.items():
            if gauged is None or gauged.get(cluster) != weight:
                self._metrics.route_weight.labels(service, caller, cluster).set(
                    weight / TOTAL_WEIGHT
                )
        self._gauged[pair] = decision.weights

    def _release(self, pair: Pair) -> None:
        """Stop deciding ``pair``: forget its state and gauges; discovery's default weights
        apply again."""
        service, caller = pair
        for cluster in self._gauged.pop(pair, {}):
            self._metrics.route_weight.remove(service, caller, cluster)
        self._last.pop(pair, None)
        self._unsettled.discard(pair)
        self._hand_back(pair)

    def _hand_back(self, pair: Pair) -> None:
        if pair not in self._applied:
            self._releasing.discard(pair)
            return  # nothing was given: the default is in force
        try:
            self._apply(pair[0], pair[1], {})
        except Exception:
            _log.exception("handing %s from %s back to default weights failed; retrying", *pair)
            self._releasing.add(pair)
            return
        del self._applied[pair]
        self._releasing.discard(pair)


def _settled(decision: Decision, caller: str) -> bool:
    """Whether a pair's traffic needs no more decisions to come home: all local and steady,
    or the local copy down (nothing to come home to; discovery's default does the same)."""
    mode = decision.state.mode
    if mode is Mode.LOCAL_DOWN:
        return True
    return mode is Mode.STEADY and decision.weights.get(caller, 0) == TOTAL_WEIGHT


def _transition_ends(decision: Decision, local: str) -> tuple[str, str]:
    """Where traffic started moving from and to: local and the target that moved most."""
    deltas = {
        c: decision.weights.get(c, 0) - decision.previous_weights.get(c, 0)
        for c in set(decision.weights) | set(decision.previous_weights)
        if c != local
    }
    if decision.transition is Direction.AWAY:
        gained = max(deltas, key=lambda c: (deltas[c], c), default=local)
        return local, gained
    lost = min(deltas, key=lambda c: (deltas[c], c), default=local)
    return lost, local
