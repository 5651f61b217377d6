"""FailoverPolicy: when and how a caller cluster's traffic for a service leaves its local copy.

A policy names a service and the triggers that mark a target cluster degraded (a latency
percentile and/or an error rate, each with an enter threshold, a lower exit threshold and how
long each must hold), where traffic may go (an ordered list of clusters or ``nearest``), how fast
it moves (ramp), how much may move (``maxShare``), how much stays on the degraded copy so its
recovery is seen (``keepShare``), how it comes back (failback) and whether the targets' reported
headroom bounds what they are sent (capacity).

Files use camelCase keys (``enterAfter``, ``keepShare``); the values expose snake_case
attributes. Example::

    apiVersion: snapbright.io/v1alpha1
    kind: FailoverPolicy
    metadata: {name: payments}
    spec:
      service: payments
      triggers:
        latency: {percentile: p95, enter: 300ms, exit: 150ms, enterAfter: 1s, exitAfter: 5s}
        errorRate: {enter: 5%, exit: 1%}
      targets: nearest
      ramp: {step: 25%, interval: 1s}
      maxShare: 100%
      keepShare: 2%
      failback: {stableFor: 10s, step: 20%, interval: 2s}
      evidence: {minSamples: 10, maxAge: 5s, enterSpan: 1s}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Final, Literal, Self

from pydantic import BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from proxy.config.model import Document, Duration, FieldError, Frozen, Name, Share

Percentile = Literal["p50", "p90", "p95", "p99"]
"""A latency percentile that observations carry and triggers compare."""

NEAREST: Final = "nearest"

EvidenceSource = Literal["traffic", "probes"]
"""What a target's latencies rest on: requests, or (an idle remote copy) its own cluster's
health probes of its endpoints."""

_CLUSTER_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _parse_targets(value: Any) -> Any:
    # One clear message instead of pydantic's two union branches.
    if value == NEAREST:
        return NEAREST
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("must be `nearest` or a non-empty list of cluster names")
    for index, name in enumerate(value):
        if not isinstance(name, str) or _CLUSTER_NAME.match(name) is None:
            raise ValueError(
                f"item {index} ({name!r}) is not a cluster name (a lowercase DNS label)"
            )
    if len(set(value)) != len(value):
        raise ValueError("must not name a cluster twice")
    return tuple(value)


Targets = Annotated[
    tuple[Name, ...] | Literal["nearest"],
    Field(union_mode="left_to_right"),
    BeforeValidator(_parse_targets),
]
"""An ordered preference list of clusters, or ``nearest`` (lowest expected latency)."""


class _Spec(Frozen):
    """Spec values: camelCase keys in files, snake_case attributes in code."""

    model_config = ConfigDict(alias_generator=to_camel)


class LatencyTrigger(_Spec):
    """Degraded when the service's latency percentile stays above ``enter`` for ``enter_after``;
    recovered when it stays below ``exit`` for ``exit_after``. Between the two nothing changes."""

    percentile: Percentile = "p95"
    enter: Duration
    exit: Duration
    enter_after: Duration = 1.0
    exit_after: Duration = 5.0

    @model_validator(mode="after")
    def _exit_below_enter(self) -> Self:
        if self.enter <= 0:
            raise FieldError(("enter",), "must be a latency above 0ms")
        if self.exit >= self.enter:
            raise FieldError(
                ("exit",), "must be below enter, so that a latency between the two changes nothing"
            )
        return self


class ErrorRateTrigger(_Spec):
    """Degraded when the error rate stays above ``enter`` for ``enter_after``; recovered when it
    stays below ``exit`` for ``exit_after``."""

    enter: Share
    exit: Share
    enter_after: Duration = 1.0
    exit_after: Duration = 5.0

    @model_validator(mode="after")
    def _exit_below_enter(self) -> Self:
        if self.enter <= 0:
            raise FieldError(("enter",), "must be an error rate above 0%")
        if self.exit >= self.enter:
            raise FieldError(
                ("exit",),
                "must be below enter, so that an error rate between the two changes nothing",
            )
        return self


class Triggers(_Spec):
    """What marks a target degraded; either trigger suffices to enter, both must clear to exit."""

    latency: LatencyTrigger | None = None
    error_rate: ErrorRateTrigger | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> Self:
        if self.latency is None and self.error_rate is None:
            raise ValueError("set a latency trigger, an errorRate trigger, or both")
        return self


class Ramp(_Spec):
    """Traffic moves away in steps of at most ``step``, at least ``interval`` apart."""

    step: Share = 0.25
    interval: Duration = 1.0

    @field_validator("step")
    @classmethod
    def _positive_step(cls, step: float) -> float:
        if step <= 0:
            raise ValueError("must be above 0%, or traffic never moves")
        return step


class Failback(_Spec):
    """Once recovered (exit thresholds held), wait ``stable_for``, then move back in steps of at
    most ``step`` at least ``interval`` apart."""

    stable_for: Duration = 10.0
    step: Share = 0.2
    interval: Duration = 2.0

    @field_validator("step")
    @classmethod
    def _positive_step(cls, step: float) -> float:
        if step <= 0:
            raise ValueError("must be above 0%, or traffic never comes back")
        return step


class Capacity(_Spec):
    """Never send a target more than its reported headroom (requests/s beyond its load)."""

    respect_headroom: bool = True


_MAX_ENTER_SPAN = 10.0  # the window the controller decides on (health.stats.core.SHORT_SPAN_S)


class Evidence(_Spec):
    """What counts as evidence: at least ``min_samples`` requests, observed within ``max_age``.
    A target without evidence is neither degraded nor healthy: it is not chosen, and its clocks
    do not run.

    ``enter_span`` is how many of the newest closed seconds of the callers' statistics a
    trigger reads to *enter* degraded (exit and failback read the whole window). Short, so a
    brownout shows within a second; longer keeps a one-second spike over the threshold for as
    many ticks. Whole seconds: the statistics come in one-second windows."""

    min_samples: int = Field(default=10, ge=1)
    max_age: Duration = 5.0
    enter_span: Duration = 1.0

    @field_validator("enter_span")
    @classmethod
    def _whole_seconds(cls, span: float) -> float:
        if span != int(span) or not 1 <= span <= _MAX_ENTER_SPAN:
            raise ValueError(
                f"must be a whole number of seconds from 1s to {_MAX_ENTER_SPAN:g}s "
                "(the statistics come in one-second windows; the decision window is 10s)"
            )
        return span


class FailoverPolicySpec(_Spec):
    """The substance of a FailoverPolicy."""

    service: Name
    triggers: Triggers
    # An ordered preference list, or "nearest": the lowest expected latency for this caller.
    targets: Targets = NEAREST
    ramp: Ramp = Ramp()
    max_share: Share = 1.0
    # Small by default: any share above about 5% owns the caller's p95.
    keep_share: Share = 0.02
    failback: Failback = Failback()
    capacity: Capacity = Capacity()
    evidence: Evidence = Evidence()

    @field_validator("max_share")
    @classmethod
    def _positive_max_share(cls, share: float) -> float:
        if share <= 0:
            raise ValueError("must be above 0%, or the policy never moves traffic")
        return share

    @field_validator("keep_share")
    @classmethod
    def _small_keep_share(cls, share: float) -> float:
        if share > 0.5:
            raise ValueError(
                "must be at most 50%: it is the probe share left on a degraded target "
                "(5% or less keeps it out of the caller's p95)"
            )
        return share


class FailoverPolicy(Document):
    """A FailoverPolicy document: latency- and error-driven, gradual, explained failover."""

    KIND: ClassVar[str] = "FailoverPolicy"

    kind: Literal["FailoverPolicy"]
    spec: FailoverPolicySpec


# --- What the controller sees, remembers and decides (built by code, not read from files) ---

TOTAL_WEIGHT: Final = 10_000
"""Weights are integer basis points: every decision's weights sum to exactly this."""


@dataclass(frozen=True, slots=True)
class TargetObservation:
    """One target cluster of the service, as seen from this caller cluster at ``observed_at``.

    Latencies are the service's own latency percentiles in seconds (``None`` when not measured)
    without the network between; ``rtt`` is that network, from this caller cluster to the
    target's gateway (0 for the local cluster). ``headroom`` is the requests/s the target can
    take beyond its current load, or ``None`` when it does not say. ``samples`` is how many
    requests (or, with ``source`` ``probes``, probe round trips) the statistics rest on.
    """

    cluster: str
    observed_at: float
    samples: int
    healthy_endpoints: int
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    error_rate: float = 0.0
    rtt: float = 0.0
    headroom: float | None = None
    # The same statistics over only the newest, short span of the evidence (``recent_start``
    # to ``observed_at``), when the source has one: what a trigger reads to *enter*, so a
    # degradation shows within a second instead of once enough of a long window is slow, and
    # the start of the first slow span is when the degradation began. ``None``: no short span
    # (a trace's readings are instants, a remote summary is a whole window); the long reading
    # is used alone.
    recent_start: float | None = None
    recent_samples: int = 0
    recent_p50: float | None = None
    recent_p90: float | None = None
    recent_p95: float | None = None
    recent_p99: float | None = None
    recent_error_rate: float = 0.0
    # ``probes``: an idle remote copy's latencies, from its cluster's probes of its endpoints.
    source: EvidenceSource = "traffic"

    def latency(self, percentile: Percentile) -> float | None:
        """The service latency at ``percentile``, in seconds, if measured."""
        value: float | None = getattr(self, percentile)
        return value

    def recent_latency(self, percentile: Percentile) -> float | None:
        """The service latency at ``percentile`` over the short span, if measured."""
        value: float | None = getattr(self, f"recent_{percentile}")
        return value


@dataclass(frozen=True, slots=True)
class Observations:
    """Everything one tick of the controller sees for one service in one caller cluster."""

    local: str
    # The caller cluster's requests/s to the service: turns a target's headroom into a share.
    request_rate: float
    targets: tuple[TargetObservation, ...]


class Mode(StrEnum):
    """Where the controller stands for one (service, caller cluster)."""

    STEADY = "steady"
    SHIFTING = "shifting"
    DEGRADED_HELD = "degraded-held"
    FAILING_BACK = "failing-back"
    LOCAL_DOWN = "local-down"


class Rule(StrEnum):
    """The rule that fired for a decision."""

    HOLD = "hold"
    ENTER_DEGRADED = "enter-degraded"
    RAMP_STEP = "ramp-step"
    CAP_REACHED = "cap-reached"
    HEADROOM_LIMITED = "headroom-limited"
    NO_TARGET = "no-target"
    TARGET_LOST = "target-lost"
    EXIT_PENDING = "exit-pending"
    FAILBACK_STEP = "failback-step"
    FAILBACK_COMPLETE = "failback-complete"
    NO_HEALTHY_LOCAL = "no-healthy-local"
    NO_LOCAL_DATA = "no-local-data"


class Direction(StrEnum):
    """Which way traffic moved relative to the local cluster."""

    AWAY = "away"
    BACK = "back"


@dataclass(frozen=True, slots=True)
class TriggerClock:
    """Since when a trigger has read continuously above its enter / below its exit threshold."""

    over_since: float | None = None
    under_since: float | None = None


@dataclass(frozen=True, slots=True)
class ClusterClocks:
    """The hysteresis clocks of one target cluster."""

    latency: TriggerClock = TriggerClock()
    error_rate: TriggerClock = TriggerClock()


@dataclass(frozen=True, slots=True)
class ControllerState:
    """What the controller remembers between ticks for one (service, caller cluster)."""

    weights: Mapping[str, int]
    mode: Mode = Mode.STEADY
    clocks: Mapping[str, ClusterClocks] = field(default_factory=dict)
    # Start of the stable period before failback (None while not recovered).
    recovered_at: float | None = None
    last_step_at: float | None = None
    last_direction: Direction | None = None

    @classmethod
    def initial(cls, local: str) -> ControllerState:
        """All traffic local, nothing observed yet."""
        return cls(weights={local: TOTAL_WEIGHT})


@dataclass(frozen=True, slots=True)
class Decision:
    """One tick's outcome: the new weights, the state to keep, and why."""

    at: float
    rule: Rule
    weights: Mapping[str, int]
    previous_weights: Mapping[str, int]
    state: ControllerState
    explanation: str
    # Set when traffic starts moving the other way (the transitions people count).
    transition: Direction | None = None
    # Service latency plus network for every target with a measured latency, in seconds.
    expected_latency: Mapping[str, float] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        """Whether the weights differ from the previous ones."""
        clusters = set(self.weights) | set(self.previous_weights)
        return any(self.weights.get(c, 0) != self.previous_weights.get(c, 0) for c in clusters)


# --- Traces: scripted observations over time, replayed by ``simulate`` ---


def _as_tuple(value: Any) -> Any:
    # YAML gives lists; values hold tuples (strict mode would otherwise reject the list).
    return tuple(value) if isinstance(value, list) else value


class TraceSample(_Spec):
    """What one target cluster looks like; in a change, only the keys written apply.

    ``headroom`` is the requests/s the target can take before this caller sends it anything;
    the simulator subtracts what it sends. ``age`` makes the observation that much older than
    the tick (stale data is not evidence).
    """

    p50: Duration | None = None
    p90: Duration | None = None
    p95: Duration | None = None
    p99: Duration | None = None
    error_rate: Share | None = None
    rtt: Duration | None = None
    headroom: float | None = None
    healthy_endpoints: int | None = Field(default=None, ge=0)
    samples: int | None = Field(default=None, ge=0)
    age: Duration | None = None


class TraceChange(_Spec):
    """A change to a cluster from ``from`` on: until ``until`` if given (a segment), and only
    for ``for`` out of every ``every`` if given (pulses). ``set`` overrides values;
    ``addLatency`` adds to every measured latency percentile (a brownout)."""

    from_: Duration = Field(default=0.0, alias="from")
    until: Duration | None = None
    every: Duration | None = None
    for_: Duration | None = Field(default=None, alias="for")
    set_: TraceSample = Field(default=TraceSample(), alias="set")
    add_latency: Duration = 0.0

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.until is not None and self.until <= self.from_:
            raise FieldError(("until",), "must be after from")
        if (self.every is None) != (self.for_ is None):
            # Point at the key that is written: it is the one missing its partner.
            written, missing = ("for", "every") if self.every is None else ("every", "for")
            raise FieldError(
                (written,), f"needs `{missing}` too: pulses last `for` once every `every`"
            )
        if self.every is not None and self.for_ is not None and not 0 < self.for_ < self.every:
            raise FieldError(("for",), "must be above 0s and shorter than every")
        if not self.set_.model_fields_set and self.add_latency == 0:
            raise ValueError("a change needs `set` values or an `addLatency`")
        return self

    def applies(self, t: float) -> bool:
        """Whether this change is in force at time ``t`` (seconds from the trace start)."""
        if t < self.from_ or (self.until is not None and t >= self.until):
            return False
        if self.every is None or self.for_ is None:
            return True
        # Small epsilon: ticks computed as i * tick land exactly on pulse edges.
        return (t - self.from_) % self.every < self.for_ - 1e-9


class TraceJitter(_Spec):
    """Uniform noise of at most ± each amount, drawn per tick from the trace's seed."""

    latency: Duration = 0.0
    error_rate: Share = 0.0
    rtt: Duration = 0.0


class TraceCluster(_Spec):
    """One target cluster over time: where it starts, its changes, its noise."""

    start: TraceSample = TraceSample()
    changes: Annotated[tuple[TraceChange, ...], BeforeValidator(_as_tuple)] = ()
    jitter: TraceJitter = TraceJitter()


class TraceSpec(_Spec):
    """A scripted run: the caller cluster, its request rate, and every target cluster."""

    caller: Name
    duration: Duration
    tick: Duration = 1.0
    request_rate: float = Field(default=100.0, gt=0)
    seed: int = 0
    clusters: dict[Name, TraceCluster]

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.tick <= 0:
            raise FieldError(("tick",), "must be above 0s")
        if self.duration < self.tick:
            raise FieldError(("duration",), "must be at least one tick")
        if self.caller not in self.clusters:
            raise FieldError(("clusters",), f"must include the caller cluster {self.caller!r}")
        return self


class Trace(Document):
    """A FailoverTrace document: observations over time for ``snapbright policy simulate``."""

    KIND: ClassVar[str] = "FailoverTrace"

    kind: Literal["FailoverTrace"]
    spec: TraceSpec
