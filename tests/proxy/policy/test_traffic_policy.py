"""TrafficPolicy: defaults like Envoy/Linkerd, and every config error at its line and column."""

from __future__ import annotations

import pytest

from proxy.config.loader import LoadResult, load_bytes
from proxy.policy.model import IDEMPOTENT_METHODS, TrafficPolicy

HEAD = "apiVersion: snapbright.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: pay}\nspec:\n"
# Line 5 is the first line of a spec body, indented two spaces.


def _load(body: str) -> LoadResult:
    return load_bytes(HEAD + body, {TrafficPolicy.KIND: TrafficPolicy}, source="pay.yaml")


def _policy(body: str) -> TrafficPolicy:
    (document,) = _load(body).raise_for_errors()
    assert isinstance(document, TrafficPolicy)
    return document


def test_defaults_follow_envoy_and_linkerd() -> None:
    spec = _policy("  service: payments\n").spec
    assert (spec.timeouts.connect, spec.timeouts.request, spec.timeouts.idle) == (1.0, 15.0, 3600.0)
    assert spec.retries.attempts == 2
    assert spec.retries.retry_on == ("connect-failure",)
    assert spec.retries.methods == IDEMPOTENT_METHODS
    assert not spec.retries.allow_non_idempotent
    assert (spec.retries.budget.ratio, spec.retries.budget.min_retries_per_second) == (0.2, 10.0)
    assert (spec.retries.backoff.base, spec.retries.backoff.max) == (0.025, 0.25)
    breaker = spec.circuit_breaker
    assert (breaker.max_connections, breaker.max_pending_requests, breaker.max_requests) == (
        1024,
        1024,
        1024,
    )
    outlier = spec.outlier_detection
    assert (outlier.consecutive_failures, outlier.base_ejection_time) == (5, 30.0)
    assert outlier.max_ejected_share == pytest.approx(0.1)
    assert spec.splits == ()
    assert spec.faults.delay is None
    assert spec.faults.abort is None


def test_a_full_policy_reads_into_seconds_and_shares() -> None:
    spec = _policy(
        "  service: payments\n"
        "  timeouts: {connect: 500ms, request: 3s, idle: 5m}\n"
        "  retries:\n"
        "    attempts: 3\n"
        "    perTryTimeout: 1s\n"
        "    retryOn: [connect-failure, reset, gateway-error]\n"
        "    budget: {ratio: 10%, minRetriesPerSecond: 5, window: 30s}\n"
        "  circuitBreaker: {maxConnections: 100, maxPendingRequests: 10, maxRequests: 200}\n"
        "  outlierDetection:\n"
        "    {consecutiveFailures: 3, baseEjectionTime: 10s, maxEjectedShare: 50%}\n"
        "  splits:\n"
        "    - {subset: v1, weight: 90%}\n"
        "    - {subset: v2, weight: 10%}\n"
        "  faults:\n"
        "    delay: {duration: 2s, percentage: 5%}\n"
        "    abort: {status: 503, percentage: 0.5%}\n"
    ).spec
    assert (spec.timeouts.connect, spec.timeouts.idle) == (0.5, 300.0)
    assert spec.retries.per_try_timeout == 1.0
    assert spec.retries.budget.ratio == pytest.approx(0.1)
    assert spec.outlier_detection.max_ejected_share == pytest.approx(0.5)
    assert [(s.subset, s.weight) for s in spec.splits] == [("v1", 0.9), ("v2", 0.1)]
    assert spec.faults.delay is not None
    assert spec.faults.delay.duration == 2.0
    assert spec.faults.abort is not None
    assert (spec.faults.abort.status, spec.faults.abort.percentage) == (503, 0.005)


def test_non_idempotent_methods_retry_only_with_explicit_opt_in() -> None:
    body = (
        "  service: payments\n  retries:\n    allowNonIdempotent: true\n    methods: [GET, POST]\n"
    )
    assert _policy(body).spec.retries.methods == ("GET", "POST")


ERRORS = [
    pytest.param(
        "  service: payments\n  splits:\n"
        "    - {subset: v1, weight: 90%}\n    - {subset: v2, weight: 5%}\n",
        ("SB0201", 7, 5, "spec.splits"),
        "weights add up to 95%, not 100%",
        id="splits-not-100",
    ),
    pytest.param(
        "  service: payments\n  splits:\n"
        "    - {subset: v1, weight: 50%}\n    - {subset: v1, weight: 50%}\n",
        ("SB0201", 8, 16, "spec.splits[1].subset"),
        "listed twice",
        id="splits-duplicate-subset",
    ),
    pytest.param(
        "  service: payments\n  faults:\n    abort: {status: 503, percentage: 150%}\n",
        ("SB0201", 7, 38, "spec.faults.abort.percentage"),
        "between 0% and 100%",
        id="percentage-over-100",
    ),
    pytest.param(
        "  service: payments\n  faults:\n    abort: {status: 99, percentage: 1%}\n",
        ("SB0201", 7, 21, "spec.faults.abort.status"),
        "greater than or equal to 200",
        id="abort-status",
    ),
    pytest.param(
        "  service: payments\n  faults:\n    delay: {percentage: 1%}\n",
        ("SB0202", 7, 12, "spec.faults.delay.duration"),
        "required",
        id="delay-without-duration",
    ),
    pytest.param(
        "  service: payments\n  timeouts:\n    request: -5s\n",
        ("SB0201", 7, 14, "spec.timeouts.request"),
        "invalid duration",
        id="negative-duration",
    ),
    pytest.param(
        "  service: payments\n  timeouts:\n    connect: 0s\n",
        ("SB0201", 7, 14, "spec.timeouts.connect"),
        "longer than 0s",
        id="zero-timeout",
    ),
    pytest.param(
        "  service: payments\n  timeouts:\n    connect: 5\n",
        ("SB0201", 7, 14, "spec.timeouts.connect"),
        "duration string",
        id="duration-without-unit",
    ),
    pytest.param(
        "  service: payments\n  retries:\n    methods: [GET, POST]\n",
        ("SB0201", 7, 20, "spec.retries.methods[1]"),
        "allowNonIdempotent: true",
        id="non-idempotent-without-opt-in",
    ),
    pytest.param(
        "  service: payments\n  retries:\n    retryOn: [5xx, timeouts]\n",
        ("SB0201", 7, 20, "spec.retries.retryOn[1]"),
        "'connect-failure', 'reset', 'gateway-error' or '5xx'",
        id="unknown-retry-class",
    ),
    pytest.param(
        "  service: payments\n  retries:\n    attempts: 0\n",
        ("SB0201", 7, 15, "spec.retries.attempts"),
        "greater than or equal to 1",
        id="zero-attempts",
    ),
    pytest.param(
        "  service: payments\n  retries:\n    attempts: 2.5\n",
        ("SB0204", 7, 15, "spec.retries.attempts"),
        "must be an integer",
        id="fractional-attempts",
    ),
    pytest.param(
        "  service: payments\n  retries:\n    backoff: {base: 1s, max: 100ms}\n",
        ("SB0201", 7, 30, "spec.retries.backoff.max"),
        "at least the base",
        id="backoff-max-below-base",
    ),
    pytest.param(
        "  service: payments\n  timeouts: {request: 1s}\n  retries: {perTryTimeout: 2s}\n",
        ("SB0201", 7, 28, "spec.retries.perTryTimeout"),
        "timeouts.request",
        id="per-try-longer-than-request",
    ),
    pytest.param(
        "  service: payments\n  retries:\n    budget: {ratio: 20%, minRetriesPerSecond: -1}\n",
        ("SB0201", 7, 47, "spec.retries.budget.minRetriesPerSecond"),
        "greater than or equal to 0",
        id="negative-budget",
    ),
    pytest.param(
        "  service: payments\n  circuitBreaker: {maxConnections: 0}\n",
        ("SB0201", 6, 36, "spec.circuitBreaker.maxConnections"),
        "greater than or equal to 1",
        id="zero-connections",
    ),
    pytest.param(
        "  service: payments\n  outlierDetection:\n"
        "    baseEjectionTime: 1m\n    maxEjectionTime: 30s\n",
        ("SB0201", 8, 22, "spec.outlierDetection.maxEjectionTime"),
        "baseEjectionTime",
        id="ejection-max-below-base",
    ),
    pytest.param(
        "  service: payments\n  circuit_breaker: {}\n",
        ("SB0203", 6, 3, "spec.circuit_breaker"),
        "unknown field",
        id="snake-case-key",
    ),
    pytest.param(
        "  timeouts: {}\n", ("SB0202", 5, 3, "spec.service"), "required", id="missing-service"
    ),
]


@pytest.mark.parametrize(("body", "where", "reason"), ERRORS)
def test_config_error(body: str, where: tuple[str, int, int, str], reason: str) -> None:
    result = _load(body)
    assert len(result.diagnostics) == 1, result.diagnostics
    (diagnostic,) = result.diagnostics
    assert (diagnostic.code.value, diagnostic.line, diagnostic.column, diagnostic.path) == where
    assert reason in diagnostic.message
