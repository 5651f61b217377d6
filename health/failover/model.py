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
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Final, Literal, Self

from pydantic import BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from proxy.config.model import Document, Duration, Frozen, Name, Share

Percentile = Literal["p50", "p90", "p95", "p99"]
"""A latency percentile that observations carry and triggers compare."""

NEAREST: Final = "nearest"

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
            raise ValueError("enter must be a latency above 0ms")
        if self.exit >= self.enter:
            raise ValueError(
                "exit must be below enter, so that a latency between the two changes nothing"
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
            raise ValueError("enter must be an error rate above 0%")
        if self.exit >= self.enter:
            raise ValueError(
                "exit must be below enter, so that an error rate between the two changes nothing"
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


class Evidence(_Spec):
    """What counts as evidence: at least ``min_samples`` requests, observed within ``max_age``.
    A target without evidence is neither degraded nor healthy: it is not chosen, and its clocks
    do not run."""

    min_samples: int = Field(default=10, ge=1)
    max_age: Duration = 5.0


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
