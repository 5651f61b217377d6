"""What each class of proxies is sent: the cluster's view, and the snapshot built from it.

:class:`ClusterView` holds everything a snapshot depends on; the process's callbacks keep it
current (the catalog source, the policy directory, the peerings' imports, trust and
staleness, the failover loop's weights) and call ``discovery.refresh()`` after each change.
:meth:`ClusterView.content` is the discovery server's ``SnapshotBuilder`` (:meth:`build` the
same as one complete snapshot):

- nothing (``None``: not ready) until the catalog source is ready and a policy set was
  accepted: a control plane never pushes an empty or partial configuration;
- a sidecar gets every federated upstream (local copy plus ``svc@peer`` mirrors, weighted by
  the failover loop when it has decided, else by the mirroring defaults), every
  TrafficPolicy, the AuthorizationPolicies of its own service, and the trust bundles (ours
  first, then each peer's);
- a gateway gets the trust bundles and its routes: each exported local service's SNI name
  to the service's registered endpoints (the sidecars' inbound listeners), with the peers it
  is exported to, and ``controlplane.snapbright.<cluster>.<mesh>`` to the peering port.

Cost O(changes). The federated upstreams live in an :class:`UpstreamTable` shared by every
sidecar class, and each change recomputes only the upstreams it can affect (with
:func:`~federation.mirror.core.federate_service`): a peer's import delta its keys; a peer's
gateways, staleness or probe verdict (and the grace running out) that peer's imports; a
failover decision the upstreams of that service; a catalog change the local services whose
endpoints differ (the catalog is compared service by service). The table's change log then
gives proxies deltas. :attr:`ClusterView.upstreams_federated` counts the upstreams
recomputed (the work of an update, independent of the clock); ``invalidate()`` recomputes
them all (a full resync, also the first fill).

A peer's gateway address that our admission policy refuses (one of our own listeners, a
metadata address) is dropped from its mirrors: a peer cannot make us route there.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import CollectorRegistry, Counter, Summary

from federation.catalog.feed import CatalogSource
from federation.catalog.model import AdmissionPolicy, Catalog
from federation.discovery.core import ProxyClass, Role
from federation.discovery.server import ClassContent, UpstreamTable
from federation.mirror.core import (
    FederatedUpstream,
    LocalService,
    MirrorSettings,
    MirrorState,
    PeerView,
    federate,
    federate_service,
    local_services,
    mirror_state,
    next_change_at,
)
from federation.mirror.wire import upstream_to_proto
from federation.peering.credentials import control_plane_server_name
from federation.peering.model import ExportedService, ServiceKey, sni_name
from proxy.api.v1 import discovery_pb2 as pb
from proxy.config.model import Document
from proxy.identity.bundle import TrustBundle, format_bundle
from snapbright.controlplane.policies import PolicyDirectory, PolicySet


class ClusterView:
    """The control plane's view of its cluster and its peers, and the snapshots built on it."""

    def __init__(
        self,
        settings: MirrorSettings,
        policies: PolicyDirectory,
        own_bundle: Callable[[], TrustBundle],
        admission: AdmissionPolicy,
        *,
        peering_endpoint: tuple[str, int] | None = None,
        clock: Callable[[], float],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.catalog: CatalogSource | None = None
        """Set once the registry is open (until then nothing is ready)."""
        self._policies = policies
        self._own_bundle = own_bundle
        self.admission = admission
        """What addresses may be routed to; the process sets the deny list once bound."""
        self.peering_endpoint = peering_endpoint
        self._clock = clock
        self.peers: dict[str, PeerView] = {}
        self.peer_bundles: dict[str, TrustBundle] = {}
        self.weights: dict[str, dict[str, int]] = {}
        """Failover weights (basis points by target cluster) by service name."""
        self.table = UpstreamTable()
        """The federated upstreams as sidecars receive them, with their change log."""
        self.upstreams_federated = 0
        """Upstreams recomputed so far: the work of every update."""
        self._everything = True
        self._dirty: set[ServiceKey] = set()
        self._dirty_names: set[str] = set()
        self._keys_by_name: dict[str, set[ServiceKey]] = {}
        self._local: dict[ServiceKey, LocalService] = {}
        self._catalog_seen: Catalog | None = None
        self._states: dict[str, MirrorState] = {}
        registry = registry if registry is not None else CollectorRegistry()
        self._m_federated = Counter(
            "snapbright_controlplane_upstreams_federated_total",
            "Federated upstreams recomputed after changes (the work of updates).",
            registry=registry,
        )
        self._m_sync = Summary(
            "snapbright_controlplane_upstream_sync_seconds",
            "Time to bring the federated upstreams up to date after changes.",
            registry=registry,
        )

    def invalidate(self) -> None:
        """Recompute every upstream at the next build (a full resync; O(services))."""
        self._everything = True

    # -- what the process's callbacks change --

    def set_weights(self, service: str, weights: Mapping[str, int]) -> None:
        """The failover loop's decision for callers in this cluster; empty: none (the
        service is no longer decided), so mirroring's default weights apply."""
        weights = dict(weights)
        if not weights:
            if self.weights.pop(service, None) is not None:
                self._dirty_names.add(service)
        elif self.weights.get(service) != weights:
            self.weights[service] = weights
            self._dirty_names.add(service)

    def set_peer(self, peer: PeerView) -> None:
        """Replace what we know of one peer (its gateways are checked here): every upstream
        it imports, before or now, is recomputed."""
        allowed = tuple(g for g in peer.gateways if self._gateway_allowed(g.host, g.port))
        old = self.peers.get(peer.cluster)
        new = replace(peer, gateways=allowed)
        self.peers[peer.cluster] = new
        if old is None or old.imports is not new.imports:
            self._dirty.update(new.imports)
            if old is not None:
                self._dirty.update(old.imports)
        elif old != new:
            self._dirty.update(new.imports)

    def imports_changed(
        self, peer: str, imports: Mapping[ServiceKey, ExportedService], keys: Iterable[ServiceKey]
    ) -> bool:
        """A known peer's imports are now ``imports``, which differ from what the view held
        only for ``keys`` (peering's delta): only those are recomputed. False (nothing done)
        for a peer the view does not know: :meth:`set_peer` it."""
        known = self.peers.get(peer)
        if known is None:
            return False
        if known.imports is not imports:
            self.peers[peer] = replace(known, imports=imports)
        self._dirty.update(keys)
        return True

    def remove_peer(self, name: str) -> None:
        """A peer was deleted: its mirrors and trust go."""
        old = self.peers.pop(name, None)
        if old is not None:
            self._dirty.update(old.imports)
        self.peer_bundles.pop(name, None)

    # -- reading --

    @property
    def ready(self) -> bool:
        """Whether snapshots can be complete: the catalog read once, a policy set accepted."""
        return self.catalog is not None and self.catalog.ready and self._policies.ready

    def upstreams(self, now: float) -> dict[ServiceKey, FederatedUpstream]:
        """Every federated upstream as callers in this cluster see it now."""
        catalog = self.catalog.current() if self.catalog is not None else None
        if catalog is None:
            return {}
        local = local_services(catalog)
        keys = {service.key for service in local}
        for peer in self.peers.values():
            keys.update(peer.imports)
        weights = {key: self.weights[key.name] for key in keys if key.name in self.weights}
        # A peer with no gateway we may route to (it dialed us naming none, or admission
        # refused them all) cannot be routed to: no mirror rather than an empty one.
        routable = [peer for peer in self.peers.values() if peer.gateways]
        return federate(local, routable, self.settings, now, weights=weights)

    def next_change_at(self, now: float) -> float | None:
        """When a stale peer's mirrors will be withdrawn by time alone."""
        return next_change_at(self.peers.values(), now, self.settings.stale_grace_seconds)

    def bundles(self) -> list[TrustBundle]:
        """Our own bundle first, then each peer's, by peer name."""
        return [self._own_bundle(), *(self.peer_bundles[p] for p in sorted(self.peer_bundles))]

    def build(self, proxy_class: ProxyClass) -> pb.Snapshot | None:
        """The complete snapshot of one class of proxies, or None while it could not be
        complete (O(services): the discovery server uses :meth:`content`)."""
        content = self.content(proxy_class)
        if not isinstance(content, ClassContent):
            return content
        content.rest.upstreams.extend(content.upstreams.all())
        return content.rest

    def content(self, proxy_class: ProxyClass) -> pb.Snapshot | ClassContent | None:
        """What one class of proxies is sent: for sidecars everything but the upstreams plus
        the (just synced) upstream table; for gateways a snapshot; None while incomplete."""
        policies = self._policies.current()
        if not self.ready or policies is None:
            return None
        snapshot = pb.Snapshot(trust_bundles=[_bundle_to_proto(b) for b in self.bundles()])
        if proxy_class.role is Role.GATEWAY:
            snapshot.gateway_routes.extend(self._gateway_routes(policies))
            return snapshot
        self.sync(self._clock())
        snapshot.policies.extend(_policy_to_proto(p) for p in policies.traffic)
        snapshot.policies.extend(
            _policy_to_proto(p)
            for p in policies.authorization
            if p.spec.service == proxy_class.service
            and p.metadata.namespace == proxy_class.namespace
        )
        return ClassContent(snapshot, self.table)

    def sync(self, now: float) -> int:
        """Recompute the upstreams that changes since the last sync can affect, into
        :attr:`table`; return how many were recomputed."""
        catalog = self.catalog.current() if self.catalog is not None else None
        if catalog is None:
            return 0
        started = time.perf_counter()
        dirty = self._dirty
        self._dirty = set()
        if catalog is not self._catalog_seen:
            local = {service.key: service for service in local_services(catalog)}
            previous = self._local
            dirty.update(k for k, s in local.items() if previous.get(k) != s)
            dirty.update(k for k in previous if k not in local)
            self._local, self._catalog_seen = local, catalog
        for name, peer in self.peers.items():
            # A peer with no gateway we may route to (it dialed us naming none, or admission
            # refused them all) cannot be routed to: no mirror, not an empty one.
            state = (
                mirror_state(peer, now, self.settings.stale_grace_seconds)
                if peer.gateways
                else MirrorState.WITHDRAWN
            )
            if self._states.get(name) is not state:
                self._states[name] = state
                dirty.update(peer.imports)
        for name in [name for name in self._states if name not in self.peers]:
            del self._states[name]
        for name in self._dirty_names:
            dirty.update(self._keys_by_name.get(name, ()))
        self._dirty_names.clear()
        if self._everything:
            self._everything = False
            dirty.update(self._local)
            for peer in self.peers.values():
                dirty.update(peer.imports)
            for keys in self._keys_by_name.values():
                dirty.update(keys)
        if not dirty:
            return 0
        routable = [peer for peer in self.peers.values() if peer.gateways]
        for key in dirty:
            upstream = federate_service(
                key,
                self._local.get(key),
                routable,
                self.settings,
                now,
                weights=self.weights.get(key.name),
            )
            if upstream is None:
                self.table.remove(key.namespace, key.name)
                names = self._keys_by_name.get(key.name)
                if names is not None:
                    names.discard(key)
                    if not names:
                        del self._keys_by_name[key.name]
            else:
                self.table.put(upstream_to_proto(upstream))
                self._keys_by_name.setdefault(key.name, set()).add(key)
        self.upstreams_federated += len(dirty)
        self._m_federated.inc(len(dirty))
        self._m_sync.observe(time.perf_counter() - started)
        return len(dirty)

    def _gateway_routes(self, policies: PolicySet) -> list[pb.GatewayRoute]:
        catalog = self.catalog.current() if self.catalog is not None else None
        routes = []
        if self.peering_endpoint is not None:
            host, port = self.peering_endpoint
            routes.append(
                pb.GatewayRoute(
                    sni=control_plane_server_name(self.settings.cluster, self.settings.mesh),
                    endpoints=[pb.Endpoint(address=host, port=port, healthy=True)],
                )
            )
        for service in local_services(catalog) if catalog is not None else ():
            peers = policies.peers_of(service.key.name)
            if not peers:
                continue  # nothing is exported by default
            routes.append(
                pb.GatewayRoute(
                    sni=sni_name(service.key, self.settings.cluster, self.settings.mesh),
                    endpoints=[
                        pb.Endpoint(address=e.address, port=e.port, zone=e.zone, healthy=e.healthy)
                        for e in service.endpoints
                    ],
                    exported_to=sorted(peers),
                )
            )
        return routes

    def _gateway_allowed(self, host: str, port: int) -> bool:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return True  # a host name: resolved by the proxy, never to an IP literal we list
        return self.admission.check_target(host, port) is None


def _bundle_to_proto(bundle: TrustBundle) -> pb.TrustBundle:
    return pb.TrustBundle(
        trust_domain=bundle.trust_domain.name,
        sequence=bundle.sequence or 0,
        spiffe_bundle_json=format_bundle(bundle),
        intermediates_der=[c.public_bytes(Encoding.DER) for c in bundle.intermediates],
    )


def _policy_to_proto(document: Document) -> pb.PolicyDocument:
    return pb.PolicyDocument(
        kind=document.kind,
        namespace=document.metadata.namespace,
        name=document.metadata.name,
        json=document.model_dump_json(by_alias=True),
    )
