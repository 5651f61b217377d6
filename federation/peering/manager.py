"""All of a control plane's peerings: tokens, establish, the peering port, list and delete.

:class:`PeeringManager` owns one :class:`~federation.peering.stream.PeerLink` per peer, the
export book every peer's exports come from, the gRPC server of the peering port (the
acceptor's side) and a dial loop per peer we established with a token (the dialer's side).
How a connection is authenticated is in :mod:`federation.peering.credentials`; in short:

- the acceptor's TLS trusts the roots of the established peers that dial it and the
  bootstrap roots of its outstanding tokens, and after the handshake the shell re-checks the
  client's leaf: a bootstrap leaf must come with its own token's one-time secret in the Open
  (redeemed once); any other leaf must validate against ONLY the roots of the trust domain it
  claims, and that domain must be a current peer's, opening as that peer;
- the dialer trusts only the acceptor's own bundle and names the acceptor's control plane
  (``controlplane.snapbright.<cluster>.<mesh>``) as SNI and expected host name.

Gateway addresses are per peer. Each side names, in its Open, its own gateway addresses as
that peer reaches them, so the other side routes to what it exports there (and its dial loop,
on the dialing side, dials there next): the acceptor names the addresses its token for that
peer carried (``generate_token(gateways=...)``, for a peer that reaches us at another
address than the rest, such as across its own WAN link), the dialer those given to
``establish(gateways=...)``; either falls back to the manager's :attr:`PeeringManager.gateways`.
An Open that names none leaves the addresses on record (an older peer sends none).

Establishing is recoverable, the way a Consul peering's pending stream secret is: redeeming a
token does not finish it. The acceptor records the new peer *pending* on its token (saved with
the token marked used by that cluster), and keeps that token's bootstrap root among its client
roots until the peer's trust bundle is stored; the dialer keeps the token, and presents it
again on each redial, until the acceptor has acknowledged our bundle (its Ack or Open names our
bundle's sequence: it is saved before that is sent). So if the acceptor is killed after saving
the new peer but before it got the bundle, the dialer's next dial (same token, same cluster,
before the token expires) takes the peering back after the restart; no other cluster can use
the token meanwhile. (So a token stays a bearer secret until the establish completes, not only
until it is first presented: normally milliseconds, after a crash until the dialer's retry;
``peering delete`` of the pending peer spends it at once.) A dialer that has seen the
acceptor's Open alternates its token with its SVID, since an acceptor that stored our bundle
but crashed before acking it no longer trusts the token. ``establish`` returns only once the
acceptor has acknowledged our bundle; if it gives up, ``establish`` with the same token (or a
new one: it replaces a pending record of the same cluster) finishes the job. A dialer records
the peer once it is first ACTIVE, with the token (in its private state file) until the acceptor
has acknowledged our bundle, so a restarted dialer finishes a pending establish as well.

Peer records (name, trust domain, bundle, gateway addresses, last versions) and issued tokens
are persisted in the state directory, so a restarted control plane reconnects without a new
token. What each peer exports to us is saved too (every few seconds per peer, off the event
loop, version and services together), so a restarted control plane keeps its mirrors while a
peer is away and resyncs with a delta from the saved version. Our own export versions start
from a new base in each run, so a peer gets a full snapshot after we restart: a manager made
with ``exports_ready=False`` withholds it until :meth:`PeeringManager.release_exports`, so a
catalog still loading never withdraws the peer's mirrors of us.

Delete is told to the peer with a Close("peering deleted"), and the peer withdraws too; a
peer that was offline then is refused at its next handshake (its roots are gone here) and
keeps its mirrors as stale only until the mirror core's grace period ends.

Root rotation: :meth:`PeeringManager.set_local_bundle` pushes our new bundle to every peer at
once; :meth:`PeeringManager.bundle_acked_by_all` says when every peer has applied a sequence,
so the CA can wait before it issues leaves under a new root.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType

import grpc
import grpc.aio
from cryptography import x509

from federation.api.v1 import peering_pb2 as pb
from federation.api.v1 import peering_pb2_grpc as pb_grpc
from federation.peering.core import (
    ApplyHealth,
    ApplyImports,
    ApplyTrustBundle,
    Deleted,
    Effect,
    ExportBook,
    ExportsChanged,
    ExportsReady,
    LocalBundleChanged,
    MarkFresh,
    MarkStale,
    PeerIdentity,
    PeeringSession,
    PeerStatus,
    SessionSettings,
    Withdraw,
)
from federation.peering.credentials import (
    bootstrap_channel_credentials,
    bootstrap_root,
    bootstrap_token_of,
    control_plane_server_name,
    peer_leaf,
    server_configuration,
    svid_channel_credentials,
)
from federation.peering.model import (
    MAX_GATEWAYS,
    Ack,
    Close,
    ExportedService,
    GatewayAddress,
    HealthSummaries,
    Open,
    PeeringMessage,
    PeeringToken,
    PeerState,
    ServiceHealth,
    ServiceKey,
    TokenError,
    TrustBundleUpdate,
    check_label,
    check_mesh,
    issue_token,
    reclaim,
    redeem,
)
from federation.peering.store import (
    PeeringState,
    PeerRecord,
    TokenRecord,
    load_imports,
    load_state,
    remove_imports,
    save_imports,
    save_state,
)
from federation.peering.stream import FLUSH_SECONDS, ClientStream, PeerLink, ServerStream
from federation.peering.token import decode_token, encode_token
from federation.peering.wire import WireError, from_proto, to_proto
from proxy.identity.bundle import (
    BundleError,
    TrustBundle,
    TrustBundleSet,
    format_bundle,
    parse_bundle,
)
from proxy.identity.model import SpiffeIdError, TrustDomain
from proxy.identity.svid import Purpose, SvidError, X509Svid, validate_svid

DEFAULT_TOKEN_TTL = 24 * 3600.0
IMPORTS_SAVE_INTERVAL = 5.0
"""Imports are written to the state directory at most this often per peer (seconds). Losing
the last few seconds to a crash costs only a larger delta: the saved version always matches
the saved services."""
OPEN_TIMEOUT = 10.0
"""How long an accepted stream may take to send its Open."""

_log = logging.getLogger(__name__)


class PeeringError(Exception):
    """A peering command failed; the message says why, in words for the operator."""


def _ignore(*_: object) -> None:
    return None


@dataclass(frozen=True, slots=True)
class PeeringCallbacks:
    """What the rest of the control plane hears from peering (each runs on the loop, quickly).

    ``imports_changed(peer, change, imports)`` gets what changed (O(changes), for the mirror
    core) and a read-only view of every service the peer exports to us now;
    ``trust_changed(peer, bundle)`` the peer's bundle as applied, or None once withdrawn;
    ``stale(peer, since)`` when the peer became unreachable, None when it is back;
    ``withdrawn(peer, trust_domain)`` after a delete (ours or the peer's): remove its mirrors;
    ``gateways_changed(peer, gateways)`` when a peer that dials us names other gateway
    addresses in its Open than we had on record (the record is saved first).
    """

    imports_changed: Callable[[str, ApplyImports, Mapping[ServiceKey, ExportedService]], None] = (
        _ignore
    )
    health: Callable[[str, tuple[ServiceHealth, ...], int], None] = _ignore
    trust_changed: Callable[[str, TrustBundle | None], None] = _ignore
    stale: Callable[[str, float | None], None] = _ignore
    withdrawn: Callable[[str, TrustDomain], None] = _ignore
    gateways_changed: Callable[[str, tuple[GatewayAddress, ...]], None] = _ignore


@dataclass(eq=False)
class _Peer:
    record: PeerRecord
    link: PeerLink
    bundle: TrustBundle | None
    token: PeeringToken | None = None
    """Dialer only, until the acceptor acked our bundle: the token we may present again."""
    acked_bundle: int = 0
    imports: dict[ServiceKey, ExportedService] = field(default_factory=dict)
    imports_dirty: bool = False
    imports_saved_at: float = 0.0
    dialer_task: asyncio.Task[None] | None = None
    last_error: str = ""
    opened: bool = False
    """Dialer: the acceptor has opened at least once (it may hold our bundle since)."""
    dials: int = 0
    completed: asyncio.Event = field(default_factory=asyncio.Event)
    """Dialer: the acceptor acknowledged our bundle; the token is spent."""
    refused: asyncio.Event = field(default_factory=asyncio.Event)
    deleted: asyncio.Event = field(default_factory=asyncio.Event)


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _ServerTrust:
    """The peering port's TLS configuration; gRPC asks for it before every handshake."""

    def __init__(self, config: grpc.ServerCertificateConfiguration) -> None:
        self._lock = threading.Lock()  # fetchers run on gRPC core threads
        self._config = config
        self._generation = 0

    def update(self, config: grpc.ServerCertificateConfiguration) -> None:
        with self._lock:
            self._config = config
            self._generation += 1

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that follow every later :meth:`update` (one per server)."""
        with self._lock:
            initial, seen = self._config, self._generation

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal seen
            with self._lock:
                if self._generation == seen:
                    return None  # no change: gRPC keeps the configuration it has
                seen = self._generation
                return self._config

        return grpc.dynamic_ssl_server_credentials(
            initial,
            fetch,  # type: ignore[arg-type]  # the stub omits that None means "no change"
            require_client_authentication=True,
        )


class _Servicer(pb_grpc.PeeringServicer):
    def __init__(self, manager: PeeringManager) -> None:
        self._manager = manager

    async def Exchange(  # type: ignore[override]
        self,
        request_iterator: object,
        context: grpc.aio.ServicerContext[pb.PeeringMessage, pb.PeeringMessage],
    ) -> None:
        await self._manager._accept(context)


class PeeringManager:
    """Every peering of one control plane (see the module docstring).

    ``svid`` is the control plane's SVID; it must carry the DNS SAN
    :func:`~federation.peering.credentials.control_plane_server_name` of this cluster.
    ``gateways`` are the addresses written into tokens (our east-west gateways, or the
    peering port itself when peers dial it directly). ``clock`` gives epoch seconds.
    ``exports_ready=False`` withholds every peer's exports until :meth:`release_exports`
    (a control plane whose catalog is still loading must not send an empty snapshot).
    """

    def __init__(
        self,
        *,
        cluster: str,
        mesh: str,
        svid: X509Svid,
        bundle: TrustBundle,
        state_dir: Path,
        gateways: Sequence[GatewayAddress] = (),
        callbacks: PeeringCallbacks | None = None,
        settings: SessionSettings | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        exports_ready: bool = True,
    ) -> None:
        self._identity = PeerIdentity(
            check_label(cluster, "cluster"),
            check_mesh(mesh),
            TrustDomain.for_cluster(cluster, mesh),
        )
        if bundle.trust_domain != self._identity.trust_domain:
            raise PeeringError(f"our bundle is for {bundle.trust_domain}, not {self.trust_domain}")
        self._svid = svid
        self._bundle = bundle
        self._state_dir = state_dir
        self._gateways = tuple(gateways)
        self._callbacks = callbacks or PeeringCallbacks()
        self._settings = settings or SessionSettings()
        self._rng = rng or random.Random()
        self._clock = clock
        self._exports_ready = exports_ready
        self.book = ExportBook(cluster=cluster, mesh=mesh, base_version=int(clock() * 1000))
        """The services exported to each peer (change them through :meth:`set_service`)."""
        self._peers: dict[str, _Peer] = {}
        self._tokens: dict[str, TokenRecord] = {}
        self._trust = _ServerTrust(server_configuration(svid, self._client_roots()))
        self._server: grpc.aio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    @property
    def trust_domain(self) -> TrustDomain:
        """Our own trust domain."""
        return self._identity.trust_domain

    @property
    def gateways(self) -> tuple[GatewayAddress, ...]:
        """Our default gateway addresses: written into tokens given none of their own, and
        named in the Open we send to every peer that has no addresses of its own (from its
        next connection on: set them before :meth:`start`)."""
        return self._gateways

    @gateways.setter
    def gateways(self, gateways: Sequence[GatewayAddress]) -> None:
        self._gateways = tuple(gateways)
        for peer in self._peers.values():
            peer.link.session.local_gateways = self._advertised(peer.record)

    def _advertised(self, record: PeerRecord) -> tuple[GatewayAddress, ...]:
        return record.advertised or self._gateways

    # -- lifecycle --

    async def start(self) -> None:
        """Load the peers and tokens of the state directory and reconnect to every peer."""
        state = load_state(self._state_dir)
        self._tokens = {t.issued.token_id: t for t in state.tokens}
        for record in state.peers:
            version, services = load_imports(self._state_dir, record.name)
            token = self._restored_token(record)
            record = replace(record, establish_token=None)  # kept in _Peer.token instead
            peer = self._add_peer(record, token=token, imports=services, version=version)
            peer.opened = token is not None  # recorded with a token: it was ACTIVE once
            if services:
                change = ApplyImports(record.name, services, (), version)
                self._callbacks.imports_changed(record.name, change, MappingProxyType(peer.imports))
        self._refresh_trust()
        self._ticker = asyncio.create_task(self._tick_all())
        self._started.set()

    def _restored_token(self, record: PeerRecord) -> PeeringToken | None:
        """A dialer's token saved while its establish was pending; None once it expired (the
        acceptor refuses it then: delete the peering and establish again)."""
        if record.establish_token is None:
            return None
        try:
            return decode_token(record.establish_token, now=self._clock())
        except TokenError as error:
            _log.warning("peering %s: the pending establish is lost: %s", record.name, error)
            return None

    async def serve(self, address: str) -> int:
        """Open the peering port on ``address`` (``host:port``); return the bound port. It may
        open before :meth:`start`: a stream is admitted once the recorded peers are loaded."""
        if self._server is not None:
            raise PeeringError("the peering port is already open")
        server = grpc.aio.server()
        pb_grpc.add_PeeringServicer_to_server(_Servicer(self), server)
        port = server.add_secure_port(address, self._trust.credentials())
        await server.start()
        self._server = server
        return port

    async def stop_serving(self) -> None:
        """Close the peering port; accepted streams end (their peers will redial)."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=None)

    async def close(self) -> None:
        """Stop everything (this is not a delete: peers stay recorded)."""
        await self.stop_serving()
        tasks = [p.dialer_task for p in self._peers.values() if p.dialer_task is not None]
        if self._ticker is not None:
            tasks.append(self._ticker)
        await _stop(tasks)
        await self._save_imports(force=True)
        self._save()

    # -- commands --

    def generate_token(
        self,
        ttl_seconds: float = DEFAULT_TOKEN_TTL,
        gateways: Sequence[GatewayAddress] = (),
    ) -> str:
        """``snapbright peering token``: a one-time token for a cluster to establish with us.

        ``gateways`` are where *that* cluster reaches our gateway, when not at our default
        :attr:`gateways`: the token carries them, and they stay our addresses for that peer."""
        own = _own_gateways(gateways)
        if not (own or self.gateways):
            raise PeeringError("no gateway address is configured to put into a token")
        now = self._clock()
        secret = secrets.token_bytes(32)
        try:
            token, issued = issue_token(
                cluster=self._identity.cluster,
                mesh=self._identity.mesh,
                trust_domain=self.trust_domain,
                gateways=own or self.gateways,
                trust_bundle_json=format_bundle(self._bundle).decode(),
                secret=secret,
                now=now,
                ttl_seconds=ttl_seconds,
            )
        except TokenError as error:
            raise PeeringError(f"cannot make a token: {error.reason}") from None
        root = bootstrap_root(secret, token.token_id, _utc(now), _utc(token.expires_at))
        self._tokens[token.token_id] = TokenRecord(issued, root, own)
        self._save()
        self._refresh_trust()
        return encode_token(token)

    async def establish(
        self,
        token_text: str,
        *,
        within: float = 10.0,
        gateways: Sequence[GatewayAddress] = (),
    ) -> str:
        """``snapbright peering establish TOKEN``: peer with the token's cluster; return its
        name once the peering is ACTIVE and the peer has acknowledged our trust bundle. A
        refusal, or no success ``within`` seconds, raises :class:`PeeringError` and leaves
        nothing behind here (the token still finishes the job when tried again).

        ``gateways`` are where *that* cluster reaches our gateway, when not at our default
        :attr:`gateways`; they are named in our Open to it and kept with the peer."""
        try:
            token = decode_token(token_text, now=self._clock())
        except TokenError as error:
            raise PeeringError(f"bad token: {error.reason}") from None
        if token.cluster == self._identity.cluster or token.trust_domain == self.trust_domain:
            raise PeeringError("this token was generated by this cluster")
        if token.cluster in self._peers:
            raise PeeringError(f"already peered with {token.cluster}: delete it first")
        try:
            bundle = parse_bundle(token.trust_domain, token.trust_bundle_json)
        except BundleError as error:
            raise PeeringError(f"the token's trust bundle is invalid: {error.reason}") from None
        record = PeerRecord(
            name=token.cluster,
            mesh=token.mesh,
            trust_domain=token.trust_domain,
            dialer=True,
            gateways=token.gateways,
            bundle_json=token.trust_bundle_json,
            bundle_sequence_seen=bundle.sequence or 0,
            advertised=_own_gateways(gateways),
        )
        peer = self._add_peer(record, token=token)
        completed = asyncio.ensure_future(peer.completed.wait())
        refused = asyncio.ensure_future(peer.refused.wait())
        try:
            await asyncio.wait(
                {completed, refused}, timeout=within, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            completed.cancel()
            refused.cancel()
        if peer.completed.is_set():
            return token.cluster
        await self._forget(token.cluster)
        raise PeeringError(
            f"establish with {token.cluster} failed: {peer.last_error or 'no answer'}"
        )

    def list(self) -> builtins.list[PeerStatus]:
        """``snapbright peering list``: one status per peer, by name."""
        return [self._peers[name].link.session.status() for name in sorted(self._peers)]

    async def delete(self, peer: str) -> None:
        """``snapbright peering delete PEER``: tell the peer, close the stream, withdraw its
        mirrors and trust (the withdraw callback runs before this returns)."""
        entry = self._peers.get(peer)
        if entry is None:
            raise PeeringError(f"no peering with {peer!r}")
        task = entry.dialer_task
        entry.link.handle(Deleted(self._clock()))
        # The Withdraw effect forgot the peer; its dial loop delivers our Close, then ends.
        if task is not None:
            await asyncio.wait([task], timeout=FLUSH_SECONDS + 1)
            await _stop([task])

    def messages_received(self, peer: str) -> Mapping[str, int]:
        """How many messages of each kind the peer sent us (for metrics and tests)."""
        return dict(self._peers[peer].link.received)

    # -- what we export --

    def set_service(
        self,
        key: ServiceKey,
        *,
        healthy_endpoints: int,
        exported_to: Iterable[str],
        mirrored_from: str | None = None,
    ) -> None:
        """A local service appeared or changed; ``exported_to`` is the ExportPolicy's decision.
        Every connected peer whose exports changed gets a delta at once."""
        changed = self.book.set_service(
            key,
            healthy_endpoints=healthy_endpoints,
            exported_to=exported_to,
            mirrored_from=mirrored_from,
        )
        self._exports_changed(changed)

    def release_exports(self) -> None:
        """Our export set is complete (the catalog read, the ExportPolicy applied): peers get
        what was withheld, a snapshot or a delta, at once. Idempotent."""
        if self._exports_ready:
            return
        self._exports_ready = True
        now = self._clock()
        for peer in self._peers.values():
            peer.link.handle(ExportsReady(now))

    def remove_service(self, key: ServiceKey) -> None:
        """A local service is gone: peers it was exported to get a delta removing it."""
        self._exports_changed(self.book.remove_service(key))

    def apply_export_decision(self, exported_to: Callable[[ServiceKey], Iterable[str]]) -> None:
        """The ExportPolicy was reloaded: re-decide every service, push what changed."""
        self._exports_changed(self.book.apply_decision(exported_to))

    def publish_health(self, services: Iterable[ServiceHealth], at_unix_ms: int) -> None:
        """Send each connected peer the health of the services we export to it."""
        services = tuple(services)
        for name, peer in self._peers.items():
            if peer.link.session.state is not PeerState.ACTIVE:
                continue
            exports = self.book.exports_to(name)
            mine = tuple(s for s in services if exports.get(s.key) is not None)
            if mine:
                peer.link.send(HealthSummaries(at_unix_ms, mine))

    # -- trust --

    def set_svid(self, svid: X509Svid) -> None:
        """Our SVID was renewed: new handshakes present it (streams that are up stay)."""
        self._svid = svid
        self._refresh_trust()

    def set_local_bundle(self, bundle: TrustBundle) -> None:
        """Our bundle changed (a root added or retired): push it to every peer at once."""
        if bundle.trust_domain != self.trust_domain:
            raise PeeringError(f"bundle is for {bundle.trust_domain}, not {self.trust_domain}")
        self._bundle = bundle
        update = self._bundle_update()
        now = self._clock()
        for peer in self._peers.values():
            peer.link.handle(LocalBundleChanged(update, now))
        self._refresh_trust()

    def bundle_acked_by_all(self, sequence: int) -> bool:
        """True when every peer has applied our bundle at ``sequence`` or later (the CA waits
        for this before it issues leaves under a new root)."""
        return all(peer.acked_bundle >= sequence for peer in self._peers.values())

    def bundle_acked(self, peer: str) -> int | None:
        """The sequence of our bundle that ``peer`` last said it applied (0: none yet; None:
        no such peer), for ``snapbright check``."""
        entry = self._peers.get(peer)
        return None if entry is None else entry.acked_bundle

    # -- the acceptor's side --

    async def _accept(
        self, context: grpc.aio.ServicerContext[pb.PeeringMessage, pb.PeeringMessage]
    ) -> None:
        stream = ServerStream(context)
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                first = await stream.read()
                # Known peers are admitted as themselves only once their records are loaded.
                await self._started.wait()
            if first is None:
                return
            peer = self._admit(peer_leaf(context.auth_context()), first)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no Open in time")
        except _Refused as refusal:
            _log.warning("peering: refused a stream: %s", refusal.reason)
            with contextlib.suppress(Exception):
                await context.write(to_proto(Close(refusal.reason)))
            await context.abort(refusal.code, refusal.reason)
        await peer.link.run(stream, first)

    def _admit(self, leaf: x509.Certificate | None, first: pb.PeeringMessage) -> _Peer:
        denied = grpc.StatusCode.PERMISSION_DENIED
        if leaf is None:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        try:
            open_ = from_proto(first)
        except WireError as error:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, error.reason) from None
        if not isinstance(open_, Open):
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Open")
        now = self._clock()
        outstanding = {
            token_id: self._tokens[token_id].bootstrap_root
            for token_id in self._outstanding_tokens(now)
        }
        token_id = bootstrap_token_of(leaf, outstanding)
        if token_id is not None:
            if self._tokens[token_id].issued.used_at is not None:
                return self._readmit_pending(token_id, open_, now)
            return self._admit_new(token_id, open_, now)
        bundles = TrustBundleSet(p.bundle for p in self._peers.values() if p.bundle is not None)
        try:
            spiffe_id = validate_svid(leaf, (), bundles, _utc(now), Purpose.CLIENT)
        except SvidError as error:
            raise _Refused(denied, f"client certificate refused: {error}") from None
        for peer in self._peers.values():
            if peer.record.trust_domain == spiffe_id.trust_domain:
                if open_.cluster != peer.record.name:
                    raise _Refused(denied, f"{spiffe_id} may not open as {open_.cluster}")
                if peer.record.dialer:
                    # One stream per peer: with this one, we are the side that dials.
                    raise _Refused(denied, f"we dial {peer.record.name}; it does not dial us")
                self._record_gateways(peer, open_.gateways)
                return peer
        raise _Refused(denied, f"{spiffe_id.trust_domain} is not a peer")

    def _admit_new(self, token_id: str, open_: Open, now: float) -> _Peer:
        denied = grpc.StatusCode.PERMISSION_DENIED
        try:
            # Only the token whose bootstrap root signed the client's leaf can be redeemed.
            issued = redeem(
                [self._tokens[token_id].issued], open_.establish_secret, peer=open_.cluster, now=now
            )
        except TokenError as error:
            raise _Refused(denied, error.reason) from None
        try:
            expected = TrustDomain.for_cluster(open_.cluster, open_.mesh)
        except SpiffeIdError as error:
            raise _Refused(denied, error.reason) from None
        if open_.trust_domain != expected:
            raise _Refused(denied, f"{open_.cluster}'s trust domain must be {expected}")
        known = self._peers.get(open_.cluster)
        if open_.cluster == self._identity.cluster or (
            known is not None and (known.record.pending_token is None or known.link.connected)
        ):
            raise _Refused(denied, f"already peered with {open_.cluster}")
        if known is not None:
            # An establish that never completed, now retried with another token: replace it.
            self._peers.pop(known.record.name)
            self.book.remove_peer(known.record.name)
        token = self._tokens[token_id] = replace(self._tokens[token_id], issued=issued)
        peer = self._add_peer(
            PeerRecord(
                open_.cluster,
                open_.mesh,
                open_.trust_domain,
                dialer=False,
                gateways=open_.gateways,
                advertised=token.gateways,
                pending_token=token_id,
            ),
            token=None,
        )
        # Saved before anything is sent: the peer's redial finds it pending after a crash.
        self._save()
        self._refresh_trust()
        _log.info(
            "peering: %s established with token %s (pending its bundle)", open_.cluster, token_id
        )
        return peer

    def _readmit_pending(self, token_id: str, open_: Open, now: float) -> _Peer:
        """The cluster that redeemed ``token_id`` presents it again: its establish did not
        complete (we never stored its bundle), so the same stream setup goes on."""
        denied = grpc.StatusCode.PERMISSION_DENIED
        issued = self._tokens[token_id].issued
        try:
            reclaim(issued, open_.establish_secret, peer=open_.cluster, now=now)
        except TokenError as error:
            raise _Refused(denied, error.reason) from None
        peer = self._peers.get(open_.cluster)
        if peer is None or peer.record.pending_token != token_id:
            raise _Refused(denied, f"token {token_id} was already used by {issued.used_by}")
        if (open_.mesh, open_.trust_domain) != (peer.record.mesh, peer.record.trust_domain):
            raise _Refused(denied, f"{open_.cluster} established as another mesh or domain")
        self._record_gateways(peer, open_.gateways)
        _log.info("peering: %s resumes its establish with token %s", open_.cluster, token_id)
        return peer

    def _outstanding_tokens(self, now: float) -> builtins.list[str]:
        """Tokens whose bootstrap root admits a handshake: unused ones, and those of peers
        whose establish is pending; either only until the token expires."""
        pending = {p.record.pending_token for p in self._peers.values()}
        return [
            token_id
            for token_id, record in self._tokens.items()
            if now < record.issued.expires_at
            and (record.issued.used_at is None or token_id in pending)
        ]

    def _record_gateways(self, peer: _Peer, gateways: tuple[GatewayAddress, ...]) -> None:
        """The peer named its gateways in its Open: keep them (none named: keep what we have,
        as an older peer, or one with no gateway to name, sends none)."""
        if not gateways or gateways == peer.record.gateways:
            return
        peer.record = replace(peer.record, gateways=gateways)
        self._save()
        self._callbacks.gateways_changed(peer.record.name, gateways)

    # -- the dialer's side --

    async def _dial(self, peer: _Peer) -> None:
        server_name = control_plane_server_name(peer.record.name, peer.record.mesh)
        options = [("grpc.ssl_target_name_override", server_name)]
        attempt = 0
        while not peer.deleted.is_set():
            # Read each time: the acceptor's Open may have named other addresses.
            gateways = peer.record.gateways
            address = gateways[attempt % len(gateways)]
            attempt += 1
            roots = peer.bundle.roots if peer.bundle is not None else ()
            token = peer.token
            if token is not None and peer.opened:
                # The acceptor may have stored our bundle and lost only its Ack: then it
                # trusts our SVID, not the token any more. Alternate.
                peer.dials += 1
                token = token if peer.dials % 2 else None
            peer.link.session.establish_secret = token.secret if token is not None else b""
            if token is not None:
                credentials = bootstrap_channel_credentials(
                    token.secret, token.token_id, roots, _utc(self._clock())
                )
            else:
                credentials = svid_channel_credentials(self._svid, roots)
            channel = grpc.aio.secure_channel(str(address), credentials, options=options)
            try:
                call = pb_grpc.PeeringStub(channel).Exchange()
                peer.last_error = await peer.link.run(ClientStream(call))
                if peer.token is not None and _is_refusal(peer.last_error):
                    peer.refused.set()
            finally:
                await channel.close(grace=None)
            delay = peer.link.reconnect_after
            if delay is None:
                return  # deleted: no reconnect
            # Sleep the backoff, unless the peering is deleted meanwhile.
            waiter = asyncio.ensure_future(peer.deleted.wait())
            try:
                await asyncio.wait([waiter], timeout=delay)
            finally:
                waiter.cancel()

    # -- effects and messages of every link --

    def _add_peer(
        self,
        record: PeerRecord,
        *,
        token: PeeringToken | None,
        imports: tuple[ExportedService, ...] = (),
        version: int = 0,
    ) -> _Peer:
        bundle = None
        if record.bundle_json is not None:
            bundle = parse_bundle(record.trust_domain, record.bundle_json)
        session = PeeringSession(
            local=self._identity,
            peer=PeerIdentity(record.name, record.mesh, record.trust_domain),
            exports=self.book.add_peer(record.name),
            local_bundle=self._bundle_update(),
            dialer=record.dialer,
            rng=self._rng,
            settings=self._settings,
            establish_secret=token.secret if token is not None else b"",
            imports=imports,
            imported_version=version if imports else 0,
            local_gateways=self._advertised(record),
            exports_ready=self._exports_ready,
        )
        link = PeerLink(
            session,
            clock=self._clock,
            on_effect=self._on_effect,
            vet=self._vet,
            on_state=self._on_state,
            name=record.name,
        )
        peer = _Peer(record, link, bundle, token, imports={s.key: s for s in imports})
        self._peers[record.name] = peer
        if record.dialer:
            peer.dialer_task = asyncio.create_task(self._dial(peer))
        return peer

    async def _forget(self, name: str) -> None:
        peer = self._peers.pop(name, None)
        if peer is None:
            return
        self.book.remove_peer(name)
        task = peer.dialer_task
        if task is not None and task is not asyncio.current_task():
            await _stop([task])
        self._save()
        self._refresh_trust()

    def _vet(self, link: PeerLink, message: PeeringMessage) -> str | None:
        peer = self._peers.get(link.name)
        if peer is None:
            return None
        if isinstance(message, Ack):
            peer.acked_bundle = max(peer.acked_bundle, message.bundle_sequence)
            self._check_completed(peer)
        elif isinstance(message, Open):
            peer.acked_bundle = max(peer.acked_bundle, message.bundle_sequence_seen)
            if peer.record.dialer and message.cluster == peer.record.name:
                # The acceptor names its addresses for us (the session checks the rest).
                self._record_gateways(peer, message.gateways)
            self._check_completed(peer)
        elif isinstance(message, TrustBundleUpdate):
            known = peer.bundle.sequence if peer.bundle is not None else None
            if message.trust_domain != peer.record.trust_domain:
                return None  # the session refuses a foreign domain's bundle itself
            if known is not None and message.sequence <= known:
                return None  # old news; the session ignores it
            try:
                bundle = parse_bundle(
                    message.trust_domain, message.spiffe_bundle_json, previous=peer.bundle
                )
            except BundleError as error:
                return f"trust bundle refused: {error.reason}"
            if bundle.sequence != message.sequence:
                return "trust bundle's spiffe_sequence differs from the update's sequence"
            if bundle.revoked:
                return "trust bundle has no root: delete the peering instead"
            peer.bundle = bundle
        return None

    def _check_completed(self, peer: _Peer) -> None:
        """Dialer: once the acceptor has acknowledged our bundle (it stores it before it says
        so), the establish is complete: the token is spent, and the peer is recorded."""
        if peer.token is None or peer.acked_bundle < max(1, self._bundle.sequence or 0):
            return
        peer.token = None
        peer.link.session.establish_secret = b""
        self._save()
        peer.completed.set()
        _log.info("peering: established with %s", peer.record.name)

    def _on_state(self, link: PeerLink, state: PeerState) -> None:
        peer = self._peers.get(link.name)
        if peer is not None and state is PeerState.ACTIVE and not peer.opened:
            peer.opened = True
            if peer.token is not None:
                self._save()  # recorded now, with the token until the acceptor acks our bundle

    def _on_effect(self, link: PeerLink, effect: Effect) -> None:
        peer = self._peers.get(link.name)
        if peer is None:
            return
        match effect:
            case ApplyImports(name, upserted, removed, version):
                # Applied here change by change: copying the session's imports would cost
                # O(services) per update.
                for service in upserted:
                    peer.imports[service.key] = service
                for key in removed:
                    peer.imports.pop(key, None)
                # Saved by the ticker every few seconds (see _save_imports).
                peer.record = replace(peer.record, services_version_seen=version)
                peer.imports_dirty = True
                self._callbacks.imports_changed(name, effect, MappingProxyType(peer.imports))
            case ApplyHealth(name, services, at_unix_ms):
                self._callbacks.health(name, services, at_unix_ms)
            case ApplyTrustBundle(name, update):
                if peer.bundle is not None and peer.bundle.sequence == update.sequence:
                    if peer.record.pending_token is not None:
                        _log.info("peering: %s established (its bundle is stored)", name)
                    # Saved before the session's Ack goes out: the dialer takes the Ack as
                    # proof that its establish is complete (pending no more).
                    peer.record = replace(
                        peer.record,
                        bundle_json=update.spiffe_bundle_json.decode(),
                        bundle_sequence_seen=update.sequence,
                        pending_token=None,
                    )
                    self._save()
                    self._refresh_trust()
                    self._callbacks.trust_changed(name, peer.bundle)
                else:
                    _log.warning(
                        "peering %s: bundle sequence %d is below the %s we hold; kept ours",
                        name,
                        update.sequence,
                        None if peer.bundle is None else peer.bundle.sequence,
                    )
            case MarkStale(name, since):
                self._callbacks.stale(name, since)
            case MarkFresh(name):
                self._callbacks.stale(name, None)
            case Withdraw(name, trust_domain, _):
                # Drop the peer's trust now. The dial loop is not cancelled: it is still
                # delivering our Close, and it ends by itself once that is done.
                self._peers.pop(name, None)
                self.book.remove_peer(name)
                remove_imports(self._state_dir, name)
                peer.deleted.set()
                self._save()
                self._refresh_trust()
                self._callbacks.trust_changed(name, None)
                self._callbacks.withdrawn(name, trust_domain)
            case _:
                raise TypeError(f"unexpected peering effect {effect!r}")

    async def _tick_all(self) -> None:
        interval = self._settings.heartbeat_interval / 4
        while True:
            await asyncio.sleep(interval)
            for peer in list(self._peers.values()):
                peer.link.tick()
            await self._save_imports(force=False)

    def _exports_changed(self, peers: Iterable[str]) -> None:
        now = self._clock()
        for name in peers:
            peer = self._peers.get(name)
            if peer is not None:
                peer.link.handle(ExportsChanged(now))

    # -- persistence and trust --

    def _bundle_update(self) -> TrustBundleUpdate:
        return TrustBundleUpdate(
            self.trust_domain, self._bundle.sequence or 0, format_bundle(self._bundle)
        )

    def _client_roots(self) -> builtins.list[x509.Certificate]:
        now = self._clock()
        roots = list(self._bundle.roots)
        for peer in self._peers.values():
            # Only peers that dial us; a peer we dial never needs to pass our handshake.
            if peer.bundle is not None and not peer.record.dialer:
                roots.extend(peer.bundle.roots)
        roots.extend(
            self._tokens[token_id].bootstrap_root for token_id in self._outstanding_tokens(now)
        )
        return roots

    def _refresh_trust(self) -> None:
        self._trust.update(server_configuration(self._svid, self._client_roots()))

    async def _save_imports(self, *, force: bool) -> None:
        now = self._clock()
        for name, peer in list(self._peers.items()):
            due = force or now - peer.imports_saved_at >= IMPORTS_SAVE_INTERVAL
            if not (peer.imports_dirty and due):
                continue
            version = peer.link.session.imported_version
            services = tuple(peer.imports.values())  # a copy: the thread must not see changes
            peer.imports_dirty = False
            peer.imports_saved_at = now
            try:
                # Encoding and fsync of thousands of services must not stall heartbeats.
                await asyncio.to_thread(save_imports, self._state_dir, name, version, services)
            except BaseException:
                peer.imports_dirty = True  # not saved (cancelled by close): the next try will
                raise
            if self._peers.get(name) is not peer:
                remove_imports(self._state_dir, name)  # deleted while we wrote

    def _save(self) -> None:
        now = self._clock()
        # A peer we dial is recorded once it has been ACTIVE: with its token until the
        # acceptor acked our bundle (a refused first establish leaves nothing behind).
        peers = tuple(
            p.record
            if p.token is None
            else replace(p.record, establish_token=encode_token(p.token))
            for p in self._peers.values()
            if p.token is None or p.opened
        )
        tokens = tuple(t for t in self._tokens.values() if now < t.issued.expires_at)
        save_state(self._state_dir, PeeringState(peers, tokens))


def format_status(statuses: Iterable[PeerStatus], now: float) -> list[str]:
    """``snapbright peering list`` as lines: PEER STATE LAST-HEARTBEAT RTT IMPORTED EXPORTED."""
    rows = [("PEER", "STATE", "LAST-HEARTBEAT", "RTT", "IMPORTED", "EXPORTED")]
    for status in statuses:
        heard = (
            "-"
            if status.last_heard_at is None
            else f"{max(0.0, now - status.last_heard_at):.1f}s ago"
        )
        rtt = "-" if status.rtt_seconds is None else f"{status.rtt_seconds * 1000:.1f}ms"
        rows.append(
            (
                status.peer,
                status.state.value.upper(),
                heard,
                rtt,
                str(status.imported),
                str(status.exported),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


async def _stop(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they end. Unlike awaiting each one inside
    ``suppress(CancelledError)``, this never swallows a cancellation of the caller itself."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


def _own_gateways(gateways: Sequence[GatewayAddress]) -> tuple[GatewayAddress, ...]:
    own = tuple(gateways)
    if not all(isinstance(g, GatewayAddress) for g in own):
        raise PeeringError("gateway addresses must be GatewayAddress values")
    if len(own) > MAX_GATEWAYS:
        raise PeeringError(f"at most {MAX_GATEWAYS} gateway addresses, not {len(own)}")
    if len(set(own)) != len(own):
        raise PeeringError("a gateway address is listed twice")
    return own


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _is_refusal(reason: str) -> bool:
    return any(
        code in reason
        for code in ("PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_ARGUMENT", "peer closed")
    )
