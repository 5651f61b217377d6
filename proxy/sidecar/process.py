"""One sidecar process: the listeners, the router and the TLS material, kept in step with
its config source, and the control-plane registration.

`Sidecar.start` builds everything from the source's current `SidecarState`; each later
state is applied in place: new contexts for new connections (`TlsHolder`), new plans swapped
into the router's routes, new authorization policies for the inbound gate. Nothing open is
dropped, except connections (inbound and outbound) of a trust domain the new bundles no longer
trust (removed by ``peering delete``, or revoked): those are aborted at once.
`Sidecar.aclose` drains the listeners (requests in flight finish within the grace period),
deregisters and stops the admin listener last.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import ipaddress
import logging
import math
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import uvloop

from proxy import native
from proxy.config.source import ConfigSource, ReloadResult
from proxy.http.model import Limits, Timeouts
from proxy.http.server import OutboundServer, serve_outbound
from proxy.identity.svid import X509Svid
from proxy.sidecar.admin import AdminServer, start_admin
from proxy.sidecar.inbound import Inbound
from proxy.sidecar.metrics import SidecarMetrics
from proxy.sidecar.model import SidecarConfig, SidecarState
from proxy.sidecar.outbound import MeshConnector, TcpServer, serve_tcp
from proxy.sidecar.router import MeshRoute, MeshRouter
from proxy.sidecar.source import (
    SidecarFileSource,
    load_own_bundle,
    load_sidecar_config,
    load_svid,
    state_from_snapshot,
)
from proxy.sidecar.tls import ALPN_TCP, MeshTls, TlsHolder

if TYPE_CHECKING:
    # Imported where used: grpc (discovery) and the aiohttp client (registration) cost a
    # sidecar with a static config ~10 MiB of memory that it would never use.
    from proxy.discovery.client import DiscoveryClient, StatsReporter
    from proxy.sidecar.registration import Registration

__all__ = ["Sidecar", "collect_on_the_second", "run", "serve"]

_log = logging.getLogger(__name__)


class Sidecar:
    """A running sidecar (start it with :meth:`start`, stop it with :meth:`aclose`)."""

    def __init__(
        self,
        config: SidecarConfig,
        source: ConfigSource[SidecarState],
        *,
        metrics: SidecarMetrics | None = None,
        limits: Limits | None = None,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.config = config
        self.source = source
        spec = config.spec
        self.metrics = metrics or SidecarMetrics(spec.identity.cluster)
        self.router = MeshRouter(metrics=self.metrics)
        self._limits = limits
        self._timeouts = timeouts
        self.tls: TlsHolder | None = None
        self.outbound: OutboundServer | None = None
        self.inbound: Inbound | None = None
        self._connector: MeshConnector | None = None
        self.tcp: dict[str, TcpServer] = {}
        self._tcp_connector: MeshConnector | None = None
        self.admin: AdminServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = False
        self.state: SidecarState | None = None

    @property
    def admin_port(self) -> int:
        """The admin listener's bound port."""
        assert self.admin is not None
        return self.admin.port

    def ready(self) -> bool:
        """A configuration is in force and the listeners are up."""
        return self._ready

    async def start(self) -> None:
        """Bind every listener and start following the config source."""
        spec = self.config.spec
        listeners = spec.listeners
        state = self.source.current()
        self.tls = TlsHolder(MeshTls(state.svid, state.bundles))
        self.admin = await start_admin(
            listeners.admin.address, listeners.admin.port, self.metrics, self.ready
        )
        self.apply(state)
        metrics = self.metrics
        connector = MeshConnector(self.tls, on_reject=metrics.outbound_rejected)
        self._connector = connector
        self.outbound = await serve_outbound(
            listeners.outbound.address,
            listeners.outbound.port,
            self.router,
            limits=self._limits,
            timeouts=self._timeouts,
            connector=connector,
        )
        inbound = Inbound(
            self.tls,
            (spec.app.address, spec.app.port),
            state.trust_domain,
            on_reject=metrics.inbound_rejected,
        )
        inbound.set_policies(state.trust_domain, state.authorization_for(state.service))
        await inbound.serve(
            listeners.inbound.address,
            listeners.inbound.port,
            limits=self._limits,
            timeouts=self._timeouts,
        )
        self.inbound = inbound
        self._tcp_connector = MeshConnector(
            self.tls, alpn=ALPN_TCP, on_reject=metrics.outbound_rejected
        )
        await self._tcp_ports(state, strict=True)
        self._tasks.append(asyncio.get_running_loop().create_task(self._follow()))
        self._ready = True

    def apply(self, state: SidecarState) -> None:
        """Put ``state`` in force: TLS for new connections, routes, authorization, and
        connections of domains no longer trusted closed."""
        self.state = state
        if self.tls is not None and self.tls.update(state.svid, state.bundles):
            # New contexts first, so that no new connection of a withdrawn domain gets in.
            for side in (self.inbound, self._connector, self._tcp_connector):
                if side is not None:
                    side.withdraw(state.bundles)
        self.router.apply(state)
        if self.inbound is not None:
            self.inbound.set_policies(state.trust_domain, state.authorization_for(state.service))
        self.metrics.cert_expiry.set(state.svid.not_after.timestamp())

    async def _tcp_ports(self, state: SidecarState, *, strict: bool = False) -> None:
        """Open the TCP ports of new upstreams; close those removed or moved.

        At start a port that cannot be bound stops the sidecar (``strict``); later it is
        logged and the rest of the configuration stays in force.
        """
        assert self._tcp_connector is not None
        wanted = {s: u.tcp_port for s, u in state.upstreams.items() if u.tcp_port is not None}
        for service, server in list(self.tcp.items()):
            if wanted.get(service) != server.requested_port:
                del self.tcp[service]
                await server.aclose()
        for service, port in wanted.items():
            if service in self.tcp:
                continue
            try:
                self.tcp[service] = await serve_tcp(
                    self.config.spec.listeners.outbound.address,
                    port,
                    _route_of(self.router, service),
                    self._tcp_connector,
                )
            except OSError as error:
                if strict:
                    raise
                _log.warning("sidecar: cannot open TCP port %d of %s: %s", port, service, error)

    async def _follow(self) -> None:
        # Reloads are counted by the source (the file source's on_reload, the discovery
        # client's own counter); here only a state the data plane cannot use is.
        async for state in self.source.updates():
            try:
                self.apply(state)
                await self._tcp_ports(state)
            except Exception:
                _log.exception("sidecar: could not apply configuration %s", state.version)
                self.metrics.reload_rejected()

    async def aclose(self, grace: float | None = None) -> None:
        """Drain and stop: not ready at once, requests in flight finish within ``grace``."""
        self._ready = False
        grace = self.config.spec.drain_timeout if grace is None else grace
        close = getattr(self.source, "close", None)
        if close is not None:
            close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        closing: list[Awaitable[None]] = [server.aclose() for server in self.tcp.values()]
        if self.outbound is not None:
            closing.append(self.outbound.aclose(grace))
        if self.inbound is not None:
            closing.append(self.inbound.aclose(grace))
        await asyncio.gather(*closing)
        if self.admin is not None:
            await self.admin.aclose()


def _route_of(router: MeshRouter, service: str) -> Callable[[], MeshRoute | None]:
    return lambda: router.upstream(service)


def _registration(config: SidecarConfig, inbound_port: int) -> Registration | None:
    spec = config.spec
    plane = spec.control_plane
    if plane is None or plane.admin_url is None:
        return None
    identity = spec.identity
    address = spec.listeners.inbound.address
    if ipaddress.ip_address(address).is_unspecified:
        # Listening on every address: callers on this host can reach loopback.
        address = "127.0.0.1"
    body = {
        "id": f"{identity.service}-{identity.namespace}-{socket.gethostname()}-{inbound_port}",
        "workload": {
            "name": identity.service,
            "namespace": identity.namespace,
            "serviceAccount": identity.service_account,
        },
        "endpoint": {
            "service": identity.service,
            "namespace": identity.namespace,
            "address": address,
            "port": inbound_port,
        },
    }
    from proxy.sidecar.registration import Registration

    return Registration(plane.admin_url, body)


class _Discovery:
    """The discovery client of a sidecar, its renewed SVIDs, and its stats reporter."""

    def __init__(self, config: SidecarConfig, metrics: SidecarMetrics) -> None:
        from proxy.api.v1 import discovery_pb2 as pb
        from proxy.discovery.client import DiscoveryClient

        spec = config.spec
        plane = spec.control_plane
        assert plane is not None
        identity = spec.identity
        svid = load_svid(spec.tls.certificate, spec.tls.key)
        self.identity = pb.ProxyIdentity(
            role=pb.ProxyIdentity.ROLE_SIDECAR,
            cluster=identity.cluster,
            namespace=identity.namespace,
            service_account=identity.service_account,
            workload=f"{identity.service}-{socket.gethostname()}",
            service=identity.service,
        )
        self.sidecar: Sidecar | None = None
        self.client: DiscoveryClient[SidecarState] = DiscoveryClient(
            f"{plane.address}:{plane.port}",
            self.identity,
            svid,
            load_own_bundle(config),
            state_from_snapshot(config, lambda: self.client.svid),
            on_svid=self._renewed,
            registry=metrics.registry,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._reporter: StatsReporter | None = None

    def _renewed(self, svid: X509Svid) -> None:
        # A renewed SVID may come without a new configuration: new connections use it now.
        sidecar = self.sidecar
        if sidecar is not None and sidecar.state is not None:
            sidecar.apply(dataclasses.replace(sidecar.state, svid=svid))

    def start(self) -> None:
        """Subscribe (in the background)."""
        self._tasks.append(asyncio.get_running_loop().create_task(self.client.run()))

    def report(self, sidecar: Sidecar) -> None:
        """Follow ``sidecar``'s SVID renewals and stream its per-second stats."""
        from proxy.discovery.client import StatsReporter

        self.sidecar = sidecar
        self._reporter = StatsReporter(
            self.client.open_channel, self.identity, sidecar.router.stats.drain
        )
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._reporter.run()))
        self._tasks.append(loop.create_task(collect_on_the_second(self._reporter.collect)))

    async def stop(self) -> None:
        """Stop subscribing and reporting."""
        if self._reporter is not None:
            self._reporter.close()
        self.client.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


_AFTER_THE_SECOND = 0.02


async def collect_on_the_second(
    collect: Callable[[float], None],
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Hand each closed one-second stats window to ``collect`` just after its second ends.

    The reporter's own once-a-second collection runs wherever its loop started, so a window
    could wait up to a second before it is sent; the failover controller acts on windows, so
    this collects 20 ms after every whole second of ``clock`` (Unix time) instead.
    """
    while True:
        now = clock()
        await sleep(math.floor(now) + 1 + _AFTER_THE_SECOND - now)
        collect(clock())


async def serve(config_path: Path) -> None:
    """Run one sidecar until SIGTERM or SIGINT, then drain and stop."""
    config = load_sidecar_config(config_path)
    discovery = None
    metrics = SidecarMetrics(
        config.spec.identity.cluster, reloads=config.spec.control_plane is None
    )
    source: ConfigSource[SidecarState]
    if config.spec.control_plane is not None:
        discovery = _Discovery(config, metrics)
        discovery.start()
        _log.info("sidecar: waiting for a first configuration from the control plane")
        await discovery.client.wait_ready()
        source = discovery.client
    else:

        def counted(result: ReloadResult) -> None:
            (metrics.reload_ok if result.ok else metrics.reload_rejected)()
            if not result.ok:
                _log.warning("sidecar: config refused, the last good one stays: %s", result.reason)

        file_source = SidecarFileSource(config_path, on_reload=counted)
        file_source.watch_sighup()
        source = file_source
    sidecar = Sidecar(config, source, metrics=metrics)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    registration: Registration | None = None
    try:
        await sidecar.start()
        if discovery is not None:
            discovery.report(sidecar)
        assert sidecar.inbound is not None
        registration = _registration(config, sidecar.inbound.port)
        if registration is not None:
            registration.start()
        # "compiled", or "pure: <why>" when the mypyc build is missing or stale (proxy/native.py).
        _log.info("sidecar: ready (hot path: %s)", native.state)
        # What start-up made (modules, config models) lives for good: out of the collector's
        # sight, so that a full collection on the request path walks only what requests made.
        gc.collect()
        gc.freeze()
        await stop.wait()
        _log.info("sidecar: draining for up to %gs", config.spec.drain_timeout)
    finally:
        if registration is not None:
            await registration.stop()
        await sidecar.aclose()
        if discovery is not None:
            await discovery.stop()


def run(config_path: Path) -> int:
    """Run :func:`serve` on uvloop; the process exit code."""
    uvloop.run(serve(config_path))
    return 0
