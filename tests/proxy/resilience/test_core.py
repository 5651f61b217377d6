"""Retry budget and eligibility, circuit breaker, outlier ejection and faults, in virtual time."""

from __future__ import annotations

import math
from collections import Counter
from random import Random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.balance.core import Endpoint, p2c_pick
from proxy.resilience.core import (
    IDEMPOTENT_METHODS,
    OVERLOAD_MAX_CONNECTIONS,
    OVERLOAD_MAX_PENDING,
    OVERLOAD_MAX_REQUESTS,
    CircuitBreaker,
    FailureClass,
    FaultSpec,
    OutlierDetector,
    RetryBudget,
    RetryPolicy,
    decide_fault,
    failure_class_of_status,
)

# --- retry budget -----------------------------------------------------------------------------


def _storm(budget: RetryBudget, seconds: int, rate: int) -> list[tuple[int, int]]:
    """Every request fails and asks for a retry; (requests, retries) per second."""
    per_second = []
    for second in range(seconds):
        requests = retries = 0
        for i in range(rate):
            now = second + i / rate
            budget.record_request(now)
            requests += 1
            if budget.try_retry(now):
                retries += 1
        per_second.append((requests, retries))
    return per_second


def test_budget_allows_ratio_of_requests_plus_minimum_in_steady_state() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=10.0, window_s=10.0)
    per_second = _storm(budget, seconds=60, rate=100)
    steady = [retries for _, retries in per_second[20:]]
    # 0.2 × 100 req/s + 10/s: 30 retries a second once the window is full.
    assert sum(steady) / len(steady) == pytest.approx(30.0, abs=1.0)


def test_budget_never_exceeds_its_bound_over_any_window() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=10.0, window_s=10.0)
    per_second = _storm(budget, seconds=60, rate=100)
    for start in range(len(per_second) - 9):
        window = per_second[start : start + 10]
        requests = sum(r for r, _ in window)
        retries = sum(r for _, r in window)
        assert retries <= 0.2 * requests + 10.0 * 10.0


def test_budget_refills_as_the_window_slides() -> None:
    budget = RetryBudget(ratio=0.0, min_per_s=1.0, window_s=10.0)
    assert sum(budget.try_retry(0.5) for _ in range(20)) == 10
    assert not budget.can_retry(9.99)
    # The slice that held those retries leaves the window at t = 10.
    assert budget.can_retry(10.0)


def test_budget_slides_slice_by_slice() -> None:
    budget = RetryBudget(ratio=0.0, min_per_s=0.5, window_s=10.0)
    for now in (0.1, 0.2, 3.1, 3.2, 5.5):
        assert budget.try_retry(now)
    assert not budget.can_retry(9.0)
    assert budget.try_retry(10.0)  # the two retries of [0, 1) left
    assert budget.try_retry(10.5)
    assert not budget.can_retry(12.9)
    assert budget.can_retry(13.0)  # those of [3, 4) left


def test_retries_do_not_count_as_requests() -> None:
    budget = RetryBudget(ratio=1.0, min_per_s=0.0, window_s=10.0)
    budget.record_request(0.0)
    assert budget.try_retry(0.0)
    assert not budget.try_retry(0.0)


def test_budget_treats_a_late_timestamp_as_now() -> None:
    budget = RetryBudget(ratio=0.0, min_per_s=0.1, window_s=10.0)
    assert budget.try_retry(20.0)
    assert not budget.can_retry(5.0)


@given(
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5]),
    min_per_s=st.sampled_from([0.0, 1.0, 5.0]),
    gaps=st.lists(st.floats(0.0, 3.0), min_size=1, max_size=300),
)
def test_storm_of_failures_stays_within_budget(
    ratio: float, min_per_s: float, gaps: list[float]
) -> None:
    budget = RetryBudget(ratio=ratio, min_per_s=min_per_s, window_s=10.0)
    policy = RetryPolicy(max_attempts=100, retry_on=[FailureClass.SERVER_ERROR])
    rng = Random(0)
    requests: Counter[int] = Counter()
    retries: Counter[int] = Counter()
    now = 0.0
    for gap in gaps:
        now += gap
        budget.record_request(now)
        requests[int(now)] += 1
        attempts = 1
        # Every attempt fails; retry for as long as the policy and budget allow.
        while (
            policy.plan_retry(
                "GET",
                FailureClass.SERVER_ERROR,
                attempts=attempts,
                body_replayable=True,
                budget=budget,
                now=now,
                rng=rng,
            )
            is not None
        ):
            attempts += 1
            retries[int(now)] += 1
    for second in retries:
        window = range(second - 9, second + 1)
        in_window = sum(retries[s] for s in window)
        assert in_window <= ratio * sum(requests[s] for s in window) + min_per_s * 10.0


# --- retry eligibility and backoff ------------------------------------------------------------

_RETRY_CASES = [
    # (retry_on, methods, method, failure, body_replayable, retryable)
    ({"connect-failure"}, IDEMPOTENT_METHODS, "POST", FailureClass.CONNECT_FAILURE, False, True),
    (set(), IDEMPOTENT_METHODS, "GET", FailureClass.CONNECT_FAILURE, True, False),
    ({"reset"}, IDEMPOTENT_METHODS, "GET", FailureClass.RESET, True, True),
    ({"reset"}, IDEMPOTENT_METHODS, "PUT", FailureClass.RESET, False, False),
    ({"reset"}, IDEMPOTENT_METHODS, "POST", FailureClass.RESET, True, False),
    ({"reset"}, IDEMPOTENT_METHODS, "GET", FailureClass.SERVER_ERROR, True, False),
    ({"5xx"}, IDEMPOTENT_METHODS, "DELETE", FailureClass.SERVER_ERROR, True, True),
    ({"5xx"}, IDEMPOTENT_METHODS, "GET", FailureClass.GATEWAY_ERROR, True, True),
    ({"5xx"}, IDEMPOTENT_METHODS, "PATCH", FailureClass.SERVER_ERROR, True, False),
    ({"gateway-error"}, IDEMPOTENT_METHODS, "GET", FailureClass.GATEWAY_ERROR, True, True),
    ({"gateway-error"}, IDEMPOTENT_METHODS, "GET", FailureClass.SERVER_ERROR, True, False),
    ({"5xx"}, {"GET", "POST"}, "POST", FailureClass.SERVER_ERROR, True, True),
    ({"5xx"}, {"GET", "POST"}, "POST", FailureClass.SERVER_ERROR, False, False),
    ({"5xx"}, {"POST"}, "GET", FailureClass.SERVER_ERROR, True, False),
]


@pytest.mark.parametrize(
    ("retry_on", "methods", "method", "failure", "body_replayable", "retryable"), _RETRY_CASES
)
def test_retry_eligibility(
    retry_on: set[str],
    methods: set[str],
    method: str,
    failure: FailureClass,
    body_replayable: bool,
    retryable: bool,
) -> None:
    policy = RetryPolicy(retry_on=retry_on, methods=methods)
    assert policy.is_retryable(method, failure, body_replayable=body_replayable) is retryable


@pytest.mark.parametrize(
    ("status", "failure"),
    [
        (200, None),
        (404, None),
        (499, None),
        (500, FailureClass.SERVER_ERROR),
        (501, FailureClass.SERVER_ERROR),
        (502, FailureClass.GATEWAY_ERROR),
        (503, FailureClass.GATEWAY_ERROR),
        (504, FailureClass.GATEWAY_ERROR),
        (599, FailureClass.SERVER_ERROR),
    ],
)
def test_failure_class_of_status(status: int, failure: FailureClass | None) -> None:
    assert failure_class_of_status(status) is failure


def test_attempts_are_capped() -> None:
    policy = RetryPolicy(max_attempts=3, retry_on=["5xx"])
    budget = RetryBudget(ratio=1.0, min_per_s=100.0)
    rng = Random(1)
    delays = [
        policy.plan_retry(
            "GET",
            FailureClass.SERVER_ERROR,
            attempts=attempts,
            body_replayable=True,
            budget=budget,
            now=0.0,
            rng=rng,
        )
        for attempts in (1, 2, 3)
    ]
    assert delays[0] is not None
    assert delays[1] is not None
    assert delays[2] is None


def test_ineligible_failure_does_not_spend_budget() -> None:
    policy = RetryPolicy(retry_on=["5xx"])
    budget = RetryBudget(ratio=0.0, min_per_s=0.1, window_s=10.0)
    delay = policy.plan_retry(
        "POST",
        FailureClass.SERVER_ERROR,
        attempts=1,
        body_replayable=True,
        budget=budget,
        now=0.0,
        rng=Random(1),
    )
    assert delay is None
    assert budget.can_retry(0.0)


def test_exhausted_budget_stops_an_eligible_retry() -> None:
    policy = RetryPolicy()
    budget = RetryBudget(ratio=0.0, min_per_s=0.0)
    delay = policy.plan_retry(
        "GET",
        FailureClass.CONNECT_FAILURE,
        attempts=1,
        body_replayable=True,
        budget=budget,
        now=0.0,
        rng=Random(1),
    )
    assert delay is None


@pytest.mark.parametrize(
    ("retry", "cap"),
    [(1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (50, 0.25), (10_000, 0.25)],
)
def test_backoff_doubles_up_to_the_maximum_with_jitter(retry: int, cap: float) -> None:
    policy = RetryPolicy(base_backoff_s=0.025, max_backoff_s=0.25)
    rng = Random(retry)
    delays = [policy.backoff_s(retry, rng) for _ in range(200)]
    assert all(cap / 2 <= delay <= cap for delay in delays)
    # Jitter spreads the delays over the whole half-open range.
    assert max(delays) - min(delays) > cap * 0.4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts must be an integer >= 1"),
        (
            {"retry_on": ["timeout"]},
            "retry_on: unknown failure class 'timeout'; known: connect-failure",
        ),
        ({"methods": ["get"]}, "must be upper-case HTTP methods: 'get'"),
        ({"base_backoff_s": -1.0}, "base_backoff_s must be >= 0"),
        ({"base_backoff_s": 1.0, "max_backoff_s": 0.5}, "max_backoff_s must be >= 1.0"),
    ],
)
def test_invalid_retry_policy_is_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": -0.1}, "ratio must be >= 0"),
        ({"min_per_s": math.nan}, "min_per_s must be a finite number"),
        ({"window_s": 0.0}, "window_s must be > 0"),
        ({"buckets": 0}, "buckets must be an integer >= 1"),
    ],
)
def test_invalid_retry_budget_is_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryBudget(**kwargs)  # type: ignore[arg-type]


# --- circuit breaker --------------------------------------------------------------------------

_BREAKER_SLOTS = [
    ("max_requests", "try_acquire", "release", OVERLOAD_MAX_REQUESTS),
    ("max_connections", "try_open_connection", "close_connection", OVERLOAD_MAX_CONNECTIONS),
    ("max_pending", "try_wait", "stop_waiting", OVERLOAD_MAX_PENDING),
]


@pytest.mark.parametrize(("limit", "take", "give_back", "reason"), _BREAKER_SLOTS)
def test_breaker_refuses_beyond_its_limit_with_a_reason(
    limit: str, take: str, give_back: str, reason: str
) -> None:
    breaker = CircuitBreaker(**{limit: 3})
    assert [getattr(breaker, take)() for _ in range(4)] == [None, None, None, reason]


@pytest.mark.parametrize(("limit", "take", "give_back", "reason"), _BREAKER_SLOTS)
def test_breaker_release_restores_capacity(
    limit: str, take: str, give_back: str, reason: str
) -> None:
    breaker = CircuitBreaker(**{limit: 2})
    getattr(breaker, take)()
    getattr(breaker, take)()
    assert getattr(breaker, take)() == reason
    getattr(breaker, give_back)()
    assert getattr(breaker, take)() is None
    assert getattr(breaker, take)() == reason


@pytest.mark.parametrize(("limit", "take", "give_back", "reason"), _BREAKER_SLOTS)
def test_breaker_give_back_without_take_is_an_error(
    limit: str, take: str, give_back: str, reason: str
) -> None:
    with pytest.raises(RuntimeError, match="without a matching"):
        getattr(CircuitBreaker(), give_back)()


def test_breaker_limits_are_independent() -> None:
    breaker = CircuitBreaker(max_connections=1, max_pending=1, max_requests=1)
    assert breaker.try_acquire() is None
    assert breaker.try_open_connection() is None
    assert breaker.try_wait() is None
    assert breaker.try_acquire() == OVERLOAD_MAX_REQUESTS


def test_breaker_with_no_pending_slots_refuses_to_queue() -> None:
    assert CircuitBreaker(max_pending=0).try_wait() == OVERLOAD_MAX_PENDING


@pytest.mark.parametrize("kwargs", [{"max_requests": 0}, {"max_connections": -1}])
def test_invalid_breaker_is_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must be an integer"):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]


def test_a_fractional_breaker_limit_is_rejected() -> None:
    # Pure Python names the rule (ValueError); compiled (mypyc), the signature refuses it first.
    with pytest.raises((ValueError, TypeError)):
        CircuitBreaker(max_pending=1.5)  # type: ignore[arg-type]


# --- outlier ejection -------------------------------------------------------------------------


def _pool(count: int, **kwargs: float) -> tuple[OutlierDetector, list[Endpoint]]:
    endpoints = [Endpoint("10.0.1.1", 9000 + i, 0.0) for i in range(count)]
    detector = OutlierDetector(**kwargs)  # type: ignore[arg-type]
    detector.set_endpoints(endpoints)
    return detector, endpoints


def _fail(detector: OutlierDetector, endpoint: Endpoint, times: int, now: float) -> bool:
    return [detector.record_failure(endpoint, now) for _ in range(times)][-1]


def test_ejection_after_consecutive_failures() -> None:
    detector, endpoints = _pool(4, consecutive_failures=5, max_ejected_share=0.5)
    assert not _fail(detector, endpoints[0], 4, now=1.0)
    assert detector.record_failure(endpoints[0], 1.0)
    assert endpoints[0].ejected_until == 31.0
    assert detector.ejected(1.0) == [endpoints[0]]


def test_success_resets_the_consecutive_count() -> None:
    detector, endpoints = _pool(4, consecutive_failures=5, max_ejected_share=0.5)
    _fail(detector, endpoints[0], 4, now=1.0)
    detector.record_success(endpoints[0])
    assert not _fail(detector, endpoints[0], 4, now=1.0)
    assert detector.ejected(1.0) == []


def test_ejected_endpoint_returns_when_its_time_passes() -> None:
    detector, endpoints = _pool(2, consecutive_failures=1, base_ejection_s=30.0)
    detector.record_failure(endpoints[0], 0.0)
    rng = Random(3)
    assert {p2c_pick(endpoints, rng, 29.0) for _ in range(50)} == {endpoints[1]}
    assert detector.ejected(30.0) == []
    assert endpoints[0] in {p2c_pick(endpoints, rng, 30.0) for _ in range(50)}


def test_ejection_time_doubles_up_to_the_maximum() -> None:
    detector, endpoints = _pool(
        2, consecutive_failures=1, base_ejection_s=30.0, max_ejection_s=300.0
    )
    endpoint = endpoints[0]
    durations = []
    now = 0.0
    for _ in range(6):
        assert detector.record_failure(endpoint, now)
        durations.append(endpoint.ejected_until - now)
        now = endpoint.ejected_until + 1.0
    assert durations == [30.0, 60.0, 120.0, 240.0, 300.0, 300.0]


def test_ejection_time_starts_over_after_a_long_healthy_stretch() -> None:
    detector, endpoints = _pool(
        2, consecutive_failures=1, base_ejection_s=30.0, max_ejection_s=300.0
    )
    endpoint = endpoints[0]
    detector.record_failure(endpoint, 0.0)
    detector.record_failure(endpoint, 31.0)
    assert endpoint.ejected_until == 91.0
    # In rotation from 91 s to 391 s: the next ejection is a first one again.
    detector.record_failure(endpoint, 391.0)
    assert endpoint.ejected_until == 421.0


def test_failures_while_ejected_do_not_extend_the_ejection() -> None:
    detector, endpoints = _pool(2, consecutive_failures=1)
    detector.record_failure(endpoints[0], 0.0)
    assert not _fail(detector, endpoints[0], 10, now=5.0)
    assert endpoints[0].ejected_until == 30.0


def test_ejected_share_is_capped() -> None:
    detector, endpoints = _pool(10, consecutive_failures=1, max_ejected_share=0.2)
    results = [detector.record_failure(endpoint, 0.0) for endpoint in endpoints]
    assert results == [True, True] + [False] * 8
    # When one returns, the next failing endpoint may take its place.
    assert detector.record_failure(endpoints[5], 30.0)


def test_one_endpoint_may_be_ejected_even_when_the_share_rounds_down() -> None:
    detector, endpoints = _pool(3, consecutive_failures=1, max_ejected_share=0.1)
    assert detector.record_failure(endpoints[0], 0.0)
    assert not detector.record_failure(endpoints[1], 0.0)


@pytest.mark.parametrize("count", [1, 2, 5])
def test_one_endpoint_always_stays_in(count: int) -> None:
    detector, endpoints = _pool(count, consecutive_failures=1, max_ejected_share=1.0)
    for _ in range(3):
        for endpoint in endpoints:
            detector.record_failure(endpoint, 0.0)
    assert len(detector.ejected(0.0)) == count - 1
    assert p2c_pick(endpoints, Random(1), 0.0) is not None


def test_zero_share_never_ejects() -> None:
    detector, endpoints = _pool(10, consecutive_failures=1, max_ejected_share=0.0)
    assert not _fail(detector, endpoints[0], 5, now=0.0)


def test_set_endpoints_keeps_history_of_remaining_endpoints() -> None:
    detector, endpoints = _pool(3, consecutive_failures=3, max_ejected_share=0.5)
    _fail(detector, endpoints[0], 2, now=0.0)
    newcomer = Endpoint("10.0.1.2", 9000, 0.0)
    detector.set_endpoints([endpoints[0], endpoints[1], newcomer])
    assert detector.record_failure(endpoints[0], 0.0)
    assert not detector.record_failure(endpoints[2], 0.0)  # no longer in the target


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"consecutive_failures": 0}, "consecutive_failures must be an integer >= 1"),
        ({"base_ejection_s": 0.0}, "base_ejection_s must be > 0"),
        ({"base_ejection_s": 30.0, "max_ejection_s": 10.0}, "max_ejection_s must be >= 30"),
        ({"max_ejected_share": 1.5}, "max_ejected_share must be <= 1"),
    ],
)
def test_invalid_outlier_detector_is_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OutlierDetector(**kwargs)  # type: ignore[arg-type]


# --- fault injection --------------------------------------------------------------------------


def test_faults_follow_their_percentages() -> None:
    spec = FaultSpec(delay_s=0.2, delay_share=0.1, abort_status=503, abort_share=0.05)
    rng = Random(9)
    draws = 40_000
    decisions = [decide_fault(spec, rng) for _ in range(draws)]
    delayed = sum(delay is not None for delay, _ in decisions)
    aborted = sum(abort is not None for _, abort in decisions)
    both = sum(delay is not None and abort is not None for delay, abort in decisions)
    # Bounds are about five standard deviations of the binomial counts.
    assert delayed == pytest.approx(4000, abs=5 * math.sqrt(draws * 0.1 * 0.9))
    assert aborted == pytest.approx(2000, abs=5 * math.sqrt(draws * 0.05 * 0.95))
    assert both == pytest.approx(200, abs=5 * math.sqrt(draws * 0.005))
    assert {delay for delay, _ in decisions} == {None, 0.2}
    assert {abort for _, abort in decisions} == {None, 503}


@pytest.mark.parametrize(
    ("delay_share", "abort_share", "expected"),
    [
        (0.0, 0.0, (None, None)),
        (1.0, 0.0, (1.5, None)),
        (0.0, 1.0, (None, 429)),
        (1.0, 1.0, (1.5, 429)),
    ],
)
def test_fault_shares_of_zero_and_one_are_exact(
    delay_share: float, abort_share: float, expected: tuple[float | None, int | None]
) -> None:
    spec = FaultSpec(
        delay_s=1.5, delay_share=delay_share, abort_status=429, abort_share=abort_share
    )
    rng = Random(4)
    assert {decide_fault(spec, rng) for _ in range(500)} == {expected}


def test_no_fault_draws_nothing() -> None:
    rng = Random(4)
    state = rng.getstate()
    decide_fault(FaultSpec(), rng)
    assert rng.getstate() == state


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"delay_share": 1.1}, "delay_share must be between 0 and 1"),
        ({"abort_share": -0.1}, "abort_share must be >= 0"),
        ({"delay_s": math.inf}, "delay_s must be a finite number"),
        ({"abort_status": 99}, "abort_status must be between 200 and 599"),
    ],
)
def test_invalid_fault_spec_is_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FaultSpec(**kwargs)  # type: ignore[arg-type]


def test_a_fault_status_that_is_not_a_number_is_rejected() -> None:
    # Pure Python names the rule (ValueError); compiled (mypyc), the signature refuses it first.
    with pytest.raises((ValueError, TypeError)):
        FaultSpec(abort_status="503")  # type: ignore[arg-type]
