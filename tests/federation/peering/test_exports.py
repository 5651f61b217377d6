"""What each peer is sent: snapshots, deltas since a version, and their cost."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.export.model import ExportPolicy, ExportPolicySpec, ServiceExport
from federation.peering.core import ExportBook, PeerExports
from federation.peering.model import ExportedService, ServiceKey, ServicesDelta, ServicesSnapshot
from proxy.config.model import API_VERSION, Metadata


def svc(name: str, healthy: int = 1, namespace: str = "shop") -> ExportedService:
    key = ServiceKey(namespace, name)
    return ExportedService(key, f"{name}.{namespace}.us-west.acme", healthy)


def contents(update: ServicesSnapshot) -> dict[ServiceKey, ExportedService]:
    return {service.key: service for service in update.services}


def apply(
    held: dict[ServiceKey, ExportedService], update: ServicesSnapshot | ServicesDelta | None
) -> dict[ServiceKey, ExportedService]:
    """What a peer holding ``held`` holds after receiving ``update``."""
    if update is None:
        return dict(held)
    if isinstance(update, ServicesSnapshot):
        return contents(update)
    result = dict(held)
    for service in update.upserted:
        result[service.key] = service
    for key in update.removed:
        result.pop(key, None)
    return result


def test_a_peer_that_holds_nothing_gets_a_full_snapshot() -> None:
    exports = PeerExports(base_version=100)
    exports.upsert(svc("pay"))
    exports.upsert(svc("cart"))
    update = exports.update_since(0)
    assert isinstance(update, ServicesSnapshot)
    assert update.version == 102
    assert set(contents(update)) == {ServiceKey("shop", "pay"), ServiceKey("shop", "cart")}


def test_after_a_snapshot_only_the_changes_are_sent_as_a_delta() -> None:
    exports = PeerExports(base_version=100)
    for name in ("pay", "cart", "search"):
        exports.upsert(svc(name))
    seen = exports.version
    exports.upsert(svc("pay", healthy=5))
    exports.upsert(svc("ledger"))
    exports.remove(ServiceKey("shop", "cart"))
    update = exports.update_since(seen)
    assert update == ServicesDelta(
        from_version=seen,
        version=seen + 3,
        upserted=(svc("ledger"), svc("pay", healthy=5)),
        removed=(ServiceKey("shop", "cart"),),
    )


def test_a_peer_that_is_up_to_date_is_sent_nothing() -> None:
    exports = PeerExports(base_version=7)
    exports.upsert(svc("pay"))
    assert exports.update_since(exports.version) is None


def test_an_unchanged_value_makes_no_new_version() -> None:
    exports = PeerExports()
    assert exports.upsert(svc("pay"))
    version = exports.version
    assert not exports.upsert(svc("pay"))
    assert not exports.remove(ServiceKey("shop", "absent"))
    assert exports.version == version


@pytest.mark.parametrize(
    ("seen", "why"),
    [
        (5, "a version from an earlier incarnation (below our base)"),
        (10_000, "a version we never reached (a later incarnation, or a lie)"),
        (1001, "a version older than the oldest removal we still remember"),
    ],
)
def test_a_version_we_cannot_answer_from_the_log_gets_a_full_snapshot(seen: int, why: str) -> None:
    exports = PeerExports(base_version=1000, max_tombstones=2)
    for name in ("a", "b", "c", "d"):
        exports.upsert(svc(name))  # versions 1001..1004
    for name in ("a", "b", "c"):
        exports.remove(ServiceKey("shop", name))  # 1005..1007; the first tombstone is dropped
    assert isinstance(exports.update_since(seen), ServicesSnapshot), why


def test_a_version_after_the_oldest_remembered_removal_still_gets_a_delta() -> None:
    exports = PeerExports(base_version=1000, max_tombstones=2)
    for name in ("a", "b", "c", "d"):
        exports.upsert(svc(name))
    for name in ("a", "b", "c"):
        exports.remove(ServiceKey("shop", name))
    update = exports.update_since(1005)
    assert isinstance(update, ServicesDelta)
    assert set(update.removed) == {ServiceKey("shop", "b"), ServiceKey("shop", "c")}


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("upsert"), st.integers(0, 12), st.integers(0, 3)),
        st.tuples(st.just("remove"), st.integers(0, 12), st.just(0)),
        st.tuples(st.just("checkpoint"), st.just(0), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=300)
@given(ops=_OPS, max_tombstones=st.integers(0, 6))
def test_any_remembered_state_plus_its_update_equals_the_current_snapshot(
    ops: list[tuple[str, int, int]], max_tombstones: int
) -> None:
    exports = PeerExports(base_version=50, max_tombstones=max_tombstones)
    checkpoints: list[tuple[int, dict[ServiceKey, ExportedService]]] = [(0, {})]
    for op, index, healthy in ops:
        if op == "upsert":
            exports.upsert(svc(f"s{index}", healthy))
        elif op == "remove":
            exports.remove(ServiceKey("shop", f"s{index}"))
        else:
            snapshot = exports.snapshot()
            checkpoints.append((snapshot.version, contents(snapshot)))
    current = contents(exports.snapshot())
    assert len(exports) == len(current)
    for version, held in checkpoints:
        assert apply(held, exports.update_since(version)) == current


def _filled(count: int) -> PeerExports:
    exports = PeerExports(base_version=1)
    for index in range(count):
        exports.upsert(svc(f"s{index}"))
    return exports


def test_a_delta_costs_the_changes_not_the_number_of_services() -> None:
    costs = []
    for size in (1_000, 10_000):
        exports = _filled(size)
        seen = exports.version
        before = exports.entries_visited
        exports.upsert(svc("s7", healthy=9))
        exports.remove(ServiceKey("shop", "s8"))
        exports.upsert(svc("new"))
        update = exports.update_since(seen)
        assert isinstance(update, ServicesDelta)
        costs.append(exports.entries_visited - before)
    assert costs[0] == costs[1] <= 3 + 3 + 1


def test_a_catalog_change_costs_the_peers_it_reaches_not_the_services() -> None:
    costs = []
    for size in (1_000, 10_000):
        book = ExportBook(cluster="us-west", mesh="acme", base_version=1)
        exports = book.add_peer("ap-southeast")
        for index in range(size):
            book.set_service(
                ServiceKey("shop", f"s{index}"), healthy_endpoints=1, exported_to={"ap-southeast"}
            )
        before = exports.entries_visited
        book.set_service(
            ServiceKey("shop", "s5"), healthy_endpoints=0, exported_to={"ap-southeast"}
        )
        costs.append(exports.entries_visited - before)
    assert costs == [1, 1]


def test_the_book_exports_a_service_only_to_the_peers_the_decision_names() -> None:
    book = ExportBook(cluster="us-west", mesh="acme")
    ap, eu = book.add_peer("ap-southeast"), book.add_peer("eu-central")
    pay = ServiceKey("shop", "pay")
    changed = book.set_service(pay, healthy_endpoints=2, exported_to={"ap-southeast"})
    assert changed == {"ap-southeast"}
    assert ap.get(pay) == ExportedService(pay, "pay.shop.us-west.acme", 2)
    assert eu.get(pay) is None


def test_a_peer_dropped_from_the_decision_is_sent_a_removal() -> None:
    book = ExportBook(cluster="us-west", mesh="acme")
    ap, eu = book.add_peer("ap-southeast"), book.add_peer("eu-central")
    pay = ServiceKey("shop", "pay")
    book.set_service(pay, healthy_endpoints=2, exported_to={"ap-southeast", "eu-central"})
    seen = eu.version
    changed = book.set_service(pay, healthy_endpoints=2, exported_to={"ap-southeast"})
    assert changed == {"eu-central"}
    assert eu.update_since(seen) == ServicesDelta(seen, seen + 1, (), (pay,))
    assert ap.get(pay) is not None


def test_a_removed_service_is_withdrawn_from_every_peer_it_was_exported_to() -> None:
    book = ExportBook(cluster="us-west", mesh="acme")
    ap, eu = book.add_peer("ap-southeast"), book.add_peer("eu-central")
    pay = ServiceKey("shop", "pay")
    book.set_service(pay, healthy_endpoints=2, exported_to={"ap-southeast", "eu-central"})
    assert book.remove_service(pay) == {"ap-southeast", "eu-central"}
    assert (len(ap), len(eu)) == (0, 0)


def test_a_mirrored_service_is_never_exported_onward() -> None:
    book = ExportBook(cluster="us-west", mesh="acme")
    eu = book.add_peer("eu-central")
    key = ServiceKey("shop", "pay")
    changed = book.set_service(
        key, healthy_endpoints=3, exported_to={"eu-central"}, mirrored_from="ap-southeast"
    )
    assert changed == frozenset()
    assert eu.get(key) is None


def test_a_peer_added_later_gets_what_is_already_exported_to_it() -> None:
    book = ExportBook(cluster="us-west", mesh="acme", base_version=10)
    pay, cart = ServiceKey("shop", "pay"), ServiceKey("shop", "cart")
    book.set_service(pay, healthy_endpoints=1, exported_to={"eu-central"})
    book.set_service(cart, healthy_endpoints=1, exported_to={"ap-southeast"})
    eu = book.add_peer("eu-central")
    assert [s.key for s in eu.snapshot().services] == [pay]


def test_a_peer_is_added_once() -> None:
    book = ExportBook(cluster="us-west", mesh="acme")
    book.add_peer("eu-central")
    with pytest.raises(ValueError, match="already"):
        book.add_peer("eu-central")


def _policy(*exports: tuple[str, tuple[str, ...]]) -> ExportPolicy:
    return ExportPolicy(
        apiVersion=API_VERSION,
        kind="ExportPolicy",
        metadata=Metadata(name="us-west-exports"),
        spec=ExportPolicySpec(
            exports=tuple(ServiceExport(service=s, peers=peers) for s, peers in exports)
        ),
    )


def test_the_export_policy_decides_and_nothing_is_exported_by_default() -> None:
    policy = _policy(("pay", ("ap-southeast",)))
    book = ExportBook(cluster="us-west", mesh="acme")
    ap = book.add_peer("ap-southeast")
    for name in ("pay", "cart"):
        key = ServiceKey("shop", name)
        book.set_service(key, healthy_endpoints=1, exported_to=policy.peers_of(key.name))
    assert [s.key.name for s in ap.snapshot().services] == ["pay"]


def test_a_policy_reload_changes_only_the_peers_it_affects() -> None:
    book = ExportBook(cluster="us-west", mesh="acme")
    ap, eu = book.add_peer("ap-southeast"), book.add_peer("eu-central")
    before = _policy(("pay", ("ap-southeast",)), ("cart", ("ap-southeast",)))
    for name in ("pay", "cart"):
        key = ServiceKey("shop", name)
        book.set_service(key, healthy_endpoints=1, exported_to=before.peers_of(key.name))
    book.set_service(
        ServiceKey("shop", "mirror"),
        healthy_endpoints=1,
        exported_to=(),
        mirrored_from="sa-east",
    )
    after = _policy(("pay", ("ap-southeast", "eu-central")), ("mirror", ("eu-central",)))
    changed = book.apply_decision(lambda key: after.peers_of(key.name))
    assert changed == {"ap-southeast", "eu-central"}
    assert [s.key.name for s in ap.snapshot().services] == ["pay"]
    assert [s.key.name for s in eu.snapshot().services] == ["pay"]
