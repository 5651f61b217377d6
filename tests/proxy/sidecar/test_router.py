"""The mesh router as pure code: states in, picks out, in virtual time."""

from __future__ import annotations

from random import Random

import pytest

from proxy.http.core import Overloaded
from proxy.http.model import Failure
from proxy.identity.bundle import TrustBundleSet
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.policy.model import TrafficPolicy
from proxy.sidecar.model import SidecarState, TargetState, UpstreamState
from proxy.sidecar.router import MeshEndpoint, MeshRoute, MeshRouter
from tests.proxy.identity.forge import forge_domain, forge_leaf

WEST = forge_domain("us-west.acme")
SVID = forge_leaf(WEST)


def _target(cluster: str, weight: float, *ports: int) -> TargetState:
    return TargetState(
        name="payments" if cluster == "us-west" else f"payments@{cluster}",
        cluster=cluster,
        weight=weight,
        endpoints=tuple(("127.0.0.1", port) for port in ports),
        sni=f"payments.default.{cluster}.acme",
        trust_domain=TrustDomain(f"{cluster}.acme"),
    )


def _state(*targets: TargetState, traffic: dict[str, TrafficPolicy] | None = None) -> SidecarState:
    return SidecarState(
        local=SpiffeId.parse("spiffe://us-west.acme/ns/default/sa/checkout"),
        service="checkout",
        upstreams={"payments": UpstreamState("payments", "default", targets)} if targets else {},
        traffic=traffic or {},
        authorization=(),
        bundles=TrustBundleSet([WEST.bundle()]),
        svid=SVID,
    )


def _route(router: MeshRouter, host: bytes = b"payments") -> MeshRoute:
    route = router.route(host)
    assert isinstance(route, MeshRoute)
    return route


def _pick(route: MeshRoute, now: float) -> MeshEndpoint:
    endpoint = route.pick(now)
    assert endpoint is not None
    return endpoint


@pytest.mark.parametrize("host", [b"payments", b"payments:80", b"PAYMENTS.default", b"payments."])
def test_the_host_names_the_upstream(host: bytes) -> None:
    router = MeshRouter(rng=Random(1))
    router.apply(_state(_target("us-west", 1.0, 1000)), now=0.0)
    assert router.route(host) is router.upstream("payments")


def test_an_unknown_host_has_no_route() -> None:
    router = MeshRouter(rng=Random(1))
    router.apply(_state(_target("us-west", 1.0, 1000)), now=0.0)
    assert router.route(b"orders") is None


def test_an_update_keeps_the_route_and_the_endpoints_that_remain() -> None:
    router = MeshRouter(rng=Random(1))
    router.apply(_state(_target("us-west", 1.0, 1000, 1001)), now=0.0)
    route = _route(router)
    before = {(e.host, e.port): e for e in router.targets()[0].endpoints}
    router.apply(_state(_target("us-west", 1.0, 1001, 1002)), now=1.0)
    assert _route(router) is route
    after = {(e.host, e.port): e for e in router.targets()[0].endpoints}
    assert after[("127.0.0.1", 1001)] is before[("127.0.0.1", 1001)]
    assert ("127.0.0.1", 1000) not in after
    assert {_pick(route, 2.0).port for _ in range(50)} == {1001, 1002}


def test_a_request_in_flight_across_an_update_is_accounted_once() -> None:
    router = MeshRouter(rng=Random(1))
    router.apply(_state(_target("us-west", 1.0, 1000)), now=0.0)
    route = _route(router)
    endpoint = _pick(route, 0.0)
    router.apply(_state(_target("us-west", 1.0, 1000)), now=0.5)
    route.on_response(endpoint, 200, 0.01, 1.0)
    assert endpoint.outstanding == 0
    assert router.targets()[0].breaker.requests == 0


def test_a_removed_upstream_answers_no_endpoint_to_connections_that_kept_it() -> None:
    router = MeshRouter(rng=Random(1))
    router.apply(_state(_target("us-west", 1.0, 1000)), now=0.0)
    route = _route(router)
    router.apply(_state(), now=1.0)
    assert route.pick(1.0) is None
    assert router.route(b"payments") is None


def test_weights_split_picks_across_target_clusters() -> None:
    router = MeshRouter(rng=Random(7))
    router.apply(_state(_target("us-west", 0.75, 1000), _target("eu", 0.25, 2000)), now=0.0)
    route = _route(router)
    picks = []
    for index in range(4000):
        endpoint = _pick(route, index * 0.001)
        picks.append(endpoint.target.cluster)
        route.on_response(endpoint, 200, 0.001, index * 0.001)
    assert 0.72 < picks.count("us-west") / 4000 < 0.78


def test_the_breaker_refuses_beyond_max_requests_and_frees_the_slot_on_failure() -> None:
    policy = TrafficPolicy.model_validate(
        {
            "apiVersion": "snapbright.io/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": {"name": "payments"},
            "spec": {"service": "payments", "circuitBreaker": {"maxRequests": 1}},
        },
        strict=False,
    )
    router = MeshRouter(rng=Random(1))
    router.apply(_state(_target("us-west", 1.0, 1000), traffic={"payments": policy}), now=0.0)
    route = _route(router)
    first = _pick(route, 0.0)
    with pytest.raises(Overloaded) as refused:
        route.pick(0.0)
    assert refused.value.reason == "max-requests"
    route.on_failure(first, Failure.RESET, 0.01, 0.01)
    assert route.pick(0.02) is not None


def test_the_traffic_policys_request_timeout_is_the_routes_and_goes_with_the_policy() -> None:
    policy = TrafficPolicy.model_validate(
        {
            "apiVersion": "snapbright.io/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": {"name": "payments"},
            "spec": {"service": "payments", "timeouts": {"request": "250ms"}},
        },
        strict=False,
    )
    router = MeshRouter(rng=Random(1))
    router.apply(_state(_target("us-west", 1.0, 1000), traffic={"payments": policy}), now=0.0)
    assert _route(router).request_timeout == 0.25
    router.apply(_state(_target("us-west", 1.0, 1000)), now=1.0)
    assert _route(router).request_timeout is None


def test_a_connect_retry_is_refused_once_attempts_are_spent() -> None:
    router = MeshRouter(rng=Random(1))
    router.apply(_state(_target("us-west", 1.0, 1000, 1001)), now=0.0)
    route = _route(router)
    endpoint = _pick(route, 0.0)
    route.on_failure(endpoint, Failure.CONNECT, 0.001, 0.001)
    retry = route.pick_retry(2, 0.001)
    assert retry is not None
    route.on_failure(retry, Failure.CONNECT, 0.001, 0.002)
    # The default policy allows two attempts in all.
    assert route.pick_retry(3, 0.002) is None


def test_stats_are_kept_per_upstream_and_target_cluster() -> None:
    router = MeshRouter(rng=Random(3))
    router.apply(_state(_target("us-west", 0.5, 1000), _target("eu", 0.5, 2000)), now=0.0)
    route = _route(router)
    for index in range(100):
        endpoint = _pick(route, 0.001 * index)
        route.on_response(endpoint, 200 if endpoint.target.cluster == "eu" else 503, 0.002, 0.0)
    windows = router.stats.drain(1e12)
    by_cluster = {w.target_cluster: w.requests for w in windows}
    assert sum(by_cluster.values()) == 100
    assert set(by_cluster) == {"us-west", "eu"}


def _connect_failed(route: MeshRoute, endpoint: MeshEndpoint, now: float) -> None:
    """``endpoint`` was picked and its connect failed at ``now``."""
    endpoint.start()
    assert endpoint.target.breaker.try_acquire() is None
    route.on_failure(endpoint, Failure.CONNECT, 0.001, now)


def test_a_connect_failure_takes_the_endpoint_out_at_once_whatever_the_share_cap() -> None:
    router = MeshRouter(rng=Random(1))
    router.apply(_state(_target("us-west", 1.0, 1000, 1001)), now=0.0)
    route = _route(router)
    dead = next(e for e in router.targets()[0].endpoints if e.port == 1000)
    _connect_failed(route, dead, 1.0)
    assert {_pick(route, 1.5).port for _ in range(50)} == {1001}
    # Back in rotation after a second; a second failure in a row keeps it out twice as long.
    assert 1000 in {_pick(route, 2.01).port for _ in range(50)}
    _connect_failed(route, dead, 3.0)
    assert {_pick(route, 4.5).port for _ in range(50)} == {1001}


def test_the_retry_after_a_local_connect_failure_goes_to_a_weight_zero_remote() -> None:
    router = MeshRouter(rng=Random(1))
    router.apply(_state(_target("us-west", 1.0, 1000, 1001), _target("eu", 0.0, 2000)), now=0.0)
    route = _route(router)
    first = _pick(route, 0.0)
    assert first.target.cluster == "us-west"
    route.on_failure(first, Failure.CONNECT, 0.001, 0.001)
    retry = route.pick_retry(2, 0.001)
    assert retry is not None
    assert (retry.target.cluster, retry.port) == ("eu", 2000)


@pytest.mark.parametrize(
    ("remote_weight", "remote_ports", "expected"),
    [
        (0.0, (2000,), {2000}),  # a mirrored target at weight 0 is a failover priority
        (0.0, (), {1000, 1001}),  # nowhere else to go: the local endpoints anyway (panic)
    ],
    ids=["next priority", "panic"],
)
def test_picks_skip_a_target_whose_endpoints_are_all_out(
    remote_weight: float, remote_ports: tuple[int, ...], expected: set[int]
) -> None:
    router = MeshRouter(rng=Random(1))
    router.apply(
        _state(_target("us-west", 1.0, 1000, 1001), _target("eu", remote_weight, *remote_ports)),
        now=0.0,
    )
    route = _route(router)
    for endpoint in router.targets()[0].endpoints:
        _connect_failed(route, endpoint, 0.001)
    assert {_pick(route, 0.5).port for _ in range(50)} == expected


def test_a_response_resets_the_connect_failure_backoff() -> None:
    router = MeshRouter(rng=Random(1))
    router.apply(_state(_target("us-west", 1.0, 1000, 1001)), now=0.0)
    route = _route(router)
    flaky = next(e for e in router.targets()[0].endpoints if e.port == 1000)
    for now in (0.0, 10.0, 30.0):
        _connect_failed(route, flaky, now)
    flaky.start()
    flaky.target.breaker.try_acquire()
    route.on_response(flaky, 200, 0.001, 50.0)
    _connect_failed(route, flaky, 60.0)
    # Out for the base second again, not for 8 s.
    assert 1000 in {_pick(route, 61.01).port for _ in range(50)}
