"""The routing table and endpoint balancing: names in, targets out, no I/O.

Names are ``<service>.<namespace>.<cluster>.<mesh>`` (ARCHITECTURE.md, Names). The gateway
serves two names of its own in the reserved ``snapbright`` namespace:
``controlplane.snapbright.<cluster>.<mesh>`` (peering, to the control plane) and
``probe.snapbright.<cluster>.<mesh>`` (liveness and RTT, answered by the gateway itself).
Anything else is refused with a counted reason.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from gateway.config.model import RESERVED_NAMESPACE, GatewaySpec
from gateway.route.model import (
    ControlPlaneTarget,
    ProbeTarget,
    Refusal,
    ServiceTarget,
    Target,
    Upstream,
)

_UNKNOWN = Refusal("unknown-name")


def control_plane_name(cluster: str, mesh: str) -> str:
    """The SNI name peers use to reach this cluster's control plane."""
    return f"controlplane.{RESERVED_NAMESPACE}.{cluster}.{mesh}"


def probe_name(cluster: str, mesh: str) -> str:
    """The SNI name peers use to probe this gateway."""
    return f"probe.{RESERVED_NAMESPACE}.{cluster}.{mesh}"


class RoutingTable:
    """Every name this gateway answers, precomputed: one dictionary lookup per connection."""

    __slots__ = ("_routes",)

    def __init__(self, routes: Mapping[str, Target | Refusal]) -> None:
        self._routes = dict(routes)

    @classmethod
    def from_spec(cls, spec: GatewaySpec) -> RoutingTable:
        """The table a :class:`GatewaySpec` describes."""
        suffix = f"{spec.cluster}.{spec.mesh}"
        routes: dict[str, Target | Refusal] = {}
        for service in spec.services:
            name = f"{service.name}.{service.namespace}.{suffix}"
            if not service.exported:
                routes[name] = Refusal("not-exported")
            elif not service.endpoints:
                routes[name] = Refusal("no-endpoints")
            else:
                endpoints = tuple(Upstream(e.address, e.port) for e in service.endpoints)
                routes[name] = ServiceTarget(name, endpoints, service.balance)
        if spec.control_plane is not None:
            upstream = Upstream(spec.control_plane.address, spec.control_plane.port)
            routes[control_plane_name(spec.cluster, spec.mesh)] = ControlPlaneTarget(upstream)
        if spec.probe is not None:
            routes[probe_name(spec.cluster, spec.mesh)] = ProbeTarget()
        return cls(routes)

    def resolve(self, server_name: str) -> Target | Refusal:
        """Where a (validated, lowercased) SNI name leads."""
        return self._routes.get(server_name, _UNKNOWN)


class Balancer:
    """Picks a service's endpoint per connection and tracks open connections per endpoint.

    Round-robin keeps a cursor per service; least-connections takes the endpoint with the
    fewest open connections, breaking ties with ``rng``. State outlives config reloads, so a
    reload neither resets the rotation nor forgets connections still open.
    """

    __slots__ = ("_cursors", "_open")

    def __init__(self) -> None:
        self._cursors: dict[str, int] = {}
        self._open: dict[Upstream, int] = {}

    def pick(self, target: ServiceTarget, rng: random.Random) -> Upstream:
        """Choose an endpoint and count a connection open on it (call :meth:`release` later)."""
        endpoints = target.endpoints
        if target.balance == "round-robin":
            cursor = self._cursors.get(target.name, 0)
            chosen = endpoints[cursor % len(endpoints)]
            self._cursors[target.name] = (cursor + 1) % len(endpoints)
        else:
            fewest = min(self._open.get(e, 0) for e in endpoints)
            chosen = rng.choice([e for e in endpoints if self._open.get(e, 0) == fewest])
        self._open[chosen] = self._open.get(chosen, 0) + 1
        return chosen

    def release(self, upstream: Upstream) -> None:
        """A connection to ``upstream`` closed."""
        remaining = self._open.get(upstream, 0) - 1
        if remaining > 0:
            self._open[upstream] = remaining
        else:
            self._open.pop(upstream, None)

    def open_connections(self, upstream: Upstream) -> int:
        """Connections counted open on ``upstream``."""
        return self._open.get(upstream, 0)
