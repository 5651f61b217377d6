"""TrafficPolicy and AuthorizationPolicy: how a service is called, and who may call it.

A ``TrafficPolicy`` holds what the sidecar applies to calls to one service: timeouts, retries
(with a budget, backoff and idempotent methods only unless opted in), circuit breaking, outlier
detection, traffic splits across subsets and fault injection. Defaults follow Envoy and
Linkerd, and match the resilience core (``proxy.resilience.core``)::

    apiVersion: snapbright.io/v1alpha1
    kind: TrafficPolicy
    metadata: {name: payments}
    spec:
      service: payments
      timeouts: {connect: 1s, request: 5s}
      retries: {attempts: 3, retryOn: [connect-failure, gateway-error]}
      splits: [{subset: v1, weight: 90%}, {subset: v2, weight: 10%}]

An ``AuthorizationPolicy`` lists which SPIFFE IDs may call a service (one exact ID, a whole
trust domain, or an ID path prefix), on which ports, methods and path prefixes. Once a service
has any policy, whatever no rule allows is denied (see ``proxy.authz.core``).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, ClassVar, Literal, Self

from pydantic import AfterValidator, Field, field_validator, model_validator

from proxy.config.model import Document, Duration, FieldError, Name, Share, Spec
from proxy.identity.model import SpiffeId, TrustDomain

RetryOn = Literal["connect-failure", "reset", "gateway-error", "5xx"]
"""Failure classes a retry may be for: no connection made; connection broken after sending;
a 502, 503 or 504 answer; any 5xx answer."""

IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE")
"""Methods whose repetition has the effect of one request (RFC 9110, section 9.2.2)."""

Method = Annotated[str, Field(pattern=r"^[A-Z][A-Z_-]*$", max_length=32)]
"""An HTTP method, upper case as on the wire (``GET``, ``POST``, extension methods too)."""

Port = Annotated[int, Field(ge=1, le=65535)]

_PATH_CHARS = re.compile(r"^/[A-Za-z0-9\-._~!$&'()*+,=:@/]*$")


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be longer than 0s")
    return seconds


PositiveDuration = Annotated[Duration, AfterValidator(_positive)]


def _unique_at(field: str, values: tuple[object, ...], what: str) -> None:
    for index, value in enumerate(values):
        if value in values[:index]:
            raise FieldError((field, index), f"{what} {value!r} is listed twice")


# --- TrafficPolicy ---------------------------------------------------------------------------


class Timeouts(Spec):
    """How long a connection may take to open, a request to complete, a connection to idle."""

    # Linkerd's connect timeout (Envoy's is 5s): a peer that needs more is better failed over.
    connect: PositiveDuration = 1.0
    # Envoy's default route timeout.
    request: PositiveDuration = 15.0
    # Envoy's default idle timeout for upstream connections.
    idle: PositiveDuration = 3600.0


class Backoff(Spec):
    """Exponential backoff between attempts with jitter: ``base × 2^n``, at most ``max``."""

    base: PositiveDuration = 0.025
    max: PositiveDuration = 0.25

    @model_validator(mode="after")
    def _max_not_below_base(self) -> Self:
        if self.max < self.base:
            raise FieldError(("max",), "must be at least the base backoff")
        return self


class RetryBudget(Spec):
    """Retries may add at most ``ratio`` to the requests seen over ``window``, plus
    ``minRetriesPerSecond`` (Linkerd's budget: retries never multiply an outage)."""

    ratio: Share = 0.2
    min_retries_per_second: float = Field(default=10.0, ge=0, allow_inf_nan=False)
    window: PositiveDuration = 10.0


class Retries(Spec):
    """When a failed attempt is tried again.

    ``attempts`` counts the first attempt. A retry is made only for a listed failure class,
    for a listed method (idempotent ones by default: listing ``POST`` or ``PATCH`` requires
    ``allowNonIdempotent: true``), within the budget.
    """

    attempts: int = Field(default=2, ge=1, le=10)
    per_try_timeout: PositiveDuration | None = None
    retry_on: tuple[RetryOn, ...] = ("connect-failure",)
    allow_non_idempotent: bool = False
    methods: tuple[Method, ...] = IDEMPOTENT_METHODS
    backoff: Backoff = Backoff()
    budget: RetryBudget = RetryBudget()

    @model_validator(mode="after")
    def _safe_methods(self) -> Self:
        _unique_at("retryOn", self.retry_on, "failure class")
        _unique_at("methods", self.methods, "method")
        if not self.allow_non_idempotent:
            for index, method in enumerate(self.methods):
                if method not in IDEMPOTENT_METHODS:
                    raise FieldError(
                        ("methods", index),
                        f"retrying {method} may repeat its effect: it is not idempotent; "
                        "set allowNonIdempotent: true to opt in",
                    )
        return self


class CircuitBreaker(Spec):
    """Limits per target: open connections, requests waiting for one, requests in flight
    (Envoy's defaults: 1024 each)."""

    max_connections: int = Field(default=1024, ge=1)
    max_pending_requests: int = Field(default=1024, ge=1)
    max_requests: int = Field(default=1024, ge=1)


class OutlierDetection(Spec):
    """Eject an endpoint after ``consecutiveFailures`` in a row, for ``baseEjectionTime``
    doubling on each new ejection up to ``maxEjectionTime``; at most ``maxEjectedShare`` of
    the endpoints are out at once (Envoy's defaults)."""

    consecutive_failures: int = Field(default=5, ge=1)
    base_ejection_time: PositiveDuration = 30.0
    max_ejection_time: PositiveDuration = 300.0
    max_ejected_share: Share = 0.1

    @model_validator(mode="after")
    def _max_not_below_base(self) -> Self:
        if self.max_ejection_time < self.base_ejection_time:
            raise FieldError(("maxEjectionTime",), "must be at least baseEjectionTime")
        return self


class Split(Spec):
    """One subset (a version of the service) and its share of the calls."""

    subset: Name
    weight: Share


class DelayFault(Spec):
    """Delay ``percentage`` of the calls by ``duration``."""

    duration: PositiveDuration
    percentage: Share


class AbortFault(Spec):
    """Answer ``percentage`` of the calls with HTTP ``status`` without calling the service."""

    status: int = Field(ge=200, le=599)
    percentage: Share


class Faults(Spec):
    """Faults injected into calls, for testing resilience; both may apply to one call."""

    delay: DelayFault | None = None
    abort: AbortFault | None = None


class TrafficPolicySpec(Spec):
    """The substance of a TrafficPolicy: everything applies to calls to ``service``."""

    service: Name
    timeouts: Timeouts = Timeouts()
    retries: Retries = Retries()
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    outlier_detection: OutlierDetection = OutlierDetection()
    # No splits: every subset is one pool.
    splits: tuple[Split, ...] = ()
    faults: Faults = Faults()

    @field_validator("splits")
    @classmethod
    def _splits_whole(cls, splits: tuple[Split, ...]) -> tuple[Split, ...]:
        if not splits:
            return splits
        total = math.fsum(split.weight for split in splits)
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"weights add up to {total * 100:g}%, not 100%")
        return splits

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        subsets = tuple(split.subset for split in self.splits)
        for index, subset in enumerate(subsets):
            if subset in subsets[:index]:
                raise FieldError(("splits", index, "subset"), f"subset {subset!r} is listed twice")
        per_try = self.retries.per_try_timeout
        if per_try is not None and per_try > self.timeouts.request:
            raise FieldError(
                ("retries", "perTryTimeout"),
                "must not be longer than timeouts.request, which bounds all attempts together",
            )
        return self


class TrafficPolicy(Document):
    """A TrafficPolicy document: how callers in this mesh call one service."""

    KIND: ClassVar[str] = "TrafficPolicy"

    kind: Literal["TrafficPolicy"]
    spec: TrafficPolicySpec


# --- AuthorizationPolicy ---------------------------------------------------------------------


class Principal(Spec):
    """Callers a rule names: exactly one of an ID, a whole trust domain, or an ID path prefix
    (``spiffe://us-west.demo/ns/shop`` covers every ID under ``/ns/shop/``)."""

    id: str | None = None
    trust_domain: str | None = None
    id_prefix: str | None = None

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str | None) -> str | None:
        return None if value is None else str(SpiffeId.parse(value))

    @field_validator("trust_domain")
    @classmethod
    def _valid_trust_domain(cls, value: str | None) -> str | None:
        return None if value is None else TrustDomain.parse(value).name

    @field_validator("id_prefix")
    @classmethod
    def _valid_prefix(cls, value: str | None) -> str | None:
        if value is None:
            return None
        prefix = SpiffeId.parse(value.removesuffix("/"))
        if not prefix.path:
            raise ValueError("a prefix without a path is a whole trust domain: use trustDomain")
        return str(prefix)

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        given = [v for v in (self.id, self.trust_domain, self.id_prefix) if v is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of id, trustDomain or idPrefix")
        return self


def _path_prefix(value: str) -> str:
    if _PATH_CHARS.fullmatch(value) is None:
        raise ValueError(
            f"path prefix {value!r} must start with '/' and hold no '%', ';', '?', '#' or '\\'"
        )
    segments = value.split("/")[1:]
    if any(segment in (".", "..") for segment in segments) or "//" in value:
        raise ValueError(f"path prefix {value!r} must be normalised (no '//', '.' or '..')")
    return value


PathPrefix = Annotated[str, AfterValidator(_path_prefix)]
"""A normalised path prefix, matched on whole segments: ``/api`` covers ``/api`` and
``/api/x`` but not ``/apix``."""


class AuthorizationRule(Spec):
    """One allow rule: these callers, on these ports, methods and path prefixes (an empty
    list means any)."""

    from_: tuple[Principal, ...] = Field(alias="from", min_length=1)
    ports: tuple[Port, ...] = ()
    methods: tuple[Method, ...] = ()
    paths: tuple[PathPrefix, ...] = ()

    @model_validator(mode="after")
    def _no_repeats(self) -> Self:
        _unique_at("ports", self.ports, "port")
        _unique_at("methods", self.methods, "method")
        _unique_at("paths", self.paths, "path prefix")
        return self


class AuthorizationPolicySpec(Spec):
    """Who may call ``service``. No rules at all: nobody may (an explicit deny-all)."""

    service: Name
    rules: tuple[AuthorizationRule, ...] = ()


class AuthorizationPolicy(Document):
    """An AuthorizationPolicy document: the callers a service accepts, by SPIFFE ID."""

    KIND: ClassVar[str] = "AuthorizationPolicy"

    kind: Literal["AuthorizationPolicy"]
    spec: AuthorizationPolicySpec
