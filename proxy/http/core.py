"""The routing seam between the forwarder and the balancing, resilience and stats cores.

The forwarder asks a `Router` for the `Route` of a request's authority once per connection
and host, asks the route to `pick` an endpoint for each request, and reports back exactly once
per pick: `Route.on_response` when response headers arrive, or `Route.on_failure`. That
contract is what a balancer needs to count outstanding requests and latency. Everything here
is pure: ``now`` is passed in.

`RoundRobinRoute` and `StaticRouter` are the trivial implementations used until the weighted
cluster pick and P2C cores are plugged in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

from proxy.http.model import Failure

__all__ = [
    "EndpointAddress",
    "InjectedFault",
    "Overloaded",
    "RequestGate",
    "RoundRobinRoute",
    "Route",
    "Router",
    "StaticEndpoint",
    "StaticRouter",
    "normalise_authority",
]


class EndpointAddress(Protocol):
    """Where a picked endpoint listens.

    The forwarder pools connections per endpoint object, so a route must return the same
    object for the same endpoint for as long as it keeps it.
    """

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


class Overloaded(Exception):
    """Raised by `Route.pick` to shed a request: answered 503 with ``x-snapbright-overload``."""

    def __init__(self, reason: str) -> None:
        if not reason or not reason.isascii() or not reason.isprintable():
            raise ValueError(f"overload reason must be printable ASCII, not {reason!r}")
        super().__init__(reason)
        self.reason = reason


class InjectedFault(Exception):
    """Raised by `Route.pick` to inject a fault (TrafficPolicy fault injection).

    With ``status``: the request is answered with it at once, never sent (abort). Without:
    it is sent to ``endpoint`` (picked, and reported like any pick) after ``delay`` seconds.
    """

    def __init__(
        self,
        *,
        status: int | None = None,
        delay: float = 0.0,
        endpoint: EndpointAddress | None = None,
    ) -> None:
        if status is None and endpoint is None:
            raise ValueError("a fault either aborts with a status or delays an endpoint")
        if status is not None and not 200 <= status <= 599:
            raise ValueError(f"fault status must be in 200..599, not {status!r}")
        if not 0.0 <= delay < float("inf"):
            raise ValueError(f"fault delay must be finite and >= 0, not {delay!r}")
        super().__init__(status, delay)
        self.status = status
        self.delay = delay
        self.endpoint = endpoint


class Route(Protocol):
    """The endpoints of one service, as the forwarder sees them."""

    # The upstream's own request timeout in seconds, or None for the listener's.
    request_timeout: float | None

    def pick(self, now: float) -> EndpointAddress | None:
        """The endpoint for the next request; ``None`` when there is none (503).

        May raise `Overloaded`. Every endpoint returned is later reported exactly once.
        """
        ...

    def on_response(
        self, endpoint: EndpointAddress, status: int, latency: float, now: float
    ) -> None:
        """Response headers with ``status`` came back ``latency`` seconds after dispatch."""
        ...

    def on_failure(
        self, endpoint: EndpointAddress, failure: Failure, latency: float, now: float
    ) -> None:
        """The request picked for ``endpoint`` got no response, for the reason given."""
        ...


class RequestGate(Protocol):
    """Per-connection admission on a listener that knows its peer (the inbound side).

    Made once per accepted connection (after its TLS handshake); asked once per request.
    """

    def headers(self, hdr: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The request's header fields as forwarded (e.g. a caller's forged ones removed)."""
        ...

    def admit(self, method: bytes, path: bytes) -> str | None:
        """``None`` to forward the request, or why it is refused (answered 403)."""
        ...


class Router(Protocol):
    """Maps a request's authority (Host header or absolute-form URL) to a route."""

    def route(self, authority: bytes) -> Route | None:
        """The route for ``authority`` as sent by the client, or ``None`` (404)."""
        ...


@dataclass(frozen=True, slots=True)
class StaticEndpoint:
    """An endpoint given by address and port, with nothing learned about it."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("endpoint host must not be empty")
        port = self.port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"endpoint port must be an integer in 1..65535, not {port!r}")


class RoundRobinRoute:
    """Picks endpoints in turn and ignores what it is told: the stand-in balancer."""

    __slots__ = ("_endpoints", "_next", "request_timeout")

    def __init__(self, endpoints: Sequence[EndpointAddress]) -> None:
        self._endpoints = tuple(endpoints)
        self._next = 0
        self.request_timeout: float | None = None

    @property
    def endpoints(self) -> tuple[EndpointAddress, ...]:
        """The endpoints in rotation."""
        return self._endpoints

    def pick(self, now: float) -> EndpointAddress | None:
        """The next endpoint in turn, or ``None`` if there are none."""
        endpoints = self._endpoints
        if not endpoints:
            return None
        index = self._next
        self._next = index + 1 if index + 1 < len(endpoints) else 0
        return endpoints[index]

    def on_response(
        self, endpoint: EndpointAddress, status: int, latency: float, now: float
    ) -> None:
        """Round robin learns nothing from responses."""

    def on_failure(
        self, endpoint: EndpointAddress, failure: Failure, latency: float, now: float
    ) -> None:
        """Round robin learns nothing from failures."""


def normalise_authority(authority: bytes) -> str | None:
    """The host part of an authority, lowercased, without port or trailing dot.

    ``None`` when it is not a plausible host: empty, or with bytes no host name has.
    """
    host = authority
    if host.startswith(b"["):
        end = host.find(b"]")
        if end < 0:
            return None
        rest = host[end + 1 :]
        if rest and not (rest.startswith(b":") and rest[1:].isdigit()):
            return None
        host = host[: end + 1]
    else:
        colon = host.rfind(b":")
        if colon >= 0:
            if not host[colon + 1 :].isdigit():
                return None
            host = host[:colon]
    if host.endswith(b"."):
        host = host[:-1]
    if not host or not host.isascii():
        return None
    text = host.decode("ascii").lower()
    if not all(c.isalnum() or c in "-._[]:" for c in text):
        return None
    return text


R = TypeVar("R")

_ROUTE_CACHE_MAX: Final = 1024


def cached_route(
    cache: dict[bytes, R | None], routes: Mapping[str, R], authority: bytes
) -> R | None:
    """``routes`` at the service ``authority`` names, remembered in ``cache`` by the bytes the
    client sent (bounded: a client sending ever new Host values must not grow it without end)."""
    try:
        return cache[authority]
    except KeyError:
        pass
    host = normalise_authority(authority)
    route = None if host is None else routes.get(host)
    if len(cache) >= _ROUTE_CACHE_MAX:
        cache.clear()
    cache[authority] = route
    return route


class StaticRouter:
    """Routes by service name (the host part of the authority) to fixed routes."""

    __slots__ = ("_cache", "_services")

    def __init__(self, services: Mapping[str, Route]) -> None:
        self._services = {name.lower().rstrip("."): route for name, route in services.items()}
        self._cache: dict[bytes, Route | None] = {}

    @classmethod
    def from_endpoints(cls, services: Mapping[str, Sequence[tuple[str, int]]]) -> StaticRouter:
        """A router with a `RoundRobinRoute` per service over ``(host, port)`` endpoints."""
        return cls(
            {
                name: RoundRobinRoute([StaticEndpoint(host, port) for host, port in endpoints])
                for name, endpoints in services.items()
            }
        )

    def route(self, authority: bytes) -> Route | None:
        """The route for the service named by ``authority``, or ``None``."""
        return cached_route(self._cache, self._services, authority)
