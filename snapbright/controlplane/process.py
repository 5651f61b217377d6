"""One cluster's control plane as one process: :func:`running` composes every part.

Order, and why:

1. The CA is loaded from the state directory (created and saved on the first run): every
   listener's certificate comes from it.
2. The admin socket is bound and the discovery and peering gRPC servers are started, so
   their ports are known: they form the admission deny list (no registration may point at
   our own listeners). The discovery server answers at once, but its snapshot builder says
   "not ready" until steps 3 and 4 are done: a proxy is never sent an empty configuration.
   The peering port opens before peering reconnects to the peers recorded in the state
   directory, so the Opens we send name our gateways (a stream that arrives first waits).
   Peers get no exports from us until steps 3 and 4 are applied (``_ExportGate``): a
   restarted control plane never sends a peer an empty snapshot while it is still loading.
3. The catalog source is opened: the embedded registry (SQLite in the state directory, TTL
   expiry running) or a Consul watcher (with leader election and mirror write-back).
4. The policy directory is loaded (a bad set leaves the control plane not ready until a good
   one arrives) and watched.
5. The failover loop ticks over the health view (stats from the sidecars, peers' health
   summaries, gateway probes) and its weights go into the next snapshots.
6. The admin API and the dashboard share one aiohttp app on the admin socket, in the same
   event loop as grpc.aio; ``endpoints.json`` is written last, when everything answers.

Every change of a source ends in ``changed()``: the view recomputes only the upstreams the
change can affect (it was told which through its setters), and the discovery server pushes
deltas of what differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from federation.catalog.consul import (
    ConsulClient,
    ConsulRejected,
    ConsulUnavailable,
    LeaderElection,
    MirrorEntry,
    MirrorWriter,
)
from federation.catalog.feed import CatalogSource
from federation.catalog.model import AdmissionPolicy, Catalog, DeniedTarget
from federation.catalog.store import Registry
from federation.catalog.watch import ConsulWatcher
from federation.discovery.core import StatsStore
from federation.discovery.server import Discovery, serve
from federation.mirror.core import MirrorSettings, PeerView, local_services
from federation.peering.core import ApplyImports
from federation.peering.credentials import control_plane_server_name
from federation.peering.manager import PeeringCallbacks, PeeringManager
from federation.peering.model import (
    ExportedService,
    GatewayAddress,
    PeerState,
    ServiceHealth,
    ServiceKey,
)
from federation.peering.store import load_state
from federation.trust import store as ca_store
from federation.trust.ca import ClusterCA, create_ca
from health.dashboard.board import Board
from health.dashboard.model import Region, RttLink, region_status, service_rows
from health.dashboard.server import LOOPBACK_HOSTS, DashboardSettings, dashboard_app
from health.failover.loop import FailoverLoop
from health.failover.model import Decision
from health.failover.record import Journal
from health.probe.core import probe_latency
from health.probe.prober import (
    EndpointTarget,
    GatewayTarget,
    Prober,
    endpoint_statuses,
    gateway_statuses,
)
from health.stats.core import (
    HealthView,
    LocalService,
    RegionalStats,
    RemoteService,
    health_summary,
)
from proxy.config.loader import load_file
from proxy.config.source import ConfigRejected
from proxy.discovery.core import control_plane_host, control_plane_id
from proxy.identity.bundle import TrustBundle, TrustBundleSet
from proxy.identity.model import TrustDomain
from proxy.identity.svid import X509Svid
from proxy.stats.core import StatsWindow
from snapbright.controlplane import api
from snapbright.controlplane.health import ClusterHealth
from snapbright.controlplane.model import (
    ENDPOINTS_FILE,
    ClusterEndpoints,
    ControlPlaneConfig,
    EndpointsFile,
)
from snapbright.controlplane.policies import PolicyDirectory, PolicySet
from snapbright.controlplane.snapshot import ClusterView

_log = logging.getLogger(__name__)

CONTROL_PLANE_SVID_TTL = timedelta(hours=24)
_HOUSEKEEPING_S = 1.0


def load_config(path: Path) -> ControlPlaneConfig:
    """Read a ControlPlaneConfig file; :class:`ConfigRejected` names file:line:col."""
    (document,) = load_file(path, {ControlPlaneConfig.KIND: ControlPlaneConfig}).raise_for_errors()
    assert isinstance(document, ControlPlaneConfig)
    return document


@dataclass(eq=False)
class ControlPlane:
    """The running parts, as the admin API and tests reach them."""

    config: ControlPlaneConfig
    state_dir: Path
    trust_domain: TrustDomain
    metrics: CollectorRegistry
    admission: AdmissionPolicy
    view: ClusterView
    policies: PolicyDirectory
    discovery: Discovery
    peering: PeeringManager
    health: ClusterHealth
    failover: FailoverLoop
    journal: Journal
    board: Board
    prober: Prober | None
    ca: Callable[[], ClusterCA]
    svid: Callable[[], X509Svid]
    registry: Registry | None = None
    """The embedded registry (None with the Consul backend: registrations go to Consul)."""
    catalog: CatalogSource | None = None
    ports: dict[str, int] = field(default_factory=dict)
    """Bound ports by listener: discovery, peering, admin."""
    started_at: float = field(default_factory=time.time)

    @property
    def cluster(self) -> str:
        """This control plane's cluster."""
        return self.config.spec.cluster

    @property
    def admin_url(self) -> str:
        """The admin API's base URL."""
        return f"http://{_connectable(self.config.spec.listen.admin.address)}:{self.ports['admin']}"

    @property
    def discovery_target(self) -> str:
        """``host:port`` proxies subscribe to."""
        address = _connectable(self.config.spec.listen.discovery.address)
        return f"{address}:{self.ports['discovery']}"

    @property
    def ready(self) -> bool:
        """Whether proxies can be served: the catalog read once and a policy set accepted."""
        return self.view.ready

    def changed(self) -> None:
        """A source changed (the view was told what): snapshots follow, pushed as deltas."""
        self.discovery.refresh()


@asynccontextmanager
async def running(
    config: ControlPlaneConfig,
    base: Path,
    *,
    policy_poll_interval: float = 1.0,
    expiry_interval: float = 1.0,
) -> AsyncIterator[ControlPlane]:
    """Start the whole control plane of ``config`` (paths relative to ``base``); stop it on
    exit. This is the one place where the parts meet."""
    spec = config.spec
    trust_domain = TrustDomain.for_cluster(spec.cluster, spec.mesh)
    state_dir = config.state_dir(base)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    metrics = CollectorRegistry()
    # The background tasks stop first (on any exit, a failed start too), then the parts.
    async with contextlib.AsyncExitStack() as stack, _background() as tasks:
        # 1. The CA, and the control plane's own SVID (peering port, gateway probes).
        ca = _load_or_create_ca(state_dir, trust_domain)
        cp_svid = _control_plane_svid(ca, spec.cluster, spec.mesh)

        # 2. Listeners first: their ports are the admission deny list. Peering reconnects to
        #    the peers recorded in the state directory.
        admin_socket = _bind(spec.listen.admin.address, spec.listen.admin.port)
        stack.callback(admin_socket.close)
        policies = PolicyDirectory(
            config.policy_directory(base), metrics, poll_interval=policy_poll_interval
        )
        regional = RegionalStats()
        # No "no healthy local endpoint" until the catalog was read and local services had
        # a registration TTL to register again (set by _follow_catalog).
        health = ClusterHealth(spec.cluster, regional, local_from=math.inf)
        # Filled in below, once the ports are known; the builder reads it lazily.
        view = ClusterView(
            MirrorSettings(spec.cluster, spec.mesh, trust_domain, spec.stale_grace),
            policies,
            lambda: ca.bundle(),
            AdmissionPolicy(allow_loopback=spec.admission.allow_loopback),
            clock=time.time,
            registry=metrics,
        )
        discovery = Discovery(
            ca,
            view.content,
            cluster=spec.cluster,
            stats=_RegionalFeed(regional, spec.cluster),
            registry=metrics,
        )
        discovery_server, discovery_port = await serve(
            discovery, _address(spec.listen.discovery.address, spec.listen.discovery.port)
        )
        stack.push_async_callback(discovery_server.stop, 1.0)

        def changed() -> None:
            discovery.refresh()

        events = _PeerEvents(view, health, changed, state_dir / "peering")
        peering = PeeringManager(
            cluster=spec.cluster,
            mesh=spec.mesh,
            svid=cp_svid,
            bundle=ca.bundle(),
            state_dir=state_dir / "peering",
            callbacks=events.callbacks(),
            # Withheld until the catalog and the ExportPolicy are applied (_ExportGate).
            exports_ready=False,
        )
        # The port first, so our gateways (with none configured, the peering port itself) are
        # known before the dial loops name them in their Opens; streams that arrive before
        # the recorded peers are loaded wait for them.
        peering_port = await peering.serve(
            _address(spec.listen.peering.address, spec.listen.peering.port)
        )
        stack.push_async_callback(peering.stop_serving)
        peering.gateways = tuple(GatewayAddress.parse(g) for g in spec.gateways) or (
            GatewayAddress(_connectable(spec.listen.peering.address), peering_port),
        )
        await peering.start()
        stack.push_async_callback(peering.close)
        ports = {
            "discovery": discovery_port,
            "peering": peering_port,
            "admin": admin_socket.getsockname()[1],
        }
        admission = AdmissionPolicy(
            allow_loopback=spec.admission.allow_loopback,
            denied=frozenset(
                DeniedTarget(getattr(spec.listen, name).address, port)
                for name, port in ports.items()
            ),
        )
        view.admission = admission
        view.peering_endpoint = (_connectable(spec.listen.peering.address), peering_port)

        # 3. The catalog source.
        registry: Registry | None = None
        catalog: CatalogSource
        if spec.catalog.backend == "embedded":
            registry = Registry.open(state_dir, admission, time.time())
            stack.callback(registry.close)
            tasks.append(asyncio.create_task(registry.run_expiry(expiry_interval)))
            catalog = registry
        else:
            catalog = await _consul(stack, tasks, config, base, admission, view)
        view.catalog = catalog

        # 4. Policies: the first load, then watched.
        policies.reload()

        # 5. Health, failover and the dashboard's board.
        journal = Journal(path=state_dir / "decisions.jsonl")
        stack.callback(journal.close)
        board = Board(spec.cluster)

        def apply_weights(service: str, _caller: str, weights: Mapping[str, int]) -> None:
            view.set_weights(service, weights)  # empty: back to the default weights
            changed()

        failover = FailoverLoop(
            spec.cluster,
            # Only what needs a decision: the rest keep discovery's default weights.
            pairs=health.failover_pairs,
            observe=health.observe,
            apply=apply_weights,
            journal=journal,
            registry=metrics,
            clock=time.time,
            interval=spec.failover.interval,
            # Just after the sidecars' windows of the second that ended arrive (loop.py).
            phase=min(0.25, spec.failover.interval / 2),
            on_decision=_board_observer(board),
        )
        prober = None
        if spec.probe_gateways:
            prober = Prober(
                identity=lambda: (cp_svid, TrustBundleSet(view.bundles())), registry=metrics
            )
        plane = ControlPlane(
            config=config,
            state_dir=state_dir,
            trust_domain=trust_domain,
            metrics=metrics,
            admission=admission,
            view=view,
            policies=policies,
            discovery=discovery,
            peering=peering,
            health=health,
            failover=failover,
            journal=journal,
            board=board,
            prober=prober,
            ca=lambda: ca,
            svid=lambda: cp_svid,
            registry=registry,
            catalog=catalog,
            ports=ports,
        )

        ca_stamp = _ca_stamp(state_dir)
        # The bundle sequence peers must ack before leaves are re-issued under a new root.
        reissue_at: int | None = None

        def refresh_identity() -> None:
            """Follow the CA on disk (`snapbright ca rotate` writes it) and prune retired
            roots; hand a changed bundle to proxies and peers; renew our own SVID."""
            nonlocal ca, cp_svid, ca_stamp, reissue_at
            now = datetime.now(UTC)
            rotated = False
            if _ca_stamp(state_dir) != ca_stamp:
                ca_stamp = _ca_stamp(state_dir)
                loaded = ca_store.load_ca(state_dir)
                if loaded.trust_domain == trust_domain and loaded.sequence != ca.sequence:
                    if loaded.active.name != ca.active.name:
                        reissue_at = loaded.sequence
                    ca, rotated = loaded, True
            # A staged root signs once every peer has acked the bundle that carries it (not in
            # the tick that loaded it: our proxies get it first); see ClusterCA.advance.
            acked = not rotated and peering.bundle_acked_by_all(ca.sequence)
            pruned = ca.advance(now, bundle_acked=acked)
            if pruned is not ca:
                if pruned.active.name != ca.active.name:
                    reissue_at = 0  # the switch already waited for peers (or its deadline)
                ca_store.save_ca(state_dir, pruned)
                ca, ca_stamp, rotated = pruned, _ca_stamp(state_dir), True
            if rotated:
                _log.info("CA of %s: bundle sequence %d", trust_domain, ca.sequence)
                discovery.set_ca(ca)
                peering.set_local_bundle(ca.bundle())
                changed()
            if rotated or now >= cp_svid.renew_at:
                cp_svid = _control_plane_svid(ca, spec.cluster, spec.mesh)
                peering.set_svid(cp_svid)
            # A new root signs: once every peer holds it, re-issue our proxies' leaves under
            # it, so none is left under the old root when that retires. Not in the tick that
            # saw the rotation: our proxies' own new bundle goes out first (built on change),
            # else a proxy refuses a leaf it cannot yet chain to a root it holds.
            if not rotated and reissue_at is not None and peering.bundle_acked_by_all(reissue_at):
                reissue_at = None
                _log.info("CA of %s: re-issued %d SVIDs", trust_domain, discovery.reissue_svids())

        # The loops that follow each source and apply its changes.
        gate = _ExportGate(peering)
        tasks.append(asyncio.create_task(_follow_catalog(plane, catalog, gate)))
        tasks.append(asyncio.create_task(_follow_policies(plane, gate)))
        tasks.append(asyncio.create_task(failover.run()))
        housekeeping = _housekeeping(plane, events, refresh_identity, _HOUSEKEEPING_S)
        tasks.append(asyncio.create_task(housekeeping))
        if prober is not None:
            tasks.append(asyncio.create_task(prober.run()))

        # 6. The admin API and the dashboard, on the admin socket.
        loopback_admin = not spec.listen.allow_non_loopback_admin
        app = dashboard_app(
            board, DashboardSettings(allowed_hosts=LOOPBACK_HOSTS if loopback_admin else None)
        )
        api.add_api(app, plane)
        runner = web.AppRunner(app, shutdown_timeout=2.0, access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.SockSite(runner, admin_socket).start()
        _write_endpoints(plane)
        _log.info(
            "control plane %s: discovery %d, peering %d, admin %s",
            spec.cluster,
            discovery_port,
            peering_port,
            plane.admin_url,
        )
        yield plane


async def serve_until_stopped(config_path: Path) -> None:
    """Run the control plane of ``config_path`` until SIGTERM or SIGINT."""
    config = load_config(config_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with running(config, config_path.parent):
        await stop.wait()
        _log.info("control plane %s: stopping", config.spec.cluster)


def run(config_path: Path) -> None:
    """Run :func:`serve_until_stopped` on uvloop (plain asyncio where it is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve_until_stopped(config_path))
    else:
        uvloop.run(serve_until_stopped(config_path))


@asynccontextmanager
async def _background() -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- The loops that connect sources to the view ---


class _ExportGate:
    """Peers get our exports only once they are complete: the catalog (the source's first
    complete read) put into the export book with an accepted policy set's decisions. Sent
    sooner, a restarted control plane's first snapshot could be empty and withdraw every
    peer's mirrors of us while a source is still syncing."""

    def __init__(self, peering: PeeringManager) -> None:
        self._peering = peering
        self._catalog_exported = False

    def catalog_exported(self, *, decided: bool) -> None:
        """The catalog is in the book; ``decided`` if a policy set made the decisions."""
        self._catalog_exported = True
        if decided:
            self._peering.release_exports()

    def policies_applied(self) -> None:
        """An accepted policy set re-decided the book."""
        if self._catalog_exported:
            self._peering.release_exports()


async def _follow_catalog(plane: ControlPlane, source: CatalogSource, gate: _ExportGate) -> None:
    """Each catalog change: new snapshots, the exports peers see, local health."""
    exported: set[ServiceKey] = set()
    async for catalog in source.watch():
        plane.changed()
        try:
            exported = _export(plane, catalog, exported)
            gate.catalog_exported(decided=plane.policies.current() is not None)
            now = time.time()
            if plane.health.local_from == math.inf:
                # The catalog's first read: from one TTL on, a missing local copy is down.
                plane.health.local_from = now + plane.config.spec.catalog.registration_ttl
            present = set()
            for service in local_services(catalog):
                present.add(service.key.name)
                plane.health.set_local(
                    service.key.name, LocalService(service.healthy_endpoints, observed_at=now)
                )
            for name in {pair[0] for pair in plane.health.pairs(now)} - present:
                plane.health.set_local(name, None)
        except Exception:
            # The snapshots follow regardless; exports and health catch up on the next change.
            _log.exception("applying catalog %d failed", catalog.index)


def _export(plane: ControlPlane, catalog: Catalog, before: set[ServiceKey]) -> set[ServiceKey]:
    """Tell peering every local service and who it is exported to (ExportPolicy decides)."""
    policies = plane.policies.current()
    now_present: set[ServiceKey] = set()
    for service in local_services(catalog):
        key = ServiceKey(service.key.namespace, service.key.name)
        now_present.add(key)
        peers = policies.peers_of(key.name) if policies is not None else frozenset()
        plane.peering.set_service(
            key, healthy_endpoints=service.healthy_endpoints, exported_to=sorted(peers)
        )
    for key in before - now_present:
        plane.peering.remove_service(key)
    return now_present


async def _follow_policies(plane: ControlPlane, gate: _ExportGate) -> None:
    """Each accepted policy set: new snapshots, failover policies, export decisions."""
    async for policies in plane.policies.watch():
        try:
            plane.failover.set_policies(policies.failover)
            plane.health.set_policies(policies.failover)  # each one's evidence.enterSpan
        except ValueError as error:  # the directory loader already refuses duplicates
            _log.error("policies: %s", error)
        plane.peering.apply_export_decision(functools.partial(_export_peers, policies))
        gate.policies_applied()
        plane.changed()


def _export_peers(policies: PolicySet, key: ServiceKey) -> list[str]:
    return sorted(policies.peers_of(key.name))


async def _housekeeping(
    plane: ControlPlane,
    events: _PeerEvents,
    refresh_identity: Callable[[], None],
    interval: float,
) -> None:
    """Once a second: gateway probes into the health view, stale mirrors withdrawn on time,
    health summaries to peers, the board's regions, the CA and our SVID followed."""
    while True:
        now = time.time()
        try:
            refresh_identity()
            if plane.prober is not None:
                # Our local endpoints too: an idle copy's latency evidence (health_summary).
                plane.prober.set_targets([*events.probe_targets(), *_endpoint_targets(plane)])
                statuses = gateway_statuses(plane.prober.statuses())
                plane.health.set_gateways(statuses)
                if events.set_probe_alive({p: s.alive for p, s in statuses.items()}):
                    plane.changed()
            due = plane.view.next_change_at(now)
            if due is not None and due <= now:
                plane.changed()
            _publish_health(plane, now)
            _update_board(plane, now)
        except Exception:
            # One bad second must not stop the next: log it, try again.
            _log.exception("control plane housekeeping failed")
        await asyncio.sleep(interval)


def _endpoint_targets(plane: ControlPlane) -> list[EndpointTarget]:
    catalog = plane.catalog.current() if plane.catalog is not None else None
    if catalog is None:
        return []
    return [
        EndpointTarget.for_endpoint(s.key.name, e.address, e.port, plane.trust_domain)
        for s in local_services(catalog)
        for e in s.endpoints
        if e.healthy
    ]


def _publish_health(plane: ControlPlane, now: float) -> None:
    catalog = plane.catalog.current() if plane.catalog is not None else None
    if catalog is None:
        return
    probed = plane.prober.statuses() if plane.prober is not None else {}
    summaries = [
        health_summary(
            plane.health.stats,
            ServiceKey(s.key.namespace, s.key.name),
            plane.cluster,
            now,
            healthy_endpoints=s.healthy_endpoints,
            probes=probe_latency(endpoint_statuses(probed, s.key.name)),
        )
        for s in local_services(catalog)
    ]
    plane.peering.publish_health(summaries, int(now * 1000))


def _update_board(plane: ControlPlane, now: float) -> None:
    """The dashboard's regions, RTT links and per-service statistics, from what we hold."""
    statuses = gateway_statuses(plane.prober.statuses()) if plane.prober is not None else {}
    policies = plane.failover.policies
    # Every copy: what our callers measured, and each peer's copy we send nothing to.
    services = service_rows(plane.health, now, policies)
    degraded = Counter(s.region for s in services if s.degraded)
    regions = [
        Region(
            plane.cluster,
            region_status(reachable=True, degraded_services=degraded[plane.cluster]),
            local=True,
        )
    ]
    for status in plane.peering.list():
        probe = statuses.get(status.peer)
        connected = status.state is PeerState.ACTIVE and status.stale_since is None
        reachable = probe.alive if probe is not None else connected
        regions.append(
            Region(
                status.peer,
                region_status(reachable=reachable, degraded_services=degraded[status.peer]),
                detail=f"peering {status.state.value}",
            )
        )
    rtt = [RttLink(plane.cluster, peer, s.rtt if s.alive else None) for peer, s in statuses.items()]
    plane.board.update(regions=regions, rtt=rtt, services=services)


# --- Peering events into the view and the health view ---


class _PeerEvents:
    """Peering's callbacks: keep the view's peers, imports, trust and staleness current."""

    def __init__(
        self,
        view: ClusterView,
        health: HealthView,
        refresh: Callable[[], None],
        peering_dir: Path,
    ) -> None:
        self._view = view
        self._health = health
        self._refresh = refresh
        self._peering_dir = peering_dir
        self._imports: dict[str, Mapping[ServiceKey, ExportedService]] = {}

    def callbacks(self) -> PeeringCallbacks:
        """The callbacks to hand the peering manager."""
        return PeeringCallbacks(
            imports_changed=self.imports_changed,
            health=self.health_received,
            trust_changed=self.trust_changed,
            stale=self.stale,
            withdrawn=self.withdrawn,
            gateways_changed=self.gateways_changed,
        )

    def imports_changed(
        self, peer: str, change: ApplyImports, imports: Mapping[ServiceKey, ExportedService]
    ) -> None:
        """The peer's exports to us changed: mirrors follow (``imports`` is peering's live,
        read-only view, so nothing is copied), and the health view learns what changed."""
        self._imports[peer] = imports
        # A known peer: only what the delta names is recomputed (``imports`` is the same live
        # mapping as before, in a new read-only wrapper).
        keys = [*change.removed, *(exported.key for exported in change.upserted)]
        if not self._view.imports_changed(peer, imports, keys):
            known = self._peer_view(peer)
            if known is None:
                _log.warning("peering: imports from %s, which has no peer record yet", peer)
                return
            self._view.set_peer(replace(known, imports=imports))
        for key in change.removed:
            self._health.remove_remote(key.name, peer)
        for exported in change.upserted:
            self._health.set_remote(
                exported.key.name, RemoteService(peer, exported.healthy_endpoints)
            )
        self._refresh()

    def health_received(
        self, peer: str, services: tuple[ServiceHealth, ...], _at_unix_ms: int
    ) -> None:
        """A peer's health summaries of what it exports to us."""
        now = time.time()
        imports = self._imports.get(peer, {})
        for summary in services:
            exported = imports.get(summary.key)
            if exported is None:
                continue  # only for services it exports to us
            self._health.set_remote(
                summary.key.name,
                RemoteService(peer, exported.healthy_endpoints, summary, received_at=now),
            )

    def trust_changed(self, peer: str, bundle: TrustBundle | None) -> None:
        """The peer's bundle as applied (None: withdrawn)."""
        if bundle is None:
            self._view.peer_bundles.pop(peer, None)
        else:
            self._view.peer_bundles[peer] = bundle
        self._refresh()

    def stale(self, peer: str, since: float | None) -> None:
        """The peer became unreachable at ``since`` (None: it is back)."""
        known = self._view.peers.get(peer)
        if known is not None:
            self._view.set_peer(replace(known, unreachable_since=since))
            self._refresh()

    def withdrawn(self, peer: str, _trust_domain: TrustDomain) -> None:
        """The peering was deleted: its mirrors and trust go now."""
        for key in self._imports.pop(peer, {}):
            self._health.remove_remote(key.name, peer)
        self._view.remove_peer(peer)
        self._refresh()

    def gateways_changed(self, peer: str, gateways: tuple[GatewayAddress, ...]) -> None:
        """A peer that dials us named new gateway addresses: its mirrors route there (the
        view drops any that our admission policy refuses)."""
        known = self._view.peers.get(peer)
        if known is not None:
            self._view.set_peer(replace(known, gateways=gateways))
            self._refresh()

    def set_probe_alive(self, alive: Mapping[str, bool]) -> bool:
        """The gateway probes' verdicts; True when a mirror's state may have changed."""
        changed = False
        for name, peer in list(self._view.peers.items()):
            value = alive.get(name, True)
            if peer.probe_alive != value:
                self._view.set_peer(replace(peer, probe_alive=value))
                changed = True
        return changed

    def probe_targets(self) -> list[GatewayTarget]:
        """One probe per peer, at its first gateway address."""
        return [
            GatewayTarget.for_peer(name, peer.mesh, peer.gateways[0].host, peer.gateways[0].port)
            for name, peer in sorted(self._view.peers.items())
            if peer.gateways
        ]

    def _peer_view(self, peer: str) -> PeerView | None:
        # Mesh, trust domain and gateways come from our record of the peer (its token, or
        # for a peer that dials us the gateways its authenticated Open named), never from
        # what the peer sends per service: see federation/mirror/core.py, rule 2.
        for record in load_state(self._peering_dir).peers:
            if record.name == peer:
                return PeerView(record.name, record.mesh, record.trust_domain, record.gateways)
        return None


# --- Small pieces of wiring ---


def _board_observer(board: Board) -> Callable[[str, str, Decision], None]:
    """The failover loop's decision observer that shows each decision on the board."""

    def observe(service: str, caller: str, decision: Decision) -> None:
        board.observe(service, caller, decision)

    return observe


class _RegionalFeed(StatsStore):
    """The discovery server's stats store, also feeding the failover controller's
    regional statistics (every subscribed sidecar is in this cluster)."""

    __slots__ = ("_cluster", "_regional")

    def __init__(self, regional: RegionalStats, cluster: str) -> None:
        super().__init__()
        self._regional = regional
        self._cluster = cluster

    def add(self, reporter: str, window: StatsWindow) -> bool:
        self._regional.add(self._cluster, window, time.time())
        return super().add(reporter, window)


def _load_or_create_ca(state_dir: Path, trust_domain: TrustDomain) -> ClusterCA:
    now = datetime.now(UTC)
    if ca_store.exists(state_dir):
        ca = ca_store.load_ca(state_dir)
        if ca.trust_domain != trust_domain:
            raise ConfigRejected(
                f"{state_dir}: the CA there is for {ca.trust_domain}, not {trust_domain}"
            )
        pruned = ca.prune(now)
        if pruned is not ca:
            ca_store.save_ca(state_dir, pruned)
        return pruned
    ca = create_ca(trust_domain, now)
    ca_store.save_ca(state_dir, ca)
    _log.info("created the CA of %s in %s", trust_domain, state_dir)
    return ca


def _ca_stamp(state_dir: Path) -> tuple[int, int] | None:
    try:
        st = (ca_store.ca_dir(state_dir) / "ca.json").stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino)


def _control_plane_svid(ca: ClusterCA, cluster: str, mesh: str) -> X509Svid:
    key = ec.generate_private_key(ec.SECP256R1())
    spiffe_id = control_plane_id(ca.trust_domain)
    chain = ca.sign_svid(
        spiffe_id,
        key.public_key(),
        datetime.now(UTC),
        CONTROL_PLANE_SVID_TTL,
        dns_names=(control_plane_server_name(cluster, mesh), control_plane_host(ca.trust_domain)),
    )
    return X509Svid(spiffe_id, chain, key)


def _bind(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _connectable(host: str) -> str:
    """Where a local client reaches a listener bound to ``host``."""
    if host in ("0.0.0.0", ""):  # noqa: S104 - mapping a wildcard bind to a dialable address
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _write_endpoints(plane: ControlPlane) -> None:
    endpoints = EndpointsFile(
        clusters={
            plane.cluster: ClusterEndpoints(
                admin=plane.admin_url,
                discovery=plane.discovery_target,
                peering=f"{_connectable(plane.config.spec.listen.peering.address)}:"
                f"{plane.ports['peering']}",
                dashboard=plane.admin_url + "/",
            )
        }
    )
    ca_store.write_atomic(
        plane.state_dir / ENDPOINTS_FILE, (endpoints.model_dump_json(indent=2) + "\n").encode()
    )


async def _consul(
    stack: contextlib.AsyncExitStack,
    tasks: list[asyncio.Task[None]],
    config: ControlPlaneConfig,
    base: Path,
    admission: AdmissionPolicy,
    view: ClusterView,
) -> CatalogSource:
    """Consul as the catalog: the watcher, leader election, and mirrors written back (by the
    leader only) whenever the federated upstreams change."""
    consul = config.spec.catalog.consul
    assert consul is not None
    token = (base / consul.token_file).read_text().strip() if consul.token_file else None
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    stack.push_async_callback(session.close)
    watcher = ConsulWatcher(consul.address, session, admission, token=token)
    client = ConsulClient(session, consul.address, token=token)
    election = LeaderElection(client, consul.leader_key, config.spec.cluster)
    writer = MirrorWriter(client, lambda: election.is_leader, admission)
    tasks.append(asyncio.create_task(watcher.run()))
    tasks.append(asyncio.create_task(election.run()))
    tasks.append(asyncio.create_task(_write_back(view, writer)))
    return watcher


async def _write_back(view: ClusterView, writer: MirrorWriter) -> None:
    """Keep Consul's mirror entries equal to our mirrors, retrying every few seconds."""
    while True:
        desired = []
        for key, upstream in view.upstreams(time.time()).items():
            for target in upstream.targets:
                if target.cluster == view.settings.cluster:
                    continue
                for endpoint in target.endpoints:
                    with contextlib.suppress(ValueError):  # a host name: Consul wants an IP
                        desired.append(
                            MirrorEntry(key.name, target.cluster, endpoint.address, endpoint.port)
                        )
        with contextlib.suppress(ConsulUnavailable, ConsulRejected):
            await writer.sync(desired)
        await asyncio.sleep(5.0)
