"""The peering session state machine, driven in virtual time by two real sessions talking."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.peering.core import (
    ApplyHealth,
    ApplyImports,
    ApplyTrustBundle,
    BundleReceived,
    CloseStream,
    Connected,
    Deleted,
    Disconnected,
    Effect,
    Event,
    ExportBook,
    ExportsChanged,
    ExportsReady,
    HealthReceived,
    HeartbeatReceived,
    LocalBundleChanged,
    MarkFresh,
    MarkStale,
    Opened,
    PeerIdentity,
    PeeringSession,
    Reconnect,
    Send,
    ServicesDeltaReceived,
    ServicesSnapshotReceived,
    SessionSettings,
    Tick,
    Withdraw,
    received,
)
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
)
from proxy.identity.model import TrustDomain

T0 = 1_800_000_000.0
US = PeerIdentity("us-west", "acme", TrustDomain("us-west.acme"))
AP = PeerIdentity("ap-southeast", "acme", TrustDomain("ap-southeast.acme"))
PAY, CART = ServiceKey("shop", "pay"), ServiceKey("shop", "cart")
GW = GatewayAddress("192.0.2.10", 15443)
SETTINGS = SessionSettings(heartbeat_interval=1.0, missed_heartbeats=3, failing_after=3)


def bundle(domain: PeerIdentity, sequence: int) -> TrustBundleUpdate:
    return TrustBundleUpdate(domain.trust_domain, sequence, b'{"keys": []}')


def ap_service(key: ServiceKey, healthy: int = 1) -> ExportedService:
    return ExportedService(key, f"{key.name}.{key.namespace}.ap-southeast.acme", healthy)


@dataclass
class Side:
    """One cluster's end of the peering: its session, its export book, what it was told."""

    session: PeeringSession
    book: ExportBook
    effects: list[Effect] = field(default_factory=list)

    def sent(self) -> list[PeeringMessage]:
        return [e.message for e in self.effects if isinstance(e, Send)]

    def local(self) -> list[Effect]:
        return [e for e in self.effects if not isinstance(e, Send)]


class Link:
    """Two sessions and a stream between them; delivers every sent message, in order."""

    def __init__(self, *, tombstones: int = 4096, secret: bytes = b"s" * 32, seed: int = 7) -> None:
        self.us = self._side(US, AP, dialer=True, tombstones=tombstones, secret=secret, seed=seed)
        self.ap = self._side(AP, US, dialer=False, tombstones=tombstones, secret=b"", seed=seed)
        self.up = False
        self.wire: deque[tuple[Side, PeeringMessage]] = deque()

    @staticmethod
    def _side(
        local: PeerIdentity,
        peer: PeerIdentity,
        *,
        dialer: bool,
        tombstones: int,
        secret: bytes,
        seed: int,
    ) -> Side:
        book = ExportBook(
            cluster=local.cluster, mesh=local.mesh, base_version=1000, max_tombstones=tombstones
        )
        session = PeeringSession(
            local=local,
            peer=peer,
            exports=book.add_peer(peer.cluster),
            local_bundle=bundle(local, 1),
            dialer=dialer,
            rng=random.Random(seed),
            settings=SETTINGS,
            establish_secret=secret,
        )
        return Side(session, book)

    def connect(self, now: float) -> None:
        """Both ends see the stream up, then each one's Open reaches the other."""
        self.up = True
        for side in (self.us, self.ap):
            self.handle(side, Connected(now), now)
        self.pump(now)

    def feed(self, side: Side, event: Event, now: float) -> list[Effect]:
        """Give ``side`` an event, and deliver what it sends while the stream is up."""
        effects = self.handle(side, event, now)
        self.pump(now)
        return effects

    def handle(self, side: Side, event: Event, now: float) -> list[Effect]:
        effects = side.session.handle(event)
        side.effects.extend(effects)
        other = self.ap if side is self.us else self.us
        for effect in effects:
            if isinstance(effect, CloseStream):
                self.up = False
            if isinstance(effect, Send) and self.up:
                self.wire.append((other, effect.message))
        return effects

    def pump(self, now: float) -> None:
        """Deliver queued messages in order (a stream is FIFO in each direction)."""
        while self.wire and self.up:
            side, message = self.wire.popleft()
            self.handle(side, received(message, now), now)
        self.wire.clear()

    def drop(self, now: float) -> None:
        self.up = False
        for side in (self.us, self.ap):
            self.feed(side, Disconnected(now, "stream reset"), now)

    def clear(self) -> None:
        self.us.effects.clear()
        self.ap.effects.clear()


def export(side: Side, key: ServiceKey, healthy: int = 1) -> None:
    side.book.set_service(key, healthy_endpoints=healthy, exported_to={"us-west", "ap-southeast"})


def imports_of(side: Side) -> list[ApplyImports]:
    return [e for e in side.effects if isinstance(e, ApplyImports)]


def test_both_sides_become_active_after_exchanging_opens() -> None:
    link = Link()
    link.connect(T0)
    assert link.us.session.state is PeerState.ACTIVE
    assert link.ap.session.state is PeerState.ACTIVE


def test_a_session_waits_in_establishing_until_the_peers_open_arrives() -> None:
    link = Link()
    effects = link.us.session.handle(Connected(T0))
    assert link.us.session.state is PeerState.ESTABLISHING
    assert [type(e) for e in effects] == [Send]


@pytest.mark.parametrize("dialer", [True, False], ids=["dialer", "acceptor"])
def test_each_side_names_its_gateways_for_this_peer_in_its_open(dialer: bool) -> None:
    session = PeeringSession(
        local=US,
        peer=AP,
        exports=ExportBook(cluster="us-west", mesh="acme").add_peer("ap-southeast"),
        local_bundle=None,
        dialer=dialer,
        rng=random.Random(1),
        local_gateways=(GatewayAddress("127.0.0.1", 1),),
    )
    session.local_gateways = (GW,)  # the shell learned its port after creating the session
    (send,) = session.handle(Connected(T0))
    assert isinstance(send, Send)
    assert isinstance(send.message, Open)
    assert send.message.gateways == (GW,)


def test_the_establish_secret_is_sent_in_every_open_until_the_shell_clears_it() -> None:
    link = Link(secret=b"k" * 32)
    link.connect(T0)
    link.drop(T0 + 1)
    link.connect(T0 + 2)  # ACTIVE before: still sent (the acceptor may not hold our bundle)
    link.drop(T0 + 3)
    link.us.session.establish_secret = b""  # the acceptor acked our bundle
    link.connect(T0 + 4)
    opens = [m for m in link.us.sent() if isinstance(m, Open)]
    assert [o.establish_secret for o in opens] == [b"k" * 32, b"k" * 32, b""]
    assert all(o.establish_secret == b"" for o in link.ap.sent() if isinstance(o, Open))


def test_the_first_connection_sends_a_snapshot_that_the_peer_imports() -> None:
    link = Link()
    export(link.ap, PAY, healthy=2)
    export(link.ap, CART)
    link.connect(T0)
    snapshots = [m for m in link.ap.sent() if isinstance(m, ServicesSnapshot)]
    assert len(snapshots) == 1
    assert link.us.session.imports == {PAY: ap_service(PAY, 2), CART: ap_service(CART)}
    assert Send(Ack(snapshots[0].version, 1)) in link.us.effects


def test_a_change_after_the_snapshot_is_sent_as_a_delta_of_that_change_only() -> None:
    link = Link()
    export(link.ap, PAY)
    export(link.ap, CART)
    link.connect(T0)
    link.clear()
    export(link.ap, PAY, healthy=4)
    link.feed(link.ap, ExportsChanged(T0 + 1), T0 + 1)
    [delta] = [m for m in link.ap.sent() if isinstance(m, ServicesDelta)]
    assert (delta.upserted, delta.removed) == ((ap_service(PAY, 4),), ())
    [applied] = imports_of(link.us)
    assert applied.upserted == (ap_service(PAY, 4),)
    assert link.us.session.imports[PAY].healthy_endpoints == 4


def test_a_resync_after_reconnect_sends_only_what_changed_while_apart() -> None:
    link = Link()
    for index in range(50):
        export(link.ap, ServiceKey("shop", f"s{index}"))
    link.connect(T0)
    link.drop(T0 + 1)
    export(link.ap, ServiceKey("shop", "s3"), healthy=0)
    link.ap.book.remove_service(ServiceKey("shop", "s4"))
    link.clear()
    link.connect(T0 + 2)
    assert not [m for m in link.ap.sent() if isinstance(m, ServicesSnapshot)]
    [delta] = [m for m in link.ap.sent() if isinstance(m, ServicesDelta)]
    assert [s.key.name for s in delta.upserted] == ["s3"]
    assert delta.removed == (ServiceKey("shop", "s4"),)
    assert len(link.us.session.imports) == 49


def test_a_resync_sends_a_full_snapshot_when_the_changes_are_no_longer_known() -> None:
    link = Link(tombstones=1)
    for index in range(5):
        export(link.ap, ServiceKey("shop", f"s{index}"))
    link.connect(T0)
    link.drop(T0 + 1)
    for index in range(3):
        link.ap.book.remove_service(ServiceKey("shop", f"s{index}"))
    link.clear()
    link.connect(T0 + 2)
    assert [type(m) for m in link.ap.sent() if isinstance(m, ServicesSnapshot | ServicesDelta)] == [
        ServicesSnapshot
    ]
    assert set(link.us.session.imports) == {ServiceKey("shop", "s3"), ServiceKey("shop", "s4")}
    [applied] = imports_of(link.us)
    assert len(applied.removed) == 3


def test_a_reconnect_with_nothing_changed_sends_no_services_at_all() -> None:
    link = Link()
    export(link.ap, PAY)
    link.connect(T0)
    link.drop(T0 + 1)
    link.clear()
    link.connect(T0 + 2)
    assert not [m for m in link.ap.sent() if isinstance(m, ServicesSnapshot | ServicesDelta)]
    assert link.us.session.imports == {PAY: ap_service(PAY)}


def test_a_delta_that_does_not_start_at_our_version_ends_the_stream_for_a_resync() -> None:
    link = Link()
    link.connect(T0)
    version = link.us.session.imported_version
    delta = ServicesDelta(version + 5, version + 6, (ap_service(PAY),), ())
    effects = link.us.session.handle(ServicesDeltaReceived(delta, T0 + 1))
    assert isinstance(effects[0], Send)
    assert isinstance(effects[0].message, Close)
    assert "resync" in effects[0].message.reason
    assert any(isinstance(e, CloseStream) for e in effects)
    assert any(isinstance(e, Reconnect) for e in effects)
    assert PAY not in link.us.session.imports


@pytest.mark.parametrize(
    ("claimed", "why"),
    [
        (PeerIdentity("eu-central", "acme", TrustDomain("eu-central.acme")), "another cluster"),
        (PeerIdentity("ap-southeast", "other", TrustDomain("ap-southeast.other")), "another mesh"),
        (PeerIdentity("ap-southeast", "acme", TrustDomain("us-west.acme")), "our trust domain"),
    ],
)
def test_a_peer_that_opens_as_someone_else_is_refused(claimed: PeerIdentity, why: str) -> None:
    link = Link()
    link.us.session.handle(Connected(T0))
    open_ = Open(claimed.cluster, claimed.mesh, claimed.trust_domain)
    effects = link.us.session.handle(Opened(open_, T0))
    assert link.us.session.state is not PeerState.ACTIVE, why
    assert any(isinstance(e, CloseStream) for e in effects), why


def test_a_service_with_another_clusters_sni_is_refused_whole() -> None:
    link = Link()
    link.connect(T0)
    forged = ExportedService(PAY, "pay.shop.us-west.acme", 3)
    snapshot = ServicesSnapshot(2000, (ap_service(CART), forged))
    effects = link.us.session.handle(ServicesSnapshotReceived(snapshot, T0 + 1))
    assert any(isinstance(e, CloseStream) and "SNI" in e.reason for e in effects)
    assert link.us.session.imports == {}


def test_services_before_the_peers_open_are_refused() -> None:
    link = Link()
    link.us.session.handle(Connected(T0))
    snapshot = ServicesSnapshot(2000, (ap_service(PAY),))
    effects = link.us.session.handle(ServicesSnapshotReceived(snapshot, T0))
    assert any(isinstance(e, CloseStream) for e in effects)
    assert link.us.session.imports == {}


def test_each_side_sends_its_bundle_on_first_open() -> None:
    link = Link()
    link.connect(T0)
    assert ApplyTrustBundle("ap-southeast", bundle(AP, 1)) in link.us.effects
    assert ApplyTrustBundle("us-west", bundle(US, 1)) in link.ap.effects


@pytest.mark.parametrize(
    ("sequences", "applied"),
    [
        ((2, 3), [2, 3]),
        ((3, 2), [3]),
        ((2, 2), [2]),
        ((1,), []),  # the sequence we already hold from the Open exchange
    ],
)
def test_a_bundle_is_applied_only_when_its_sequence_is_higher(
    sequences: tuple[int, ...], applied: list[int]
) -> None:
    link = Link()
    link.connect(T0)  # holds the peer's bundle at sequence 1 from here
    got: list[int] = []
    for sequence in sequences:
        effects = link.us.session.handle(BundleReceived(bundle(AP, sequence), T0 + 1))
        got.extend(e.update.sequence for e in effects if isinstance(e, ApplyTrustBundle))
    assert got == applied


def test_a_bundle_for_another_trust_domain_is_refused() -> None:
    link = Link()
    link.connect(T0)
    effects = link.us.session.handle(BundleReceived(bundle(US, 9), T0 + 1))
    assert not any(isinstance(e, ApplyTrustBundle) for e in effects)
    assert any(isinstance(e, CloseStream) for e in effects)


def test_a_new_local_bundle_is_sent_to_an_active_peer_and_after_a_reconnect_only_if_newer() -> None:
    link = Link()
    link.connect(T0)
    link.feed(link.ap, LocalBundleChanged(bundle(AP, 2), T0 + 1), T0 + 1)
    assert ApplyTrustBundle("ap-southeast", bundle(AP, 2)) in link.us.effects
    link.drop(T0 + 2)
    link.clear()
    link.connect(T0 + 3)
    assert not [m for m in link.ap.sent() if isinstance(m, TrustBundleUpdate)]


def test_heartbeats_go_out_every_interval_while_active() -> None:
    link = Link()
    link.connect(T0)
    link.clear()
    for step in range(1, 41):
        now = T0 + step * 0.25
        link.feed(link.us, Tick(now), now)
        link.feed(link.ap, Tick(now), now)
    assert link.us.session.state is PeerState.ACTIVE
    beats = [m for m in link.us.sent() if isinstance(m, Heartbeat) and m.sequence > 0]
    assert len(beats) == 10
    assert [b.sequence for b in beats] == list(range(2, 12))


def test_a_heartbeat_is_answered_at_once_by_an_echo_which_is_not_answered() -> None:
    link = Link()
    link.connect(T0)
    link.up = False  # deliver by hand
    beat = Heartbeat(sequence=7, sent_unix_ms=123)
    effects = link.ap.session.handle(HeartbeatReceived(beat, T0 + 0.5))
    assert effects == [Send(Heartbeat(0, round((T0 + 0.5) * 1000), 7, 123))]
    echo = Heartbeat(sequence=0, sent_unix_ms=1, echo_sequence=99)
    assert link.ap.session.handle(HeartbeatReceived(echo, T0 + 0.6)) == []


def test_the_rtt_is_the_round_trip_to_the_echo_not_the_peers_heartbeat_interval() -> None:
    link = Link()
    link.connect(T0)
    link.up = False  # deliver by hand, 4 ms each way; the peer's own heartbeat is 1 s away
    (send,) = link.us.session.handle(Tick(T0 + 1.0))
    assert isinstance(send, Send)
    (echo,) = link.ap.session.handle(received(send.message, T0 + 1.004))
    assert isinstance(echo, Send)
    assert link.us.session.handle(received(echo.message, T0 + 1.008)) == []
    assert link.us.session.status().rtt_seconds == pytest.approx(0.008, abs=1e-6)


def test_an_echo_of_a_heartbeat_long_forgotten_does_not_count_for_rtt() -> None:
    link = Link()
    link.connect(T0)
    link.up = False
    first = link.us.session.handle(Tick(T0 + 1.0))[0]
    assert isinstance(first, Send)
    assert isinstance(first.message, Heartbeat)
    for step in range(2, 40):  # the peer hears nothing, and we keep sending
        link.us.session.handle(HeartbeatReceived(Heartbeat(0, 0), T0 + step * 0.5))
        link.us.session.handle(Tick(T0 + step * 0.5))
    late = Heartbeat(sequence=0, sent_unix_ms=0, echo_sequence=first.message.sequence)
    link.us.session.handle(HeartbeatReceived(late, T0 + 20.0))
    assert link.us.session.status().rtt_seconds == pytest.approx(0.0)  # from the Open's echo


def restarted_ap(*, exports_ready: bool) -> Side:
    """ap-southeast after a restart: export versions from a new base, its catalog not yet
    read into the book."""
    book = ExportBook(cluster=AP.cluster, mesh=AP.mesh, base_version=5000)
    session = PeeringSession(
        local=AP,
        peer=US,
        exports=book.add_peer(US.cluster),
        local_bundle=bundle(AP, 1),
        dialer=False,
        rng=random.Random(3),
        settings=SETTINGS,
        exports_ready=exports_ready,
    )
    return Side(session, book)


def test_a_restarted_peer_still_loading_withholds_its_exports_and_ours_stay() -> None:
    link = Link()
    export(link.ap, PAY)
    link.connect(T0)
    link.drop(T0 + 1)
    link.ap = restarted_ap(exports_ready=False)
    link.clear()
    link.connect(T0 + 2)
    export(link.ap, PAY)  # the catalog arrives, the export decision not yet in force
    link.feed(link.ap, ExportsChanged(T0 + 2.1), T0 + 2.1)
    assert link.us.session.state is PeerState.ACTIVE
    assert not [m for m in link.ap.sent() if isinstance(m, ServicesSnapshot | ServicesDelta)]
    assert set(link.us.session.imports) == {PAY}

    link.feed(link.ap, ExportsReady(T0 + 2.5), T0 + 2.5)
    (snapshot,) = [m for m in link.ap.sent() if isinstance(m, ServicesSnapshot)]
    assert [s.key for s in snapshot.services] == [PAY]
    assert all(not e.removed for e in imports_of(link.us))  # never withdrawn meanwhile
    assert set(link.us.session.imports) == {PAY}


def test_a_restarted_peer_whose_exports_are_ready_sends_them_even_when_empty() -> None:
    link = Link()
    export(link.ap, PAY)
    link.connect(T0)
    link.drop(T0 + 1)
    link.ap = restarted_ap(exports_ready=True)
    link.clear()
    link.connect(T0 + 2)
    # Ready and empty means nothing is exported any more: the mirrors go.
    assert link.us.session.imports == {}


def test_exports_ready_before_the_stream_is_up_sends_nothing_until_the_open() -> None:
    side = restarted_ap(exports_ready=False)
    assert side.session.handle(ExportsReady(T0)) == []
    export(side, PAY)
    side.session.handle(Connected(T0 + 1))
    effects = side.session.handle(Opened(Open(US.cluster, US.mesh, US.trust_domain), T0 + 1))
    sent = [e.message for e in effects if isinstance(e, Send)]
    assert isinstance(sent[0], ServicesSnapshot)
    assert [s.key for s in sent[0].services] == [PAY]


def test_a_silent_peer_is_disconnected_after_the_missed_heartbeats_and_marked_stale() -> None:
    link = Link()
    export(link.ap, PAY)
    link.connect(T0)
    link.up = False  # the network eats everything from now on, with no reset
    link.clear()
    effects = link.us.session.handle(Tick(T0 + 3.0))
    assert link.us.session.state is PeerState.ACTIVE
    effects = link.us.session.handle(Tick(T0 + 3.01))
    assert link.us.session.status().state is PeerState.DISCONNECTED
    assert CloseStream in [type(e) for e in effects]
    assert MarkStale("ap-southeast", T0 + 3.01) in effects
    assert link.us.session.imports == {PAY: ap_service(PAY)}  # kept while stale


def test_the_dialer_reconnects_after_a_jittered_backoff_that_grows() -> None:
    link = Link()
    link.connect(T0)
    delays = []
    for attempt in range(6):
        effects = link.us.session.handle(Disconnected(T0 + attempt, "refused"))
        [reconnect] = [e for e in effects if isinstance(e, Reconnect)]
        delays.append(reconnect.after)
    for index, delay in enumerate(delays):
        ceiling = min(SETTINGS.backoff_cap, SETTINGS.backoff_base * 2**index)
        assert ceiling / 2 <= delay <= ceiling
    assert delays[5] > delays[0]


def test_the_jitter_comes_from_the_rng_given() -> None:
    def first_delay(seed: int) -> float:
        session = Link(seed=seed).us.session
        [reconnect] = [e for e in session.handle(Disconnected(T0, "x")) if isinstance(e, Reconnect)]
        return reconnect.after

    assert first_delay(1) == first_delay(1)
    assert first_delay(1) != first_delay(2)


def test_repeated_failures_make_the_peering_failing_until_it_is_active_again() -> None:
    link = Link()
    link.connect(T0)
    link.drop(T0 + 1)
    for attempt in range(2):
        link.us.session.handle(Disconnected(T0 + 2 + attempt, "connection refused"))
    assert link.us.session.state is PeerState.FAILING
    link.connect(T0 + 10)
    assert link.us.session.status().state is PeerState.ACTIVE
    [fresh] = [e for e in link.us.effects if isinstance(e, MarkFresh)]
    assert fresh.peer == "ap-southeast"


def test_the_accepting_side_waits_to_be_dialed_again() -> None:
    link = Link()
    link.connect(T0)
    effects = link.ap.session.handle(Disconnected(T0 + 1, "stream reset"))
    assert not any(isinstance(e, Reconnect) for e in effects)
    assert link.ap.session.state is PeerState.DISCONNECTED


def test_delete_withdraws_mirrors_and_trust_within_the_bound() -> None:
    link = Link()
    export(link.ap, PAY)
    link.connect(T0)
    effects = link.us.session.handle(Deleted(T0 + 1))
    assert effects[-1] == Withdraw("ap-southeast", AP.trust_domain, T0 + 1 + 5.0)
    assert Send(Close("peering deleted")) in effects
    assert link.us.session.state is PeerState.DELETED
    assert link.us.session.imports == {}


def test_a_deleted_peering_ignores_the_peer_and_closes_any_new_stream() -> None:
    link = Link()
    link.connect(T0)
    link.us.session.handle(Deleted(T0 + 1))
    snapshot = ServicesSnapshot(5000, (ap_service(PAY),))
    assert link.us.session.handle(ServicesSnapshotReceived(snapshot, T0 + 2)) == []
    assert link.us.session.handle(Tick(T0 + 100)) == []
    assert link.us.session.handle(Connected(T0 + 3)) == [CloseStream("peering deleted")]
    assert link.us.session.state is PeerState.DELETED


def test_health_for_services_not_imported_from_the_peer_is_dropped() -> None:
    link = Link()
    export(link.ap, PAY)
    link.connect(T0)

    def health(key: ServiceKey) -> ServiceHealth:
        return ServiceHealth(key, 0.01, 0.02, 0.03, 1.0, 50.0, None, 2)

    summaries = HealthSummaries(123, (health(PAY), health(CART)))
    effects = link.us.session.handle(HealthReceived(summaries, T0 + 1))
    assert effects == [ApplyHealth("ap-southeast", (health(PAY),), 123)]


def test_status_reports_what_peering_list_shows() -> None:
    link = Link()
    export(link.ap, PAY)
    export(link.us, CART)
    link.connect(T0)
    status = link.us.session.status()
    assert (status.peer, status.state, status.imported, status.exported) == (
        "ap-southeast",
        PeerState.ACTIVE,
        1,
        1,
    )
    assert status.last_heard_at == T0


_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("export"), st.integers(0, 9), st.integers(0, 3)),
        st.tuples(st.just("unexport"), st.integers(0, 9), st.just(0)),
        st.tuples(st.sampled_from(["sync", "drop", "connect"]), st.just(0), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=200)
@given(steps=_STEPS, tombstones=st.integers(0, 4))
def test_after_any_changes_drops_and_reconnects_the_importer_holds_exactly_the_exports(
    steps: list[tuple[str, int, int]], tombstones: int
) -> None:
    link = Link(tombstones=tombstones)
    link.connect(T0)
    now = T0
    for op, index, healthy in steps:
        now += 0.1
        key = ServiceKey("shop", f"s{index}")
        if op == "export":
            export(link.ap, key, healthy)
        elif op == "unexport":
            link.ap.book.remove_service(key)
        elif op == "sync" and link.up:
            link.feed(link.ap, ExportsChanged(now), now)
        elif op == "drop" and link.up:
            link.drop(now)
        elif op == "connect" and not link.up:
            link.connect(now)
    if not link.up:
        link.connect(now + 1)
    link.feed(link.ap, ExportsChanged(now + 1), now + 1)
    exported = link.ap.book.exports_to("us-west").snapshot().services
    assert link.us.session.state is PeerState.ACTIVE
    assert link.us.session.imports == {service.key: service for service in exported}


def test_a_message_left_over_from_a_dropped_stream_is_ignored() -> None:
    link = Link()
    link.connect(T0)
    link.drop(T0 + 1)
    link.clear()
    late = ServicesSnapshot(9999, (ap_service(PAY),))
    assert link.us.session.handle(ServicesSnapshotReceived(late, T0 + 1.1)) == []
    assert link.us.session.imports == {}
    assert link.us.session.state is PeerState.DISCONNECTED
