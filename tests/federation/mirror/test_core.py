"""Mirroring: federated upstreams, default weights, stale discovery and what a peer may not do."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.catalog.model import Catalog, Endpoint, Health, Service
from federation.mirror.core import (
    TOTAL_WEIGHT,
    FederatedUpstream,
    LocalService,
    MirrorSettings,
    MirrorState,
    PeerView,
    TargetEndpoint,
    federate,
    federate_service,
    local_services,
    mirror_state,
    next_change_at,
)
from federation.peering.core import (
    Connected,
    Deleted,
    ExportBook,
    MarkStale,
    Opened,
    PeerIdentity,
    PeeringSession,
    ServicesSnapshotReceived,
    Tick,
    Withdraw,
)
from federation.peering.model import (
    ExportedService,
    GatewayAddress,
    Open,
    ServiceKey,
    ServicesSnapshot,
)
from proxy.identity.model import TrustDomain

T0 = 1_800_000_000.0
GRACE = 30.0
SETTINGS = MirrorSettings("us-west", "acme", TrustDomain("us-west.acme"), stale_grace_seconds=GRACE)
PAY = ServiceKey("shop", "pay")
GATEWAYS = {
    "ap-southeast": (GatewayAddress("10.1.0.1", 8443), GatewayAddress("10.1.0.2", 8443)),
    "eu-central": (GatewayAddress("10.2.0.1", 8443),),
    "sa-east": (GatewayAddress("10.3.0.1", 8443),),
}


def local(healthy: int, unhealthy: int = 0, key: ServiceKey = PAY) -> LocalService:
    endpoints = [TargetEndpoint(f"10.0.0.{i}", 8080) for i in range(healthy)]
    endpoints += [TargetEndpoint(f"10.0.1.{i}", 8080, healthy=False) for i in range(unhealthy)]
    return LocalService(key, tuple(endpoints))


def peer(
    cluster: str,
    imports: dict[ServiceKey, int] | None = None,
    *,
    unreachable_since: float | None = None,
    probe_alive: bool = True,
    deleted: bool = False,
) -> PeerView:
    exported = {
        key: ExportedService(key, f"{key.name}.{key.namespace}.{cluster}.acme", healthy)
        for key, healthy in (imports if imports is not None else {PAY: 1}).items()
    }
    return PeerView(
        cluster=cluster,
        mesh="acme",
        trust_domain=TrustDomain(f"{cluster}.acme"),
        gateways=GATEWAYS[cluster],
        imports=exported,
        unreachable_since=unreachable_since,
        probe_alive=probe_alive,
        deleted=deleted,
    )


def upstream(
    local_service: LocalService | None,
    *peers: PeerView,
    now: float = T0,
    order: tuple[str, ...] = (),
    weights: dict[str, int] | None = None,
) -> FederatedUpstream:
    result = federate_service(
        PAY, local_service, peers, SETTINGS, now, order=order, weights=weights
    )
    assert result is not None
    return result


def test_a_mirrored_target_points_at_the_peers_gateways_with_the_services_sni() -> None:
    result = upstream(local(1), peer("ap-southeast"))
    mirror = result.targets[1]
    assert mirror.name == "pay@ap-southeast"
    assert mirror.cluster == "ap-southeast"
    assert mirror.endpoints == (
        TargetEndpoint("10.1.0.1", 8443),
        TargetEndpoint("10.1.0.2", 8443),
    )
    assert mirror.sni == "pay.shop.ap-southeast.acme"
    assert mirror.trust_domain == TrustDomain("ap-southeast.acme")
    assert not mirror.stale


def test_the_local_target_keeps_its_own_endpoints_name_and_identity() -> None:
    result = upstream(local(2, unhealthy=1), peer("ap-southeast"))
    own = result.targets[0]
    assert (own.name, own.cluster, own.sni) == ("pay", "us-west", "pay.shop.us-west.acme")
    assert own.trust_domain == TrustDomain("us-west.acme")
    assert len(own.endpoints) == 3
    assert own.healthy_endpoints == 2


@pytest.mark.parametrize(
    ("local_service", "peers", "order", "expected", "note"),
    [
        (
            local(2),
            [peer("ap-southeast", {PAY: 3}), peer("eu-central", {PAY: 3})],
            (),
            {"us-west": 10000, "ap-southeast": 0, "eu-central": 0},
            "all local",
        ),
        (
            local(0, unhealthy=2),
            [peer("ap-southeast", {PAY: 3}), peer("eu-central", {PAY: 1})],
            (),
            {"us-west": 0, "ap-southeast": 5000, "eu-central": 5000},
            "split across 2 healthy remote",
        ),
        (
            local(0),
            [peer("ap-southeast"), peer("eu-central"), peer("sa-east")],
            (),
            {"us-west": 0, "ap-southeast": 3334, "eu-central": 3333, "sa-east": 3333},
            "split across 3",
        ),
        (
            local(0),
            [peer("ap-southeast", {PAY: 0}), peer("eu-central", {PAY: 2})],
            (),
            {"us-west": 0, "ap-southeast": 0, "eu-central": 10000},
            "split across 1",
        ),
        (
            local(0),
            [peer("ap-southeast"), peer("eu-central")],
            ("eu-central", "ap-southeast"),
            {"us-west": 0, "ap-southeast": 0, "eu-central": 10000},
            "all to eu-central, first healthy in order",
        ),
        (
            local(0),
            [peer("ap-southeast", {PAY: 0}), peer("eu-central")],
            ("ap-southeast", "eu-central"),
            {"us-west": 0, "ap-southeast": 0, "eu-central": 10000},
            "first healthy in order",
        ),
        (
            local(0, unhealthy=3),
            [peer("ap-southeast", {PAY: 0})],
            (),
            {"us-west": 10000, "ap-southeast": 0},
            "no healthy endpoint anywhere: traffic stays local as it is",
        ),
        (
            None,
            [peer("ap-southeast", {PAY: 0}), peer("eu-central", {PAY: 0})],
            (),
            {"ap-southeast": 5000, "eu-central": 5000},
            "no healthy endpoint anywhere and no local copy",
        ),
        (
            None,
            [peer("ap-southeast", {PAY: 4})],
            (),
            {"ap-southeast": 10000},
            "no local copy: split across 1",
        ),
        (
            local(0),
            [peer("ap-southeast", unreachable_since=T0 - 1), peer("eu-central")],
            (),
            {"us-west": 0, "ap-southeast": 0, "eu-central": 10000},
            "split across 1 healthy remote target(s)",
        ),
        (
            local(0),
            [peer("ap-southeast", unreachable_since=T0 - 1)],
            (),
            {"us-west": 0, "ap-southeast": 10000},
            "(stale)",
        ),
    ],
    ids=[
        "local-healthy-keeps-all",
        "no-local-healthy-splits-evenly",
        "uneven-split-still-sums-to-10000",
        "only-healthy-remotes-get-traffic",
        "order-picks-first",
        "order-skips-unhealthy",
        "nothing-healthy-stays-local",
        "nothing-healthy-no-local-splits",
        "remote-only-service",
        "fresh-before-stale",
        "stale-when-nothing-fresh",
    ],
)
def test_default_weights(
    local_service: LocalService | None,
    peers: list[PeerView],
    order: tuple[str, ...],
    expected: dict[str, int],
    note: str,
) -> None:
    result = upstream(local_service, *peers, order=order)
    assert result.weights() == expected
    assert sum(result.weights().values()) == TOTAL_WEIGHT
    assert note in result.note


@given(
    local_healthy=st.none() | st.integers(0, 3),
    remote=st.lists(
        st.tuples(st.integers(0, 3), st.booleans()), min_size=0, max_size=3
    ),  # (healthy, stale) per peer
    controller=st.none() | st.dictionaries(st.sampled_from(list(GATEWAYS)), st.integers(0, 50)),
)
def test_weights_are_non_negative_basis_points_that_sum_to_10000(
    local_healthy: int | None,
    remote: list[tuple[int, bool]],
    controller: dict[str, int] | None,
) -> None:
    peers = [
        peer(name, {PAY: healthy}, unreachable_since=T0 - 1 if stale else None)
        for name, (healthy, stale) in zip(GATEWAYS, remote, strict=False)
    ]
    result = federate_service(
        PAY,
        None if local_healthy is None else local(local_healthy),
        peers,
        SETTINGS,
        T0,
        weights=controller,
    )
    if result is None:
        assert local_healthy is None
        assert not peers
        return
    assert all(target.weight >= 0 for target in result.targets)
    assert sum(target.weight for target in result.targets) == TOTAL_WEIGHT


def test_controller_weights_are_renormalised_over_the_targets_present() -> None:
    result = upstream(
        local(3),
        peer("ap-southeast"),
        weights={"us-west": 1, "ap-southeast": 3, "eu-central": 6},
    )
    assert result.weights() == {"us-west": 2500, "ap-southeast": 7500}
    assert result.note == "weights from the failover controller"


def test_controller_weights_naming_only_absent_targets_fall_back_to_the_defaults() -> None:
    result = upstream(local(3), peer("ap-southeast"), weights={"eu-central": 10000})
    assert result.weights() == {"us-west": 10000, "ap-southeast": 0}


@pytest.mark.parametrize(
    ("unreachable_since", "probe_alive", "deleted", "now", "expected"),
    [
        (None, True, False, T0, MirrorState.FRESH),
        (None, False, False, T0, MirrorState.FRESH),
        (T0, True, False, T0, MirrorState.STALE),
        (T0, True, False, T0 + GRACE - 0.001, MirrorState.STALE),
        (T0, True, False, T0 + GRACE, MirrorState.WITHDRAWN),
        (T0, False, False, T0, MirrorState.WITHDRAWN),
        (None, True, True, T0, MirrorState.WITHDRAWN),
    ],
    ids=[
        "reachable",
        "reachable-probe-dead-trusts-the-stream",
        "just-unreachable",
        "end-of-grace",
        "after-grace",
        "probe-dead-withdrawn-at-once",
        "deleted",
    ],
)
def test_stale_discovery_rule(
    unreachable_since: float | None,
    probe_alive: bool,
    deleted: bool,
    now: float,
    expected: MirrorState,
) -> None:
    view = peer(
        "ap-southeast",
        unreachable_since=unreachable_since,
        probe_alive=probe_alive,
        deleted=deleted,
    )
    assert mirror_state(view, now, GRACE) is expected


def _session_gone_silent() -> tuple[PeeringSession, float]:
    """A us-west session with ap-southeast that imported ``pay``, then heard nothing."""
    ap = PeerIdentity("ap-southeast", "acme", TrustDomain("ap-southeast.acme"))
    us = PeerIdentity("us-west", "acme", TrustDomain("us-west.acme"))
    book = ExportBook(cluster="us-west", mesh="acme")
    session = PeeringSession(
        local=us,
        peer=ap,
        exports=book.add_peer("ap-southeast"),
        local_bundle=None,
        dialer=True,
        rng=random.Random(1),
    )
    session.handle(Connected(T0))
    session.handle(Opened(Open("ap-southeast", "acme", ap.trust_domain), T0))
    service = ExportedService(PAY, "pay.shop.ap-southeast.acme", 2)
    session.handle(ServicesSnapshotReceived(ServicesSnapshot(10, (service,)), T0))
    for step in range(1, 100):
        stale = [e for e in session.handle(Tick(T0 + step * 0.5)) if isinstance(e, MarkStale)]
        if stale:
            return session, stale[0].since
    raise AssertionError("the session never noticed the silence")


def _view(session: PeeringSession, since: float | None, probe_alive: bool) -> PeerView:
    return PeerView(
        cluster="ap-southeast",
        mesh="acme",
        trust_domain=TrustDomain("ap-southeast.acme"),
        gateways=GATEWAYS["ap-southeast"],
        imports=session.imports,
        unreachable_since=since,
        probe_alive=probe_alive,
    )


def test_a_silent_peer_keeps_stale_mirrors_within_grace_while_its_probe_is_alive() -> None:
    session, since = _session_gone_silent()
    assert since <= T0 + 3.5  # three missed 1 s heartbeats, noticed on the next tick
    view = _view(session, since, probe_alive=True)
    during = upstream(None, view, now=since + GRACE - 1)
    assert [(t.name, t.stale, t.weight) for t in during.targets] == [
        ("pay@ap-southeast", True, 10000)
    ]
    assert next_change_at([view], since + 1, GRACE) == since + GRACE
    assert federate_service(PAY, None, [view], SETTINGS, since + GRACE) is None


def test_a_silent_peer_whose_probe_says_dead_is_withdrawn_at_once() -> None:
    session, since = _session_gone_silent()
    view = _view(session, since, probe_alive=False)
    result = upstream(local(0, unhealthy=1), view, now=since)
    assert [t.name for t in result.targets] == ["pay"]
    assert next_change_at([view], since, GRACE) is None


def test_delete_leaves_no_mirror_and_names_a_deadline_within_five_seconds() -> None:
    session, _ = _session_gone_silent()
    deleted_at = T0 + 100
    effects = session.handle(Deleted(deleted_at))
    [withdraw] = [e for e in effects if isinstance(e, Withdraw)]
    assert withdraw.deadline - deleted_at <= 5.0
    view = PeerView(
        "ap-southeast",
        "acme",
        TrustDomain("ap-southeast.acme"),
        GATEWAYS["ap-southeast"],
        imports=session.imports,
        deleted=True,
    )
    result = upstream(local(1), view, now=deleted_at)
    assert [t.name for t in result.targets] == ["pay"]


def test_an_unreachable_source_never_empties_an_upstream_before_the_stale_rule_says_so() -> None:
    alive = peer("ap-southeast", unreachable_since=T0, probe_alive=True)
    result = upstream(None, alive, now=T0 + 1)
    assert [t.name for t in result.targets] == ["pay@ap-southeast"]
    assert result.targets[0].weight == TOTAL_WEIGHT


def test_a_mirror_joins_only_the_upstream_of_its_own_namespace() -> None:
    billing_pay = ServiceKey("billing", "pay")
    upstreams = federate(
        [local(2)],
        [peer("ap-southeast", {billing_pay: 5})],
        SETTINGS,
        T0,
    )
    assert [t.name for t in upstreams[PAY].targets] == ["pay"]
    assert [t.name for t in upstreams[billing_pay].targets] == ["pay@ap-southeast"]
    assert upstreams[billing_pay].targets[0].sni == "pay.billing.ap-southeast.acme"


def test_a_peer_gets_no_target_for_a_service_it_does_not_export_to_us() -> None:
    cart = ServiceKey("shop", "cart")
    result = upstream(local(1), peer("ap-southeast", {cart: 9}), peer("eu-central", {PAY: 1}))
    assert [t.name for t in result.targets] == ["pay", "pay@eu-central"]


def test_a_mirror_ignores_the_sni_the_peer_claims_and_points_only_at_its_gateways() -> None:
    claim = ExportedService(PAY, "admin.kube-system.us-west.acme", 1)
    view = PeerView(
        "ap-southeast",
        "acme",
        TrustDomain("ap-southeast.acme"),
        GATEWAYS["ap-southeast"],
        imports={PAY: claim},
    )
    mirror = upstream(None, view).targets[0]
    assert mirror.sni == "pay.shop.ap-southeast.acme"
    assert {e.address for e in mirror.endpoints} == {"10.1.0.1", "10.1.0.2"}


def test_a_peer_with_our_own_cluster_name_never_adds_a_target() -> None:
    impostor = PeerView(
        "us-west",
        "acme",
        TrustDomain("us-west.acme"),
        (GatewayAddress("10.9.9.9", 8443),),
        imports={PAY: ExportedService(PAY, "pay.shop.us-west.acme", 5)},
    )
    result = upstream(local(0), impostor)
    assert [t.name for t in result.targets] == ["pay"]


def test_a_service_that_exists_nowhere_has_no_upstream() -> None:
    assert federate_service(PAY, None, [peer("ap-southeast", {})], SETTINGS, T0) is None
    assert federate([], [peer("ap-southeast", {})], SETTINGS, T0) == {}


def test_local_services_come_from_the_catalog_with_only_passing_endpoints_healthy() -> None:
    catalog = Catalog.of(
        3,
        services=[Service("pay", "shop"), Service("cart", "shop")],
        endpoints=[
            Endpoint("pay", "10.0.0.1", 8080, "shop", zone="a"),
            Endpoint("pay", "10.0.0.2", 8080, "shop", health=Health.WARNING),
            Endpoint("pay", "10.0.0.3", 8080, "shop", health=Health.CRITICAL),
        ],
    )
    services = {service.key: service for service in local_services(catalog)}
    assert services[PAY].endpoints == (
        TargetEndpoint("10.0.0.1", 8080, "a", healthy=True),
        TargetEndpoint("10.0.0.2", 8080, "", healthy=False),
        TargetEndpoint("10.0.0.3", 8080, "", healthy=False),
    )
    assert services[PAY].healthy_endpoints == 1
    assert services[ServiceKey("shop", "cart")].endpoints == ()
