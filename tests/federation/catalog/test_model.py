"""Admission of raw catalog entries: hostile data becomes a named rejection, never a route."""

from __future__ import annotations

import pytest

from federation.catalog.model import (
    AdmissionPolicy,
    Catalog,
    CatalogEntryError,
    DeniedTarget,
    Endpoint,
    Health,
    Protocol,
    Reason,
    Registration,
    Rejection,
    Service,
    Workload,
    admit_endpoint,
    admit_service,
    admit_workload,
)

ADMIN = DeniedTarget("127.0.0.1", 9901)
STRICT = AdmissionPolicy(denied=frozenset({ADMIN, DeniedTarget("10.0.0.5", 8500)}))
LOCAL = AdmissionPolicy(allow_loopback=True, denied=frozenset({ADMIN}))


def _endpoint(**changes: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "service": "pay",
        "namespace": "default",
        "address": "10.1.2.3",
        "port": 8080,
        "zone": "us-west-2a",
        "health": "passing",
        "workload": "pay-7f9c",
        "tags": ["v1"],
        "meta": {"version": "1.2.3"},
    }
    raw.update(changes)
    return raw


HOSTILE = [
    ("dot-dot-slash name", {"service": "../etc"}, Reason.NAME_NOT_DNS_LABEL),
    ("CRLF in name", {"service": "pay\r\nX-Evil: 1"}, Reason.NAME_NOT_DNS_LABEL),
    ("trailing newline", {"service": "pay\n"}, Reason.NAME_NOT_DNS_LABEL),
    ("control character", {"service": "pa\x00y"}, Reason.NAME_NOT_DNS_LABEL),
    ("uppercase", {"service": "Pay"}, Reason.NAME_NOT_DNS_LABEL),
    ("cyrillic look-alike", {"service": "p\u0430y"}, Reason.NAME_NOT_DNS_LABEL),
    ("kelvin sign", {"service": "\u212aube"}, Reason.NAME_NOT_DNS_LABEL),
    ("overlong name", {"service": "a" * 64}, Reason.NAME_NOT_DNS_LABEL),
    ("empty name", {"service": ""}, Reason.NAME_NOT_DNS_LABEL),
    ("leading dash", {"service": "-pay"}, Reason.NAME_NOT_DNS_LABEL),
    ("bad namespace", {"namespace": "a/b"}, Reason.NAME_NOT_DNS_LABEL),
    ("bad zone", {"zone": "zone a"}, Reason.NAME_NOT_DNS_LABEL),
    ("bad workload", {"workload": "x;rm"}, Reason.NAME_NOT_DNS_LABEL),
    ("missing name", {"service": None}, Reason.MALFORMED),
    ("port 0", {"port": 0}, Reason.PORT_OUT_OF_RANGE),
    ("port 65536", {"port": 65536}, Reason.PORT_OUT_OF_RANGE),
    ("negative port", {"port": -1}, Reason.PORT_OUT_OF_RANGE),
    ("port as string", {"port": "80"}, Reason.MALFORMED),
    ("port as bool", {"port": True}, Reason.MALFORMED),
    ("host name", {"address": "evil.example.com"}, Reason.ADDRESS_NOT_IP),
    ("short IPv4 form", {"address": "127.1"}, Reason.ADDRESS_NOT_IP),
    ("leading zeros", {"address": "010.1.2.3"}, Reason.ADDRESS_NOT_IP),
    ("IPv6 zone", {"address": "fe80::1%eth0"}, Reason.ADDRESS_NOT_IP),
    ("0.0.0.0", {"address": "0.0.0.0"}, Reason.ADDRESS_UNSPECIFIED),
    ("0.1.2.3 this network", {"address": "0.1.2.3"}, Reason.ADDRESS_UNSPECIFIED),
    ("::", {"address": "::"}, Reason.ADDRESS_UNSPECIFIED),
    ("loopback", {"address": "127.0.0.1"}, Reason.ADDRESS_LOOPBACK),
    ("other loopback", {"address": "127.8.9.10"}, Reason.ADDRESS_LOOPBACK),
    ("IPv6 loopback", {"address": "::1"}, Reason.ADDRESS_LOOPBACK),
    ("mapped loopback", {"address": "::ffff:127.0.0.1"}, Reason.ADDRESS_LOOPBACK),
    ("link-local", {"address": "169.254.10.10"}, Reason.ADDRESS_LINK_LOCAL),
    ("IPv6 link-local", {"address": "fe80::1"}, Reason.ADDRESS_LINK_LOCAL),
    ("metadata", {"address": "169.254.169.254"}, Reason.ADDRESS_METADATA),
    ("mapped metadata", {"address": "::ffff:169.254.169.254"}, Reason.ADDRESS_METADATA),
    ("AWS IPv6 metadata", {"address": "fd00:ec2::254"}, Reason.ADDRESS_METADATA),
    ("multicast", {"address": "224.0.0.1"}, Reason.ADDRESS_MULTICAST),
    ("IPv6 multicast", {"address": "ff02::1"}, Reason.ADDRESS_MULTICAST),
    ("broadcast", {"address": "255.255.255.255"}, Reason.ADDRESS_BROADCAST),
    ("denied pair", {"address": "10.0.0.5", "port": 8500}, Reason.ADDRESS_DENIED),
    ("unknown health", {"health": "maintenance"}, Reason.HEALTH_UNKNOWN),
    ("tag with label injection", {"tags": ['a",evil="1']}, Reason.TAG_UNSAFE),
    ("tag with brace", {"tags": ["a}"]}, Reason.TAG_UNSAFE),
    ("tag with equals", {"tags": ["zone=a"]}, Reason.TAG_UNSAFE),
    ("tag with newline", {"tags": ["a\nb"]}, Reason.TAG_UNSAFE),
    ("too many tags", {"tags": [f"t{i}" for i in range(33)]}, Reason.META_TOO_LARGE),
    ("meta key with equals", {"meta": {"a=b": "c"}}, Reason.META_UNSAFE),
    ("meta key with quote", {"meta": {'le"': "c"}}, Reason.META_UNSAFE),
    ("meta key with CRLF", {"meta": {"X\r\nSet-Cookie": "c"}}, Reason.META_UNSAFE),
    ("meta value with newline", {"meta": {"k": "a\r\nb"}}, Reason.META_UNSAFE),
    ("meta value with brace", {"meta": {"k": "}"}}, Reason.META_UNSAFE),
    ("too many meta entries", {"meta": {f"k{i}": "v" for i in range(65)}}, Reason.META_TOO_LARGE),
    ("huge meta value", {"meta": {"k": "v" * 513}}, Reason.META_TOO_LARGE),
    (
        "meta over the byte budget",
        {"meta": {f"k{i}": "v" * 500 for i in range(9)}},
        Reason.META_TOO_LARGE,
    ),
    ("meta not a map", {"meta": ["a"]}, Reason.MALFORMED),
]


@pytest.mark.parametrize(
    ("changes", "reason"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_hostile_endpoint_is_rejected_for_its_reason(
    changes: dict[str, object], reason: Reason
) -> None:
    result = admit_endpoint(_endpoint(**changes), STRICT)
    assert isinstance(result, Rejection)
    assert result.reason is reason


def test_rejection_subject_is_printable_and_bounded() -> None:
    result = admit_endpoint(_endpoint(service="x\r\n" + "y" * 500), STRICT)
    assert isinstance(result, Rejection)
    assert "\r" not in result.subject
    assert "\n" not in result.subject
    assert len(result.subject) <= 80


def test_well_formed_endpoint_is_admitted_with_normalised_values() -> None:
    result = admit_endpoint(_endpoint(address="2001:db8:0::1", tags=["b", "a", "a"]), STRICT)
    assert result == Endpoint(
        service="pay",
        address="2001:db8::1",
        port=8080,
        zone="us-west-2a",
        health=Health.PASSING,
        workload="pay-7f9c",
        tags=("a", "b"),
        meta=(("version", "1.2.3"),),
    )


LOCAL_CASES = [
    ("loopback allowed locally", "127.0.0.1", 18080, None),
    ("IPv6 loopback allowed locally", "::1", 18080, None),
    ("admin port denied", "127.0.0.1", 9901, Reason.ADDRESS_DENIED),
    ("admin port via another loopback", "127.0.0.2", 9901, Reason.ADDRESS_DENIED),
    ("admin port via IPv6 loopback", "::1", 9901, Reason.ADDRESS_DENIED),
    ("admin port via mapped form", "::ffff:127.0.0.1", 9901, Reason.ADDRESS_DENIED),
    ("metadata still refused", "169.254.169.254", 80, Reason.ADDRESS_METADATA),
    ("unspecified still refused", "0.0.0.0", 18080, Reason.ADDRESS_UNSPECIFIED),
]


@pytest.mark.parametrize(
    ("address", "port", "reason"), [c[1:] for c in LOCAL_CASES], ids=[c[0] for c in LOCAL_CASES]
)
def test_local_mesh_allows_loopback_but_never_our_admin_ports(
    address: str, port: int, reason: Reason | None
) -> None:
    result = admit_endpoint(_endpoint(address=address, port=port), LOCAL)
    if reason is None:
        assert isinstance(result, Endpoint)
    else:
        assert isinstance(result, Rejection)
        assert result.reason is reason


def test_wildcard_deny_entry_covers_every_address_on_that_port() -> None:
    policy = AdmissionPolicy(denied=frozenset({DeniedTarget("0.0.0.0", 8502)}))
    assert policy.check_target("10.9.9.9", 8502) is not None
    assert policy.check_target("10.9.9.9", 8503) is None


def test_service_and_workload_admission() -> None:
    assert admit_service({"name": "pay", "protocol": "grpc"}) == Service(
        "pay", protocol=Protocol.GRPC
    )
    bad = admit_service({"name": "pay", "protocol": "smtp"})
    assert isinstance(bad, Rejection)
    assert bad.reason is Reason.PROTOCOL_UNKNOWN
    workload = admit_workload({"name": "pay-1", "namespace": "shop", "service_account": "pay"})
    assert isinstance(workload, Workload)
    assert workload.spiffe_path == "/ns/shop/sa/pay"
    bad_sa = admit_workload({"name": "pay-1", "service_account": "../admin"})
    assert isinstance(bad_sa, Rejection)
    assert bad_sa.reason is Reason.NAME_NOT_DNS_LABEL


def test_direct_construction_validates_shape() -> None:
    with pytest.raises(CatalogEntryError, match="port-out-of-range"):
        Endpoint("pay", "10.0.0.1", 0)
    with pytest.raises(CatalogEntryError, match="name-not-dns-label"):
        Workload("pay", service_account="a/b")
    with pytest.raises(CatalogEntryError, match="must name the registering workload"):
        Registration("r1", Workload("pay-1"), Endpoint("pay", "10.0.0.1", 80, workload="other"))


def test_catalog_content_ignores_order_and_index() -> None:
    a = Endpoint("pay", "10.0.0.1", 80)
    b = Endpoint("pay", "10.0.0.2", 80)
    first = Catalog.of(1, [Service("pay")], [a, b])
    second = Catalog.of(7, [Service("pay")], [b, a, a])
    assert first.same_content(second)
    assert second.endpoints_of("pay") == (a, b)
    assert second.endpoints_of("cart") == ()
    assert second.service("pay") == Service("pay")
    assert not first.same_content(Catalog.of(2, [Service("pay")], [a]))
