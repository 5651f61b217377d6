"""The routing table and the balancer, as pure values."""

from __future__ import annotations

import random

import pytest

from gateway.config.model import GatewayConfig
from gateway.route.core import Balancer, RoutingTable, control_plane_name, probe_name
from gateway.route.model import (
    ControlPlaneTarget,
    ProbeTarget,
    Refusal,
    ServiceTarget,
    Upstream,
)

_CONFIG = GatewayConfig.model_validate(
    {
        "apiVersion": "snapbright.io/v1alpha1",
        "kind": "GatewayConfig",
        "metadata": {"name": "gw"},
        "spec": {
            "cluster": "east",
            "mesh": "acme",
            "controlPlane": {"address": "127.0.0.1", "port": 15012},
            "probe": {
                "certificate": "c.pem",
                "key": "k.pem",
                "bundles": [{"trustDomain": "west.acme", "path": "b.json"}],
            },
            "services": [
                {
                    "name": "payments",
                    "exported": True,
                    "endpoints": [
                        {"address": "127.0.0.1", "port": 9001},
                        {"address": "127.0.0.1", "port": 9002},
                    ],
                },
                {"name": "ledger", "namespace": "money", "exported": False},
                {"name": "empty", "exported": True},
            ],
        },
    },
    strict=False,
)
_TABLE = RoutingTable.from_spec(_CONFIG.spec)
_A, _B = Upstream("127.0.0.1", 9001), Upstream("127.0.0.1", 9002)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "payments.default.east.acme",
            ServiceTarget("payments.default.east.acme", (_A, _B), "round-robin"),
        ),
        ("ledger.money.east.acme", Refusal("not-exported")),
        ("empty.default.east.acme", Refusal("no-endpoints")),
        ("payments.default.west.acme", Refusal("unknown-name")),
        ("payments.east.acme", Refusal("unknown-name")),
        ("other.default.east.acme", Refusal("unknown-name")),
        (control_plane_name("east", "acme"), ControlPlaneTarget(Upstream("127.0.0.1", 15012))),
        (probe_name("east", "acme"), ProbeTarget()),
    ],
)
def test_names_resolve_to_their_target_or_refusal(
    name: str, expected: ServiceTarget | ControlPlaneTarget | ProbeTarget | Refusal
) -> None:
    assert _TABLE.resolve(name) == expected


def test_without_a_control_plane_or_probe_their_names_are_unknown() -> None:
    spec = _CONFIG.spec.model_copy(update={"control_plane": None, "probe": None})
    table = RoutingTable.from_spec(spec)
    assert table.resolve(control_plane_name("east", "acme")) == Refusal("unknown-name")
    assert table.resolve(probe_name("east", "acme")) == Refusal("unknown-name")


def test_round_robin_rotates_through_endpoints() -> None:
    target = ServiceTarget("s", (_A, _B), "round-robin")
    balancer = Balancer()
    picks = [balancer.pick(target, random.Random(0)) for _ in range(4)]
    assert picks == [_A, _B, _A, _B]
    assert balancer.open_connections(_A) == 2


def test_least_connections_prefers_the_endpoint_with_fewest_open() -> None:
    target = ServiceTarget("s", (_A, _B), "least-connections")
    balancer = Balancer()
    rng = random.Random(7)
    first = balancer.pick(target, rng)
    second = balancer.pick(target, rng)
    assert {first, second} == {_A, _B}
    balancer.release(_A)
    assert balancer.pick(target, rng) == _A
    assert balancer.open_connections(_A) == 1
    assert balancer.open_connections(_B) == 1


def test_release_never_counts_below_zero() -> None:
    balancer = Balancer()
    balancer.release(_A)
    assert balancer.open_connections(_A) == 0
