"""The proxy's discovery client: a :class:`~proxy.config.source.ConfigSource` over the control
plane's Subscribe stream, and the stats reporter.

:class:`DiscoveryClient` subscribes with the proxy's identity, its last applied version and a
CSR for a P-256 key it generated itself (the private key never leaves the process; only the
CSR's public key and signature are sent). Each snapshot goes through ``parse`` (which raises
:class:`~proxy.config.source.ConfigRejected`): a good one becomes the current configuration
and is acked, a bad one is nacked with the reason and the last good configuration stays. A
renewed SVID in a snapshot is checked (our key, our SPIFFE ID, a chain to our domain's roots)
and installed even when the rest of that snapshot is rejected: a certificate is never hostage
to a bad policy. A snapshot repeating a version already seen carries only a renewed SVID; the
client answers it as it answered the version the first time.

Deltas. The client says it takes deltas: after a complete snapshot the control plane may send
only the upstreams changed since the version the client holds (``from_version``), with
removed upstream names, and the other fields complete. A delta from a version the client does
not hold is nacked (the last good configuration stays, and the control plane sends a complete
snapshot next); this is not a rejection of the content, so the complete snapshot of the same
version is parsed, not refused. Removing an upstream the client does not have is a no-op (the
control plane names every key that changed since ``from_version``, including ones added and
removed again in between). With
``parse_delta`` the configuration is updated from the delta alone (O(changes)); without it,
the client rebuilds the complete snapshot and calls ``parse`` (O(upstreams) per delta).

When the control plane is away the client keeps the last good configuration (it never clears
it), reconnects with jittered exponential backoff, and says which version it holds so that an
unchanged configuration is not sent again.

:class:`StatsReporter` drains the proxy's closed one-second windows and streams them; while
the control plane is away they wait in a bounded outbox whose oldest windows are dropped and
counted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Generic, TypeVar

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry, Counter

from proxy.api.v1 import discovery_pb2 as pb
from proxy.api.v1 import discovery_pb2_grpc as pb_grpc
from proxy.config.source import ConfigRejected
from proxy.discovery.core import Backoff, StatsOutbox, control_plane_host
from proxy.identity.bundle import TrustBundle, TrustBundleSet, parse_bundle
from proxy.identity.svid import Purpose, SvidError, X509Svid, validate_svid
from proxy.stats.core import Histogram, Outcome, StatsWindow

_log = logging.getLogger(__name__)

T = TypeVar("T")

HISTOGRAM_LAYOUT = 1
"""The bucket layout of :mod:`proxy.stats.core` on the wire (``Histogram.layout``)."""

_CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    # Find a dead control plane (a killed host sends no FIN) within a minute.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class NoConfigYet(Exception):
    """The control plane has not delivered a configuration this proxy could apply yet."""


def stats_window_to_wire(window: StatsWindow) -> pb.StatsWindow:
    """The wire form of a closed window (its ``start`` is a Unix second)."""
    counts = window.counts
    histogram = window.histogram.to_wire()
    return pb.StatsWindow(
        start_unix_ms=window.start * 1000,
        duration_ms=1000,
        upstream=window.upstream,
        target_cluster=window.target_cluster,
        responses_2xx=counts[Outcome.HTTP_2XX],
        responses_3xx=counts[Outcome.HTTP_3XX],
        responses_4xx=counts[Outcome.HTTP_4XX],
        responses_5xx=counts[Outcome.HTTP_5XX],
        connect_failures=counts[Outcome.CONNECT_FAILURE],
        timeouts=counts[Outcome.TIMEOUT],
        latency=pb.Histogram(
            layout=HISTOGRAM_LAYOUT,
            first_bucket=histogram[0] if histogram else 0,
            counts=histogram[1:],
        ),
    )


def stats_window_from_wire(message: pb.StatsWindow) -> StatsWindow:
    """The window a proxy reported; ``ValueError`` if it is not one this layout can hold."""
    if message.duration_ms != 1000 or message.start_unix_ms % 1000:
        raise ValueError("a stats window covers one whole second")
    if not message.upstream or not message.target_cluster:
        raise ValueError("a stats window names its upstream and target cluster")
    latency = message.latency
    if latency.counts and latency.layout != HISTOGRAM_LAYOUT:
        raise ValueError(f"unknown histogram layout {latency.layout}")
    histogram = (
        Histogram.from_wire([latency.first_bucket, *latency.counts])
        if latency.counts
        else Histogram()
    )
    return StatsWindow(
        start=message.start_unix_ms // 1000,
        upstream=message.upstream,
        target_cluster=message.target_cluster,
        counts=(
            message.responses_2xx,
            message.responses_3xx,
            message.responses_4xx,
            message.responses_5xx,
            message.connect_failures,
            message.timeouts,
        ),
        histogram=histogram,
    )


def hello_request(
    identity: pb.ProxyIdentity,
    known_version: str,
    key: ec.EllipticCurvePrivateKey,
    *,
    accepts_deltas: bool = False,
) -> pb.SubscribeRequest:
    """The first request of a subscription: who we are, what we hold, and a CSR for ``key``.

    The CSR names nothing: the control plane certifies the identity the connection proved.
    """
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return pb.SubscribeRequest(
        hello=pb.Hello(
            identity=identity,
            known_version=known_version,
            csr_der=csr.public_bytes(serialization.Encoding.DER),
            accepts_deltas=accepts_deltas,
        )
    )


def _upstream_name(upstream: pb.Upstream | pb.UpstreamName) -> tuple[str, str]:
    return upstream.namespace, upstream.service


class DiscoveryClient(Generic[T]):
    """A configuration from the control plane's discovery stream (a ``ConfigSource[T]``).

    ``svid`` is the proxy's current SVID (at first boot the one ``snapbright ca issue``
    wrote), ``bundle`` its own trust domain's bundle, ``target`` the control plane's
    ``host:port``. Run :meth:`run` as a task; :meth:`wait_ready` returns once a first
    configuration is in force. ``parse_delta(previous, delta)`` (optional) returns the
    configuration after a delta (see the module docstring).
    """

    def __init__(
        self,
        target: str,
        identity: pb.ProxyIdentity,
        svid: X509Svid,
        bundle: TrustBundle,
        parse: Callable[[pb.Snapshot], T],
        *,
        parse_delta: Callable[[T, pb.Snapshot], T] | None = None,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] = _utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        connect_timeout_s: float = 5.0,
        on_svid: Callable[[X509Svid], None] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if bundle.trust_domain != svid.spiffe_id.trust_domain:
            raise ValueError(f"the bundle of {bundle.trust_domain} is not the SVID's domain")
        self._target = target
        self._identity = identity
        self._svid = svid
        self._bundle = bundle
        self._parse = parse
        self._parse_delta = parse_delta
        self._upstreams: dict[tuple[str, str], pb.Upstream] = {}
        self._backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._connect_timeout_s = connect_timeout_s
        self._on_svid = on_svid
        self._csr_key: ec.EllipticCurvePrivateKey | None = None
        self._value: T | None = None
        self._has_value = False
        self._version = ""
        self._rejected_version = ""
        self._rejected_reason = ""
        self._generation = 0
        self._changed = asyncio.Event()
        self._ready = asyncio.Event()
        self._closed = False
        self.reconnects = 0
        """Streams that ended and were retried."""
        self.deltas = 0
        """Deltas applied."""
        self.last_error = ""
        """Why the last stream ended, for ``snapbright check``."""
        registry = registry if registry is not None else CollectorRegistry()
        self._m_reloads = Counter(
            "snapbright_config_reload_total",
            "Configurations received, by result (ok or rejected).",
            ["result"],
            registry=registry,
        )

    # -- ConfigSource ----------------------------------------------------------------------

    def current(self) -> T:
        """The configuration in force (the last good one); :class:`NoConfigYet` before one."""
        if not self._has_value:
            raise NoConfigYet(f"no configuration from {self._target} yet")
        return self._value  # type: ignore[return-value]

    async def updates(self) -> AsyncGenerator[T, None]:
        """Each later good configuration, in order (one consumer), until :meth:`close`."""
        seen = self._generation
        while not self._closed:
            await self._changed.wait()
            self._changed.clear()
            if self._generation != seen and not self._closed:
                seen = self._generation
                yield self.current()

    # -- state -----------------------------------------------------------------------------

    @property
    def version(self) -> str:
        """The version of the configuration in force ("" before the first)."""
        return self._version

    @property
    def rejected(self) -> tuple[str, str]:
        """The last version this proxy nacked and why (``("", "")`` if none)."""
        return self._rejected_version, self._rejected_reason

    @property
    def svid(self) -> X509Svid:
        """The proxy's current SVID."""
        return self._svid

    @property
    def bundle(self) -> TrustBundle:
        """The proxy's own trust domain's bundle, as last delivered."""
        return self._bundle

    async def wait_ready(self) -> T:
        """Wait until a first configuration is in force and return it."""
        await self._ready.wait()
        return self.current()

    def open_channel(self) -> grpc.aio.Channel:
        """A channel to the control plane under the current SVID (the stats reporter uses it)."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self._bundle.roots_pem(),
            private_key=self._svid.key_pem(),
            certificate_chain=self._svid.chain_pem(),
        )
        options = [
            *_CHANNEL_OPTIONS,
            ("grpc.ssl_target_name_override", control_plane_host(self._bundle.trust_domain)),
        ]
        return grpc.aio.secure_channel(self._target, credentials, options=options)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Stop :meth:`run` at its next step and end :meth:`updates`."""
        self._closed = True
        self._changed.set()

    # -- the stream ------------------------------------------------------------------------

    async def run(self) -> None:
        """Subscribe, and resubscribe with backoff whenever the stream ends, until closed."""
        attempt = 0
        while not self._closed:
            started = self._monotonic()
            try:
                await self._subscribe()
                self.last_error = "the control plane ended the stream"
            except grpc.aio.AioRpcError as error:
                self.last_error = f"{error.code().name}: {error.details()}"
            except TimeoutError:
                self.last_error = f"cannot reach {self._target}"
            if self.closed:
                return
            attempt = self._backoff.attempt_after(attempt, self._monotonic() - started)
            delay = self._backoff.delay(attempt, self._rng)
            attempt += 1
            self.reconnects += 1
            _log.info("discovery: %s; retrying in %.1fs", self.last_error, delay)
            await self._sleep(delay)

    async def _subscribe(self) -> None:
        async with self.open_channel() as channel:
            await asyncio.wait_for(channel.channel_ready(), self._connect_timeout_s)
            call = pb_grpc.DiscoveryStub(channel).Subscribe()
            await call.write(self.hello())
            while not self._closed:
                snapshot = await call.read()
                if snapshot is grpc.aio.EOF:
                    return  # read() raised instead if the stream ended with an error
                assert isinstance(snapshot, pb.Snapshot)
                await call.write(self.apply(snapshot))
            call.cancel()

    def hello(self) -> pb.SubscribeRequest:
        """The Hello of a new stream, with a CSR for the key the next SVID will certify.

        The key is fresh once the previous one was certified, so a key is never offered
        again after its certificate was installed; until then a reconnect offers it again.
        """
        key = self._csr_key
        if key is None or key is self._svid.key:
            key = self._csr_key = ec.generate_private_key(ec.SECP256R1())
        return hello_request(self._identity, self._version, key, accepts_deltas=True)

    def apply(self, snapshot: pb.Snapshot) -> pb.SubscribeRequest:
        """Take one snapshot of the stream and return the Ack or Nack to send for it.

        A new version is parsed and, if good, becomes the current configuration. An SVID in
        it must certify the key of the last :meth:`hello`'s CSR, name this proxy and chain to
        our domain's roots; a bad one rejects the whole snapshot. A version seen before only
        carries an SVID and gets the answer it got the first time.
        """
        version = snapshot.version
        try:
            bundle = self._own_bundle(snapshot)
            svid = self._checked_svid(snapshot.svid, bundle) if snapshot.HasField("svid") else None
        except ValueError as error:  # a BundleError, or an SVID we cannot use
            return self._reject(version, str(error))
        if svid is not None:
            self._svid = svid
            if self._on_svid is not None:
                self._on_svid(svid)
        if version == self._version:
            return pb.SubscribeRequest(ack=pb.Ack(version=version))
        if version == self._rejected_version:
            return pb.SubscribeRequest(nack=pb.Nack(version=version, reason=self._rejected_reason))
        if snapshot.from_version:
            return self._apply_delta(snapshot, bundle)
        try:
            value = self._parse(snapshot)
        except ConfigRejected as error:
            return self._reject(version, error.reason)
        self._upstreams = {_upstream_name(u): u for u in snapshot.upstreams}
        return self._install(value, version, bundle)

    def _apply_delta(self, delta: pb.Snapshot, bundle: TrustBundle) -> pb.SubscribeRequest:
        version = delta.version
        problem = ""
        if not self._has_value or delta.from_version != self._version:
            problem = f"a delta from {delta.from_version}, but we hold {self._version or 'nothing'}"
        if problem:
            # Not a verdict on the content: the complete snapshot that follows is parsed.
            self._m_reloads.labels("rejected").inc()
            _log.info("discovery: cannot apply delta %s: %s", version, problem)
            return pb.SubscribeRequest(nack=pb.Nack(version=version, reason=problem))
        upstreams = self._upstreams if self._parse_delta is not None else dict(self._upstreams)
        try:
            if self._parse_delta is not None:
                value = self._parse_delta(self._value, delta)  # type: ignore[arg-type]
            else:
                value = self._parse(_complete(delta, _patched(upstreams, delta)))
        except ConfigRejected as error:
            return self._reject(version, error.reason)
        self._upstreams = _patched(upstreams, delta)
        self.deltas += 1
        return self._install(value, version, bundle)

    def _install(self, value: T, version: str, bundle: TrustBundle) -> pb.SubscribeRequest:
        self._value = value
        self._has_value = True
        self._version = version
        self._bundle = bundle
        self._generation += 1
        self._m_reloads.labels("ok").inc()
        self._changed.set()
        self._ready.set()
        return pb.SubscribeRequest(ack=pb.Ack(version=version))

    def _reject(self, version: str, reason: str) -> pb.SubscribeRequest:
        self._rejected_version = version
        self._rejected_reason = reason
        self._m_reloads.labels("rejected").inc()
        _log.warning("discovery: rejected version %s: %s", version, reason)
        return pb.SubscribeRequest(nack=pb.Nack(version=version, reason=reason))

    def _own_bundle(self, snapshot: pb.Snapshot) -> TrustBundle:
        domain = self._bundle.trust_domain
        for message in snapshot.trust_bundles:
            if message.trust_domain == domain.name:
                return parse_bundle(domain, message.spiffe_bundle_json, previous=self._bundle)
        raise ValueError(f"the snapshot has no bundle for our trust domain {domain}")

    def _checked_svid(self, message: pb.Svid, bundle: TrustBundle) -> X509Svid:
        key = self._csr_key
        if key is None:
            raise ValueError("svid: we sent no CSR")
        try:
            chain = x509.load_pem_x509_certificates(message.cert_chain_pem)
        except ValueError as error:
            raise ValueError(f"svid: not a PEM chain: {error}") from None
        leaf = chain[0]
        if leaf.public_key() != key.public_key():
            raise ValueError("svid: not issued for the key of this connection's CSR")
        bundles = TrustBundleSet([bundle])
        now = self._clock()
        for purpose in Purpose:
            try:
                spiffe_id = validate_svid(leaf, chain[1:], bundles, now, purpose)
            except SvidError as error:
                raise ValueError(f"svid: {error}") from None
            if spiffe_id != self._svid.spiffe_id:
                raise ValueError(f"svid: names {spiffe_id}, we are {self._svid.spiffe_id}")
        return X509Svid(self._svid.spiffe_id, tuple(chain), key)


def _patched(
    upstreams: dict[tuple[str, str], pb.Upstream], delta: pb.Snapshot
) -> dict[tuple[str, str], pb.Upstream]:
    """``upstreams`` with the delta applied (in place: pass a copy to keep the original)."""
    for name in delta.removed_upstreams:
        upstreams.pop(_upstream_name(name), None)
    for upstream in delta.upstreams:
        upstreams[_upstream_name(upstream)] = upstream
    return upstreams


def _complete(delta: pb.Snapshot, upstreams: dict[tuple[str, str], pb.Upstream]) -> pb.Snapshot:
    """The complete snapshot a delta leads to, upstreams ordered by name."""
    snapshot = pb.Snapshot()
    snapshot.CopyFrom(delta)
    snapshot.ClearField("upstreams")
    snapshot.ClearField("removed_upstreams")
    snapshot.ClearField("from_version")
    snapshot.upstreams.extend(upstreams[name] for name in sorted(upstreams))
    return snapshot


class StatsReporter:
    """Streams closed stats windows to the control plane, one batch per ``interval_s``.

    ``drain(now)`` returns the windows closed by ``now`` (a Unix time), such as
    :meth:`proxy.stats.core.StatsRecorder.drain`; the recorder must be fed Unix time too.
    At most ``capacity`` windows wait while the control plane is away; older ones are
    dropped and counted in :attr:`dropped`.
    """

    def __init__(
        self,
        open_channel: Callable[[], grpc.aio.Channel],
        identity: pb.ProxyIdentity,
        drain: Callable[[float], list[StatsWindow]],
        *,
        capacity: int = 3600,
        batch: int = 1000,
        interval_s: float = 1.0,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        connect_timeout_s: float = 5.0,
    ) -> None:
        if batch < 1 or interval_s <= 0:
            raise ValueError("batch must be at least 1 and interval_s positive")
        self._open_channel = open_channel
        self._identity = identity
        self._drain = drain
        self._outbox = StatsOutbox(capacity)
        self._batch = batch
        self._interval_s = interval_s
        self._backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._connect_timeout_s = connect_timeout_s
        self._pending = asyncio.Event()
        self._closed = False
        self.sent = 0
        """Windows written to the stream."""

    @property
    def dropped(self) -> int:
        """Windows lost: dropped from a full outbox, or in flight when a stream broke."""
        return self._outbox.dropped

    @property
    def waiting(self) -> int:
        """Windows waiting to be sent."""
        return len(self._outbox)

    def collect(self, now: float) -> None:
        """Drain the windows closed by ``now`` into the outbox (oldest dropped when full)."""
        windows = self._drain(now)
        if windows:
            self._outbox.add(windows)
            self._pending.set()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Stop :meth:`run` at its next step."""
        self._closed = True
        self._pending.set()

    async def run(self) -> None:
        """Collect every ``interval_s`` and stream, reconnecting with backoff, until closed."""
        collector = asyncio.create_task(self._collect_forever())
        attempt = 0
        try:
            while not self._closed:
                started = self._monotonic()
                try:
                    await self._stream()
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError) as error:
                    _log.info("stats: stream ended: %s", error)
                if self.closed:
                    return
                attempt = self._backoff.attempt_after(attempt, self._monotonic() - started)
                delay = self._backoff.delay(attempt, self._rng)
                attempt += 1
                await self._sleep(delay)
        finally:
            collector.cancel()

    async def _collect_forever(self) -> None:
        while not self._closed:
            self.collect(self._clock())
            await self._sleep(self._interval_s)

    async def _stream(self) -> None:
        async with self._open_channel() as channel:
            await asyncio.wait_for(channel.channel_ready(), self._connect_timeout_s)
            call = pb_grpc.DiscoveryStub(channel).ReportStats()
            first = True
            while not self._closed:
                if not self._outbox and not first:
                    await self._pending.wait()
                    self._pending.clear()
                    continue
                windows = self._outbox.take(self._batch)
                report = pb.StatsReport(windows=[stats_window_to_wire(w) for w in windows])
                if first:
                    report.identity.CopyFrom(self._identity)
                try:
                    await call.write(report)
                except BaseException:
                    self._outbox.lost(len(windows))
                    raise
                first = False
                self.sent += len(windows)
            await call.done_writing()
            await call
