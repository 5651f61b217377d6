"""The prober: probes local endpoints and peer gateways, on a loop clock.

Three kinds of target:

- :class:`HttpTarget`, a local endpoint's health URL: a GET that answers 2xx in time is a
  success. Every probe opens a new connection, so a listener that stopped accepting fails
  and the round trip includes the connect.
- :class:`GatewayTarget`, a peer's east-west gateway: *address + SNI + expected trust domain*.
  The probe dials the address, sends SNI ``probe.snapbright.<cluster>.<mesh>``, completes a
  TLS 1.3 handshake with :func:`proxy.tls.context.client_context` (our SVID, trusting only the
  peer domain's roots) and checks the gateway's SVID with :func:`verify_peer` against that
  trust domain. With ``exchange="http"`` it then sends a tiny ``GET /`` on the probe name and
  needs a 2xx back, and **keeps the connection**: later probes send their request on it, and
  only a broken connection (or a rotated SVID) is dialled again. With
  ``exchange="handshake"`` the server's Finished is the response (a new connection each time).
- :class:`EndpointTarget`, a local endpoint as callers reach it: its sidecar's inbound
  listener, over mTLS with our SVID, proving an identity of our own trust domain, then
  ``GET /healthz`` (by default) through to the app on a kept connection, like a gateway's
  ``http`` exchange. Its round trips are an idle copy's latency evidence
  (:func:`~health.probe.core.probe_latency`), which its health summary publishes when it
  has too few requests of its own.

The round trip of an HTTP probe runs from the connect to the response (a local endpoint: the
connect is part of what is checked). A gateway probe measures one network round trip, which is
what a request over a pooled connection pays and what the failover controller adds to a remote
service's latency. With ``exchange="http"`` that is exactly one request to its response on an
established mTLS connection: nothing of the TCP or TLS handshakes, which an L4 proxy on the
path (a WAN emulator, a load balancer) may answer or delay on its own (through the WAN
emulator at 40 ms one way a handshake probe read ~210 ms, the kept exchange 80 ms). With
``exchange="handshake"``, the TLS 1.3 handshake after the TCP connect. Liveness always needs
a successful exchange. A timeout, a refused connection, a failed handshake or a rejected
identity are failures, each with a short reason.
Each result goes through :class:`~health.probe.core.ProbeStatus`; the schedule comes from
:meth:`~health.probe.core.ProbeSettings.next_probe_at` on the injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import aiohttp
from prometheus_client import CollectorRegistry, Gauge

from health.probe.core import ProbeSettings, ProbeStatus
from proxy.identity.bundle import TrustBundleSet
from proxy.identity.model import TrustDomain
from proxy.identity.svid import Purpose, SvidError, X509Svid
from proxy.tls.context import ContextCache, verify_peer

_RESPONSE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class HttpTarget:
    """A local endpoint probed by an HTTP GET of its health URL; ``name`` keys its status."""

    name: str
    url: str


@dataclass(frozen=True, slots=True)
class GatewayTarget:
    """A peer's gateway: where to dial, the SNI to send, the trust domain it must prove."""

    name: str
    host: str
    port: int
    sni: str
    trust_domain: TrustDomain
    exchange: Literal["handshake", "http"] = "http"

    @classmethod
    def for_peer(
        cls,
        cluster: str,
        mesh: str,
        host: str,
        port: int,
        *,
        exchange: Literal["handshake", "http"] = "http",
    ) -> GatewayTarget:
        """The probe of ``cluster``'s gateway at ``host:port``, named after the cluster."""
        return cls(
            name=cluster,
            host=host,
            port=port,
            sni=f"probe.snapbright.{cluster}.{mesh}",
            trust_domain=TrustDomain.for_cluster(cluster, mesh),
            exchange=exchange,
        )


@dataclass(frozen=True, slots=True)
class EndpointTarget:
    """A local endpoint reached as callers reach it: its sidecar's inbound listener, over mTLS
    with our SVID, proving an identity of our own trust domain; ``GET path`` must answer 2xx.
    Its round trips are the latency evidence of a copy that has no callers."""

    name: str
    host: str
    port: int
    sni: str
    trust_domain: TrustDomain
    path: str = "/healthz"

    @classmethod
    def for_endpoint(
        cls, service: str, host: str, port: int, trust_domain: TrustDomain, path: str = "/healthz"
    ) -> EndpointTarget:
        """The probe of one endpoint of ``service``, named ``service@host:port``."""
        return cls(f"{service}@{host}:{port}", host, port, service, trust_domain, path)


ProbeTarget = HttpTarget | GatewayTarget | EndpointTarget


def endpoint_statuses(statuses: Mapping[str, ProbeStatus], service: str) -> list[ProbeStatus]:
    """Among a prober's statuses, those of ``service``'s endpoint probes
    (:meth:`EndpointTarget.for_endpoint` names them ``service@host:port``)."""
    prefix = f"{service}@"
    return [status for name, status in statuses.items() if name.startswith(prefix)]


def gateway_statuses(statuses: Mapping[str, ProbeStatus]) -> dict[str, ProbeStatus]:
    """Among a prober's statuses, the gateway probes, by cluster (endpoint probes carry an @,
    which a cluster name cannot)."""
    return {name: status for name, status in statuses.items() if "@" not in name}


Identity = Callable[[], tuple[X509Svid, TrustBundleSet]]
"""Our current SVID and the trust bundles we hold (read at every probe: SVIDs rotate)."""


class ProbeFailed(Exception):
    """One probe failed; the message is the short reason kept in the status."""


class Prober:
    """Probes a set of targets on a jittered schedule and keeps each one's status."""

    def __init__(
        self,
        settings: ProbeSettings | None = None,
        *,
        identity: Identity | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._settings = settings if settings is not None else ProbeSettings()
        self._identity = identity
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._contexts = ContextCache()
        self._targets: dict[str, ProbeTarget] = {}
        self._statuses: dict[str, ProbeStatus] = {}
        self._due: dict[str, float] = {}
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._kept: dict[str, _KeptConnection] = {}
        self._changed = asyncio.Event()
        self._metrics = _GatewayMetrics(registry) if registry is not None else None

    def set_targets(self, targets: Iterable[ProbeTarget]) -> None:
        """Probe exactly these from now on; a known target keeps its status, a new one starts
        unknown and is probed at once, a removed one is forgotten."""
        wanted: dict[str, ProbeTarget] = {}
        for target in targets:
            if target.name in wanted:
                raise ValueError(f"two probe targets are named {target.name!r}")
            wanted[target.name] = target
        for name in set(self._targets) - set(wanted):
            if self._metrics is not None and isinstance(self._targets[name], GatewayTarget):
                self._metrics.forget(name)
            self._statuses.pop(name, None)
            self._due.pop(name, None)
            self._drop(name)
            task = self._in_flight.pop(name, None)
            if task is not None:
                task.cancel()
        for name, target in wanted.items():
            if self._targets.get(name) != target:
                # A changed address is a new target: what we knew was about the old one.
                self._statuses[name] = ProbeStatus()
                self._drop(name)
                self._due[name] = self._clock()
        self._targets = wanted
        self._changed.set()

    def statuses(self) -> Mapping[str, ProbeStatus]:
        """Every target's status, by name."""
        return dict(self._statuses)

    def status(self, name: str) -> ProbeStatus | None:
        """One target's status, or ``None`` if it is not probed."""
        return self._statuses.get(name)

    async def run(self) -> None:
        """Probe every target when due, until cancelled."""
        try:
            while True:
                now = self._clock()
                for name, due in list(self._due.items()):
                    if due > now:
                        continue
                    self._due[name] = self._settings.next_probe_at(now, self._rng)
                    # A probe still running (timeout longer than the interval) skips its turn.
                    if name not in self._in_flight:
                        task = asyncio.create_task(self._probe_and_record(self._targets[name]))
                        self._in_flight[name] = task
                wake = min(self._due.values(), default=now + self._settings.interval)
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), max(0.0, wake - self._clock()))
        finally:
            for task in self._in_flight.values():
                task.cancel()
            await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
            self._in_flight.clear()
            for name in list(self._kept):
                self._drop(name)

    def _drop(self, name: str) -> None:
        kept = self._kept.pop(name, None)
        if kept is not None:
            kept.writer.close()

    async def _probe_and_record(self, target: ProbeTarget) -> None:
        try:
            try:
                rtt: float | None = await self.probe(target)
                reason = ""
            except ProbeFailed as failure:
                rtt, reason = None, str(failure)
            if self._targets.get(target.name) != target:
                return  # removed or replaced while in flight
            status = self._statuses.get(target.name, ProbeStatus())
            now = self._clock()
            status = (
                status.succeeded(rtt, now, self._settings)
                if rtt is not None
                else status.failed(reason, now, self._settings)
            )
            self._statuses[target.name] = status
            if self._metrics is not None and isinstance(target, GatewayTarget):
                self._metrics.show(target.name, status)
        finally:
            if self._in_flight.get(target.name) is asyncio.current_task():
                del self._in_flight[target.name]

    async def probe(self, target: ProbeTarget) -> float:
        """Probe once: the round trip in seconds, or :class:`ProbeFailed` with the reason."""
        try:
            async with asyncio.timeout(self._settings.timeout):
                if isinstance(target, HttpTarget):
                    return await self._probe_http(target)
                if isinstance(target, EndpointTarget):
                    context, bundles = self._client(target.trust_domain)
                    return await self._exchange_kept(target, context, bundles)
                return await self._probe_gateway(target)
        except TimeoutError:
            self._drop(target.name)  # an answer may still come: never read it as the next one
            raise ProbeFailed(f"timeout after {self._settings.timeout:g}s") from None
        except ssl.SSLError as error:
            raise ProbeFailed(f"tls: {error.reason or error}") from None
        except SvidError as error:
            raise ProbeFailed(f"identity: {error}") from None
        except aiohttp.ClientError as error:
            raise ProbeFailed(f"http: {error}") from None
        except OSError as error:
            raise ProbeFailed(f"connect: {error.strerror or error}") from None

    async def _probe_http(self, target: HttpTarget) -> float:
        started = time.perf_counter()
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(target.url, allow_redirects=False) as response,
        ):
            if not 200 <= response.status < 300:
                raise ProbeFailed(f"status {response.status}")
        return time.perf_counter() - started

    def _client(self, domain: TrustDomain) -> tuple[ssl.SSLContext, TrustBundleSet]:
        if self._identity is None:
            raise ProbeFailed("no identity: an mTLS probe needs our SVID")
        svid, bundles = self._identity()
        bundle = bundles.get(domain)
        if bundle is None:
            raise ProbeFailed(f"no trust bundle for {domain}")
        return self._contexts.client(svid, bundle), bundles

    async def _probe_gateway(self, target: GatewayTarget) -> float:
        context, bundles = self._client(target.trust_domain)
        if target.exchange == "http":
            return await self._exchange_kept(target, context, bundles)
        _, writer = await asyncio.open_connection(target.host, target.port)
        try:
            # One round trip, not connect-to-response: a request over a pooled mTLS
            # connection costs one, and an L4 proxy on the path (a WAN emulator, a load
            # balancer) answers the TCP handshake itself. TLS 1.3's handshake is one round trip.
            started = time.perf_counter()
            await writer.start_tls(context, server_hostname=target.sni)
            rtt = time.perf_counter() - started
            verify_peer(
                writer.get_extra_info("ssl_object"),
                bundles,
                datetime.now(UTC),
                Purpose.SERVER,
                target.trust_domain,
            )
            return rtt
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def _exchange_kept(
        self,
        target: GatewayTarget | EndpointTarget,
        context: ssl.SSLContext,
        bundles: TrustBundleSet,
    ) -> float:
        """One ``GET /`` timed on the target's kept connection (dialled when there is none,
        it broke, or our SVID changed); a kept connection that fails is dialled again once."""
        kept = self._kept.get(target.name)
        if kept is not None and kept.context is not context:
            self._drop(target.name)  # a rotated SVID or bundle: present the new one
            kept = None
        if kept is not None:
            try:
                return await self._exchange(target, kept)
            except (OSError, ssl.SSLError, ProbeFailed):
                self._drop(target.name)  # broken while idle: one fresh connection decides
        reader, writer = await asyncio.open_connection(target.host, target.port)
        kept = _KeptConnection(reader, writer, context)
        self._kept[target.name] = kept
        try:
            await writer.start_tls(context, server_hostname=target.sni)
            verify_peer(
                writer.get_extra_info("ssl_object"),
                bundles,
                datetime.now(UTC),
                Purpose.SERVER,
                target.trust_domain,
            )
            return await self._exchange(target, kept)
        except BaseException:
            self._drop(target.name)
            raise

    async def _exchange(
        self, target: GatewayTarget | EndpointTarget, kept: _KeptConnection
    ) -> float:
        path = target.path if isinstance(target, EndpointTarget) else "/"
        rtt, keep = await kept.exchange(target.sni, path)
        if not keep:
            self._drop(target.name)  # an endpoint that closes after each answer: dial next time
        return rtt


class _KeptConnection:
    """An established mTLS connection to a peer's probe endpoint, reused by later probes."""

    __slots__ = ("context", "reader", "writer")

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.context = context

    async def exchange(self, sni: str, path: str) -> tuple[float, bool]:
        """Send ``GET path``, read the whole 2xx response: the seconds it took, and whether the
        endpoint keeps the connection."""
        started = time.perf_counter()
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {sni}\r\n\r\n".encode())
        await self.writer.drain()
        _check_status_line(await self.reader.readline())
        length, keep = 0, True
        while True:
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                raise ProbeFailed("response cut short")
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length" and value.strip().isdigit():
                length = int(value.strip())
            elif name == b"connection" and b"close" in value.lower():
                keep = False
        if length > _RESPONSE_LIMIT:
            raise ProbeFailed("response too long")
        await self.reader.readexactly(length)
        return time.perf_counter() - started, keep


class _GatewayMetrics:
    """``snapbright_gateway_up{peer}`` and ``snapbright_gateway_rtt_seconds{peer}``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge(
            "snapbright_gateway_up",
            "Whether a peer's gateway answers our mTLS probes (1) or is down (0).",
            ["peer"],
            registry=registry,
        )
        self.rtt = Gauge(
            "snapbright_gateway_rtt_seconds",
            "Round trip to a peer's gateway: the EWMA of successful probes.",
            ["peer"],
            registry=registry,
        )

    def show(self, peer: str, status: ProbeStatus) -> None:
        self.up.labels(peer).set(1.0 if status.alive else 0.0)
        if status.rtt is not None:
            self.rtt.labels(peer).set(status.rtt)

    def forget(self, peer: str) -> None:
        for gauge in (self.up, self.rtt):
            with contextlib.suppress(KeyError):
                gauge.remove(peer)


def _check_status_line(line: bytes) -> None:
    if len(line) > _RESPONSE_LIMIT:
        raise ProbeFailed("response line too long")
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ProbeFailed("no HTTP response" if not line else f"not an HTTP response: {line!r:.60}")
    status = int(parts[1])
    if not 200 <= status < 300:
        raise ProbeFailed(f"status {status}")
