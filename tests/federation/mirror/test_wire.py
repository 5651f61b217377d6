"""Federated upstreams as proxies receive them."""

from __future__ import annotations

import pytest

from federation.mirror.core import (
    FederatedTarget,
    FederatedUpstream,
    LocalService,
    MirrorSettings,
    PeerView,
    TargetEndpoint,
    federate_service,
)
from federation.mirror.wire import upstream_to_proto
from federation.peering.model import ExportedService, GatewayAddress, ServiceKey
from proxy.api.v1 import discovery_pb2 as pb
from proxy.identity.model import TrustDomain

PAY = ServiceKey("shop", "pay")
SETTINGS = MirrorSettings("us-west", "acme", TrustDomain("us-west.acme"))


def test_a_federated_upstream_becomes_a_discovery_upstream_target_for_target() -> None:
    peer = PeerView(
        "ap-southeast",
        "acme",
        TrustDomain("ap-southeast.acme"),
        (GatewayAddress("10.1.0.1", 8443),),
        imports={PAY: ExportedService(PAY, "pay.shop.ap-southeast.acme", 2)},
        unreachable_since=99.0,
    )
    local = LocalService(PAY, (TargetEndpoint("10.0.0.5", 8080, "a", healthy=False),))
    upstream = federate_service(PAY, local, [peer], SETTINGS, 100.0)
    assert upstream is not None
    assert upstream_to_proto(upstream) == pb.Upstream(
        service="pay",
        namespace="shop",
        targets=[
            pb.Target(
                name="pay",
                cluster="us-west",
                weight=0,
                endpoints=[pb.Endpoint(address="10.0.0.5", port=8080, zone="a", healthy=False)],
                sni="pay.shop.us-west.acme",
                trust_domain="us-west.acme",
                stale=False,
            ),
            pb.Target(
                name="pay@ap-southeast",
                cluster="ap-southeast",
                weight=10000,
                endpoints=[pb.Endpoint(address="10.1.0.1", port=8443, healthy=True)],
                sni="pay.shop.ap-southeast.acme",
                trust_domain="ap-southeast.acme",
                stale=True,
            ),
        ],
    )


def test_weights_that_do_not_add_up_are_never_handed_to_a_proxy() -> None:
    target = FederatedTarget(
        "pay", "us-west", 9999, (), "pay.shop.us-west.acme", TrustDomain("us-west.acme"), False, 1
    )
    with pytest.raises(ValueError, match="do not sum to 10000"):
        upstream_to_proto(FederatedUpstream(PAY, (target,), "hand-made"))
