"""The checks of `snapbright check`, one behaviour per row, over status values in virtual time."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from snapbright.check.core import (
    Check,
    Level,
    Unreachable,
    check_across,
    check_cluster,
    summary,
)
from snapbright.check.model import ClusterStatus

NOW = 1_800_000_000.0
DAY = 86400.0


def _healthy() -> dict[str, Any]:
    """A peered cluster where everything is well, as GET /api/v1/status says it."""
    return {
        "cluster": "us-west",
        "mesh": "acme",
        "trustDomain": "us-west.acme",
        "now": NOW,
        "ready": {"catalog": True, "policies": True},
        "peers": [
            {
                "peer": "ap-southeast",
                "state": "active",
                "lastHeardAt": NOW - 0.5,
                "rttSeconds": 0.08,
                "imported": 1,
                "exported": 1,
                "staleSince": None,
                "trustDomain": "ap-southeast.acme",
                "gateways": ["10.0.0.9:15443"],
                "bundleAcked": 2,
                "bundle": {
                    "trustDomain": "ap-southeast.acme",
                    "sequence": 1,
                    "roots": 1,
                    "notAfter": NOW + 300 * DAY,
                    "latestNotAfter": NOW + 300 * DAY,
                    "refreshHintSeconds": 300,
                },
            }
        ],
        "gateways": [{"peer": "ap-southeast", "alive": True, "state": "up", "rttSeconds": 0.081}],
        "probeGateways": True,
        "staleGraceSeconds": 60.0,
        "bundles": [
            {"trustDomain": "us-west.acme", "sequence": 2, "roots": 1, "notAfter": NOW + DAY}
        ],
        "certificates": {
            "controlPlane": {
                "spiffeId": "spiffe://us-west.acme/ns/snapbright-system/sa/controlplane",
                "notBefore": NOW - 3600,
                "notAfter": NOW + 23 * 3600,
                "renewAt": NOW + 15 * 3600,
            },
            "authorities": [
                {
                    "kind": "root",
                    "name": "1a",
                    "notBefore": NOW - DAY,
                    "notAfter": NOW + 364 * DAY,
                    "retireAt": None,
                }
            ],
        },
        "subscribers": [
            {
                "proxy": "web-1",
                "role": "sidecar",
                "service": "web",
                "sentVersion": "v7",
                "ackedVersion": "v7",
            }
        ],
        "nacks": [],
        "policies": {"ok": True, "errors": [], "files": ["policies/pay.yaml"]},
        "mirrors": [
            {
                "service": "pay",
                "peer": "ap-southeast",
                "present": True,
                "stale": False,
                "staleSince": None,
                "probeAlive": True,
                "endpoints": 1,
                "healthyEndpoints": 2,
            }
        ],
        "exports": [{"service": "cart", "peers": ["ap-southeast"], "endpoints": ["10.0.1.5:8080"]}],
        "failover": [],
    }


Edit = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Edit:
    """An edit that sets ``a.b.0.c`` (list indices as numbers) to ``value``."""

    def edit(status: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = status
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


def _checks(*edits: Edit, group: str) -> list[Check]:
    raw = copy.deepcopy(_healthy())
    for edit in edits:
        edit(raw)
    report = check_cluster(
        "us-west", "http://127.0.0.1:15000", ClusterStatus.model_validate(raw), NOW
    )
    return [c for c in report.checks if c.group == group]


def test_a_healthy_cluster_passes_every_check() -> None:
    report = check_cluster(
        "us-west", "http://127.0.0.1:15000", ClusterStatus.model_validate(_healthy()), NOW
    )
    assert [(c.level, c.message) for c in report.checks if c.level is not Level.OK] == []
    groups = list(dict.fromkeys(c.group for c in report.checks))
    assert groups == [
        "control plane",
        "policies",
        "gateways",
        "peering",
        "trust bundles",
        "certificates",
        "mirrors",
        "exports",
        "proxies",
    ]
    assert summary([report]) == (Level.OK, "all checks passed: the mesh is healthy")


CASES: list[tuple[str, list[Edit], str, Level, str, str]] = [
    # (behaviour, edits, group, level, in the message, in the hint or details)
    (
        "catalog not read is a failure",
        [_set("ready.catalog", False)],
        "control plane",
        Level.FAIL,
        "catalog has not been read",
        "Consul",
    ),
    (
        "no accepted policy set is a failure",
        [_set("ready.policies", False)],
        "control plane",
        Level.FAIL,
        "no policy set has been accepted",
        "fix the policy files",
    ),
    (
        "a rejected reload shows where the file is wrong",
        [
            _set("policies.ok", False),
            _set("policies.lastSuccessAt", NOW - 60),
            _set("policies.errors", ["policies/pay.yaml:6:13: spec.timeouts.request: bad"]),
        ],
        "policies",
        Level.FAIL,
        "last policy reload was rejected: the last good set stays",
        "policies/pay.yaml:6:13: spec.timeouts.request: bad",
    ),
    (
        "files rejected from the start say that nothing ever loaded",
        [_set("policies.ok", False), _set("policies.errors", ["p.yaml:1:1: kind: unknown"])],
        "policies",
        Level.FAIL,
        "no policy set has ever loaded",
        "p.yaml:1:1",
    ),
    (
        "a gateway probed down is a failure naming its address",
        [
            _set(
                "gateways.0",
                {
                    "peer": "ap-southeast",
                    "alive": False,
                    "state": "down",
                    "lastError": "connection refused",
                },
            )
        ],
        "gateways",
        Level.FAIL,
        "ap-southeast's gateway is down: connection refused",
        "10.0.0.9:15443",
    ),
    (
        "a gateway not answered yet is a warning",
        [_set("gateways.0", {"peer": "ap-southeast", "alive": False, "state": "unknown"})],
        "gateways",
        Level.WARN,
        "has not answered a probe yet",
        "after its first answer",
    ),
    (
        "a peer without a probe is a warning",
        [_set("gateways", [])],
        "gateways",
        Level.WARN,
        "ap-southeast's gateway is not probed",
        "first service the peer exports",
    ),
    (
        "a peer exporting to us whose gateway address is unknown is a failure",
        [_set("gateways", []), _set("peers.0.gateways", [])],
        "gateways",
        Level.FAIL,
        "no gateway address is known for ap-southeast",
        "set spec.gateways on ap-southeast's control plane",
    ),
    (
        "probes switched off with peers is a warning",
        [_set("probeGateways", False)],
        "gateways",
        Level.WARN,
        "gateway probes are off",
        "probeGateways: true",
    ),
    (
        "a silent active peer is a warning",
        [_set("peers.0.lastHeardAt", NOW - 9)],
        "peering",
        Level.WARN,
        "connected but silent for 9.0s",
        "heartbeats",
    ),
    (
        "an establishing peer is a warning",
        [_set("peers.0.state", "establishing")],
        "peering",
        Level.WARN,
        "ap-southeast is establishing",
        "gateway",
    ),
    (
        "a disconnected peer is a failure with how long",
        [_set("peers.0.state", "disconnected"), _set("peers.0.staleSince", NOW - 12)],
        "peering",
        Level.FAIL,
        "ap-southeast is disconnected for 12.0s",
        "10.0.0.9:15443",
    ),
    (
        "a peer behind on our bundle is a warning",
        [_set("peers.0.bundleAcked", 1)],
        "trust bundles",
        Level.WARN,
        "holds our bundle at sequence 1, ours is at 2",
        "retire an old root only after",
    ),
    (
        "a peer that never acked our bundle is a failure",
        [_set("peers.0.bundleAcked", 0)],
        "trust bundles",
        Level.FAIL,
        "has not acknowledged our bundle",
        "ACTIVE",
    ),
    (
        "the peer's bundle missing here is a failure",
        [_set("peers.0.bundle", None)],
        "trust bundles",
        Level.FAIL,
        "no trust bundle of ap-southeast here",
        "peering stream",
    ),
    (
        "a peer bundle whose roots all expired is a failure",
        [_set("peers.0.bundle.notAfter", NOW - 1), _set("peers.0.bundle.latestNotAfter", NOW - 1)],
        "trust bundles",
        Level.FAIL,
        "every root of ap-southeast's bundle has expired",
        "snapbright ca rotate",
    ),
    (
        "a peer bundle holding one expired root is a warning",
        [_set("peers.0.bundle.notAfter", NOW - 1)],
        "trust bundles",
        Level.WARN,
        "still holds an expired root",
        "prunes",
    ),
    (
        "a peer silent beyond its bundle's refresh hint is a warning",
        [_set("peers.0.state", "failing"), _set("peers.0.staleSince", NOW - 600)],
        "trust bundles",
        Level.WARN,
        "may be outdated: ap-southeast is silent for 10m, longer than its refresh hint (5m)",
        "bring the peering back",
    ),
    (
        "a root within 30 days of expiry is a warning",
        [_set("certificates.authorities.0.notAfter", NOW + 20 * DAY)],
        "certificates",
        Level.WARN,
        "root 1a expires in 20d",
        "snapbright ca rotate",
    ),
    (
        "an expired root is a failure",
        [_set("certificates.authorities.0.notAfter", NOW - DAY)],
        "certificates",
        Level.FAIL,
        "root 1a expired 24h ago",
        "rotate now",
    ),
    (
        "a control plane SVID in its last third is a warning",
        [_set("certificates.controlPlane.notAfter", NOW + 600)],
        "certificates",
        Level.WARN,
        "SVID expires in 10m: its renewal is overdue",
        "two thirds",
    ),
    (
        "an expired control plane SVID is a failure",
        [_set("certificates.controlPlane.notAfter", NOW - 5)],
        "certificates",
        Level.FAIL,
        "SVID expired 5.0s ago",
        "log",
    ),
    (
        "a withdrawn mirror of a dead gateway is a failure",
        [_set("mirrors.0.present", False), _set("mirrors.0.probeAlive", False)],
        "mirrors",
        Level.FAIL,
        "pay@ap-southeast is withdrawn",
        "probe says it is dead",
    ),
    (
        "a mirror withdrawn after the grace says so",
        [_set("mirrors.0.present", False), _set("mirrors.0.staleSince", NOW - 90)],
        "mirrors",
        Level.FAIL,
        "pay@ap-southeast is withdrawn",
        "longer than staleGrace (1m)",
    ),
    (
        "a mirror without gateway endpoints is a failure",
        [_set("mirrors.0.endpoints", 0)],
        "mirrors",
        Level.FAIL,
        "pay@ap-southeast has no gateway endpoint",
        "spec.gateways",
    ),
    (
        "a stale mirror within the grace is a warning",
        [_set("mirrors.0.stale", True), _set("mirrors.0.staleSince", NOW - 12)],
        "mirrors",
        Level.WARN,
        "pay@ap-southeast is stale for 12.0s (withdrawn after 1m)",
        "peering with ap-southeast is down",
    ),
    (
        "a mirror whose remote has no healthy endpoint is a warning",
        [_set("mirrors.0.healthyEndpoints", 0)],
        "mirrors",
        Level.WARN,
        "ap-southeast reports no healthy endpoint",
        "nothing healthier",
    ),
    (
        "an exported service whose endpoints are a peer's gateway is a daisy chain",
        [_set("exports.0.endpoints", ["10.0.0.9:15443"])],
        "exports",
        Level.FAIL,
        "its endpoints are ap-southeast's gateway: a mirror re-exported (daisy chain)",
        "stop exporting cart",
    ),
    (
        "a nack is a failure with its reason",
        [_set("nacks", [{"proxy": "web-1", "version": "v7", "reason": "bad route", "at": NOW}])],
        "proxies",
        Level.FAIL,
        "web-1 rejected config v7: bad route",
        "last good config",
    ),
    (
        "a proxy behind the latest config is a warning",
        [_set("subscribers.0.ackedVersion", "v6")],
        "proxies",
        Level.WARN,
        "web-1 has not acked the latest config (sent v7, acked v6)",
        "stuck",
    ),
]


@pytest.mark.parametrize(
    ("edits", "group", "level", "message", "hint"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_each_item_says_what_is_wrong_and_what_to_do(
    edits: list[Edit], group: str, level: Level, message: str, hint: str
) -> None:
    found = [c for c in _checks(*edits, group=group) if c.level is level]
    assert found, _checks(*edits, group=group)
    (check,) = found
    assert message in check.message
    assert hint in check.hint + " ".join(check.details)


OK_CASES: list[tuple[str, list[Edit], str, str]] = [
    (
        "a retiring root close to expiry is not a warning",
        [
            _set("certificates.authorities.0.notAfter", NOW + 5 * DAY),
            _set("certificates.authorities.0.retireAt", NOW + 2 * DAY),
        ],
        "certificates",
        "root 1a is retiring: it leaves the bundle in 2d",
    ),
    (
        "a single cluster has no gateways to probe",
        [_set("peers", []), _set("gateways", []), _set("mirrors", []), _set("exports", [])],
        "gateways",
        "no peers: no gateway to probe",
    ),
    (
        "a peer that exports nothing to us needs no gateway probe",
        [_set("gateways", []), _set("peers.0.imported", 0)],
        "gateways",
        "ap-southeast's gateway is not probed: ap-southeast exports nothing to us",
    ),
    (
        "a deleted peer is no longer checked",
        [_set("peers.0.state", "deleted"), _set("mirrors", [])],
        "peering",
        "no peerings",
    ),
    (
        "an exported service with its own endpoints is not a chain",
        [],
        "exports",
        "no mirrored service is re-exported (1 service(s) exported)",
    ),
    (
        "proxies that acked are counted",
        [],
        "proxies",
        "1 proxies acked the latest config",
    ),
]


@pytest.mark.parametrize(
    ("edits", "group", "message"), [pytest.param(*case[1:], id=case[0]) for case in OK_CASES]
)
def test_what_is_fine_passes(edits: list[Edit], group: str, message: str) -> None:
    checks = _checks(*edits, group=group)
    assert {c.level for c in checks} == {Level.OK}
    assert message in [c.message for c in checks]


def test_an_unreachable_control_plane_is_one_failure_with_a_hint() -> None:
    report = check_cluster(
        "us-west",
        "http://127.0.0.1:1",
        Unreachable("http://127.0.0.1:1", "cannot reach the control plane at …: refused"),
        NOW,
    )
    (check,) = report.checks
    assert (check.group, check.level) == ("control plane", Level.FAIL)
    assert "refused" in check.message
    assert "snapbright up" in check.hint
    assert report.failures == 1


def test_a_status_this_cli_cannot_read_is_a_failure_with_the_field() -> None:
    report = check_cluster(
        "x", "http://h:1", Unreachable("http://h:1", "ready: Field required", True), NOW
    )
    (check,) = report.checks
    assert "cannot read" in check.message
    assert check.details == ("ready: Field required",)


def test_the_summary_counts_failures_and_warnings_over_clusters() -> None:
    warned = check_cluster(
        "us-west", "a", ClusterStatus.model_validate(_edited(_set("probeGateways", False))), NOW
    )
    failed = check_cluster("eu", "b", Unreachable("b", "refused"), NOW)
    assert summary([warned]) == (
        Level.WARN,
        "all checks passed, with 1 warning(s) worth a look",
    )
    assert summary([warned, failed])[0] is Level.FAIL
    assert summary([warned, failed])[1].startswith("1 check(s) failed, 1 warning(s)")


def _edited(*edits: Edit) -> dict[str, Any]:
    raw = copy.deepcopy(_healthy())
    for edit in edits:
        edit(raw)
    return raw


def _exporter(sequence: int) -> dict[str, Any]:
    """ap-southeast's own status, publishing its bundle at ``sequence``."""
    raw = _healthy()
    raw |= {"cluster": "ap-southeast", "trustDomain": "ap-southeast.acme", "peers": []}
    raw["bundles"] = [{"trustDomain": "ap-southeast.acme", "sequence": sequence, "roots": 1}]
    return raw


@pytest.mark.parametrize(
    ("published", "level", "message"),
    [
        (1, Level.OK, "us-west holds ap-southeast's current bundle (sequence 1)"),
        (
            2,
            Level.WARN,
            "us-west holds ap-southeast's bundle at sequence 1, but ap-southeast publishes "
            "sequence 2",
        ),
    ],
)
def test_across_clusters_each_holds_its_peers_current_bundle(
    published: int, level: Level, message: str
) -> None:
    statuses = [ClusterStatus.model_validate(r) for r in (_healthy(), _exporter(published))]
    (check,) = check_across(statuses).checks
    assert (check.level, check.message) == (level, message)
    assert (check.hint != "") is (level is Level.WARN)


def test_across_clusters_skips_peers_whose_status_is_missing() -> None:
    assert check_across([ClusterStatus.model_validate(_healthy())]).checks == ()
