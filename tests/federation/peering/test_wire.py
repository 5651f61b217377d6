"""The peering stream's edge: values to protobuf and back, and what a peer cannot send."""

from __future__ import annotations

import math

import pytest

from federation.api.v1 import peering_pb2 as pb
from federation.peering.core import (
    AckReceived,
    Disconnected,
    Opened,
    ServicesDeltaReceived,
    received,
)
from federation.peering.model import (
    Ack,
    Close,
    ExportedService,
    GatewayAddress,
    HealthSource,
    HealthSummaries,
    Heartbeat,
    Open,
    PeeringMessage,
    ServiceHealth,
    ServiceKey,
    ServicesDelta,
    ServicesSnapshot,
    TrustBundleUpdate,
)
from federation.peering.wire import MAX_CLOSE_REASON, WireError, from_proto, to_proto
from proxy.identity.model import TrustDomain

PAY = ServiceKey("shop", "pay")
AP = TrustDomain("ap-southeast.acme")
SERVICE = ExportedService(PAY, "pay.shop.ap-southeast.acme", 3)
GW_V4 = GatewayAddress("10.0.0.7", 8443)


def open_naming(*gateways: str) -> pb.PeeringMessage:
    return pb.PeeringMessage(
        open=pb.Open(cluster="ap", mesh="acme", trust_domain="ap.acme", gateways=gateways)
    )


def health(headroom: float | None) -> ServiceHealth:
    return ServiceHealth(PAY, 0.01, 0.05, 0.2, 0.999, 120.0, headroom, 3)


MESSAGES: list[PeeringMessage] = [
    Open("ap-southeast", "acme", AP, b"\x01" * 32, 1_000_000_000_017, 4),
    Open("ap-southeast", "acme.example", AP),
    ServicesSnapshot(2**63 + 5, (SERVICE, ExportedService(ServiceKey("b", "c"), "c.b.x.y", 0))),
    ServicesSnapshot(0, ()),
    ServicesDelta(10, 12, (SERVICE,), (ServiceKey("shop", "cart"),)),
    TrustBundleUpdate(AP, 7, b'{"keys": []}', (b"\x30\x82", b"\x30\x83")),
    HealthSummaries(1_800_000_000_000, (health(None), health(40.5))),
    # An idle copy: latencies from its cluster's probes of its endpoints, marked as such.
    HealthSummaries(
        1, (ServiceHealth(PAY, 0.002, 0.004, 0.004, 1.0, 0.0, None, 2, HealthSource.PROBES, 20),)
    ),
    Heartbeat(9, 1_800_000_000_123, 8, 1_800_000_000_001),
    Ack(12, 7),
    Close("peering deleted"),
    Open("ap-southeast", "acme", AP, gateways=(GW_V4, GatewayAddress("::1", 443))),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_survives_the_wire_unchanged(message: PeeringMessage) -> None:
    data = to_proto(message).SerializeToString()
    assert from_proto(pb.PeeringMessage.FromString(data)) == message


def test_an_absent_headroom_stays_absent_rather_than_becoming_zero() -> None:
    decoded = from_proto(to_proto(HealthSummaries(1, (health(None),))))
    assert isinstance(decoded, HealthSummaries)
    assert decoded.services[0].headroom_rps is None


def _health_proto(**fields: float) -> pb.PeeringMessage:
    values: dict[str, float] = {
        "latency_p50_seconds": 0.01,
        "latency_p95_seconds": 0.02,
        "latency_p99_seconds": 0.03,
        "success_rate": 1.0,
        "request_rate": 1.0,
    }
    values.update(fields)
    return pb.PeeringMessage(
        health=pb.HealthSummaries(
            services=[pb.ServiceHealth(name="pay", namespace="shop", **values)]  # type: ignore[arg-type]
        )
    )


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (pb.PeeringMessage(), "no body"),
        (open_naming("10.0.0.7"), "must be host:port"),
        (open_naming("10.0.0.7:0"), "not in 1..65535"),
        (open_naming("a b:80"), "neither an IP address nor a host name"),
        (open_naming("10.0.0.7:80", "10.0.0.7:80"), "listed twice"),
        (open_naming(*(f"10.0.0.7:{port}" for port in range(1, 18))), "at most 16"),
        (
            pb.PeeringMessage(open=pb.Open(cluster="AP", mesh="acme", trust_domain="x")),
            "not a DNS label",
        ),
        (
            pb.PeeringMessage(open=pb.Open(cluster="ap", mesh="acme", trust_domain="A:1")),
            "trust domain",
        ),
        (
            pb.PeeringMessage(
                services_snapshot=pb.ServicesSnapshot(
                    services=[pb.ExportedService(name="../etc", namespace="shop")]
                )
            ),
            "not a DNS label",
        ),
        (
            pb.PeeringMessage(
                services_snapshot=pb.ServicesSnapshot(
                    services=[
                        pb.ExportedService(name="pay", namespace="shop"),
                        pb.ExportedService(name="pay", namespace="shop"),
                    ]
                )
            ),
            "twice",
        ),
        (
            pb.PeeringMessage(
                services_delta=pb.ServicesDelta(from_version=3, version=4, removed=["pay"])
            ),
            "<namespace>/<name>",
        ),
        (
            pb.PeeringMessage(
                services_delta=pb.ServicesDelta(from_version=4, version=4, removed=["shop/pay"])
            ),
            "forward",
        ),
        (_health_proto(latency_p95_seconds=math.nan), "latency p95"),
        (_health_proto(latency_p50_seconds=-1.0), "latency p50"),
        (_health_proto(success_rate=1.5), "success rate"),
        (_health_proto(headroom_rps=math.inf), "headroom"),
    ],
    ids=[
        "empty",
        "gateway-without-port",
        "gateway-port-zero",
        "gateway-host-with-space",
        "gateway-twice",
        "too-many-gateways",
        "cluster-not-a-label",
        "bad-trust-domain",
        "path-in-service-name",
        "duplicate-service",
        "removal-without-namespace",
        "delta-not-forward",
        "nan-latency",
        "negative-latency",
        "success-above-one",
        "infinite-headroom",
    ],
)
def test_invalid_messages_are_refused_whole(message: pb.PeeringMessage, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        from_proto(message)


def test_a_close_reason_is_bounded_and_printable() -> None:
    hostile = "bye\r\n\x1b[31m" + "x" * 5000
    decoded = from_proto(pb.PeeringMessage(close=pb.Close(reason=hostile)))
    assert isinstance(decoded, Close)
    assert len(decoded.reason) == MAX_CLOSE_REASON
    assert decoded.reason.isprintable()


@pytest.mark.parametrize(
    ("message", "event"),
    [
        (MESSAGES[0], Opened),
        (MESSAGES[4], ServicesDeltaReceived),
        (Ack(1, 1), AckReceived),
        (Close("bye"), Disconnected),
    ],
)
def test_each_message_maps_to_its_session_event(message: PeeringMessage, event: type) -> None:
    assert isinstance(received(message, 5.0), event)
