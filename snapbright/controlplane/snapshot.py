"""What each class of proxies is sent: the cluster's view, and the snapshot built from it.

:class:`ClusterView` holds everything a snapshot depends on; the process's callbacks keep it
current (the catalog source, the policy directory, the peerings' imports, trust and
staleness, the failover loop's weights) and call ``discovery.refresh()`` after each change.
:meth:`ClusterView.build` is the discovery server's ``SnapshotBuilder``:

- nothing (``None``: not ready) until the catalog source is ready and a policy set was
  accepted: a control plane never pushes an empty or partial configuration;
- a sidecar gets every federated upstream (local copy plus ``svc@peer`` mirrors, weighted by
  the failover loop when it has decided, else by the mirroring defaults), every
  TrafficPolicy, the AuthorizationPolicies of its own service, and the trust bundles (ours
  first, then each peer's);
- a gateway gets the trust bundles and its routes: each exported local service's SNI name
  to the service's registered endpoints (the sidecars' inbound listeners), with the peers it
  is exported to, and ``controlplane.snapbright.<cluster>.<mesh>`` to the peering port.

A peer's gateway address that our admission policy refuses (one of our own listeners, a
metadata address) is dropped from its mirrors: a peer cannot make us route there.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping
from dataclasses import replace

from cryptography.hazmat.primitives.serialization import Encoding

from federation.catalog.feed import CatalogSource
from federation.catalog.model import AdmissionPolicy
from federation.discovery.core import ProxyClass, Role
from federation.mirror.core import (
    FederatedUpstream,
    MirrorSettings,
    PeerView,
    federate,
    local_services,
    next_change_at,
)
from federation.mirror.wire import upstream_to_proto
from federation.peering.credentials import control_plane_server_name
from federation.peering.model import ServiceKey, sni_name
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
        # Every class's snapshot of one rebuild shares the upstreams: built once per change.
        self._cached: tuple[float, list[pb.Upstream]] | None = None

    def invalidate(self) -> None:
        """A source changed (the catalog, a peer's imports, trust, policies): build anew."""
        self._cached = None

    # -- what the process's callbacks change --

    def set_weights(self, service: str, weights: Mapping[str, int]) -> None:
        """The failover loop's decision for callers in this cluster."""
        self.weights[service] = dict(weights)
        self.invalidate()

    def set_peer(self, peer: PeerView) -> None:
        """Replace what we know of one peer (its gateways are checked here)."""
        allowed = tuple(g for g in peer.gateways if self._gateway_allowed(g.host, g.port))
        self.peers[peer.cluster] = replace(peer, gateways=allowed)
        self.invalidate()

    def remove_peer(self, name: str) -> None:
        """A peer was deleted: its mirrors and trust go."""
        self.peers.pop(name, None)
        self.peer_bundles.pop(name, None)
        self.invalidate()

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
        # A peer whose gateways we do not know (it dialed us; the peering protocol does not
        # carry the dialer's gateways) cannot be routed to: no mirror rather than an empty one.
        routable = [peer for peer in self.peers.values() if peer.gateways]
        return federate(local, routable, self.settings, now, weights=weights)

    def next_change_at(self, now: float) -> float | None:
        """When a stale peer's mirrors will be withdrawn by time alone."""
        return next_change_at(self.peers.values(), now, self.settings.stale_grace_seconds)

    def bundles(self) -> list[TrustBundle]:
        """Our own bundle first, then each peer's, by peer name."""
        return [self._own_bundle(), *(self.peer_bundles[p] for p in sorted(self.peer_bundles))]

    def build(self, proxy_class: ProxyClass) -> pb.Snapshot | None:
        """The snapshot of one class of proxies, or None while it could not be complete."""
        policies = self._policies.current()
        if not self.ready or policies is None:
            return None
        snapshot = pb.Snapshot(trust_bundles=[_bundle_to_proto(b) for b in self.bundles()])
        if proxy_class.role is Role.GATEWAY:
            snapshot.gateway_routes.extend(self._gateway_routes(policies))
            return snapshot
        snapshot.upstreams.extend(self._upstream_protos(self._clock()))
        snapshot.policies.extend(_policy_to_proto(p) for p in policies.traffic)
        snapshot.policies.extend(
            _policy_to_proto(p)
            for p in policies.authorization
            if p.spec.service == proxy_class.service
            and p.metadata.namespace == proxy_class.namespace
        )
        return snapshot

    def _upstream_protos(self, now: float) -> list[pb.Upstream]:
        if self._cached is not None and now < self._cached[0]:
            return self._cached[1]
        upstreams = self.upstreams(now)
        protos = [upstream_to_proto(upstreams[key]) for key in sorted(upstreams)]
        # Valid until a stale peer's mirrors are withdrawn by time, or the next change.
        until = self.next_change_at(now)
        self._cached = (math.inf if until is None else until, protos)
        return protos

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
