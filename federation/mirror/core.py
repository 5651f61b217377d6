"""Service mirroring, pure: from local services and peers' imports to federated upstreams.

A service ``pay`` exported by ``ap-southeast`` appears here as the target ``pay@ap-southeast``
of the upstream ``pay`` in the same namespace. Its endpoints are ap-southeast's gateway
addresses, its SNI is ``pay.<namespace>.ap-southeast.<mesh>`` and the serving side must hold
an SVID of ap-southeast's trust domain. Callers keep calling ``pay``: the upstream is the union
of the local copy and every mirror, weighted.

Rules, and why:

1. A mirror joins only the upstream of its own namespace and name. A peer exporting
   ``billing/pay`` never adds a target to our ``shop/pay``.
2. A mirror's endpoints, SNI and trust domain come from our record of the peer (the token and
   the peering), never from what the peer sends: a peer can add a target only for a service
   it exports to us, and only pointing at its own gateways.
3. Stale discovery (declared): while a peer is unreachable its mirrors stay, marked stale, for
   ``stale_grace_seconds`` *as long as the gateway probe says the peer is alive*; then they
   are withdrawn. A peer whose probe says dead is withdrawn at once: no stale routing to a
   dead cluster. A deleted peer is withdrawn at once.
4. Default weights, until the failover controller gives its own: everything local while any
   local endpoint is healthy; else split across the healthy remote targets (fresh ones before
   stale ones), evenly or to the first of a given order; with nothing healthy anywhere, the
   local copy keeps everything, and the upstream's ``note`` says so. Weights are basis points
   summing to 10000.
5. An upstream is never emptied because a source is unreachable (rule 3 keeps last known
   imports); it disappears only when no local copy and no mirror remains.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from federation.catalog.model import Catalog, Health
from federation.peering.model import (
    ExportedService,
    GatewayAddress,
    ServiceKey,
    check_label,
    check_mesh,
    sni_name,
)
from proxy.identity.model import TrustDomain

TOTAL_WEIGHT = 10_000
"""All targets of an upstream share this many basis points."""


@dataclass(frozen=True, slots=True)
class MirrorSettings:
    """Who we are, and how long an unreachable peer's mirrors stay (while its probe is alive)."""

    cluster: str
    mesh: str
    trust_domain: TrustDomain
    stale_grace_seconds: float = 60.0

    def __post_init__(self) -> None:
        check_label(self.cluster, "cluster")
        check_mesh(self.mesh)
        if not self.stale_grace_seconds >= 0:
            raise ValueError("stale_grace_seconds must not be negative")


@dataclass(frozen=True, slots=True)
class TargetEndpoint:
    """One address of a target: a local workload, or a peer's gateway."""

    address: str
    port: int
    zone: str = ""
    healthy: bool = True


@dataclass(frozen=True, slots=True)
class LocalService:
    """A service of the local catalog and its endpoints."""

    key: ServiceKey
    endpoints: tuple[TargetEndpoint, ...] = ()

    @property
    def healthy_endpoints(self) -> int:
        """How many of its endpoints are healthy."""
        return sum(1 for endpoint in self.endpoints if endpoint.healthy)


@dataclass(frozen=True, slots=True)
class PeerView:
    """What we know of one peer: who it is, its gateways, what it exports to us, and whether
    it is reachable (``unreachable_since`` is None while the peering is up)."""

    cluster: str
    mesh: str
    trust_domain: TrustDomain
    gateways: tuple[GatewayAddress, ...]
    imports: Mapping[ServiceKey, ExportedService] = field(default_factory=dict)
    unreachable_since: float | None = None
    probe_alive: bool = True
    deleted: bool = False

    def __post_init__(self) -> None:
        check_label(self.cluster, "peer cluster")
        check_mesh(self.mesh)


class MirrorState(enum.Enum):
    """Whether a peer's mirrors are routed to, and how."""

    FRESH = "fresh"
    STALE = "stale"
    WITHDRAWN = "withdrawn"


def local_services(catalog: Catalog) -> tuple[LocalService, ...]:
    """The local services of a catalog view with their endpoints; only ``passing`` endpoints
    count as healthy (``warning`` and ``critical`` do not take traffic by default)."""
    return tuple(
        LocalService(
            ServiceKey(service.namespace, service.name),
            tuple(
                TargetEndpoint(e.address, e.port, e.zone, e.health is Health.PASSING)
                for e in catalog.endpoints_of(service.name, service.namespace)
            ),
        )
        for service in catalog.services
    )


def mirror_state(peer: PeerView, now: float, grace_seconds: float) -> MirrorState:
    """The stale-discovery rule for one peer at ``now``."""
    if peer.deleted:
        return MirrorState.WITHDRAWN
    if peer.unreachable_since is None:
        return MirrorState.FRESH
    if not peer.probe_alive:
        return MirrorState.WITHDRAWN
    if now < peer.unreachable_since + grace_seconds:
        return MirrorState.STALE
    return MirrorState.WITHDRAWN


def next_change_at(peers: Iterable[PeerView], now: float, grace_seconds: float) -> float | None:
    """When the next stale peer will be withdrawn by time alone (None if none will): the
    moment to compute the upstreams again even if nothing else happens."""
    times = [
        peer.unreachable_since + grace_seconds
        for peer in peers
        if peer.unreachable_since is not None
        and mirror_state(peer, now, grace_seconds) is MirrorState.STALE
    ]
    return min(times, default=None)


@dataclass(frozen=True, slots=True)
class FederatedTarget:
    """One target of an upstream: the local copy (``pay``) or a mirror (``pay@ap-southeast``)."""

    name: str
    cluster: str
    weight: int
    endpoints: tuple[TargetEndpoint, ...]
    sni: str
    trust_domain: TrustDomain
    stale: bool
    healthy_endpoints: int


@dataclass(frozen=True, slots=True)
class FederatedUpstream:
    """What callers of one service reach, with why the weights are what they are."""

    key: ServiceKey
    targets: tuple[FederatedTarget, ...]
    note: str

    def weights(self) -> dict[str, int]:
        """Target cluster -> basis points."""
        return {target.cluster: target.weight for target in self.targets}


def federate_service(
    key: ServiceKey,
    local: LocalService | None,
    peers: Iterable[PeerView],
    settings: MirrorSettings,
    now: float,
    *,
    order: Sequence[str] = (),
    weights: Mapping[str, int] | None = None,
) -> FederatedUpstream | None:
    """The federated upstream of one service, or None when it exists nowhere we may route.

    ``order`` is a preference of remote clusters for the default weights; ``weights`` (target
    cluster -> share) are the failover controller's, renormalised over the targets present.
    """
    targets: list[FederatedTarget] = []
    if local is not None:
        if local.key != key:
            raise ValueError(f"local service {local.key} given for upstream {key}")
        targets.append(
            FederatedTarget(
                name=key.name,
                cluster=settings.cluster,
                weight=0,
                endpoints=local.endpoints,
                sni=sni_name(key, settings.cluster, settings.mesh),
                trust_domain=settings.trust_domain,
                stale=False,
                healthy_endpoints=local.healthy_endpoints,
            )
        )
    for peer in sorted(peers, key=lambda p: p.cluster):
        mirror = _mirror(key, peer, settings, now)
        if mirror is not None:
            targets.append(mirror)
    if not targets:
        return None
    shares, note = _choose(targets, settings.cluster, order, weights)
    return FederatedUpstream(
        key,
        tuple(replace(target, weight=shares.get(target.cluster, 0)) for target in targets),
        note,
    )


def federate(
    local: Iterable[LocalService],
    peers: Iterable[PeerView],
    settings: MirrorSettings,
    now: float,
    *,
    order: Mapping[ServiceKey, Sequence[str]] | None = None,
    weights: Mapping[ServiceKey, Mapping[str, int]] | None = None,
) -> dict[ServiceKey, FederatedUpstream]:
    """Every federated upstream (the loop recomputes single services with
    :func:`federate_service` when only they changed)."""
    local_by_key = {service.key: service for service in local}
    peer_list = list(peers)
    keys = set(local_by_key)
    for peer in peer_list:
        keys.update(peer.imports)
    upstreams = {}
    for key in sorted(keys):
        upstream = federate_service(
            key,
            local_by_key.get(key),
            peer_list,
            settings,
            now,
            order=(order or {}).get(key, ()),
            weights=(weights or {}).get(key),
        )
        if upstream is not None:
            upstreams[key] = upstream
    return upstreams


def _mirror(
    key: ServiceKey, peer: PeerView, settings: MirrorSettings, now: float
) -> FederatedTarget | None:
    imported = peer.imports.get(key)
    if imported is None or peer.cluster == settings.cluster:
        return None
    state = mirror_state(peer, now, settings.stale_grace_seconds)
    if state is MirrorState.WITHDRAWN:
        return None
    return FederatedTarget(
        name=f"{key.name}@{peer.cluster}",
        cluster=peer.cluster,
        weight=0,
        endpoints=tuple(TargetEndpoint(g.host, g.port) for g in peer.gateways),
        sni=sni_name(key, peer.cluster, peer.mesh),
        trust_domain=peer.trust_domain,
        stale=state is MirrorState.STALE,
        healthy_endpoints=imported.healthy_endpoints,
    )


def _choose(
    targets: list[FederatedTarget],
    local_cluster: str,
    order: Sequence[str],
    weights: Mapping[str, int] | None,
) -> tuple[dict[str, int], str]:
    present = {target.cluster for target in targets}
    if weights is not None:
        given = {cluster: share for cluster, share in weights.items() if cluster in present}
        if any(share < 0 for share in given.values()):
            raise ValueError(f"weights must not be negative: {dict(weights)}")
        if sum(given.values()) > 0:
            return _apportion(given), "weights from the failover controller"
    local = next((t for t in targets if t.cluster == local_cluster), None)
    if local is not None and local.healthy_endpoints > 0:
        return {local_cluster: TOTAL_WEIGHT}, (
            f"all local: {local.healthy_endpoints} healthy local endpoint(s)"
        )
    remote = [t for t in targets if t.cluster != local_cluster and t.healthy_endpoints > 0]
    fresh = [t for t in remote if not t.stale]
    candidates = fresh or remote
    why = "no healthy local endpoint" if local is not None else "no local copy"
    if candidates:
        ranked = _ranked([t.cluster for t in candidates], order)
        if order:
            return {ranked[0]: TOTAL_WEIGHT}, f"{why}: all to {ranked[0]}, first healthy in order"
        stale = "" if fresh else " (stale)"
        return _apportion(dict.fromkeys(ranked, 1)), (
            f"{why}: split across {len(ranked)} healthy remote target(s){stale}"
        )
    if local is not None:
        return {local_cluster: TOTAL_WEIGHT}, (
            "no healthy endpoint anywhere: traffic stays local as it is"
        )
    clusters = _ranked([t.cluster for t in targets], order)
    return _apportion(dict.fromkeys(clusters, 1)), (
        "no healthy endpoint anywhere and no local copy: split across remote targets"
    )


def _ranked(clusters: list[str], order: Sequence[str]) -> list[str]:
    position = {cluster: index for index, cluster in enumerate(order)}
    return sorted(clusters, key=lambda c: (position.get(c, len(position)), c))


def _apportion(shares: Mapping[str, int]) -> dict[str, int]:
    """Basis points in proportion to ``shares``, summing to exactly 10000 (largest remainder;
    ties go to the cluster listed first)."""
    total = sum(shares.values())
    result = {cluster: share * TOTAL_WEIGHT // total for cluster, share in shares.items()}
    left = TOTAL_WEIGHT - sum(result.values())
    by_remainder = sorted(shares, key=lambda c: -(shares[c] * TOTAL_WEIGHT % total))
    for cluster in by_remainder[:left]:
        result[cluster] += 1
    return result
