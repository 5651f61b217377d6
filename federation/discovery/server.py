"""The discovery API server: versioned snapshots and SVIDs to proxies, stats from them.

What a proxy receives is computed by a :data:`SnapshotBuilder` the process wiring supplies
(from the catalog, mirroring, policies and trust bundles); this module owns the protocol:

Authentication. gRPC over mTLS: the server presents the control plane's own SVID (see
:func:`proxy.discovery.core.control_plane_host`) and requires a client certificate that
chains to this cluster's roots. Each stream then re-validates the client's leaf against the
own trust domain's roots only (:func:`~federation.discovery.core.authenticate_peer`), and a
Hello must claim the namespace and service account its SVID proves (PERMISSION_DENIED
otherwise): a proxy can never obtain another workload's configuration or certificate.

Bootstrap. A proxy's first SVID is issued out of band by ``snapbright ca issue --namespace N
--service-account S --out DIR`` (``snapbright up`` does this for every sidecar it starts; on
Kubernetes an init step with access to the CA would), written 0600 next to the workload.
Issue it short-lived (``--ttl 1h``): the first connection happens well within it, and from
then on this server renews the SVID over the stream, two thirds into each lifetime, from a
CSR whose private key never leaves the proxy. There is no unauthenticated path into the
server at all, which is why this was preferred over join tokens (those would need a second,
client-auth-optional listener and a token store that survives restarts).

Snapshots. One content per :class:`~federation.discovery.core.ProxyClass`, built once per
change and numbered (``<counter>.<digest>``); a proxy is sent a version only when it holds
other content, never one it nacked, and nothing while its class is not ready (the builder
returns ``None`` while a source is unreachable or syncing after a restart). Changes are
announced with :meth:`Discovery.refresh`, coalesced over ``coalesce_s``.

Deltas. A builder may return a :class:`ClassContent` instead of a snapshot: everything but
the upstreams (small: policies, trust bundles), plus an :class:`UpstreamTable` the process
keeps current one upstream at a time. The class's version is then digested in O(changes)
(the table keeps a set digest), and a proxy that said ``accepts_deltas`` and holds a recent
version of this server is sent only the upstreams changed since (``from_version`` ->
``version``), with the rest complete. A proxy holding a version we cannot place (too old for
the table's change log, or from before a restart with other content) gets a complete
snapshot; so does a proxy that nacked a delta (it could not apply it), once, next. A builder
that returns ``None`` (a source unreachable) stops all pushes, deltas included: nothing is
ever withdrawn because a source went away.

Stats. ``ReportStats`` keeps each proxy's windows in a bounded ring per (upstream, target
cluster, proxy) in :attr:`Discovery.stats` for the failover controller.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, cast

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry, Counter, Gauge, Summary

from federation.discovery.core import (
    ClaimedIdentity,
    ContentVersions,
    IdentityRefused,
    NackLog,
    NackRecord,
    ProxyClass,
    Role,
    StatsStore,
    UpstreamLog,
    VersionRevisions,
    authenticate_peer,
    check_identity,
    content_digest,
    digest_of_version,
    item_digest,
    plan_delta,
    plan_push,
    renew_at,
    renewal_due,
)
from federation.trust.ca import DEFAULT_SVID_TTL, CaError, ClusterCA
from proxy.api.v1 import discovery_pb2 as pb
from proxy.api.v1 import discovery_pb2_grpc as pb_grpc
from proxy.discovery.client import stats_window_from_wire
from proxy.discovery.core import control_plane_host, control_plane_id
from proxy.identity.model import SpiffeId
from proxy.identity.svid import SvidError

_log = logging.getLogger(__name__)


def upstream_key(namespace: str, service: str) -> str:
    """The key of an upstream in an :class:`UpstreamTable`."""
    return f"{namespace}/{service}"


class UpstreamTable:
    """The upstreams sidecars receive, kept one at a time, with the log deltas are made from.

    The process puts and removes upstreams as their sources change (one ``put`` costs one
    upstream's serialization); an unchanged upstream is not a change. Share one table between
    every class whose upstreams are the same.
    """

    __slots__ = ("_upstreams", "log")

    def __init__(self, capacity: int = 65_536) -> None:
        self._upstreams: dict[str, pb.Upstream] = {}
        self.log = UpstreamLog(capacity)
        """Which upstreams changed when; ``log.touched`` counts the work done."""

    def put(self, upstream: pb.Upstream) -> bool:
        """Add or replace ``upstream``; True if it differs from what was held."""
        key = upstream_key(upstream.namespace, upstream.service)
        digest = item_digest(key, upstream.SerializeToString(deterministic=True))
        if not self.log.put(key, digest):
            return False
        self._upstreams[key] = upstream
        return True

    def remove(self, namespace: str, service: str) -> bool:
        """Drop an upstream; True if it was held."""
        key = upstream_key(namespace, service)
        self._upstreams.pop(key, None)
        return self.log.remove(key)

    def replace_all(self, upstreams: Iterable[pb.Upstream]) -> int:
        """Make the table hold exactly ``upstreams``; return how many changed (O(services):
        for a first fill or a full resync, not for single changes)."""
        seen = set()
        changed = 0
        for upstream in upstreams:
            seen.add(upstream_key(upstream.namespace, upstream.service))
            changed += self.put(upstream)
        for key in [key for key in self._upstreams if key not in seen]:
            namespace, _, service = key.partition("/")
            changed += self.remove(namespace, service)
        return changed

    def get(self, key: str) -> pb.Upstream | None:
        """The upstream held under ``key``."""
        return self._upstreams.get(key)

    def all(self) -> list[pb.Upstream]:
        """Every upstream, ordered by key."""
        return [self._upstreams[key] for key in sorted(self._upstreams)]

    def __len__(self) -> int:
        return len(self._upstreams)


@dataclass(frozen=True, slots=True)
class ClassContent:
    """One class's content for deltas: ``rest`` is everything but the upstreams (it must not
    set ``version``, ``svid`` or ``upstreams``), ``upstreams`` the table they come from."""

    rest: pb.Snapshot
    upstreams: UpstreamTable


SnapshotBuilder = Callable[[ProxyClass], pb.Snapshot | ClassContent | None]
"""The content for one class of proxies, or ``None`` while it cannot be complete.

A returned snapshot must not set ``version`` or ``svid`` (the server does).
"""

_DELTA_CACHE = 16


@dataclass(eq=False)
class _Incremental:
    """The current version of a class built from a :class:`ClassContent`."""

    rest: pb.Snapshot
    table: UpstreamTable
    version: str
    revision: int
    history: VersionRevisions
    full: pb.Snapshot | None = None
    deltas: dict[str, pb.Snapshot] = field(default_factory=dict)

    def complete(self) -> pb.Snapshot:
        if self.full is None:
            full = pb.Snapshot()
            full.CopyFrom(self.rest)
            full.upstreams.extend(self.table.all())
            full.version = self.version
            self.full = full
        return self.full

    def delta(
        self, from_version: str, upserted: tuple[str, ...], removed: tuple[str, ...]
    ) -> pb.Snapshot:
        cached = self.deltas.get(from_version)
        if cached is not None:
            return cached
        delta = pb.Snapshot()
        delta.CopyFrom(self.rest)
        delta.version = self.version
        delta.from_version = from_version
        for key in upserted:
            upstream = self.table.get(key)
            assert upstream is not None
            delta.upstreams.append(upstream)
        for key in removed:
            namespace, _, service = key.partition("/")
            delta.removed_upstreams.append(pb.UpstreamName(namespace=namespace, service=service))
        if len(self.deltas) >= _DELTA_CACHE:
            self.deltas.clear()
        self.deltas[from_version] = delta
        return delta


_ROLES = {pb.ProxyIdentity.ROLE_SIDECAR: Role.SIDECAR, pb.ProxyIdentity.ROLE_GATEWAY: Role.GATEWAY}
_SERVER_OPTIONS = [
    # Proxies ping every 30 s to find a dead control plane; let them.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class SubscriberStatus:
    """One subscribed proxy as ``snapbright check`` shows it."""

    proxy: str
    proxy_class: ProxyClass
    sent_version: str
    acked_version: str
    svid_renew_at: datetime


@dataclass(eq=False)
class _Subscriber:
    proxy: str
    spiffe_id: SpiffeId
    proxy_class: ProxyClass
    held_digest: str
    cert_not_before: datetime
    cert_not_after: datetime
    csr_key: ec.EllipticCurvePublicKey | None
    connection_expires: datetime
    accepts_deltas: bool = False
    held_version: str = ""
    full_next: bool = False
    sent_as_delta: deque[str] = field(default_factory=lambda: deque(maxlen=16))
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    sent_version: str = ""
    acked_version: str = ""


@dataclass(slots=True)
class _OwnCertificate:
    chain_pem: bytes
    key_pem: bytes
    roots_pem: bytes
    not_before: datetime
    not_after: datetime


class Discovery(pb_grpc.DiscoveryServicer):
    """The Discovery service of one cluster's control plane (register with :func:`serve`)."""

    def __init__(
        self,
        ca: ClusterCA,
        build: SnapshotBuilder,
        *,
        cluster: str | None = None,
        clock: Callable[[], datetime] = _utcnow,
        svid_ttl: timedelta = DEFAULT_SVID_TTL,
        coalesce_s: float = 0.05,
        stats: StatsStore | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._ca = ca
        self._build = build
        self._cluster = cluster or ca.trust_domain.name.split(".", 1)[0]
        self._clock = clock
        self._svid_ttl = svid_ttl
        self._coalesce_s = coalesce_s
        self.stats = stats if stats is not None else StatsStore()
        """Stats windows per (upstream, target cluster, proxy), for the failover controller."""
        self._versions = ContentVersions()
        self._snapshots: dict[ProxyClass, pb.Snapshot] = {}
        self._incremental: dict[ProxyClass, _Incremental] = {}
        # Kept when a class's last proxy leaves, so that it can resume with a delta.
        self._histories: dict[ProxyClass, VersionRevisions] = {}
        self._ready: dict[ProxyClass, bool] = {}
        self._subscribers: dict[ProxyClass, set[_Subscriber]] = {}
        self._nacks = NackLog()
        self._rebuild: asyncio.TimerHandle | None = None
        self._own_lock = threading.Lock()
        self._own: _OwnCertificate | None = None
        registry = registry if registry is not None else CollectorRegistry()
        self._m_pushes = Counter(
            "snapbright_discovery_pushes_total", "Snapshots sent to proxies.", registry=registry
        )
        self._m_deltas = Counter(
            "snapbright_discovery_deltas_total",
            "Pushes that carried only the upstreams changed since the proxy's version.",
            registry=registry,
        )
        self._m_rebuild = Summary(
            "snapbright_discovery_rebuild_seconds",
            "Time to bring every subscribed class's content up to date after changes.",
            registry=registry,
        )
        self._m_nacks = Counter(
            "snapbright_discovery_nacks_total",
            "Snapshot versions proxies rejected.",
            registry=registry,
        )
        self._m_refused = Counter(
            "snapbright_discovery_refused_total",
            "Streams refused, by reason.",
            ["reason"],
            registry=registry,
        )
        self._m_svids = Counter(
            "snapbright_discovery_svids_issued_total",
            "SVIDs signed for proxies' CSRs.",
            registry=registry,
        )
        self._m_subscribers = Gauge(
            "snapbright_discovery_subscribers", "Proxies subscribed now.", registry=registry
        )
        self._m_stats = Counter(
            "snapbright_discovery_stats_windows_total",
            "Stats windows received, by result.",
            ["result"],
            registry=registry,
        )

    # -- what the rest of the control plane calls ------------------------------------------

    def refresh(self) -> None:
        """A source changed: rebuild every subscribed class soon (calls within
        ``coalesce_s`` share one rebuild) and push what changed. Call from the event loop."""
        if self._rebuild is None:
            loop = asyncio.get_running_loop()
            self._rebuild = loop.call_later(self._coalesce_s, self._rebuild_all)

    def set_ca(self, ca: ClusterCA) -> None:
        """Sign with ``ca`` from now on (after a rotation); the server certificate follows."""
        if ca.trust_domain != self._ca.trust_domain:
            raise ValueError(f"{ca.trust_domain} is not this server's {self._ca.trust_domain}")
        self._ca = ca

    def reissue_svids(self) -> int:
        """Re-issue every subscribed proxy's SVID now, under the CA's active authority: after a
        rotation, once peers hold the new root, so the old root can retire with no leaf left
        under it. Returns how many proxies get one."""
        count = 0
        for subscribers in self._subscribers.values():
            for subscriber in subscribers:
                if subscriber.csr_key is None:
                    continue
                # Renewal is due two thirds into [not_before, not_after]: with both equal, now.
                subscriber.cert_not_after = subscriber.cert_not_before
                subscriber.wake.set()
                count += 1
        return count

    def nacks(self) -> list[NackRecord]:
        """Each proxy's last rejected version that no later ack superseded."""
        return list(self._nacks)

    def subscribers(self) -> list[SubscriberStatus]:
        """The proxies subscribed now, with the versions sent to and acked by each."""
        return [
            SubscriberStatus(
                s.proxy,
                s.proxy_class,
                s.sent_version,
                s.acked_version,
                renew_at(s.cert_not_before, s.cert_not_after),
            )
            for subscribers in self._subscribers.values()
            for s in subscribers
        ]

    def server_credentials(self) -> grpc.ServerCredentials:
        """mTLS credentials under the control plane's own SVID, renewed as it ages and when
        the CA rotates; clients must present a certificate under this cluster's roots."""
        initial = self._certificate_configuration(force=True)
        assert initial is not None
        # The fetcher returns None for "no change", which grpc's type stubs do not say.
        fetch = cast(
            Callable[[], grpc.ServerCertificateConfiguration], self._certificate_configuration
        )
        return grpc.dynamic_ssl_server_credentials(
            initial, fetch, require_client_authentication=True
        )

    # -- Subscribe ------------------------------------------------------------------------

    async def Subscribe(
        self,
        request_iterator: AsyncIterator[pb.SubscribeRequest],
        context: grpc.aio.ServicerContext[pb.SubscribeRequest, pb.Snapshot],
    ) -> AsyncIterator[pb.Snapshot]:
        """Authenticate, then push snapshots and renewed SVIDs until the proxy leaves."""
        spiffe_id, leaf = await self._authenticate(context)
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        if first.WhichOneof("kind") != "hello":
            await self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "hello",
                "the first request must be a Hello",
            )
        hello = first.hello
        proxy_class = await self._check_identity(context, hello.identity, spiffe_id)
        csr_key = await self._csr_key(context, hello.csr_der)
        subscriber = _Subscriber(
            proxy=f"{spiffe_id}#{hello.identity.workload}",
            spiffe_id=spiffe_id,
            proxy_class=proxy_class,
            held_digest=digest_of_version(hello.known_version),
            cert_not_before=leaf.not_valid_before_utc,
            cert_not_after=leaf.not_valid_after_utc,
            csr_key=csr_key,
            connection_expires=leaf.not_valid_after_utc,
            accepts_deltas=hello.accepts_deltas,
            held_version=hello.known_version,
        )
        if hello.known_version:
            subscriber.acked_version = hello.known_version
        self._join(subscriber)
        reader = asyncio.create_task(self._read_replies(request_iterator, subscriber))
        try:
            while not subscriber.closed:
                if self._clock() >= subscriber.connection_expires:
                    # TLS checked the client's SVID once, at the handshake: a stream must not
                    # outlive it. The proxy reconnects with its renewed SVID.
                    await self._refuse(
                        context,
                        grpc.StatusCode.UNAUTHENTICATED,
                        "expired",
                        "the SVID this stream was opened with has expired",
                    )
                message = self._next_message(subscriber)
                if message is not None:
                    self._m_pushes.inc()
                    yield message
                    continue
                await self._wait(subscriber)
        finally:
            reader.cancel()
            self._leave(subscriber)

    async def _authenticate(
        self, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[SpiffeId, x509.Certificate]:
        pem = next(iter(context.auth_context().get("x509_pem_cert", ())), None)
        if pem is None:
            await self._refuse(
                context, grpc.StatusCode.UNAUTHENTICATED, "no-certificate", "no client SVID"
            )
        try:
            spiffe_id, leaf = authenticate_peer(pem, self._ca.bundle(), self._clock())
        except SvidError as error:
            await self._refuse(
                context, grpc.StatusCode.UNAUTHENTICATED, "svid", f"client SVID refused: {error}"
            )
        return spiffe_id, leaf

    async def _check_identity(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pb.ProxyIdentity,
        spiffe_id: SpiffeId,
    ) -> ProxyClass:
        claimed = ClaimedIdentity(
            role=_ROLES.get(identity.role),
            cluster=identity.cluster,
            namespace=identity.namespace,
            service_account=identity.service_account,
            workload=identity.workload,
            service=identity.service,
        )
        try:
            return check_identity(claimed, spiffe_id, self._ca.trust_domain, self._cluster)
        except IdentityRefused as error:
            await self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, "identity", error.reason)

    async def _csr_key(
        self, context: grpc.aio.ServicerContext[Any, Any], csr_der: bytes
    ) -> ec.EllipticCurvePublicKey | None:
        if not csr_der:
            return None
        try:
            csr = x509.load_der_x509_csr(csr_der)
            valid = csr.is_signature_valid
            key = csr.public_key()
        except (ValueError, TypeError) as error:
            await self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, "csr", f"bad CSR: {error}"
            )
        # Only the key is taken from the CSR; the identity is the one the caller proved.
        if not valid or not isinstance(key, ec.EllipticCurvePublicKey):
            await self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "csr",
                "the CSR must be signed by its own ECDSA key",
            )
        return key

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        code: grpc.StatusCode,
        reason: str,
        details: str,
    ) -> NoReturn:
        self._m_refused.labels(reason).inc()
        _log.warning("discovery: refused %s (%s): %s", context.peer(), code.name, details)
        await context.abort(code, details)
        raise AssertionError("unreachable: abort raises")

    def _join(self, subscriber: _Subscriber) -> None:
        members = self._subscribers.setdefault(subscriber.proxy_class, set())
        if not members or subscriber.proxy_class not in self._versions_built():
            # Content is kept current only for classes with subscribers: build on arrival.
            self._build_class(subscriber.proxy_class)
        members.add(subscriber)
        self._m_subscribers.inc()

    def _leave(self, subscriber: _Subscriber) -> None:
        members = self._subscribers.get(subscriber.proxy_class)
        if members is not None:
            members.discard(subscriber)
            if not members:
                del self._subscribers[subscriber.proxy_class]
                self._snapshots.pop(subscriber.proxy_class, None)
                self._incremental.pop(subscriber.proxy_class, None)
                self._ready.pop(subscriber.proxy_class, None)
        self._m_subscribers.dec()

    def _versions_built(self) -> set[ProxyClass]:
        return set(self._snapshots) | set(self._incremental)

    def _next_message(self, subscriber: _Subscriber) -> pb.Snapshot | None:
        now = self._clock()
        proxy_class = subscriber.proxy_class
        state = self._incremental.get(proxy_class)
        if state is not None and state.revision != state.table.log.revision:
            # The shared table moved on (another class's build synced it): catch up first,
            # so a version always names what it carries.
            self._build_class(proxy_class)
            state = self._incremental.get(proxy_class)
        nacked = None if subscriber.full_next else self._nacks.last(subscriber.proxy)
        svid_due = subscriber.csr_key is not None and renewal_due(
            subscriber.cert_not_before, subscriber.cert_not_after, now
        )
        push = plan_push(
            self._versions.get(proxy_class),
            self._ready.get(proxy_class, False),
            subscriber.held_digest,
            digest_of_version(nacked.version) if nacked is not None else "",
            svid_due,
        )
        if push is None:
            return None
        if state is None:
            content = self._snapshots[proxy_class]
            delta = False
        else:
            content, delta = self._incremental_message(subscriber, state)
        message = content
        if push.svid:
            message = pb.Snapshot()
            message.CopyFrom(content)
            if not self._sign(subscriber, message, now) and subscriber.held_digest == (
                digest_of_version(push.version)
            ):
                return None  # nothing new to say without the SVID
        subscriber.held_digest = digest_of_version(push.version)
        subscriber.held_version = push.version
        subscriber.sent_version = push.version
        subscriber.full_next = False
        if delta:
            subscriber.sent_as_delta.append(push.version)
            self._m_deltas.inc()
        return message

    def _incremental_message(
        self, subscriber: _Subscriber, state: _Incremental
    ) -> tuple[pb.Snapshot, bool]:
        held = subscriber.held_version
        plan = plan_delta(
            state.table.log,
            state.history.get(held) if held else None,
            subscriber.accepts_deltas,
            subscriber.full_next,
        )
        if plan is None:
            return state.complete(), False
        return state.delta(held, plan.upserted, plan.removed), True

    def _sign(self, subscriber: _Subscriber, message: pb.Snapshot, now: datetime) -> bool:
        assert subscriber.csr_key is not None
        try:
            chain = self._ca.sign_svid(
                subscriber.spiffe_id, subscriber.csr_key, now, self._svid_ttl
            )
        except CaError as error:
            # The proxy keeps its SVID; it reconnects (with a new CSR) before that expires.
            _log.error("discovery: cannot sign an SVID for %s: %s", subscriber.proxy, error)
            subscriber.csr_key = None
            return False
        leaf = chain[0]
        subscriber.cert_not_before = leaf.not_valid_before_utc
        subscriber.cert_not_after = leaf.not_valid_after_utc
        message.svid.cert_chain_pem = b"".join(
            cert.public_bytes(serialization.Encoding.PEM) for cert in chain
        )
        message.svid.not_after_unix = int(leaf.not_valid_after_utc.timestamp())
        message.svid.renew_at_unix = int(
            renew_at(leaf.not_valid_before_utc, leaf.not_valid_after_utc).timestamp()
        )
        self._m_svids.inc()
        return True

    async def _wait(self, subscriber: _Subscriber) -> None:
        now = self._clock()
        # The stream ends when the SVID it was opened with expires (see Subscribe).
        timeout = (subscriber.connection_expires - now).total_seconds()
        if subscriber.csr_key is not None:
            due = renew_at(subscriber.cert_not_before, subscriber.cert_not_after)
            left = (due - now).total_seconds()
            # Already due but nothing was sent: the class is not ready, and becoming ready
            # wakes us; a timer would only spin.
            if left > 0:
                timeout = min(timeout, left)
        try:
            async with asyncio.timeout(timeout):
                await subscriber.wake.wait()
        except TimeoutError:
            return
        subscriber.wake.clear()

    async def _read_replies(
        self, requests: AsyncIterator[pb.SubscribeRequest], subscriber: _Subscriber
    ) -> None:
        try:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "ack":
                    subscriber.acked_version = request.ack.version
                    nacked = self._nacks.last(subscriber.proxy)
                    if nacked is not None and digest_of_version(nacked.version) != (
                        digest_of_version(request.ack.version)
                    ):
                        self._nacks.clear(subscriber.proxy)
                elif kind == "nack" and request.nack.version in subscriber.sent_as_delta:
                    # It could not apply a delta: it keeps what it had, which we no longer
                    # know exactly. A complete snapshot next (a bad content is then nacked
                    # again, as a snapshot, and recorded).
                    _log.info(
                        "discovery: %s could not apply delta %s: %s",
                        subscriber.proxy,
                        request.nack.version,
                        request.nack.reason[:200],
                    )
                    subscriber.sent_as_delta.clear()
                    subscriber.full_next = True
                    subscriber.held_digest = ""
                    subscriber.held_version = ""
                    subscriber.wake.set()
                elif kind == "nack":
                    self._record_nack(subscriber, request.nack)
                    # It kept what it last acked: the next delta starts from there.
                    if request.nack.version == subscriber.held_version:
                        subscriber.held_version = subscriber.acked_version
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the proxy went away; the stream's end says the rest
        finally:
            subscriber.closed = True
            subscriber.wake.set()

    def _record_nack(self, subscriber: _Subscriber, nack: pb.Nack) -> None:
        self._m_nacks.inc()
        reason = nack.reason[:1024]
        _log.warning(
            "discovery: %s rejected version %s: %s", subscriber.proxy, nack.version, reason
        )
        self._nacks.record(NackRecord(subscriber.proxy, nack.version, reason, self._clock()))

    # -- building content --------------------------------------------------------------------

    def _rebuild_all(self) -> None:
        self._rebuild = None
        with self._m_rebuild.time():
            for proxy_class, members in self._subscribers.items():
                if self._build_class(proxy_class):
                    for subscriber in members:
                        subscriber.wake.set()

    def _build_class(self, proxy_class: ProxyClass) -> bool:
        """Rebuild one class's content; True if its subscribers may have something new."""
        was_ready = self._ready.get(proxy_class, False)
        try:
            built = self._build(proxy_class)
        except Exception:
            _log.exception("discovery: building the snapshot for %s failed", proxy_class)
            built = None
        if isinstance(built, ClassContent):
            return self._build_incremental(proxy_class, built, was_ready)
        snapshot = built
        if snapshot is not None and not snapshot.trust_bundles:
            # A snapshot without any trust bundle could not verify a single peer: it is
            # incomplete, whatever the builder thinks.
            _log.error("discovery: the snapshot for %s has no trust bundle", proxy_class)
            snapshot = None
        if snapshot is None:
            self._ready[proxy_class] = False
            return False
        snapshot.ClearField("version")
        snapshot.ClearField("svid")
        digest = content_digest(snapshot.SerializeToString(deterministic=True))
        content, changed = self._versions.update(proxy_class, digest)
        if changed or proxy_class not in self._snapshots:
            snapshot.version = content.version
            self._snapshots[proxy_class] = snapshot
        self._ready[proxy_class] = True
        return changed or not was_ready

    def _build_incremental(
        self, proxy_class: ProxyClass, content: ClassContent, was_ready: bool
    ) -> bool:
        rest = content.rest
        if not rest.trust_bundles:
            _log.error("discovery: the content for %s has no trust bundle", proxy_class)
            self._ready[proxy_class] = False
            return False
        for name in ("version", "svid", "upstreams", "from_version", "removed_upstreams"):
            rest.ClearField(name)
        table = content.upstreams
        rest_digest = content_digest(rest.SerializeToString(deterministic=True))
        digest = content_digest(f"{rest_digest}.{table.log.digest}".encode())
        current, changed = self._versions.update(proxy_class, digest)
        state = self._incremental.get(proxy_class)
        revision = table.log.revision
        if state is None or state.table is not table or changed:
            history = self._histories.setdefault(proxy_class, VersionRevisions())
            state = _Incremental(rest, table, current.version, revision, history)
            self._incremental[proxy_class] = state
        elif state.revision != revision:
            # Same content at a later revision (changes that cancelled out): deltas from
            # here on start at the later revision, so they carry less.
            state.revision = revision
            state.deltas.clear()
        state.history.record(current.version, revision)
        self._ready[proxy_class] = True
        return changed or not was_ready

    # -- ReportStats -------------------------------------------------------------------------

    async def ReportStats(
        self,
        request_iterator: AsyncIterator[pb.StatsReport],
        context: grpc.aio.ServicerContext[pb.StatsReport, pb.StatsAck],
    ) -> pb.StatsAck:
        """Keep every window a proxy reports (the first report names the proxy)."""
        spiffe_id, _ = await self._authenticate(context)
        reporter = ""
        async for report in request_iterator:
            if not reporter:
                if not report.HasField("identity"):
                    await self._refuse(
                        context,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "hello",
                        "the first stats report must name the proxy",
                    )
                await self._check_identity(context, report.identity, spiffe_id)
                reporter = f"{spiffe_id}#{report.identity.workload}"
            for wire in report.windows:
                try:
                    window = stats_window_from_wire(wire)
                except ValueError as error:
                    self._m_stats.labels("invalid").inc()
                    _log.warning("discovery: bad stats window from %s: %s", reporter, error)
                    continue
                kept = self.stats.add(reporter, window)
                self._m_stats.labels("kept" if kept else "dropped").inc()
        return pb.StatsAck()

    # -- the server's own certificate ---------------------------------------------------------

    def _certificate_configuration(
        self, force: bool = False
    ) -> grpc.ServerCertificateConfiguration | None:
        # gRPC calls this before every handshake, from its own thread: cheap when unchanged.
        now = self._clock()
        ca = self._ca
        roots_pem = ca.bundle().roots_pem()
        with self._own_lock:
            own = self._own
            if (
                not force
                and own is not None
                and own.roots_pem == roots_pem
                and not renewal_due(own.not_before, own.not_after, now)
            ):
                return None
            key = ec.generate_private_key(ec.SECP256R1())
            trust_domain = ca.trust_domain
            chain = ca.sign_svid(
                control_plane_id(trust_domain),
                key.public_key(),
                now,
                self._svid_ttl,
                dns_names=(control_plane_host(trust_domain),),
            )
            own = _OwnCertificate(
                chain_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
                key_pem=key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
                roots_pem=roots_pem,
                not_before=chain[0].not_valid_before_utc,
                not_after=chain[0].not_valid_after_utc,
            )
            self._own = own
        return grpc.ssl_server_certificate_configuration(
            [(own.key_pem, own.chain_pem)], root_certificates=own.roots_pem
        )


async def serve(discovery: Discovery, address: str) -> tuple[grpc.aio.Server, int]:
    """Start a gRPC server for ``discovery`` on ``address`` (``host:port``, port 0 picks one);
    return it and its port. Stop it with ``await server.stop(grace)``."""
    server = grpc.aio.server(options=_SERVER_OPTIONS)
    pb_grpc.add_DiscoveryServicer_to_server(discovery, server)
    port = server.add_secure_port(address, discovery.server_credentials())
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server, port
