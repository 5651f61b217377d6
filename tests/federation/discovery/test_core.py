"""The discovery server's decisions: identity checks, versions, pushes, renewal, memory bounds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from federation.discovery.core import (
    ClaimedIdentity,
    Content,
    ContentVersions,
    DeltaPlan,
    IdentityRefused,
    NackLog,
    NackRecord,
    ProxyClass,
    Push,
    Role,
    StatsStore,
    UpstreamLog,
    authenticate_peer,
    check_identity,
    digest_of_version,
    item_digest,
    plan_delta,
    plan_push,
    renew_at,
    renewal_due,
)
from federation.trust.ca import create_ca
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.identity.svid import Rejection, SvidError
from proxy.stats.core import Histogram, StatsWindow

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
TD = TrustDomain.for_cluster("us-west", "acme")
WEB = SpiffeId.workload(TD, "shop", "web")


def _claim(**changes: object) -> ClaimedIdentity:
    fields: dict[str, object] = {
        "role": Role.SIDECAR,
        "cluster": "us-west",
        "namespace": "shop",
        "service_account": "web",
        "workload": "web-1",
        "service": "web",
    }
    fields.update(changes)
    return ClaimedIdentity(**fields)  # type: ignore[arg-type]


def test_a_proxy_gets_the_class_of_the_identity_its_svid_proves() -> None:
    assert check_identity(_claim(), WEB, TD, "us-west") == ProxyClass(
        Role.SIDECAR, "shop", "web", "web"
    )


@pytest.mark.parametrize(
    ("claim", "proven", "message"),
    [
        (_claim(namespace="bank"), WEB, "proves ns/shop/sa/web"),
        (_claim(service_account="admin"), WEB, "proves ns/shop/sa/web"),
        (_claim(cluster="ap-southeast"), WEB, "this is 'us-west'"),
        (_claim(role=None), WEB, "no role"),
        (_claim(workload=""), WEB, "no workload"),
        (_claim(), SpiffeId.parse("spiffe://other.acme/ns/shop/sa/web"), "trust domain"),
        (_claim(), SpiffeId.parse("spiffe://us-west.acme/shop/web"), "not a workload ID"),
    ],
)
def test_a_proxy_asking_for_an_identity_it_did_not_prove_is_refused(
    claim: ClaimedIdentity, proven: SpiffeId, message: str
) -> None:
    with pytest.raises(IdentityRefused, match=message):
        check_identity(claim, proven, TD, "us-west")


def test_authentication_accepts_only_svids_of_the_own_trust_domain() -> None:
    own = create_ca(TD, NOW)
    other_td = TrustDomain.for_cluster("ap-southeast", "acme")
    foreign = create_ca(other_td, NOW)
    own_svid = own.issue(WEB, NOW)
    assert authenticate_peer(own_svid.chain_pem(), own.bundle(), NOW)[0] == WEB
    foreign_svid = foreign.issue(SpiffeId.workload(other_td, "shop", "web"), NOW)
    with pytest.raises(SvidError) as refused:
        authenticate_peer(foreign_svid.chain_pem(), own.bundle(), NOW)
    assert refused.value.reason is Rejection.UNKNOWN_TRUST_DOMAIN


@pytest.mark.parametrize(
    ("elapsed", "due"),
    [
        (timedelta(hours=0), False),
        (timedelta(hours=15, minutes=59, seconds=59), False),
        (timedelta(hours=16), True),
        (timedelta(hours=23), True),
    ],
)
def test_an_svid_is_renewed_two_thirds_into_its_lifetime(elapsed: timedelta, due: bool) -> None:
    not_before, not_after = NOW, NOW + timedelta(hours=24)
    assert renew_at(not_before, not_after) == NOW + timedelta(hours=16)
    assert renewal_due(not_before, not_after, NOW + elapsed) is due


def test_a_version_changes_only_when_the_content_does() -> None:
    versions = ContentVersions()
    web = ProxyClass(Role.SIDECAR, "shop", "web", "web")
    first, changed = versions.update(web, "aaa")
    assert changed
    same, changed = versions.update(web, "aaa")
    assert (same, changed) == (first, False)
    second, changed = versions.update(web, "bbb")
    assert changed
    assert second.version != first.version
    assert digest_of_version(second.version) == "bbb"
    assert versions.get(web) == second


def test_a_version_from_another_incarnation_is_recognised_by_its_digest() -> None:
    web = ProxyClass(Role.SIDECAR, "shop", "web", "web")
    before_restart = ContentVersions()
    before_restart.update(web, "old")
    held, _ = before_restart.update(web, "aaa")
    after_restart, _ = ContentVersions().update(web, "aaa")
    assert held.version != after_restart.version
    assert digest_of_version(held.version) == digest_of_version(after_restart.version)
    assert digest_of_version("") == digest_of_version("garbage") == ""


CURRENT = Content("7.aaa", "aaa")


@pytest.mark.parametrize(
    ("current", "ready", "held", "rejected", "svid_due", "push"),
    [
        (CURRENT, True, "", "", False, Push("7.aaa", svid=False)),
        (CURRENT, True, "old", "", False, Push("7.aaa", svid=False)),
        (CURRENT, True, "aaa", "", False, None),
        (CURRENT, True, "old", "aaa", False, None),
        (CURRENT, True, "aaa", "", True, Push("7.aaa", svid=True)),
        (CURRENT, False, "", "", False, None),
        (CURRENT, False, "", "", True, None),
        (None, True, "", "", True, None),
    ],
    ids=[
        "first",
        "changed",
        "held",
        "nacked-never-resent",
        "svid-rides-the-held-content",
        "not-ready",
        "not-ready-even-for-an-svid",
        "never-built",
    ],
)
def test_plan_push(
    current: Content | None,
    ready: bool,
    held: str,
    rejected: str,
    svid_due: bool,
    push: Push | None,
) -> None:
    assert plan_push(current, ready, held, rejected, svid_due) == push


def test_the_nack_log_keeps_each_proxys_last_rejection_and_is_bounded() -> None:
    log = NackLog(capacity=2)
    for proxy, version in (("a", "1.x"), ("b", "1.x"), ("a", "2.y"), ("c", "2.y")):
        log.record(NackRecord(proxy, version, "bad policy", NOW))
    assert log.total == 4
    assert [(r.proxy, r.version) for r in log] == [("a", "2.y"), ("c", "2.y")]
    log.clear("a")
    assert log.last("a") is None
    assert len(log) == 1


def _window(start: int, upstream: str = "pay", target: str = "ap-southeast") -> StatsWindow:
    return StatsWindow(start, upstream, target, (1, 0, 0, 0, 0, 0), Histogram.of([0.01]))


def test_stats_keep_a_bounded_ring_per_series_and_merge_reporters_in_time_order() -> None:
    store = StatsStore(ring=3)
    for start in range(10):
        store.add("proxy-a", _window(start))
    store.add("proxy-b", _window(8))
    windows = store.windows("pay", "ap-southeast")
    assert [w.start for w in windows] == [7, 8, 8, 9]
    assert store.windows("pay", "us-west") == []
    assert store.received == 11


def test_stats_beyond_the_series_limit_are_dropped_and_counted() -> None:
    store = StatsStore(ring=2, max_series=2)
    assert store.add("p", _window(1, "a"))
    assert store.add("p", _window(1, "b"))
    assert not store.add("p", _window(1, "c"))
    assert store.add("p", _window(2, "a"))
    assert store.dropped == 1
    assert len(store.series()) == 2


def test_pruning_forgets_old_windows_and_empty_series() -> None:
    store = StatsStore()
    store.add("p", _window(1, "a"))
    store.add("p", _window(5, "b"))
    store.prune(before=3)
    assert [key.upstream for key in store.series()] == ["b"]


# -- the upstream change log behind deltas ------------------------------------------------


def test_the_upstream_log_names_what_changed_since_a_revision() -> None:
    log = UpstreamLog()
    log.put("shop/pay", 1)
    log.put("shop/cart", 2)
    mark = log.revision
    assert not log.put("shop/pay", 1)  # unchanged: not a change
    log.put("shop/pay", 3)
    log.remove("shop/cart")
    assert log.changed_since(mark) == {"shop/pay", "shop/cart"}
    assert log.changed_since(log.revision) == set()
    assert log.touched == 5


def test_the_set_digest_names_the_content_whatever_the_order_of_changes() -> None:
    one, other = UpstreamLog(), UpstreamLog()
    one.put("a", item_digest("a", b"1"))
    one.put("b", item_digest("b", b"2"))
    other.put("b", item_digest("b", b"2"))
    other.put("c", item_digest("c", b"3"))
    other.put("a", item_digest("a", b"1"))
    assert one.digest != other.digest
    other.remove("c")
    assert one.digest == other.digest


@pytest.mark.parametrize(
    ("held", "accepts", "full_next", "expected"),
    [
        (None, True, False, None),  # a version we cannot place
        (3, False, False, None),  # a proxy that takes no deltas
        (3, True, True, None),  # it nacked a delta
        (2, True, False, None),  # older than the log reaches
        (99, True, False, None),  # from the future (another incarnation)
        (3, True, False, DeltaPlan(("c", "d"), ("a",))),
        (6, True, False, DeltaPlan((), ())),  # current: nothing (an SVID-only push)
    ],
)
def test_plan_delta_sends_changes_only_from_a_revision_the_log_reaches(
    held: int | None, accepts: bool, full_next: bool, expected: DeltaPlan | None
) -> None:
    log = UpstreamLog(capacity=3)
    for key in ("a", "b", "c", "d"):
        log.put(key, 1)  # revisions 1..4
    log.remove("a")  # 5
    log.put("c", 2)  # 6: the log now holds revisions 4..6, so it reaches back to 3
    assert plan_delta(log, held, accepts, full_next) == expected
