"""Decisions of the proxy's discovery client, free of I/O: names, backoff, the stats outbox.

- The control plane serves gRPC under an SVID whose one URI SAN is its SPIFFE ID and which
  also carries the DNS name :func:`control_plane_host` (gRPC clients check a host name and
  cannot be told to check a URI SAN instead). Only the cluster CA can put that name on a
  certificate under the cluster's roots, so the name proves the same thing as the ID.
- :class:`Backoff` spaces reconnects: exponential, capped, with jitter so that a thousand
  proxies that lost their control plane at the same moment do not return at the same moment.
- :class:`StatsOutbox` holds closed stats windows until they are sent, and drops the oldest
  (counting them) when the control plane is away, so memory stays bounded.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.identity.model import SpiffeId, TrustDomain
from proxy.stats.core import StatsWindow

CONTROL_PLANE_NAMESPACE = "snapbright-system"
CONTROL_PLANE_SERVICE_ACCOUNT = "controlplane"


def control_plane_id(trust_domain: TrustDomain) -> SpiffeId:
    """The control plane's SPIFFE ID in ``trust_domain``."""
    return SpiffeId.workload(trust_domain, CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_SERVICE_ACCOUNT)


def control_plane_host(trust_domain: TrustDomain) -> str:
    """The DNS name on the control plane's SVID: ``<sa>.<namespace>.<cluster>.<mesh>``."""
    return f"{CONTROL_PLANE_SERVICE_ACCOUNT}.{CONTROL_PLANE_NAMESPACE}.{trust_domain.name}"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: ``base * factor**attempt`` capped at ``cap``, times a jitter.

    The jitter draws from ``[1 - jitter, 1]``, so a delay never exceeds the cap and never
    falls to zero. A stream that stayed up for ``stable_s`` counts as a success: the next
    failure starts again from ``base`` (the caller resets its attempt count to 0).
    """

    base_s: float = 0.5
    cap_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5
    stable_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.cap_s:
            raise ValueError(f"backoff needs 0 < base_s <= cap_s, got {self.base_s}, {self.cap_s}")
        if self.factor < 1:
            raise ValueError(f"backoff factor must be at least 1, got {self.factor}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {self.jitter}")
        if self.stable_s < 0:
            raise ValueError(f"backoff stable_s must not be negative, got {self.stable_s}")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before reconnect number ``attempt`` (0 for the first retry)."""
        if attempt < 0:
            raise ValueError(f"attempt must not be negative, got {attempt}")
        # Cap the exponent too: factor**attempt overflows a float long before attempts end.
        ceiling = self.base_s * self.factor ** min(attempt, 64)
        return min(self.cap_s, ceiling) * (1.0 - self.jitter * rng.random())

    def attempt_after(self, attempt: int, lived_s: float) -> int:
        """The attempt number to wait for after a stream that lived ``lived_s`` seconds."""
        return 0 if lived_s >= self.stable_s else attempt


class StatsOutbox:
    """Closed stats windows waiting to be sent, at most ``capacity``; the oldest go first."""

    __slots__ = ("_capacity", "_windows", "dropped")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the stats outbox needs a capacity of at least 1, got {capacity}")
        self._capacity = capacity
        self._windows: deque[StatsWindow] = deque()
        self.dropped = 0
        """Windows dropped, oldest first, because the outbox was full."""

    def add(self, windows: Iterable[StatsWindow]) -> None:
        """Queue windows; drop (and count) the oldest beyond the capacity."""
        self._windows.extend(windows)
        excess = len(self._windows) - self._capacity
        for _ in range(excess):
            self._windows.popleft()
        if excess > 0:
            self.dropped += excess

    def take(self, limit: int) -> list[StatsWindow]:
        """Remove and return up to ``limit`` windows, oldest first."""
        return [self._windows.popleft() for _ in range(min(limit, len(self._windows)))]

    def lost(self, count: int) -> None:
        """Count ``count`` windows that were taken but never delivered as dropped."""
        self.dropped += count

    def __len__(self) -> int:
        return len(self._windows)
