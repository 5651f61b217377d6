"""Values that configure the HTTP forwarding path: size limits, timeouts, failure kinds."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

__all__ = ["Failure", "Limits", "Timeouts"]


class Failure(enum.Enum):
    """Why a request picked for an endpoint got no response from it."""

    CONNECT = "connect"
    """The connection could not be made (refused, unreachable, connect timeout)."""
    TIMEOUT = "timeout"
    """The response did not arrive within the request timeout."""
    RESET = "reset"
    """The endpoint closed the connection before answering."""
    PROTOCOL = "protocol"
    """The endpoint answered with a malformed or ambiguous response."""
    CANCELLED = "cancelled"
    """The caller went away, or sent a broken body, before the answer came."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Sizes a request may not exceed; each is answered with its own 4xx and a close.

    ``max_body`` is ``None`` for no limit: bodies are streamed, never held whole.
    """

    max_request_line: int = 8 * 1024
    """Longest request target (URL) in bytes: 414 above it."""
    max_header_bytes: int = 64 * 1024
    """Largest header section (names and values) in bytes: 431 above it."""
    max_headers: int = 100
    """Most header fields: 431 above it."""
    max_body: int | None = None
    """Largest request body in bytes: 413 above it."""

    def __post_init__(self) -> None:
        for field in ("max_request_line", "max_header_bytes", "max_headers"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{field} must be a positive integer, not {value!r}")
        body = self.max_body
        if body is not None and (isinstance(body, bool) or not isinstance(body, int) or body < 0):
            raise ValueError(f"Limits.max_body must be None or an integer >= 0, not {body!r}")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long each phase may take, in seconds; ``math.inf`` turns one off."""

    connect: float = 2.0
    """Making a new upstream connection: 504 after it."""
    request: float = 15.0
    """From a request's head being read until its response is complete: 504 after it."""
    header: float = 10.0
    """From a request's first byte until its head is complete (slow clients): 408 after it."""
    idle: float = 60.0
    """A downstream keep-alive connection waiting for its next request: closed after it."""
    upstream_idle: float = 30.0
    """A pooled upstream connection unused for this long is closed (keep it below the
    upstream's own keep-alive timeout, so that we close first)."""

    def __post_init__(self) -> None:
        for field in ("connect", "request", "header", "idle", "upstream_idle"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"Timeouts.{field} must be a number of seconds, not {value!r}")
            if math.isnan(value) or value <= 0:
                raise ValueError(f"Timeouts.{field} must be > 0 seconds, not {value!r}")

    @property
    def shortest(self) -> float:
        """The shortest timeout: timers are checked a few times within it."""
        return min(self.connect, self.request, self.header, self.idle, self.upstream_idle)
