"""ClusterView: what each class of proxies is sent, from values (no servers)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType

import pytest
from prometheus_client import CollectorRegistry

from federation.catalog.feed import CatalogFeed
from federation.catalog.model import (
    AdmissionPolicy,
    Catalog,
    DeniedTarget,
    Endpoint,
    Health,
    Service,
)
from federation.discovery.core import ProxyClass, Role
from federation.discovery.server import ClassContent
from federation.mirror.core import MirrorSettings, PeerView
from federation.peering.model import ExportedService, GatewayAddress, ServiceKey
from federation.trust.ca import create_ca
from proxy.api.v1 import discovery_pb2 as pb
from proxy.identity.model import TrustDomain
from snapbright.controlplane.policies import PolicyDirectory
from snapbright.controlplane.snapshot import ClusterView

EXAMPLES = Path(__file__).parents[3] / "deploy" / "examples"
US_WEST = TrustDomain.for_cluster("us-west", "acme")
AP = TrustDomain.for_cluster("ap-southeast", "acme")
PAY = ServiceKey("default", "pay")
SIDECAR = ProxyClass(Role.SIDECAR, "default", "web", "web")
CA = create_ca(US_WEST, datetime.now(UTC))
ADMIN = DeniedTarget("127.0.0.1", 15000)


def _view(
    tmp_path: Path,
    *,
    policies: dict[str, str] | None = None,
    clock: Callable[[], float] = lambda: 100.0,
) -> tuple[ClusterView, CatalogFeed]:
    directory = tmp_path / "policies"
    directory.mkdir()
    for name, text in (policies or {}).items():
        (directory / name).write_text(text)
    loaded = PolicyDirectory(directory, CollectorRegistry())
    loaded.reload()
    view = ClusterView(
        MirrorSettings("us-west", "acme", US_WEST),
        loaded,
        CA.bundle,
        AdmissionPolicy(allow_loopback=True, denied=frozenset({ADMIN})),
        clock=clock,
    )
    feed = CatalogFeed()
    view.catalog = feed
    return view, feed


def _catalog(*endpoints: Endpoint) -> Catalog:
    services = {Service(e.service, e.namespace) for e in endpoints}
    return Catalog.of(1, services=services, endpoints=endpoints)


def _peer(*gateways: GatewayAddress) -> PeerView:
    return PeerView(
        "ap-southeast",
        "acme",
        AP,
        gateways,
        imports={PAY: ExportedService(PAY, "pay.default.ap-southeast.acme", 2)},
    )


def _weights(snapshot: pb.Snapshot) -> dict[str, int]:
    (upstream,) = snapshot.upstreams
    return {t.cluster: t.weight for t in upstream.targets}


def test_nothing_is_built_before_the_catalog_is_read(tmp_path: Path) -> None:
    view, feed = _view(tmp_path)
    assert view.build(SIDECAR) is None
    feed.publish(_catalog())
    snapshot = view.build(SIDECAR)
    assert snapshot is not None
    assert list(snapshot.upstreams) == []  # an empty catalog read is a fact, not a gap


def test_nothing_is_built_before_a_policy_set_is_accepted(tmp_path: Path) -> None:
    view, feed = _view(tmp_path, policies={"bad.yaml": "kind: Nothing\n"})
    feed.publish(_catalog())
    assert view.build(SIDECAR) is None


@pytest.mark.parametrize(
    ("local_health", "failover", "expected"),
    [
        (Health.PASSING, None, {"us-west": 10_000, "ap-southeast": 0}),
        (Health.CRITICAL, None, {"us-west": 0, "ap-southeast": 10_000}),
        (
            Health.PASSING,
            {"us-west": 3_000, "ap-southeast": 7_000},
            {
                "us-west": 3_000,
                "ap-southeast": 7_000,
            },
        ),
    ],
)
def test_weights_come_from_the_failover_loop_when_it_decided_else_the_defaults(
    tmp_path: Path,
    local_health: Health,
    failover: dict[str, int] | None,
    expected: dict[str, int],
) -> None:
    view, feed = _view(tmp_path)
    feed.publish(_catalog(Endpoint("pay", "10.0.0.1", 8080, health=local_health)))
    view.set_peer(_peer(GatewayAddress("192.0.2.10", 15443)))
    if failover is not None:
        view.set_weights("pay", failover)
    snapshot = view.build(SIDECAR)
    assert snapshot is not None
    assert _weights(snapshot) == expected


def test_a_peer_gateway_on_our_own_admin_port_is_never_routed_to(tmp_path: Path) -> None:
    view, feed = _view(tmp_path)
    feed.publish(_catalog())
    view.set_peer(_peer(GatewayAddress("127.0.0.2", ADMIN.port), GatewayAddress("192.0.2.10", 1)))
    snapshot = view.build(SIDECAR)
    assert snapshot is not None
    (upstream,) = snapshot.upstreams
    assert [(e.address, e.port) for e in upstream.targets[0].endpoints] == [("192.0.2.10", 1)]


def test_a_peer_without_known_gateways_gives_no_mirror(tmp_path: Path) -> None:
    view, feed = _view(tmp_path)
    feed.publish(_catalog())
    view.set_peer(_peer())
    snapshot = view.build(SIDECAR)
    assert snapshot is not None
    assert list(snapshot.upstreams) == []


def test_a_sidecar_gets_only_its_own_services_authorization_policies(tmp_path: Path) -> None:
    policies = (EXAMPLES / "authorization-policy-payments.yaml").read_text()
    view, feed = _view(tmp_path, policies={"authz.yaml": policies})
    feed.publish(_catalog())
    ledger = view.build(ProxyClass(Role.SIDECAR, "shop", "ledger", "ledger"))
    other = view.build(ProxyClass(Role.SIDECAR, "default", "ledger", "ledger"))
    assert ledger is not None
    assert other is not None
    assert [(p.kind, p.name) for p in ledger.policies] == [("AuthorizationPolicy", "ledger")]
    assert list(other.policies) == []  # same service name, another namespace


def test_a_stale_peers_mirror_goes_when_its_grace_ends_even_with_no_other_change(
    tmp_path: Path,
) -> None:
    now = [100.0]
    view, feed = _view(tmp_path, clock=lambda: now[0])
    feed.publish(_catalog())
    stale = replace(_peer(GatewayAddress("192.0.2.10", 15443)), unreachable_since=90.0)
    view.set_peer(stale)  # the grace is 60 s: withdrawn at 150
    snapshot = view.build(SIDECAR)
    assert snapshot is not None
    assert [t.stale for t in snapshot.upstreams[0].targets] == [True]
    now[0] = 149.0
    assert len(view.build(SIDECAR).upstreams) == 1  # type: ignore[union-attr]
    now[0] = 150.0
    assert list(view.build(SIDECAR).upstreams) == []  # type: ignore[union-attr]


def test_a_change_announced_to_the_view_is_in_the_next_build(tmp_path: Path) -> None:
    view, feed = _view(tmp_path)
    feed.publish(_catalog(Endpoint("pay", "10.0.0.1", 8080)))
    assert len(view.build(SIDECAR).upstreams) == 1  # type: ignore[union-attr]
    feed.publish(Catalog.of(2, services=[Service("cart")]))
    view.invalidate()
    assert [u.service for u in view.build(SIDECAR).upstreams] == ["cart"]  # type: ignore[union-attr]


# -- updates cost O(changes) --------------------------------------------------------------


def _peers(total: int, count: int = 10) -> list[PeerView]:
    """``count`` peers exporting ``total`` services between them (distinct names)."""
    per = total // count
    peers = []
    for p in range(count):
        cluster = f"peer-{p}"
        keys = [ServiceKey("default", f"svc-{p}-{i}") for i in range(per)]
        imports = {k: ExportedService(k, f"{k.name}.default.{cluster}.acme", 1) for k in keys}
        peers.append(
            PeerView(
                cluster,
                "acme",
                TrustDomain.for_cluster(cluster, "acme"),
                (GatewayAddress("192.0.2.10", 15443 + p),),
                imports=imports,
            )
        )
    return peers


def _upstream_names(view: ClusterView) -> list[str]:
    content = view.content(SIDECAR)
    assert isinstance(content, ClassContent)
    return [u.service for u in content.upstreams.all()]


@pytest.mark.parametrize("total", [1_000, 10_000])
def test_one_peer_change_recomputes_one_upstream_whatever_the_catalog_size(
    tmp_path: Path, total: int
) -> None:
    view, feed = _view(tmp_path)
    feed.publish(_catalog())
    peers = _peers(total)
    for peer in peers:
        view.set_peer(peer)
    assert len(_upstream_names(view)) == total
    work, log = view.upstreams_federated, view.table.log.touched
    # A new service in peer-3, delivered as peering delivers it: the live mapping changes
    # in place and the view is told which key.
    key = ServiceKey("default", "brand-new")
    imports = view.peers["peer-3"].imports
    assert isinstance(imports, dict)
    imports[key] = ExportedService(key, "brand-new.default.peer-3.acme", 2)
    view.imports_changed("peer-3", MappingProxyType(imports), [key])
    assert "brand-new" in _upstream_names(view)
    assert view.upstreams_federated - work == 1
    assert view.table.log.touched - log == 1


def test_a_failover_decision_recomputes_only_that_service(tmp_path: Path) -> None:
    view, feed = _view(tmp_path)
    feed.publish(_catalog(Endpoint("svc-0-1", "10.0.0.1", 8080, namespace="default")))
    for peer in _peers(100):
        view.set_peer(peer)
    _upstream_names(view)
    work = view.upstreams_federated
    view.set_weights("svc-0-1", {"us-west": 5_000, "peer-0": 5_000})
    content = view.content(SIDECAR)
    assert isinstance(content, ClassContent)
    assert view.upstreams_federated - work == 1
    upstream = content.upstreams.get("default/svc-0-1")
    assert upstream is not None
    assert {t.cluster: t.weight for t in upstream.targets} == {"us-west": 5_000, "peer-0": 5_000}


def test_weights_handed_back_by_the_failover_loop_give_the_defaults_again(
    tmp_path: Path,
) -> None:
    view, feed = _view(tmp_path)
    feed.publish(_catalog(Endpoint("pay", "10.0.0.1", 8080, health=Health.CRITICAL)))
    view.set_peer(_peer(GatewayAddress("192.0.2.10", 15443)))
    view.set_weights("pay", {"us-west": 10_000})
    decided = view.build(SIDECAR)
    view.set_weights("pay", {})  # the loop no longer decides pay
    work = view.upstreams_federated
    released = view.build(SIDECAR)
    assert decided is not None
    assert released is not None
    assert _weights(decided) == {"us-west": 10_000, "ap-southeast": 0}
    assert _weights(released) == {"us-west": 0, "ap-southeast": 10_000}
    assert view.upstreams_federated - work == 1
    assert "pay" not in view.weights
    view.set_weights("pay", {})  # again: nothing to recompute
    view.build(SIDECAR)
    assert view.upstreams_federated - work == 1


def test_a_catalog_change_recomputes_only_the_services_that_differ(tmp_path: Path) -> None:
    view, feed = _view(tmp_path)
    endpoints = [Endpoint(f"local-{i}", f"10.0.0.{i}", 8080) for i in range(20)]
    feed.publish(_catalog(*endpoints))
    _upstream_names(view)
    work = view.upstreams_federated
    endpoints[4] = Endpoint("local-4", "10.0.0.4", 8080, health=Health.CRITICAL)
    feed.publish(
        Catalog.of(2, services={Service(f"local-{i}") for i in range(20)}, endpoints=endpoints)
    )
    _upstream_names(view)
    assert view.upstreams_federated - work == 1


def test_incremental_updates_end_where_a_full_recompute_does(tmp_path: Path) -> None:
    now = [100.0]
    view, feed = _view(tmp_path, clock=lambda: now[0])
    feed.publish(_catalog(Endpoint("svc-1-0", "10.0.0.1", 8080, namespace="default")))
    peers = _peers(40, count=4)
    for peer in peers:
        view.set_peer(peer)
    _upstream_names(view)
    # A series of changes, each told to the view as the process tells it.
    imports = view.peers["peer-2"].imports
    assert isinstance(imports, dict)
    gone = next(iter(imports))
    del imports[gone]
    view.imports_changed("peer-2", MappingProxyType(imports), [gone])
    view.set_peer(replace(view.peers["peer-1"], unreachable_since=95.0))
    view.set_weights("svc-1-0", {"peer-1": 1})
    view.remove_peer("peer-3")
    _upstream_names(view)
    now[0] = 200.0  # peer-1's grace ran out: withdrawn by time alone
    incremental = view.build(SIDECAR)
    view.invalidate()
    full = view.build(SIDECAR)
    assert incremental is not None
    assert full is not None
    assert list(incremental.upstreams) == list(full.upstreams)
    expected = view.upstreams(now[0])
    assert [u.service for u in full.upstreams] == [k.name for k in sorted(expected)]
    assert "svc-1-1" not in [u.service for u in full.upstreams]
