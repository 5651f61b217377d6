"""Resilience decisions for the request path: retries, circuit breaking, outlier ejection, faults.

Everything here is pure: it takes numbers, ``now`` (loop clock, seconds) and an ``rng``, and
returns decisions; the sidecar's I/O shell applies them. Configuration arrives as plain
constructor arguments (the sidecar maps TrafficPolicy onto them), is checked once there, and
is not re-checked per request.

- `RetryBudget`: retries stay within ``ratio × requests + min_per_s × window_s`` over a
  sliding window, so a failing upstream sees at most that many extra requests (as Linkerd's
  and Finagle's budgets), never a multiple of its load.
- `RetryPolicy`: which failures may be retried (connect failures always; 5xx, resets and
  gateway errors only for idempotent requests whose body can be sent again), how many
  attempts, and the backoff with jitter before the next one.
- `CircuitBreaker`: per-target limits on connections, pending and concurrent requests; a
  refusal names its reason for the ``x-snapbright-overload`` header of the 503.
- `OutlierDetector`: ejects an endpoint after consecutive failures, for a time that doubles
  with each ejection, never ejecting more than a share of the endpoints.
- `FaultSpec` and `decide_fault`: delay and abort injection by percentage.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from enum import StrEnum
from random import Random
from typing import Final

from proxy.balance.core import Endpoint

__all__ = [
    "IDEMPOTENT_METHODS",
    "OVERLOAD_HEADER",
    "OVERLOAD_MAX_CONNECTIONS",
    "OVERLOAD_MAX_PENDING",
    "OVERLOAD_MAX_REQUESTS",
    "CircuitBreaker",
    "FailureClass",
    "FaultSpec",
    "OutlierDetector",
    "RetryBudget",
    "RetryPolicy",
    "decide_fault",
    "failure_class_of_status",
]


def _check_number(name: str, value: float, *, minimum: float, inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number: {value!r}")
    if value < minimum or (not inclusive and value == minimum):
        relation = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be {relation} {minimum}: {value!r}")
    return float(value)


def _check_int(name: str, value: int, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}: {value!r}")
    return value


# --- retries ----------------------------------------------------------------------------------


def jittered_backoff(failures: int, base: float, cap: float, rng: Random) -> float:
    """Seconds to wait after ``failures`` consecutive failures (``>= 1``): between half and
    all of ``min(cap, base * 2**(failures-1))``, so clients that failed together do not all
    come back together. The one backoff of the mesh: retries, reconnects, watches."""
    ceiling = min(cap, base * 2.0 ** min(failures - 1, 64))
    return ceiling / 2 + rng.random() * ceiling / 2


class RetryBudget:
    """Retries allowed over a sliding window, relative to the requests seen in it.

    Over any window of ``window_s`` seconds (counted in ``buckets`` slices, so the window
    slides in steps of ``window_s / buckets``) the retries recorded never exceed
    ``ratio × requests + min_per_s × window_s``. ``record_request`` counts first attempts
    only; a retry is recorded with ``record_retry`` after ``can_retry`` allowed it.
    """

    __slots__ = (
        "_allowance",
        "_buckets",
        "_current",
        "_index",
        "_ratio",
        "_requests",
        "_retries",
        "_slice_end",
        "_total_requests",
        "_total_retries",
        "_width",
    )

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_s: float = 10.0,
        window_s: float = 10.0,
        *,
        buckets: int = 10,
    ) -> None:
        self._ratio = _check_number("retry budget ratio", ratio, minimum=0.0)
        min_per_s = _check_number("retry budget min_per_s", min_per_s, minimum=0.0)
        window_s = _check_number("retry budget window_s", window_s, minimum=0.0, inclusive=False)
        self._buckets = _check_int("retry budget buckets", buckets, minimum=1)
        self._allowance = min_per_s * window_s
        self._width = window_s / buckets
        self._requests = [0] * buckets
        self._retries = [0] * buckets
        self._total_requests = 0
        self._total_retries = 0
        self._current: int | None = None
        self._index = 0
        # Until the first call every timestamp is "after the current slice".
        self._slice_end = -math.inf

    def record_request(self, now: float) -> None:
        """Count one first attempt of a request at ``now``."""
        if now >= self._slice_end:
            self._slide(now)
        self._requests[self._index] += 1
        self._total_requests += 1

    def can_retry(self, now: float) -> bool:
        """Whether one more retry at ``now`` stays within the budget."""
        if now >= self._slice_end:
            self._slide(now)
        return self._total_retries + 1 <= self._ratio * self._total_requests + self._allowance

    def record_retry(self, now: float) -> None:
        """Count one retry at ``now`` (after `can_retry` allowed it)."""
        if now >= self._slice_end:
            self._slide(now)
        self._retries[self._index] += 1
        self._total_retries += 1

    def try_retry(self, now: float) -> bool:
        """`can_retry` and, if allowed, `record_retry`, in one step."""
        if not self.can_retry(now):
            return False
        self.record_retry(now)
        return True

    def _slide(self, now: float) -> None:
        # Only called with now at or after the end of the current slice: a timestamp from
        # before it (a late one; the loop clock does not go back) counts in the current one.
        slot = math.floor(now / self._width)
        current = self._current
        if current is None or slot - current >= self._buckets:
            self._requests = [0] * self._buckets
            self._retries = [0] * self._buckets
            self._total_requests = 0
            self._total_retries = 0
        else:
            for expired in range(current + 1, slot + 1):
                index = expired % self._buckets
                self._total_requests -= self._requests[index]
                self._total_retries -= self._retries[index]
                self._requests[index] = 0
                self._retries[index] = 0
        self._current = slot
        self._index = slot % self._buckets
        self._slice_end = (slot + 1) * self._width


class FailureClass(StrEnum):
    """What went wrong with one attempt, as retry-on configuration names it."""

    CONNECT_FAILURE = "connect-failure"
    """No connection was made: the request was never sent."""
    RESET = "reset"
    """The connection broke after the request (or part of it) was sent."""
    GATEWAY_ERROR = "gateway-error"
    """A 502, 503 or 504 answer."""
    SERVER_ERROR = "5xx"
    """Any 5xx answer (includes gateway errors)."""


def failure_class_of_status(status: int) -> FailureClass | None:
    """The failure class of a response status: gateway error, other 5xx, or ``None``."""
    if 500 <= status <= 599:
        return FailureClass.GATEWAY_ERROR if 502 <= status <= 504 else FailureClass.SERVER_ERROR
    return None


_METHOD: Final = re.compile(r"[A-Z][A-Z_-]*")

IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
"""Methods whose repetition has the same effect as one request (RFC 9110, 9.2.2)."""


class RetryPolicy:
    """When to retry one request, and how long to wait before the next attempt.

    A connect failure is retried whatever the method and body, when ``retry_on`` lists it
    (it does by default): nothing was sent, so it is always safe. Other failures (a reset,
    a 5xx, a gateway error) are retried only when their class is listed, the method is in
    ``methods`` (idempotent ones unless configured otherwise) and the body can be sent again
    (empty, or buffered whole). ``max_attempts`` counts the first attempt. The delay
    before retry ``n`` (1-based) is drawn uniformly from ``[cap / 2, cap]`` with
    ``cap = min(max_backoff_s, base_backoff_s × 2^(n - 1))``: exponential, with jitter so
    that callers failing together do not retry together.
    """

    __slots__ = ("_base", "_gateway_errors", "_max", "_max_attempts", "_methods", "_retry_on")

    def __init__(
        self,
        *,
        max_attempts: int = 2,
        retry_on: Iterable[FailureClass | str] = (FailureClass.CONNECT_FAILURE,),
        methods: Iterable[str] = IDEMPOTENT_METHODS,
        base_backoff_s: float = 0.025,
        max_backoff_s: float = 0.25,
    ) -> None:
        self._max_attempts = _check_int("retry max_attempts", max_attempts, minimum=1)
        known = {failure.value: failure for failure in FailureClass}
        for failure in retry_on:
            if failure not in known:
                names = ", ".join(known)
                raise ValueError(f"retry_on: unknown failure class {failure!r}; known: {names}")
        self._retry_on = frozenset(known[failure] for failure in retry_on)
        # A gateway error is a 5xx: listing either class retries it.
        self._gateway_errors = bool(
            {FailureClass.GATEWAY_ERROR, FailureClass.SERVER_ERROR} & self._retry_on
        )
        methods = frozenset(methods)
        for method in methods:
            if not _METHOD.fullmatch(method):
                raise ValueError(f"retry methods must be upper-case HTTP methods: {method!r}")
        self._methods = methods
        self._base = _check_number("retry base_backoff_s", base_backoff_s, minimum=0.0)
        self._max = _check_number("retry max_backoff_s", max_backoff_s, minimum=self._base)

    @property
    def max_attempts(self) -> int:
        """Attempts allowed in all, the first included."""
        return self._max_attempts

    def is_retryable(self, method: str, failure: FailureClass, *, body_replayable: bool) -> bool:
        """Whether an attempt that failed with ``failure`` may be tried again at all."""
        if failure is FailureClass.CONNECT_FAILURE:
            return FailureClass.CONNECT_FAILURE in self._retry_on
        if failure is FailureClass.GATEWAY_ERROR:
            listed = self._gateway_errors
        else:
            listed = failure in self._retry_on
        return listed and body_replayable and method in self._methods

    def backoff_s(self, retry: int, rng: Random) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        return jittered_backoff(retry, self._base, self._max, rng)

    def plan_retry(
        self,
        method: str,
        failure: FailureClass,
        *,
        attempts: int,
        body_replayable: bool,
        budget: RetryBudget,
        now: float,
        rng: Random,
    ) -> float | None:
        """The delay before the next attempt, or ``None`` if this failure is final.

        ``attempts`` is how many attempts were made so far (1 after the first). A retry is
        charged to ``budget`` only when every other condition allows it.
        """
        if attempts >= self._max_attempts:
            return None
        if not self.is_retryable(method, failure, body_replayable=body_replayable):
            return None
        if not budget.try_retry(now):
            return None
        return self.backoff_s(attempts, rng)


# --- circuit breaking -------------------------------------------------------------------------

OVERLOAD_HEADER: Final = "x-snapbright-overload"
"""Header of the 503 the sidecar answers when a circuit breaker refuses a request."""
OVERLOAD_MAX_CONNECTIONS: Final = "max-connections"
OVERLOAD_MAX_PENDING: Final = "max-pending"
OVERLOAD_MAX_REQUESTS: Final = "max-requests"


class CircuitBreaker:
    """Limits for one target: open connections, requests waiting for one, requests in flight.

    Each ``try_*`` returns ``None`` when the slot was taken, or the reason for refusing
    (``max-connections``, ``max-pending``, ``max-requests``) that the sidecar puts in the
    ``x-snapbright-overload`` header of its 503. Each taken slot is given back once.
    """

    __slots__ = (
        "connections",
        "max_connections",
        "max_pending",
        "max_requests",
        "pending",
        "requests",
    )

    def __init__(
        self,
        *,
        max_connections: int = 1024,
        max_pending: int = 1024,
        max_requests: int = 1024,
    ) -> None:
        self.max_connections = _check_int("max_connections", max_connections, minimum=1)
        self.max_pending = _check_int("max_pending", max_pending, minimum=0)
        self.max_requests = _check_int("max_requests", max_requests, minimum=1)
        self.connections = 0
        self.pending = 0
        self.requests = 0

    def try_acquire(self) -> str | None:
        """Take a slot for one request in flight, or say why not."""
        if self.requests >= self.max_requests:
            return OVERLOAD_MAX_REQUESTS
        self.requests += 1
        return None

    def release(self) -> None:
        """Give back a request slot taken by `try_acquire`."""
        if self.requests <= 0:
            raise RuntimeError("release() without a matching try_acquire()")
        self.requests -= 1

    def try_open_connection(self) -> str | None:
        """Take a slot for one more upstream connection, or say why not."""
        if self.connections >= self.max_connections:
            return OVERLOAD_MAX_CONNECTIONS
        self.connections += 1
        return None

    def close_connection(self) -> None:
        """Give back a connection slot taken by `try_open_connection`."""
        if self.connections <= 0:
            raise RuntimeError("close_connection() without a matching try_open_connection()")
        self.connections -= 1

    def try_wait(self) -> str | None:
        """Take a slot for one request waiting for a connection, or say why not."""
        if self.pending >= self.max_pending:
            return OVERLOAD_MAX_PENDING
        self.pending += 1
        return None

    def stop_waiting(self) -> None:
        """Give back a waiting slot taken by `try_wait` (got a connection, or gave up)."""
        if self.pending <= 0:
            raise RuntimeError("stop_waiting() without a matching try_wait()")
        self.pending -= 1


# --- outlier ejection -------------------------------------------------------------------------


class _OutlierRecord:
    __slots__ = ("consecutive", "times_ejected")

    def __init__(self) -> None:
        self.consecutive = 0
        self.times_ejected = 0


class OutlierDetector:
    """Ejects endpoints of one target that fail several times in a row.

    After ``consecutive_failures`` failures (5xx or connect failures) with no success in
    between, an endpoint is ejected for ``base_ejection_s × 2^(times ejected - 1)``, at most
    ``max_ejection_s``; it returns to rotation by itself when that time has passed (the
    balancer compares ``Endpoint.ejected_until`` with ``now``). An endpoint that then stays
    in for ``max_ejection_s`` starts again from ``base_ejection_s``. At most
    ``max_ejected_share`` of the endpoints are out at once (at least one may be ejected when
    there are two or more) and one endpoint always stays in: ejecting the last endpoint would
    turn a sick target into a dead one. A success resets the consecutive count.
    """

    __slots__ = ("_base", "_max", "_max_share", "_records", "_threshold")

    def __init__(
        self,
        *,
        consecutive_failures: int = 5,
        base_ejection_s: float = 30.0,
        max_ejection_s: float = 300.0,
        max_ejected_share: float = 0.1,
    ) -> None:
        self._threshold = _check_int("consecutive_failures", consecutive_failures, minimum=1)
        self._base = _check_number("base_ejection_s", base_ejection_s, minimum=0.0, inclusive=False)
        self._max = _check_number("max_ejection_s", max_ejection_s, minimum=self._base)
        share = _check_number("max_ejected_share", max_ejected_share, minimum=0.0)
        if share > 1.0:
            raise ValueError(f"max_ejected_share must be <= 1: {max_ejected_share!r}")
        self._max_share = share
        self._records: dict[Endpoint, _OutlierRecord] = {}

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """The endpoints of the target now; history is kept for those that remain."""
        previous = self._records
        self._records = {
            endpoint: previous.get(endpoint) or _OutlierRecord() for endpoint in endpoints
        }

    def record_success(self, endpoint: Endpoint) -> None:
        """A response that was not a failure: the consecutive count starts again."""
        record = self._records.get(endpoint)
        if record is not None:
            record.consecutive = 0

    def record_failure(self, endpoint: Endpoint, now: float) -> bool:
        """A 5xx or connect failure at ``now``; returns whether the endpoint was ejected."""
        record = self._records.get(endpoint)
        if record is None or endpoint.ejected_until > now:
            # Gone from the target, or already out: answers from before the ejection.
            return False
        record.consecutive += 1
        if record.consecutive < self._threshold or not self._may_eject(now):
            return False
        # ejected_until is when the previous ejection ended (-inf if there was none).
        if now - endpoint.ejected_until >= self._max:
            record.times_ejected = 0
        record.times_ejected += 1
        duration = min(self._max, self._base * 2.0 ** min(record.times_ejected - 1, 62))
        endpoint.ejected_until = now + duration
        record.consecutive = 0
        return True

    def ejected(self, now: float) -> list[Endpoint]:
        """The endpoints out of rotation at ``now``."""
        return [endpoint for endpoint in self._records if endpoint.ejected_until > now]

    def _may_eject(self, now: float) -> bool:
        total = len(self._records)
        if self._max_share == 0.0:
            return False
        # The epsilon keeps 0.29 × 100 at 29 despite float rounding (28.999…).
        allowed = min(max(1, math.floor(self._max_share * total + 1e-9)), total - 1)
        out = sum(1 for endpoint in self._records if endpoint.ejected_until > now)
        return out < allowed


# --- fault injection --------------------------------------------------------------------------


class FaultSpec:
    """Faults to inject into a share of requests: a delay, an abort with a status, or both.

    Delay and abort are drawn independently, so with both at 10 % one request in a hundred
    gets both (it waits, then fails).
    """

    __slots__ = ("abort_share", "abort_status", "delay_s", "delay_share")

    def __init__(
        self,
        *,
        delay_s: float = 0.0,
        delay_share: float = 0.0,
        abort_status: int = 503,
        abort_share: float = 0.0,
    ) -> None:
        self.delay_s = _check_number("fault delay_s", delay_s, minimum=0.0)
        self.delay_share = _check_share("fault delay_share", delay_share)
        if isinstance(abort_status, bool) or not isinstance(abort_status, int):
            raise ValueError(f"fault abort_status must be an HTTP status: {abort_status!r}")
        if not 200 <= abort_status <= 599:
            raise ValueError(f"fault abort_status must be between 200 and 599: {abort_status}")
        self.abort_status = abort_status
        self.abort_share = _check_share("fault abort_share", abort_share)


def _check_share(name: str, value: float) -> float:
    share = _check_number(name, value, minimum=0.0)
    if share > 1.0:
        raise ValueError(f"{name} must be between 0 and 1: {value!r}")
    return share


def decide_fault(spec: FaultSpec, rng: Random) -> tuple[float | None, int | None]:
    """Whether to delay this request (seconds) and whether to abort it (status), by share."""
    delay = None
    abort = None
    # No draw for a fault that is off, so a policy without faults costs nothing.
    if spec.delay_share > 0.0 and rng.random() < spec.delay_share:
        delay = spec.delay_s
    if spec.abort_share > 0.0 and rng.random() < spec.abort_share:
        abort = spec.abort_status
    return delay, abort
