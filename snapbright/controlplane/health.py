"""The control plane's health view: which services the failover loop decides every tick.

The failover loop decides a (service, caller) pair only when it needs a decision
(health/failover/loop.py); the rest keep discovery's default weights. Besides the services
with a policy (the loop knows those), this view names, for callers in this cluster:

- every service called from this cluster in the stats horizon (60 s): the controller reads
  what those callers see;
- every service with a local copy and a remote one: a failure of the local copy can move
  traffic, and it must be decided before anyone calls it.

An imported-only service that nobody here calls is not named: its default weights (the
healthy remote copies) are what the controller would give it. Nor is a local-only service
nobody calls: it has nowhere to move.

The sets are kept as the view is fed (O(1) per change), so naming the pairs costs
O(services called + services with both copies), not O(services known).
"""

from __future__ import annotations

from typing import Any

from health.stats.core import HealthView, LocalService, RegionalStats, RemoteService


class ClusterHealth(HealthView):
    """A :class:`HealthView` that also knows which pairs need a failover decision."""

    def __init__(self, cluster: str, stats: RegionalStats, **settings: Any) -> None:
        super().__init__(cluster, stats, **settings)
        self._here: set[str] = set()  # services with a local copy
        self._there: dict[str, set[str]] = {}  # service -> clusters with a copy
        self._both: set[str] = set()

    def set_local(self, service: str, local: LocalService | None) -> None:
        """Our own copy of ``service`` (``None``: we have none)."""
        super().set_local(service, local)
        if local is None:
            self._here.discard(service)
        else:
            self._here.add(service)
        self._follow(service)

    def set_remote(self, service: str, remote: RemoteService) -> None:
        """A peer's copy of ``service`` (replacing what we knew of that cluster's copy)."""
        super().set_remote(service, remote)
        self._there.setdefault(service, set()).add(remote.cluster)
        self._follow(service)

    def remove_remote(self, service: str, cluster: str) -> None:
        """``cluster`` no longer offers ``service`` (its export was withdrawn)."""
        super().remove_remote(service, cluster)
        clusters = self._there.get(service)
        if clusters is not None:
            clusters.discard(cluster)
            if not clusters:
                del self._there[service]
        self._follow(service)

    def failover_pairs(self, now: float) -> list[tuple[str, str]]:
        """The (service, caller cluster) pairs to decide at ``now`` (besides those with a
        policy): the services called from this cluster, and those with a local and a remote
        copy; sorted. Statistics idle for the whole horizon are dropped first (the stats
        drop them otherwise only when full): a service last called then is called no more."""
        self.stats.prune(now)
        services = {
            key.service for key in self.stats.traffic_keys() if key.caller_cluster == self.cluster
        }
        services |= self._both
        return [(service, self.cluster) for service in sorted(services)]

    def _follow(self, service: str) -> None:
        if service in self._here and service in self._there:
            self._both.add(service)
        else:
            self._both.discard(service)
