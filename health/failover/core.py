"""The failover controller's decision core: observations in, weights and their reason out.

``decide(policy, state, observations, now)`` runs once per tick for one service in one caller
cluster. It holds no clock and does no I/O; ``simulate`` replays a trace through it.

Rules, in the order they are checked:

1. Without a fresh observation of the local cluster nothing moves (``no-local-data``): stale
   data is not evidence of anything.
2. Hard failure: no healthy local endpoint moves everything that can move, at once, to healthy
   targets within their headroom (``no-healthy-local``). This is availability, not latency:
   no hold time, no ramp, no ``maxShare``, no kept share. Without a policy this is the only
   reason traffic leaves the local cluster (as in Linkerd and Consul).
3. Degradation: a trigger above its enter threshold for its ``enterAfter`` enters degraded
   (``enter-degraded``, one ramp step at once); then one step of at most ``ramp.step`` per
   ``ramp.interval`` while a trigger stays above enter, held (``ramp-step``), up to
   ``min(maxShare, 100% - keepShare)`` (``cap-reached``). Between the exit and the enter
   thresholds nothing changes.

   *What enter reads, and from when it counts.* When the observation carries a short span
   (``recent_*``: the newest closed second of the caller's own statistics, with evidence),
   the enter side reads it, and a new degradation's clock starts at the start of its first
   slow span (when the evidence says it began), not at the tick that first saw it: a
   brownout enters ``enterAfter`` after it began, ≈ 1 s earlier than counted from the tick,
   and the p95 of one second crosses with a few slow answers, where one of 10 s needs half a
   second of them. A one-second span holds a spike no longer than the seconds it touched, so
   one slow second moves nothing with ``enterAfter`` ≥ 2 s; but a one-second blip that
   straddles two windows reads as two slow seconds (``enterAfter: 2s`` then counts it as
   held: choose ``enterAfter`` above the longest blip to ignore, in whole seconds, plus one).
   Exit and failback read the long reading,
   so recovery still needs the whole window below exit. Without a short span (traces, whose
   readings are instants; remote summaries) the long reading is read to enter, from the tick.
4. Recovery: every trigger below its exit threshold for its ``exitAfter`` (``exit-pending``
   while it holds), then the failback stable period, then steps of ``failback.step`` per
   ``failback.interval`` (``failback-step``) until all traffic is local
   (``failback-complete``). A reading above exit on the way pauses failback until the exit
   threshold and the stable period hold again; a degradation held again re-enters degraded.

Targets: a remote cluster is chosen only with evidence (enough fresh samples), healthy
endpoints, no trigger above its enter threshold, and, for each trigger that degrades the local
copy, a better reading than local: for latency, a lower *expected* latency (service latency
there plus the RTT between), so a remote region is chosen only when it is faster for this
caller. They are filled in the policy's order (or nearest first), each up to its headroom
(``headroom-limited``; the rest stays local). Share already placed stays where it is while
that target remains usable, so a reshuffled ranking moves nothing; a target that loses its
endpoints, disappears, or is itself degraded for ``enterAfter`` loses its share
(``target-lost``). Failback takes share back from the least preferred targets first.

Evidence: ``evidence.minSamples`` is for a target sent all of the caller's traffic. The local
copy sent only part of it (at the cap, only the kept share) needs that many times its share,
at least 5 (or ``minSamples`` if lower): 2 % of 60 requests/s gives about 12 samples in a 10 s
window, and its recovery must still be seen, or failback never starts. An idle remote copy
has no requests: its cluster publishes the round trips of its probes of its endpoints instead
(``source`` ``probes``), which count with at least 5 of them (probes come at a fixed pace,
not with load); its expected latency is that plus the RTT, and the explanation says so.

Weights are integer basis points summing to ``TOTAL_WEIGHT`` (10000).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from health.failover.model import (
    NEAREST,
    ClusterClocks,
    ControllerState,
    Decision,
    Direction,
    ErrorRateTrigger,
    Evidence,
    Failback,
    FailoverPolicy,
    LatencyTrigger,
    Mode,
    Observations,
    Percentile,
    Rule,
    TargetObservation,
    Trace,
    TraceCluster,
    TriggerClock,
)
from health.failover.model import TOTAL_WEIGHT as TOTAL

_LATENCY = "latency"
_ERRORS = "errorRate"


@dataclass(frozen=True, slots=True)
class _Params:
    """A policy flattened for the core; without a policy, triggers are off."""

    latency: LatencyTrigger | None
    error_rate: ErrorRateTrigger | None
    targets: tuple[str, ...] | Literal["nearest"]
    ramp_step: int
    ramp_interval: float
    cap_away: int
    failback: Failback
    failback_step: int
    respect_headroom: bool
    evidence: Evidence
    percentile: Percentile


def _default_params() -> _Params:
    failback = Failback()
    return _Params(
        latency=None,
        error_rate=None,
        targets=NEAREST,
        ramp_step=TOTAL,
        ramp_interval=0.0,
        cap_away=0,
        failback=failback,
        failback_step=_bp(failback.step),
        respect_headroom=True,
        evidence=Evidence(),
        percentile="p95",
    )


def _params(policy: FailoverPolicy | None) -> _Params:
    if policy is None:
        return _DEFAULT_PARAMS  # built once: most pairs have no policy, every tick
    spec = policy.spec
    latency = spec.triggers.latency
    return _Params(
        latency=latency,
        error_rate=spec.triggers.error_rate,
        targets=spec.targets,
        ramp_step=_bp(spec.ramp.step),
        ramp_interval=spec.ramp.interval,
        cap_away=min(round(spec.max_share * TOTAL), TOTAL - math.ceil(spec.keep_share * TOTAL)),
        failback=spec.failback,
        failback_step=_bp(spec.failback.step),
        respect_headroom=spec.capacity.respect_headroom,
        evidence=spec.evidence,
        percentile=latency.percentile if latency is not None else "p95",
    )


def _bp(share: float) -> int:
    return max(1, round(share * TOTAL))


_DEFAULT_PARAMS = _default_params()


# --- Reading one cluster: evidence, hysteresis clocks, and what they say ---


@dataclass(frozen=True, slots=True)
class _Health:
    evidence: bool
    over_now: frozenset[str]  # triggers reading above enter now
    over_held: frozenset[str]  # ... and for at least their enterAfter
    above_exit: bool  # some trigger, with evidence, reads at or above its exit threshold
    clear_now: bool  # every trigger, with evidence, reads below its exit threshold
    clear_held: bool  # ... and has for at least its exitAfter


def _fresh(obs: TargetObservation, p: _Params, now: float) -> bool:
    return now - obs.observed_at <= p.evidence.max_age


# A target holding a small share still needs this many samples: with 5 the percentile is
# about the slowest answer seen, so recovery is judged conservatively, never on one or two.
_MIN_SCALED_SAMPLES = 5


def _required_samples(p: _Params, share: int) -> int:
    """``minSamples`` assumes all of the caller's traffic; a target sent only ``share`` (basis
    points) of it, such as the degraded local copy holding the kept share, can produce only that
    fraction of the samples in the same window. Scale the requirement with the share (never
    below ``_MIN_SCALED_SAMPLES``, never above ``minSamples``), so its recovery is still seen."""
    scaled = math.ceil(p.evidence.min_samples * share / TOTAL)
    return min(p.evidence.min_samples, max(_MIN_SCALED_SAMPLES, scaled))


# Probes come at a fixed pace (about one per endpoint per second), not with load: minSamples,
# sized for requests, could take one endpoint's probes longer than its summary keeps them.
_MIN_PROBE_SAMPLES = 5


def _required(obs: TargetObservation, p: _Params, share: int) -> int:
    if obs.source == "probes":
        return min(p.evidence.min_samples, _MIN_PROBE_SAMPLES)
    return _required_samples(p, share)


def _has_evidence(obs: TargetObservation, p: _Params, now: float, share: int = TOTAL) -> bool:
    return _fresh(obs, p, now) and obs.samples >= _required(obs, p, share)


def _has_recent(obs: TargetObservation, p: _Params, now: float, share: int) -> bool:
    return (
        obs.recent_start is not None
        and _fresh(obs, p, now)
        and obs.recent_samples >= _required_samples(p, share)
    )


def _tick(
    clock: TriggerClock,
    value: float | None,
    entering: float | None,
    began: float | None,
    enter: float,
    exit_: float,
    now: float,
) -> TriggerClock:
    """Advance one trigger's clocks: ``value`` is the long reading (exit), ``entering`` the one
    read to enter (the short span's when it has evidence), ``began`` the start of that span."""
    if value is None and entering is None:
        # No evidence this tick: it says neither degraded nor healthy, so the clocks stand
        # still. (Starting them over made a copy holding only the kept share, whose few
        # samples dip below the minimum now and then, wait far longer to be seen recovered.)
        return clock
    over_since = None
    if entering is not None and entering > enter:
        # A new degradation is dated from the start of its first slow span, not this tick.
        start = began if began is not None else now
        over_since = clock.over_since if clock.over_since is not None else min(start, now)
    under_since = None
    if value is not None and value < exit_:
        under_since = clock.under_since if clock.under_since is not None else now
    return TriggerClock(over_since=over_since, under_since=under_since)


def _assess(
    obs: TargetObservation, previous: ClusterClocks, p: _Params, now: float, share: int = TOTAL
) -> tuple[ClusterClocks, _Health]:
    evidence = _has_evidence(obs, p, now, share)
    recent = _has_recent(obs, p, now, share)
    began = obs.recent_start if recent else None
    readings: list[tuple[str, TriggerClock, float | None, float, float]] = []
    latency_clock = error_clock = TriggerClock()
    if p.latency is not None:
        pct = p.latency.percentile
        value = obs.latency(pct) if evidence else None
        entering = obs.recent_latency(pct) if recent else value
        latency_clock = _tick(
            previous.latency, value, entering, began, p.latency.enter, p.latency.exit, now
        )
        readings.append(
            (_LATENCY, latency_clock, value, p.latency.enter_after, p.latency.exit_after)
        )
    if p.error_rate is not None:
        value = obs.error_rate if evidence else None
        entering = obs.recent_error_rate if recent else value
        error_clock = _tick(
            previous.error_rate, value, entering, began, p.error_rate.enter, p.error_rate.exit, now
        )
        readings.append(
            (_ERRORS, error_clock, value, p.error_rate.enter_after, p.error_rate.exit_after)
        )
    over_now = frozenset(name for name, clock, *_ in readings if clock.over_since is not None)
    over_held = frozenset(
        name
        for name, clock, _, enter_after, _ in readings
        if clock.over_since is not None and now - clock.over_since >= enter_after
    )
    measured = [r for r in readings if r[2] is not None]
    # Without triggers (no policy) nothing says degraded: clear, so held traffic comes home.
    clear_now = len(measured) == len(readings) and all(
        clock.under_since is not None for _, clock, *_ in readings
    )
    clear_held = clear_now and all(
        clock.under_since is not None and now - clock.under_since >= exit_after
        for _, clock, _, _, exit_after in readings
    )
    above_exit = any(clock.under_since is None for _, clock, *_ in measured)
    health = _Health(evidence, over_now, over_held, above_exit, clear_now, clear_held)
    return ClusterClocks(latency=latency_clock, error_rate=error_clock), health


# --- Where traffic may go ---


def _entering_view(obs: TargetObservation, p: _Params, now: float, share: int) -> TargetObservation:
    if not _has_recent(obs, p, now, share):
        return obs
    return replace(
        obs,
        p50=obs.recent_p50,
        p90=obs.recent_p90,
        p95=obs.recent_p95,
        p99=obs.recent_p99,
        error_rate=obs.recent_error_rate,
    )


def _expected(obs: TargetObservation, p: _Params) -> float | None:
    latency = obs.latency(p.percentile)
    return None if latency is None else latency + obs.rtt


def _better_than_local(
    obs: TargetObservation, local: TargetObservation, reasons: frozenset[str], p: _Params
) -> bool:
    if _LATENCY in reasons:
        mine, theirs = _expected(local, p), _expected(obs, p)
        if mine is None or theirs is None or theirs >= mine:
            return False
    return not (_ERRORS in reasons and obs.error_rate >= local.error_rate)


def _ranked(clusters: list[TargetObservation], p: _Params) -> list[str]:
    if p.targets == NEAREST:
        by_latency = sorted(
            clusters,
            key=lambda o: (_expected(o, p) is None, _expected(o, p) or 0.0, o.rtt, o.cluster),
        )
        return [o.cluster for o in by_latency]
    listed = {o.cluster for o in clusters}
    return [c for c in p.targets if c in listed]


def _allowed(cluster: str, p: _Params) -> bool:
    return p.targets == NEAREST or cluster in p.targets


@dataclass(frozen=True, slots=True)
class _Allocation:
    weights: dict[str, int]
    headroom_limited: bool
    lost: tuple[str, ...]


def _allocate(
    old: Mapping[str, int],
    local: str,
    away: int,
    order: list[str],
    retained: set[str],
    caps: Mapping[str, int | None],
) -> _Allocation:
    """Place ``away`` basis points off the local cluster: keep what usable targets hold, add to
    ``order`` first to last, remove from the least preferred first; the rest stays local."""
    placed: dict[str, int] = {}
    limited = False
    lost = tuple(sorted(c for c, w in old.items() if c != local and w > 0 and c not in retained))
    for cluster in retained:
        cap = caps.get(cluster)
        held = old.get(cluster, 0)
        if cap is not None and held > cap:
            held, limited = cap, True
        placed[cluster] = held
    total = sum(placed.values())
    if total < away:
        for cluster in order:
            cap = caps.get(cluster)
            room = (
                (away - total) if cap is None else min(away - total, cap - placed.get(cluster, 0))
            )
            if room > 0:
                placed[cluster] = placed.get(cluster, 0) + room
                total += room
            if total >= away:
                break
        limited = limited or (total < away and any(caps.get(c) is not None for c in order))
    elif total > away:
        rank = {cluster: index for index, cluster in enumerate(order)}
        for cluster in sorted(placed, key=lambda c: (-rank.get(c, len(order)), c)):
            take = min(placed[cluster], total - away)
            placed[cluster] -= take
            total -= take
            if total <= away:
                break
    weights = {c: w for c, w in placed.items() if w > 0}
    weights[local] = TOTAL - sum(weights.values())
    return _Allocation(weights, limited, lost)


# --- The decision ---


def decide(
    policy: FailoverPolicy | None,
    state: ControllerState,
    observations: Observations,
    now: float,
) -> Decision:
    """One tick for one service in one caller cluster: the new weights, the state, and why."""
    p = _params(policy)
    local = observations.local
    seen = {o.cluster: o for o in observations.targets}
    old = _checked_weights(state.weights, local)
    clocks: dict[str, ClusterClocks] = {}
    health: dict[str, _Health] = {}
    for cluster, obs in seen.items():
        # Only the local copy's samples follow the share this caller sends it; a remote
        # target's statistics are its service's own, whatever this caller sends.
        share = old.get(local, 0) if cluster == local else TOTAL
        clocks[cluster], health[cluster] = _assess(
            obs, state.clocks.get(cluster, ClusterClocks()), p, now, share
        )
    expected = {
        c: e for c, o in seen.items() if health[c].evidence and (e := _expected(o, p)) is not None
    }
    kept = replace(state, clocks=clocks)
    local_obs = seen.get(local)
    if local_obs is None or not _fresh(local_obs, p, now):
        return _finish(
            state,
            kept,
            local,
            seen,
            old,
            dict(old),
            Rule.NO_LOCAL_DATA,
            now,
            expected,
            f"no fresh observation of the local cluster {local}: holding weights",
        )
    ctx = _Context(
        p,
        local,
        local_obs,
        seen,
        health,
        clocks[local],
        old,
        now,
        observations.request_rate,
        _entering_view(local_obs, p, now, old.get(local, 0)),
    )
    if local_obs.healthy_endpoints == 0:
        return ctx.hard_failure(state, kept, expected)
    mode, recovered_at, notes = state.mode, state.recovered_at, []
    if mode is Mode.LOCAL_DOWN:
        mode, recovered_at = Mode.FAILING_BACK, now
        notes.append(f"local endpoints healthy again ({local_obs.healthy_endpoints})")
    elif mode is Mode.STEADY and ctx.away > 0:
        # A state that starts with traffic away (a restart, a hand-made state) comes home.
        mode, recovered_at = Mode.FAILING_BACK, now
    kept = replace(kept, mode=mode, recovered_at=recovered_at)
    if mode is Mode.STEADY:
        return ctx.steady(state, kept, expected)
    if mode in (Mode.SHIFTING, Mode.DEGRADED_HELD):
        if health[local].clear_held:
            kept = replace(kept, mode=Mode.FAILING_BACK, recovered_at=now)
            notes.append(f"recovered: {ctx.readings()} below exit for exitAfter")
        else:
            return ctx.degraded(state, kept, expected)
    return ctx.failing_back(state, kept, expected, notes)


def _checked_weights(weights: Mapping[str, int], local: str) -> dict[str, int]:
    if not weights:
        return {local: TOTAL}
    if any(w < 0 for w in weights.values()) or sum(weights.values()) != TOTAL:
        raise ValueError(
            f"controller state weights must be non-negative and sum to {TOTAL}: {dict(weights)}"
        )
    result = {c: w for c, w in weights.items() if w > 0}
    result.setdefault(local, 0)
    return result


@dataclass(frozen=True, slots=True)
class _Context:
    p: _Params
    local: str
    local_obs: TargetObservation
    seen: Mapping[str, TargetObservation]
    health: Mapping[str, _Health]
    clocks: ClusterClocks  # the local cluster's
    old: Mapping[str, int]
    now: float
    request_rate: float
    # The local copy as its triggers read it to enter (the short span, when it has evidence):
    # a target must beat that, or a degradation seen early has nowhere to go.
    local_entering: TargetObservation

    @property
    def away(self) -> int:
        return TOTAL - self.old.get(self.local, 0)

    def readings(self) -> str:
        """The local triggers' readings against their thresholds, for explanations."""
        parts = []
        if self.p.latency is not None:
            value = self.local_obs.latency(self.p.latency.percentile)
            shown = "n/a" if value is None else _ms(value)
            recent = self.local_obs.recent_latency(self.p.latency.percentile)
            if self.local_obs.recent_start is not None and recent is not None:
                span = self.local_obs.observed_at - self.local_obs.recent_start
                shown += f" (last {span:g}s {_ms(recent)})"
            parts.append(
                f"{self.p.latency.percentile} {shown} (enter {_ms(self.p.latency.enter)}, "
                f"exit {_ms(self.p.latency.exit)})"
            )
        if self.p.error_rate is not None:
            parts.append(
                f"errors {_pct(self.local_obs.error_rate)} (enter {_pct(self.p.error_rate.enter)}, "
                f"exit {_pct(self.p.error_rate.exit)})"
            )
        if not self.health[self.local].evidence:
            needed = _required_samples(self.p, self.old.get(self.local, 0))
            parts.append(f"only {self.local_obs.samples} samples of {needed}: no evidence")
        return f"{self.local} " + ", ".join(parts) if parts else self.local

    def _held(self, side: Literal["over", "under"]) -> str:
        """How long each running local clock has held against what it needs."""
        parts = []
        for name, trigger, clock in (
            ("latency", self.p.latency, self.clocks.latency),
            ("errors", self.p.error_rate, self.clocks.error_rate),
        ):
            since = clock.over_since if side == "over" else clock.under_since
            if trigger is None or since is None:
                continue
            needed = trigger.enter_after if side == "over" else trigger.exit_after
            parts.append(f"{name} for {self.now - since:g}s of {needed:g}s")
        return "(" + ", ".join(parts) + ")" if parts else ""

    def _caps(self) -> dict[str, int | None]:
        caps: dict[str, int | None] = {}
        for cluster, obs in self.seen.items():
            headroom = obs.headroom
            if (
                not self.p.respect_headroom
                or headroom is None
                or not math.isfinite(headroom)
                or self.request_rate <= 0
            ):
                caps[cluster] = None
            else:
                extra = math.floor(headroom / self.request_rate * TOTAL)
                caps[cluster] = max(0, self.old.get(cluster, 0) + extra)
        return caps

    def _retained(self) -> set[str]:
        keep = set()
        for cluster, weight in self.old.items():
            obs = self.seen.get(cluster)
            if cluster == self.local or weight == 0 or obs is None or not _allowed(cluster, self.p):
                continue
            fresh = _fresh(obs, self.p, self.now)
            # Only positive evidence evicts: stale data says nothing either way.
            if fresh and (obs.healthy_endpoints == 0 or self.health[cluster].over_held):
                continue
            keep.add(cluster)
        return keep

    def _candidates(self, reasons: frozenset[str]) -> list[str]:
        usable = [
            obs
            for cluster, obs in self.seen.items()
            if cluster != self.local
            and _allowed(cluster, self.p)
            and obs.healthy_endpoints > 0
            and self.health[cluster].evidence
            and not self.health[cluster].over_now
            and _better_than_local(obs, self.local_entering, reasons, self.p)
        ]
        return _ranked(usable, self.p)

    def _move(self, away: int, order: list[str]) -> _Allocation:
        return _allocate(self.old, self.local, away, order, self._retained(), self._caps())

    def hard_failure(
        self, state: ControllerState, kept: ControllerState, expected: Mapping[str, float]
    ) -> Decision:
        reachable = [
            o
            for c, o in self.seen.items()
            if c != self.local
            and _allowed(c, self.p)
            and _fresh(o, self.p, self.now)
            and o.healthy_endpoints > 0
        ]
        preferred = _ranked(
            [
                o
                for o in reachable
                if self.health[o.cluster].evidence and not self.health[o.cluster].over_now
            ],
            self.p,
        )
        order = preferred + [c for c in _ranked(reachable, self.p) if c not in preferred]
        moved = self._move(TOTAL, order)
        note = f"no healthy local endpoint in {self.local}: moving everything that can move now"
        if not order:
            note += "; no healthy target either"
        elif moved.weights[self.local] > 0:
            note += f"; {_pct(moved.weights[self.local] / TOTAL)} stays local (target headroom)"
        kept = replace(kept, mode=Mode.LOCAL_DOWN, recovered_at=None)
        return self._done(state, kept, moved.weights, Rule.NO_HEALTHY_LOCAL, expected, note)

    def steady(
        self, state: ControllerState, kept: ControllerState, expected: Mapping[str, float]
    ) -> Decision:
        local = self.health[self.local]
        if not local.over_held:
            note = f"{self.readings()}"
            if local.over_now:
                note += f": above enter {self._held('over')}"
            return self._done(state, kept, dict(self.old), Rule.HOLD, expected, note)
        return self._step_away(
            state,
            replace(kept, mode=Mode.SHIFTING),
            expected,
            Rule.ENTER_DEGRADED,
            local.over_held,
            [],
        )

    def degraded(
        self, state: ControllerState, kept: ControllerState, expected: Mapping[str, float]
    ) -> Decision:
        local = self.health[self.local]
        if local.clear_now:
            return self._hold(
                state,
                kept,
                expected,
                Rule.EXIT_PENDING,
                f"{self.readings()}: below exit {self._held('under')}",
            )
        if not local.over_now:
            return self._hold(
                state,
                kept,
                expected,
                Rule.HOLD,
                f"{self.readings()}: between exit and enter (or no evidence)",
            )
        if not local.over_held:
            # Any move away needs the enter threshold held, also after a dip mid-ramp.
            return self._hold(
                state,
                kept,
                expected,
                Rule.HOLD,
                f"{self.readings()}: above enter {self._held('over')}",
            )
        due = state.last_step_at is None or self.now - state.last_step_at >= self.p.ramp_interval
        if self.away < self.p.cap_away and due:
            # Moving away again after failback began is a new entry, not a continued ramp.
            rule = Rule.ENTER_DEGRADED if state.last_direction is Direction.BACK else Rule.RAMP_STEP
            return self._step_away(state, kept, expected, rule, local.over_held, [])
        note = f"{self.readings()}: still degraded"
        if self.away >= self.p.cap_away:
            note += f"; {_pct(self.away / TOTAL)} moved, the cap"
        return self._hold(state, kept, expected, Rule.HOLD, note)

    def failing_back(
        self,
        state: ControllerState,
        kept: ControllerState,
        expected: Mapping[str, float],
        notes: list[str],
    ) -> Decision:
        local = self.health[self.local]
        if local.over_held:
            kept = replace(kept, mode=Mode.SHIFTING, recovered_at=None)
            return self._step_away(
                state, kept, expected, Rule.ENTER_DEGRADED, local.over_held, notes
            )
        if local.above_exit:
            kept = replace(kept, mode=Mode.DEGRADED_HELD, recovered_at=None)
            return self._hold(
                state,
                kept,
                expected,
                Rule.HOLD,
                _join(notes, f"{self.readings()}: above exit, failback paused"),
            )
        recovered_at = kept.recovered_at if kept.recovered_at is not None else self.now
        kept = replace(kept, recovered_at=recovered_at)
        stable = self.now - recovered_at
        if self.away == 0:
            kept = replace(kept, mode=Mode.STEADY, recovered_at=None)
            return self._done(
                state,
                kept,
                dict(self.old),
                Rule.FAILBACK_COMPLETE,
                expected,
                _join(notes, "all traffic is local"),
            )
        if stable < self.p.failback.stable_for:
            return self._hold(
                state,
                kept,
                expected,
                Rule.EXIT_PENDING,
                _join(
                    notes,
                    f"stable for {stable:g}s of {self.p.failback.stable_for:g}s before failback",
                ),
            )
        due = state.last_step_at is None or (
            self.now - state.last_step_at >= self.p.failback.interval
        )
        if not due:
            return self._hold(
                state,
                kept,
                expected,
                Rule.HOLD,
                _join(notes, "failing back: waiting for the next step"),
            )
        order = self._candidates(frozenset())
        moved = self._move(max(0, self.away - self.p.failback_step), order)
        if moved.weights[self.local] == TOTAL:
            kept = replace(kept, mode=Mode.STEADY, recovered_at=None)
            return self._done(
                state,
                kept,
                moved.weights,
                Rule.FAILBACK_COMPLETE,
                expected,
                _join(notes, "failback complete: all traffic local"),
            )
        return self._done(
            state,
            kept,
            moved.weights,
            Rule.FAILBACK_STEP,
            expected,
            _join(notes, f"{self.readings()}: failing back one step"),
        )

    def _done(
        self,
        state: ControllerState,
        kept: ControllerState,
        new: Mapping[str, int],
        rule: Rule,
        expected: Mapping[str, float],
        note: str,
    ) -> Decision:
        return _finish(
            state, kept, self.local, self.seen, self.old, new, rule, self.now, expected, note
        )

    def _hold(
        self,
        state: ControllerState,
        kept: ControllerState,
        expected: Mapping[str, float],
        rule: Rule,
        note: str,
    ) -> Decision:
        # Holding keeps the total moved, but still re-homes share from targets that are lost
        # or over their headroom.
        moved = self._move(self.away, self._candidates(self.health[self.local].over_now))
        if moved.lost and moved.weights != _nonzero(self.old, self.local):
            rule, note = Rule.TARGET_LOST, f"{', '.join(moved.lost)} unusable; {note}"
        elif moved.headroom_limited and moved.weights != _nonzero(self.old, self.local):
            rule, note = Rule.HEADROOM_LIMITED, f"over target headroom; {note}"
        return self._done(state, kept, moved.weights, rule, expected, note)

    def _step_away(
        self,
        state: ControllerState,
        kept: ControllerState,
        expected: Mapping[str, float],
        rule: Rule,
        reasons: frozenset[str],
        notes: list[str],
    ) -> Decision:
        goal = min(self.away + self.p.ramp_step, self.p.cap_away)
        order = self._candidates(reasons)
        moved = self._move(goal, order)
        away = TOTAL - moved.weights[self.local]
        why = " and ".join(sorted(reasons))
        note = f"{self.readings()}: degraded by {why}"
        if not order and away <= self.away:
            rule = Rule.NO_TARGET
            note += "; no target is usable (healthy, with evidence, not degraded, and faster)"
        elif away < goal and moved.headroom_limited:
            if rule is not Rule.ENTER_DEGRADED:
                rule = Rule.HEADROOM_LIMITED
            note += f"; target headroom allows {_pct(away / TOTAL)} of {_pct(goal / TOTAL)}"
        elif away >= self.p.cap_away:
            if rule is Rule.RAMP_STEP:
                rule = Rule.CAP_REACHED
            kept = replace(kept, mode=Mode.DEGRADED_HELD)
            note += f"; {_pct(away / TOTAL)} moved, the cap"
        else:
            kept = replace(kept, mode=Mode.SHIFTING)
        return self._done(state, kept, moved.weights, rule, expected, _join(notes, note))


def _nonzero(weights: Mapping[str, int], local: str) -> dict[str, int]:
    result = {c: w for c, w in weights.items() if w > 0}
    result.setdefault(local, 0)
    return result


def _finish(
    state: ControllerState,
    kept: ControllerState,
    local: str,
    seen: Mapping[str, TargetObservation],
    old: Mapping[str, int],
    new: Mapping[str, int],
    rule: Rule,
    now: float,
    expected: Mapping[str, float],
    note: str,
) -> Decision:
    local_old = old.get(local, 0)
    clusters = sorted(set(old) | set(new) | set(seen))
    weights = {c: new.get(c, 0) for c in clusters}
    previous = {c: old.get(c, 0) for c in clusters}
    changed = weights != previous
    direction: Direction | None = None
    if weights.get(local, 0) < local_old:
        direction = Direction.AWAY
    elif weights.get(local, 0) > local_old:
        direction = Direction.BACK
    transition = direction if direction is not None and direction != state.last_direction else None
    kept = replace(
        kept,
        weights={c: w for c, w in weights.items() if w > 0},
        last_step_at=now if changed else state.last_step_at,
        last_direction=direction if direction is not None else state.last_direction,
    )
    return Decision(
        at=now,
        rule=rule,
        weights=weights,
        previous_weights=previous,
        state=kept,
        explanation=_explain(
            note,
            previous,
            weights,
            expected,
            frozenset(c for c, o in seen.items() if o.source == "probes"),
        ),
        transition=transition,
        expected_latency=dict(expected),
    )


def _explain(
    note: str,
    previous: Mapping[str, int],
    weights: Mapping[str, int],
    expected: Mapping[str, float],
    probed: frozenset[str],
) -> str:
    changes = [
        f"{c} {_pct(previous[c] / TOTAL)}→{_pct(weights[c] / TOTAL)}"
        for c in weights
        if weights[c] != previous[c]
    ]
    moved = "weights " + ", ".join(changes) if changes else "weights unchanged"
    parts = [note, moved]
    if expected:
        parts.append(
            "expected latency "
            + ", ".join(
                f"{c} {_ms(e)}" + (" (probes + RTT: the copy is idle)" if c in probed else "")
                for c, e in sorted(expected.items())
            )
        )
    return "; ".join(parts)


def _join(notes: list[str], note: str) -> str:
    return "; ".join([*notes, note])


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms"


def _pct(share: float) -> str:
    return f"{share * 100:.4g}%"


# --- Replaying a trace ---


def simulate(
    policy: FailoverPolicy | None,
    trace: Trace,
    *,
    rng: random.Random | None = None,
    state: ControllerState | None = None,
) -> tuple[Decision, ...]:
    """Replay ``trace`` through ``decide``, one tick at a time, and return every decision.

    Time starts at 0. Jitter is drawn from ``rng`` (by default seeded with the trace's seed),
    so a replay is repeatable. A remote cluster's reported headroom is the trace's headroom
    minus what this caller currently sends it, so the capacity guard sees its own effect; the
    local cluster's sample count is the trace's times the share this caller sends it, so a
    small kept share rests on few samples, as it does live.
    """
    spec = trace.spec
    draw = rng if rng is not None else random.Random(spec.seed)
    current = state if state is not None else ControllerState.initial(spec.caller)
    ticks = math.floor(spec.duration / spec.tick + 1e-9)
    decisions: list[Decision] = []
    for index in range(ticks + 1):
        now = index * spec.tick
        targets = tuple(
            _observe(
                name,
                cluster,
                now,
                draw,
                current.weights,
                spec.request_rate,
                local=name == spec.caller,
            )
            for name, cluster in sorted(spec.clusters.items())
        )
        decision = decide(
            policy, current, Observations(spec.caller, spec.request_rate, targets), now
        )
        decisions.append(decision)
        current = decision.state
    return tuple(decisions)


_PERCENTILES: tuple[Percentile, ...] = ("p50", "p90", "p95", "p99")


def _observe(
    name: str,
    cluster: TraceCluster,
    now: float,
    draw: random.Random,
    weights: Mapping[str, int],
    request_rate: float,
    *,
    local: bool,
) -> TargetObservation:
    sample = cluster.start
    extra = 0.0
    for change in cluster.changes:
        if change.applies(now):
            written = change.set_.model_fields_set
            sample = sample.model_copy(update={k: getattr(change.set_, k) for k in written})
            extra += change.add_latency
    noise = cluster.jitter
    shift = extra + (draw.uniform(-noise.latency, noise.latency) if noise.latency else 0.0)
    latency = {
        p: None if (v := getattr(sample, p)) is None else max(0.0, v + shift) for p in _PERCENTILES
    }
    error_rate = sample.error_rate or 0.0
    if noise.error_rate:
        error_rate = min(
            1.0, max(0.0, error_rate + draw.uniform(-noise.error_rate, noise.error_rate))
        )
    rtt = sample.rtt or 0.0
    if noise.rtt:
        rtt = max(0.0, rtt + draw.uniform(-noise.rtt, noise.rtt))
    headroom = sample.headroom
    if headroom is not None and not local:
        # The trace's headroom is before this caller sends anything; report what is left.
        headroom -= weights.get(name, 0) / TOTAL * request_rate
    samples = sample.samples if sample.samples is not None else 100
    if local:
        # The trace's count is with all of the caller's traffic local; the local copy sees only
        # the share it is sent (at the cap, the kept share), as a real window would.
        share = weights.get(name, 0) if weights else TOTAL  # no weights yet: all local
        samples = round(samples * share / TOTAL)
    return TargetObservation(
        cluster=name,
        observed_at=now - (sample.age or 0.0),
        samples=samples,
        healthy_endpoints=sample.healthy_endpoints if sample.healthy_endpoints is not None else 1,
        p50=latency["p50"],
        p90=latency["p90"],
        p95=latency["p95"],
        p99=latency["p99"],
        error_rate=error_rate,
        rtt=rtt,
        headroom=headroom,
    )
