"""The peering session, pure: named events in, the peer's state and a list of effects out.

Two parts:

- What we export. :class:`ExportBook` keeps, for every peer, a :class:`PeerExports`: the
  services that peer may see and a log of which changed at which version. One catalog change
  costs O(peers it is exported to); a delta since version V costs O(entries changed since V),
  never O(services), because the log is ordered by last change and read from its newest end.
  Removals are remembered as tombstones, a bounded number of them; a peer that has been away
  longer than the oldest one we kept gets a full snapshot instead.
- The stream with one peer. :class:`PeeringSession` is the state machine of
  ``PENDING → ESTABLISHING → ACTIVE ⇄ DISCONNECTED/FAILING → … → DELETED``. The I/O shell
  feeds it events (a message arrived, a tick, the stream dropped) with ``now`` and applies the
  effects it returns (send this, apply these imports, mark the peer's mirrors stale,
  reconnect after this delay). It reads no clock and opens no socket.

Rules it keeps:

1. A peer speaks only for itself: its Open must name the cluster, mesh and trust domain we
   peered with, the SNI of every service it exports must be its own
   ``<svc>.<ns>.<cluster>.<mesh>``, and it may publish only its own trust domain's bundle.
   Breaking any of these ends the stream.
2. A bundle with a sequence not above the one we hold is ignored.
3. A delta that does not start at the version we hold ends the stream; reconnecting tells the
   peer what we hold, so it sends the right delta or a full snapshot.
4. Anything heard from the peer proves it alive; nothing for ``missed_heartbeats`` intervals
   means DISCONNECTED. Imports are kept (the mirror core decides how long they stay).
5. A heartbeat (``sequence`` > 0) is answered at once with an echo (``sequence`` 0, naming
   it in ``echo_sequence``), which is not answered. The RTT is the time from our heartbeat
   to its echo: the channel's round trip, not the peer's heartbeat interval.
6. Our exports are sent only once they are complete. A restarted control plane's versions
   start from a new base, so the peer gets a full snapshot: sent before the catalog is read
   and the export decision applied, it would be empty and withdraw the peer's mirrors of us
   while a source is still syncing. Until then the session sends nothing about services.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from federation.peering.model import (
    Ack,
    Close,
    ExportedService,
    GatewayAddress,
    HealthSummaries,
    Heartbeat,
    Open,
    PeeringMessage,
    PeerState,
    ServiceHealth,
    ServiceKey,
    ServicesDelta,
    ServicesSnapshot,
    TrustBundleUpdate,
    check_label,
    check_mesh,
    sni_name,
)
from proxy.identity.model import TrustDomain
from proxy.resilience.core import jittered_backoff

# --- What we export, per peer. ---


class PeerExports:
    """The services exported to one peer, versioned, with the changes since any recent version.

    ``base_version`` should differ between incarnations of the control plane (the shell uses
    its start time), so a version a peer remembers from a previous run is never mistaken for
    one of ours. ``entries_visited`` counts per-service work, for tests and the benchmark.
    """

    __slots__ = (
        "_entries",
        "_floor",
        "_live",
        "_max_tombstones",
        "_tombstones",
        "_version",
        "entries_visited",
    )

    def __init__(self, base_version: int = 0, max_tombstones: int = 4096) -> None:
        if base_version < 0 or max_tombstones < 0:
            raise ValueError("base_version and max_tombstones must not be negative")
        self._version = base_version
        self._floor = base_version
        self._max_tombstones = max_tombstones
        # Key -> (version of its last change, service or None once removed), oldest first.
        self._entries: OrderedDict[ServiceKey, tuple[int, ExportedService | None]] = OrderedDict()
        self._tombstones: deque[tuple[int, ServiceKey]] = deque()
        self._live = 0
        self.entries_visited = 0

    @property
    def version(self) -> int:
        """The version of the current exports; every change adds one."""
        return self._version

    def __len__(self) -> int:
        return self._live

    def get(self, key: ServiceKey) -> ExportedService | None:
        """The exported service under ``key``, if it is exported now."""
        entry = self._entries.get(key)
        return None if entry is None else entry[1]

    def upsert(self, service: ExportedService) -> bool:
        """Export ``service`` (or its new value); False when nothing changed."""
        self.entries_visited += 1
        entry = self._entries.get(service.key)
        if entry is not None and entry[1] == service:
            return False
        if entry is None or entry[1] is None:
            self._live += 1
        self._version += 1
        self._entries[service.key] = (self._version, service)
        self._entries.move_to_end(service.key)
        return True

    def remove(self, key: ServiceKey) -> bool:
        """Stop exporting ``key``; False when it was not exported."""
        self.entries_visited += 1
        entry = self._entries.get(key)
        if entry is None or entry[1] is None:
            return False
        self._live -= 1
        self._version += 1
        self._entries[key] = (self._version, None)
        self._entries.move_to_end(key)
        self._tombstones.append((self._version, key))
        while len(self._tombstones) > self._max_tombstones:
            version, old = self._tombstones.popleft()
            current = self._entries.get(old)
            if current is not None and current == (version, None):
                del self._entries[old]
                # A peer older than this removal could no longer learn of it from a delta.
                self._floor = max(self._floor, version)
        return True

    def snapshot(self) -> ServicesSnapshot:
        """Everything exported now."""
        services = []
        for _, service in self._entries.values():
            self.entries_visited += 1
            if service is not None:
                services.append(service)
        return ServicesSnapshot(self._version, tuple(services))

    def update_since(self, version: int) -> ServicesSnapshot | ServicesDelta | None:
        """What a peer holding ``version`` needs: nothing, a delta, or (if we cannot tell what
        changed since then) a full snapshot."""
        if version == self._version:
            return None
        if not self._floor <= version < self._version:
            return self.snapshot()
        upserted: list[ExportedService] = []
        removed: list[ServiceKey] = []
        for key, (changed_at, service) in reversed(self._entries.items()):
            self.entries_visited += 1
            if changed_at <= version:
                break
            if service is None:
                removed.append(key)
            else:
                upserted.append(service)
        return ServicesDelta(version, self._version, tuple(upserted), tuple(removed))


@dataclass(frozen=True, slots=True)
class _Exported:
    healthy_endpoints: int
    exported_to: frozenset[str]
    mirrored: bool


class ExportBook:
    """Every peer's exports, kept current from local catalog changes one service at a time.

    The export decision (which peers may see a service) comes from the ExportPolicy; the book
    only applies it. Mirrored services are never exported, whatever the decision says: a
    service imported from peer B must not reach peer C through us.
    """

    __slots__ = ("_base_version", "_cluster", "_max_tombstones", "_mesh", "_peers", "_services")

    def __init__(
        self, *, cluster: str, mesh: str, base_version: int = 0, max_tombstones: int = 4096
    ) -> None:
        self._cluster = check_label(cluster, "cluster")
        self._mesh = check_mesh(mesh)
        self._base_version = base_version
        self._max_tombstones = max_tombstones
        self._peers: dict[str, PeerExports] = {}
        self._services: dict[ServiceKey, _Exported] = {}

    def add_peer(self, peer: str) -> PeerExports:
        """Start keeping exports for ``peer``, filled from every service exported to it."""
        if peer in self._peers:
            raise ValueError(f"peer {peer!r} is already in the export book")
        exports = PeerExports(self._base_version, self._max_tombstones)
        self._peers[check_label(peer, "peer")] = exports
        for key, exported in self._services.items():
            if peer in exported.exported_to:
                exports.upsert(self._exported_service(key, exported))
        return exports

    def remove_peer(self, peer: str) -> None:
        """Forget ``peer`` (deleted)."""
        self._peers.pop(peer, None)

    def exports_to(self, peer: str) -> PeerExports:
        """The exports kept for ``peer``."""
        return self._peers[peer]

    def set_service(
        self,
        key: ServiceKey,
        *,
        healthy_endpoints: int,
        exported_to: Iterable[str],
        mirrored_from: str | None = None,
    ) -> frozenset[str]:
        """A local service appeared or changed; return the peers whose exports changed.

        ``exported_to`` is the export decision for this service (the ExportPolicy's
        ``peers_of(key.name)``). A service that is itself a mirror (``mirrored_from`` names
        its origin) is exported to nobody.
        """
        peers = frozenset(()) if mirrored_from is not None else frozenset(exported_to)
        previous = self._services.get(key)
        exported = _Exported(healthy_endpoints, peers, mirrored_from is not None)
        self._services[key] = exported
        changed: set[str] = set()
        service = self._exported_service(key, exported)
        for peer in peers:
            exports = self._peers.get(peer)
            if exports is not None and exports.upsert(service):
                changed.add(peer)
        if previous is not None:
            changed.update(self._withdraw(key, previous.exported_to - peers))
        return frozenset(changed)

    def apply_decision(self, exported_to: Callable[[ServiceKey], Iterable[str]]) -> frozenset[str]:
        """Re-decide every service (after an ExportPolicy reload; O(services), which a reload
        may cost); return the peers whose exports changed."""
        changed: set[str] = set()
        for key, exported in list(self._services.items()):
            peers = frozenset(exported_to(key)) if not exported.mirrored else frozenset()
            if peers != exported.exported_to:
                changed |= self.set_service(
                    key, healthy_endpoints=exported.healthy_endpoints, exported_to=peers
                )
        return frozenset(changed)

    def remove_service(self, key: ServiceKey) -> frozenset[str]:
        """A local service is gone; return the peers whose exports changed."""
        previous = self._services.pop(key, None)
        if previous is None:
            return frozenset()
        return self._withdraw(key, previous.exported_to)

    def _withdraw(self, key: ServiceKey, peers: Iterable[str]) -> frozenset[str]:
        changed = set()
        for peer in peers:
            exports = self._peers.get(peer)
            if exports is not None and exports.remove(key):
                changed.add(peer)
        return frozenset(changed)

    def _exported_service(self, key: ServiceKey, exported: _Exported) -> ExportedService:
        return ExportedService(
            key, sni_name(key, self._cluster, self._mesh), exported.healthy_endpoints
        )


# --- The session with one peer. ---


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """Timings of a peering session (seconds)."""

    heartbeat_interval: float = 1.0
    missed_heartbeats: int = 3
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    failing_after: int = 5
    delete_within: float = 5.0

    def __post_init__(self) -> None:
        if not self.heartbeat_interval > 0:
            raise ValueError("heartbeat_interval must be positive")
        if self.missed_heartbeats < 1 or self.failing_after < 1:
            raise ValueError("missed_heartbeats and failing_after must be at least 1")
        if not 0 < self.backoff_base <= self.backoff_cap:
            raise ValueError("backoff needs 0 < base <= cap")
        if not self.delete_within > 0:
            raise ValueError("delete_within must be positive")

    def backoff(self, failures: int, rng: random.Random) -> float:
        """Wait before reconnect number ``failures`` (>= 1): half to all of an exponential
        ceiling, so clusters that lost each other together do not redial in lockstep."""
        return jittered_backoff(failures, self.backoff_base, self.backoff_cap, rng)


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who a cluster is on the peering stream."""

    cluster: str
    mesh: str
    trust_domain: TrustDomain

    def __post_init__(self) -> None:
        check_label(self.cluster, "cluster")
        check_mesh(self.mesh)


# Events: what the shell tells the session. Every event carries ``now`` (seconds, epoch).


@dataclass(frozen=True, slots=True)
class Connected:
    """A stream to the peer is up (we dialed it, or it dialed us)."""

    now: float


@dataclass(frozen=True, slots=True)
class Opened:
    """The peer's Open arrived."""

    open: Open
    now: float


@dataclass(frozen=True, slots=True)
class ServicesSnapshotReceived:
    """The peer sent everything it exports to us."""

    snapshot: ServicesSnapshot
    now: float


@dataclass(frozen=True, slots=True)
class ServicesDeltaReceived:
    """The peer sent what changed in its exports to us."""

    delta: ServicesDelta
    now: float


@dataclass(frozen=True, slots=True)
class BundleReceived:
    """The peer published its trust bundle."""

    update: TrustBundleUpdate
    now: float


@dataclass(frozen=True, slots=True)
class HealthReceived:
    """The peer published health summaries of what it exports to us."""

    summaries: HealthSummaries
    now: float


@dataclass(frozen=True, slots=True)
class HeartbeatReceived:
    """The peer's heartbeat arrived."""

    heartbeat: Heartbeat
    now: float


@dataclass(frozen=True, slots=True)
class AckReceived:
    """The peer says what it has applied from us."""

    ack: Ack
    now: float


@dataclass(frozen=True, slots=True)
class ExportsChanged:
    """Our exports to this peer changed (see :meth:`ExportBook.set_service`)."""

    now: float


@dataclass(frozen=True, slots=True)
class ExportsReady:
    """Our export set is complete (every source read, the export decision applied): what
    was withheld until now may be sent."""

    now: float


@dataclass(frozen=True, slots=True)
class LocalBundleChanged:
    """Our own trust bundle changed (a root was added or retired)."""

    update: TrustBundleUpdate
    now: float


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: send heartbeats that are due, notice a silent peer."""

    now: float


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The stream ended (the peer closed it, it broke, or a dial attempt failed)."""

    now: float
    reason: str


@dataclass(frozen=True, slots=True)
class Deleted:
    """``snapbright peering delete``: withdraw the peer's mirrors and trust, and stop."""

    now: float


def received(message: PeeringMessage, now: float) -> Event:
    """The event a message from the peer stands for (a Close ends the stream)."""
    match message:
        case Open():
            return Opened(message, now)
        case ServicesSnapshot():
            return ServicesSnapshotReceived(message, now)
        case ServicesDelta():
            return ServicesDeltaReceived(message, now)
        case TrustBundleUpdate():
            return BundleReceived(message, now)
        case HealthSummaries():
            return HealthReceived(message, now)
        case Heartbeat():
            return HeartbeatReceived(message, now)
        case Ack():
            return AckReceived(message, now)
        case Close(reason):
            return Disconnected(now, f"peer closed the stream: {reason}")


Event = (
    Connected
    | Opened
    | ServicesSnapshotReceived
    | ServicesDeltaReceived
    | BundleReceived
    | HealthReceived
    | HeartbeatReceived
    | AckReceived
    | ExportsChanged
    | ExportsReady
    | LocalBundleChanged
    | Tick
    | Disconnected
    | Deleted
)
"""Anything the shell can tell a session."""


# Effects: what the session asks the shell to do, in order.


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message`` on the stream."""

    message: PeeringMessage


@dataclass(frozen=True, slots=True)
class ApplyImports:
    """The peer's exports to us changed: upsert and remove these imports (at ``version``)."""

    peer: str
    upserted: tuple[ExportedService, ...]
    removed: tuple[ServiceKey, ...]
    version: int


@dataclass(frozen=True, slots=True)
class ApplyHealth:
    """Health summaries for services we import from the peer."""

    peer: str
    services: tuple[ServiceHealth, ...]
    at_unix_ms: int


@dataclass(frozen=True, slots=True)
class ApplyTrustBundle:
    """Trust the peer's new bundle (for the peer's trust domain only)."""

    peer: str
    update: TrustBundleUpdate


@dataclass(frozen=True, slots=True)
class MarkStale:
    """The peer is unreachable since ``since``: keep its imports, marked stale."""

    peer: str
    since: float


@dataclass(frozen=True, slots=True)
class MarkFresh:
    """The peer is reachable again: its imports are current."""

    peer: str


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Dial the peer again after ``after`` seconds."""

    after: float


@dataclass(frozen=True, slots=True)
class CloseStream:
    """End the current stream."""

    reason: str


@dataclass(frozen=True, slots=True)
class Withdraw:
    """The peering is deleted: by ``deadline``, remove every mirror of ``peer``, stop trusting
    ``trust_domain`` and close connections from it."""

    peer: str
    trust_domain: TrustDomain
    deadline: float


Effect = (
    Send
    | ApplyImports
    | ApplyHealth
    | ApplyTrustBundle
    | MarkStale
    | MarkFresh
    | Reconnect
    | CloseStream
    | Withdraw
)
"""Anything a session can ask of the shell."""


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """One line of ``snapbright peering list``."""

    peer: str
    state: PeerState
    last_heard_at: float | None
    rtt_seconds: float | None
    imported: int
    exported: int
    stale_since: float | None


_CONNECTED = (PeerState.ESTABLISHING, PeerState.ACTIVE)
_ECHO_WINDOW = 16
"""Our heartbeats still awaiting an echo, at most (older ones no longer count for RTT)."""
_MESSAGE_EVENTS = (
    Opened,
    ServicesSnapshotReceived,
    ServicesDeltaReceived,
    BundleReceived,
    HealthReceived,
    HeartbeatReceived,
    AckReceived,
)


class PeeringSession:
    """The state machine of one peering, from either side.

    The dialing side (``dialer=True``) reconnects after a jittered backoff; the accepting
    side waits to be dialed again. ``establish_secret`` (dialer only) is the token's secret,
    sent in every Open until the shell clears it: the shell keeps it until the accepting
    side has acknowledged our trust bundle, so a dial after the acceptor lost the stream (or
    crashed) before storing our bundle can present the token again; the accepting shell
    redeems it (``model.redeem``) before it creates a session for a new peer.

    ``imports`` and ``imported_version`` restore what a previous run of the control plane
    held from the peer (as persisted by the shell), so the first Open after a restart asks
    for a delta from there instead of a full snapshot.

    ``exports_ready=False`` withholds our exports (rule 6) until :class:`ExportsReady`.

    ``local_gateways`` are our east-west gateway addresses as this peer reaches them; both
    sides name them in their Open, so the other side routes to what we export there (the
    accepting side's are in its token too; naming them again lets them change later).
    """

    def __init__(
        self,
        *,
        local: PeerIdentity,
        peer: PeerIdentity,
        exports: PeerExports,
        local_bundle: TrustBundleUpdate | None,
        dialer: bool,
        rng: random.Random,
        settings: SessionSettings | None = None,
        establish_secret: bytes = b"",
        imports: Iterable[ExportedService] = (),
        imported_version: int = 0,
        local_gateways: tuple[GatewayAddress, ...] = (),
        exports_ready: bool = True,
    ) -> None:
        restored = {service.key: service for service in imports}
        if imported_version < 0 or (restored and imported_version == 0):
            raise ValueError("restored imports need the positive version they were held at")
        self._local = local
        self._peer = peer
        self._exports = exports
        self._local_bundle = local_bundle
        self._dialer = dialer
        self._rng = rng
        self._settings = settings or SessionSettings()
        self.establish_secret = establish_secret
        """Sent in the next Open (dialer only); the shell clears it once the establish is done."""
        self._state = PeerState.PENDING
        self._imports: dict[ServiceKey, ExportedService] = restored
        self._imported_version = imported_version
        self._peer_bundle_sequence: int | None = None
        self._sent_version: int | None = None
        self._failures = 0
        self._last_heard: float | None = None
        self._next_heartbeat = 0.0
        self._heartbeat_sequence = 0
        self._sent_heartbeats: dict[int, float] = {}
        self._rtt: float | None = None
        self._stale_since: float | None = None
        self.local_gateways = local_gateways
        """Sent in the next Open; the shell may change it at any time."""
        self._exports_ready = exports_ready

    @property
    def state(self) -> PeerState:
        """Where the peering stands now."""
        return self._state

    @property
    def imports(self) -> dict[ServiceKey, ExportedService]:
        """A copy of what the peer exports to us (kept while it is unreachable)."""
        return dict(self._imports)

    @property
    def imported_version(self) -> int:
        """The version of the peer's exports that we hold."""
        return self._imported_version

    def status(self) -> PeerStatus:
        """What ``snapbright peering list`` shows for this peer."""
        return PeerStatus(
            peer=self._peer.cluster,
            state=self._state,
            last_heard_at=self._last_heard,
            rtt_seconds=self._rtt,
            imported=len(self._imports),
            exported=len(self._exports),
            stale_since=self._stale_since,
        )

    def handle(self, event: Event) -> list[Effect]:
        """Apply ``event``; return the effects for the shell to carry out, in order."""
        if self._state is PeerState.DELETED:
            # A stream that shows up after delete is closed; everything else is moot.
            return [CloseStream("peering deleted")] if isinstance(event, Connected) else []
        if isinstance(event, _MESSAGE_EVENTS) and self._state not in _CONNECTED:
            # Left over from a stream that is already gone: not the peer's fault, not news.
            return []
        match event:
            case Connected(now):
                return self._connected(now)
            case Opened(open_, now):
                return self._opened(open_, now)
            case ServicesSnapshotReceived(snapshot, now):
                return self._snapshot(snapshot, now)
            case ServicesDeltaReceived(delta, now):
                return self._delta(delta, now)
            case BundleReceived(update, now):
                return self._bundle(update, now)
            case HealthReceived(summaries, now):
                return self._health(summaries, now)
            case HeartbeatReceived(heartbeat, now):
                return self._heartbeat(heartbeat, now)
            case AckReceived(_, now):
                # What the peer applied is told again in its Open after a reconnect, which is
                # when it matters; here an ack only proves the peer alive.
                if self._state is PeerState.ACTIVE:
                    self._last_heard = now
                return []
            case ExportsChanged(_):
                return self._send_exports() if self._state is PeerState.ACTIVE else []
            case ExportsReady(_):
                self._exports_ready = True
                return self._send_exports() if self._state is PeerState.ACTIVE else []
            case LocalBundleChanged(update, _):
                self._local_bundle = update
                return [Send(update)] if self._state is PeerState.ACTIVE else []
            case Tick(now):
                return self._tick(now)
            case Disconnected(now, reason):
                return self._lost(now, reason, close=False)
            case Deleted(now):
                return self._deleted(now)
        raise TypeError(f"not a peering event: {event!r}")

    # -- transitions --

    def _connected(self, now: float) -> list[Effect]:
        self._state = PeerState.ESTABLISHING
        self._last_heard = now
        self._sent_version = None
        self._sent_heartbeats.clear()
        return [
            Send(
                Open(
                    cluster=self._local.cluster,
                    mesh=self._local.mesh,
                    trust_domain=self._local.trust_domain,
                    establish_secret=self.establish_secret if self._dialer else b"",
                    services_version_seen=self._imported_version,
                    bundle_sequence_seen=self._peer_bundle_sequence or 0,
                    gateways=self.local_gateways,
                )
            )
        ]

    def _opened(self, open_: Open, now: float) -> list[Effect]:
        if self._state is not PeerState.ESTABLISHING:
            return self._refuse(now, f"unexpected Open while {self._state.value}")
        claimed = PeerIdentity(open_.cluster, open_.mesh, open_.trust_domain)
        if claimed != self._peer:
            return self._refuse(
                now,
                f"peer opened as {claimed.cluster}/{claimed.mesh} ({claimed.trust_domain}), "
                f"expected {self._peer.cluster}/{self._peer.mesh} ({self._peer.trust_domain})",
            )
        self._state = PeerState.ACTIVE
        self._last_heard = now
        self._failures = 0
        self._sent_version = open_.services_version_seen
        effects: list[Effect] = []
        if self._stale_since is not None:
            self._stale_since = None
            effects.append(MarkFresh(self._peer.cluster))
        effects.extend(self._send_exports())
        bundle = self._local_bundle
        seen = open_.bundle_sequence_seen
        # Sequence 0 on the wire also means "none yet", so a bundle at 0 is sent then too.
        if bundle is not None and (seen == 0 or seen < bundle.sequence):
            effects.append(Send(bundle))
        effects.extend(self._send_heartbeat(now))
        return effects

    def _snapshot(self, snapshot: ServicesSnapshot, now: float) -> list[Effect]:
        if self._state is not PeerState.ACTIVE:
            return self._refuse(now, f"services snapshot while {self._state.value}")
        bad = self._foreign_sni(snapshot.services)
        if bad is not None:
            return self._refuse(now, bad)
        self._last_heard = now
        incoming = {service.key: service for service in snapshot.services}
        removed = tuple(key for key in self._imports if key not in incoming)
        upserted = tuple(s for s in snapshot.services if self._imports.get(s.key) != s)
        self._imports = incoming
        self._imported_version = snapshot.version
        return [*self._applied(upserted, removed), self._ack()]

    def _delta(self, delta: ServicesDelta, now: float) -> list[Effect]:
        if self._state is not PeerState.ACTIVE:
            return self._refuse(now, f"services delta while {self._state.value}")
        if delta.from_version != self._imported_version:
            return self._refuse(
                now,
                f"delta from version {delta.from_version}, but we hold "
                f"{self._imported_version}: resync",
            )
        bad = self._foreign_sni(delta.upserted)
        if bad is not None:
            return self._refuse(now, bad)
        self._last_heard = now
        upserted = tuple(s for s in delta.upserted if self._imports.get(s.key) != s)
        removed = tuple(key for key in delta.removed if key in self._imports)
        for service in upserted:
            self._imports[service.key] = service
        for key in removed:
            del self._imports[key]
        self._imported_version = delta.version
        return [*self._applied(upserted, removed), self._ack()]

    def _bundle(self, update: TrustBundleUpdate, now: float) -> list[Effect]:
        if self._state is not PeerState.ACTIVE:
            return self._refuse(now, f"trust bundle while {self._state.value}")
        if update.trust_domain != self._peer.trust_domain:
            return self._refuse(
                now, f"peer published a bundle for {update.trust_domain}, not its own domain"
            )
        self._last_heard = now
        known = self._peer_bundle_sequence
        if known is not None and update.sequence <= known:
            return []
        self._peer_bundle_sequence = update.sequence
        return [ApplyTrustBundle(self._peer.cluster, update), self._ack()]

    def _health(self, summaries: HealthSummaries, now: float) -> list[Effect]:
        if self._state is not PeerState.ACTIVE:
            return []
        self._last_heard = now
        # Health of a service we do not import is not ours to hear about.
        known = tuple(s for s in summaries.services if s.key in self._imports)
        if not known:
            return []
        return [ApplyHealth(self._peer.cluster, known, summaries.at_unix_ms)]

    def _heartbeat(self, heartbeat: Heartbeat, now: float) -> list[Effect]:
        if self._state is not PeerState.ACTIVE:
            return []
        self._last_heard = now
        sent_at = self._sent_heartbeats.pop(heartbeat.echo_sequence, None)
        if sent_at is not None and now >= sent_at:
            self._rtt = now - sent_at
        if heartbeat.sequence == 0:
            return []  # an echo (rule 5): answering it would ping-pong forever
        # Answered at once (rule 5), so the peer measures the channel, not our interval.
        return [
            Send(
                Heartbeat(
                    sequence=0,
                    sent_unix_ms=round(now * 1000),
                    echo_sequence=heartbeat.sequence,
                    echo_sent_unix_ms=heartbeat.sent_unix_ms,
                )
            )
        ]

    def _tick(self, now: float) -> list[Effect]:
        settings = self._settings
        if self._state in _CONNECTED:
            silent_for = now - (self._last_heard if self._last_heard is not None else now)
            if silent_for > settings.heartbeat_interval * settings.missed_heartbeats:
                return self._lost(now, f"nothing heard for {silent_for:.1f} s", close=True)
        if self._state is PeerState.ACTIVE and now >= self._next_heartbeat:
            return self._send_heartbeat(now)
        return []

    def _lost(self, now: float, reason: str, *, close: bool) -> list[Effect]:
        effects: list[Effect] = []
        was_connected = self._state in _CONNECTED
        if close and was_connected:
            effects.append(CloseStream(reason))
        if self._state is PeerState.ACTIVE:
            self._failures = 0
        self._failures += 1
        self._state = (
            PeerState.FAILING
            if self._failures >= self._settings.failing_after
            else PeerState.DISCONNECTED
        )
        if self._stale_since is None and (self._imports or was_connected):
            self._stale_since = now
            effects.append(MarkStale(self._peer.cluster, now))
        if self._dialer:
            effects.append(Reconnect(self._settings.backoff(self._failures, self._rng)))
        return effects

    def _refuse(self, now: float, reason: str) -> list[Effect]:
        """The peer broke the protocol: tell it why, end the stream, and go on as if lost."""
        return [Send(Close(reason)), *self._lost(now, reason, close=True)]

    def _deleted(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        if self._state in _CONNECTED:
            effects += [Send(Close("peering deleted")), CloseStream("peering deleted")]
        self._state = PeerState.DELETED
        self._imports.clear()
        effects.append(
            Withdraw(
                self._peer.cluster,
                self._peer.trust_domain,
                now + self._settings.delete_within,
            )
        )
        return effects

    # -- helpers --

    def _send_exports(self) -> list[Effect]:
        if not self._exports_ready:
            return []  # rule 6: the peer keeps what it holds until ours are complete
        seen = self._sent_version if self._sent_version is not None else 0
        update = self._exports.update_since(seen)
        self._sent_version = self._exports.version
        return [] if update is None else [Send(update)]

    def _send_heartbeat(self, now: float) -> list[Effect]:
        self._heartbeat_sequence += 1
        self._sent_heartbeats[self._heartbeat_sequence] = now
        # A heartbeat the peer never echoed is forgotten after a while (kept bounded).
        self._sent_heartbeats.pop(self._heartbeat_sequence - _ECHO_WINDOW, None)
        self._next_heartbeat = now + self._settings.heartbeat_interval
        return [Send(Heartbeat(sequence=self._heartbeat_sequence, sent_unix_ms=round(now * 1000)))]

    def _applied(
        self, upserted: tuple[ExportedService, ...], removed: tuple[ServiceKey, ...]
    ) -> list[Effect]:
        if not upserted and not removed:
            return []
        return [ApplyImports(self._peer.cluster, upserted, removed, self._imported_version)]

    def _ack(self) -> Send:
        return Send(Ack(self._imported_version, self._peer_bundle_sequence or 0))

    def _foreign_sni(self, services: Iterable[ExportedService]) -> str | None:
        peer = self._peer
        for service in services:
            expected = sni_name(service.key, peer.cluster, peer.mesh)
            if service.sni != expected:
                return f"service {service.key} has SNI {service.sni!r}, expected {expected!r}"
        return None
