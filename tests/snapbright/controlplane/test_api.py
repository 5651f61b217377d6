"""The admin API and the gateway's snapshot on a running control plane."""

from __future__ import annotations

import asyncio
import math
import time
import urllib.error
import urllib.request
from pathlib import Path

from proxy.api.v1 import discovery_pb2 as pb
from snapbright.controlplane.process import ControlPlane
from tests.snapbright.controlplane.conftest import (
    call,
    control_plane,
    next_snapshot,
    registration,
    sidecar,
    until,
    write_config,
)

EXPORT_PAY = """\
apiVersion: snapbright.io/v1alpha1
kind: ExportPolicy
metadata: {name: exports}
spec:
  exports:
    - service: pay
      peers: [ap-southeast, eu-central]
"""


async def test_a_gateway_is_sent_routes_for_exported_services_and_the_control_plane(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, "us-west")
    (tmp_path / "policies" / "exports.yaml").write_text(EXPORT_PAY)
    async with control_plane(config) as plane:
        for name, service, port in (("pay-1", "pay", 9001), ("cart-1", "cart", 9002)):
            body = registration(name, service, port)
            assert (await call("POST", f"{plane.admin_url}/api/v1/registrations", body))[0] == 200
        gateway = sidecar(
            plane.ca(),
            plane.discovery_target,
            "us-west",
            "east-west",
            "snapbright-system",
            role=pb.ProxyIdentity.ROLE_GATEWAY,
        )
        task = asyncio.create_task(gateway.run())
        try:
            snapshot = await next_snapshot(gateway)
            routes = {r.sni: r for r in snapshot.gateway_routes}
            assert sorted(routes) == [
                "controlplane.snapbright.us-west.acme",
                "pay.default.us-west.acme",  # cart is not exported: no route
            ]
            pay = routes["pay.default.us-west.acme"]
            assert [(e.address, e.port) for e in pay.endpoints] == [("127.0.0.1", 9001)]
            assert list(pay.exported_to) == ["ap-southeast", "eu-central"]
            control = routes["controlplane.snapbright.us-west.acme"]
            assert [(e.address, e.port) for e in control.endpoints] == [
                ("127.0.0.1", plane.ports["peering"])
            ]
            assert list(snapshot.upstreams) == []
        finally:
            gateway.close()
            task.cancel()


async def test_status_reports_readiness_bundles_certificates_and_subscribers(
    tmp_path: Path,
) -> None:
    async with control_plane(write_config(tmp_path, "us-west")) as plane:
        client = sidecar(plane.ca(), plane.discovery_target, "us-west", "web")
        task = asyncio.create_task(client.run())
        try:
            version = (await next_snapshot(client)).version
            await until(lambda: any(s.acked_version for s in plane.discovery.subscribers()))
            status, body = await call("GET", f"{plane.admin_url}/api/v1/status")
        finally:
            client.close()
            task.cancel()
    assert status == 200
    assert body["ready"] == {"catalog": True, "policies": True}
    assert body["trustDomain"] == "us-west.acme"
    assert [(b["trustDomain"], b["sequence"], b["roots"]) for b in body["bundles"]] == [
        ("us-west.acme", 1, 1)
    ]
    assert body["certificates"]["controlPlane"]["spiffeId"] == (
        "spiffe://us-west.acme/ns/snapbright-system/sa/controlplane"
    )
    assert body["certificates"]["controlPlane"]["notAfter"] > body["now"]
    assert [(s["role"], s["service"], s["ackedVersion"]) for s in body["subscribers"]] == [
        ("sidecar", "web", version)
    ]
    assert body["nacks"] == []
    assert body["peers"] == []
    assert body["policies"]["ok"] is True


def _rule(plane: ControlPlane, service: str) -> str | None:
    decision = plane.failover.last_decision(service, "us-west")
    return None if decision is None else decision.rule.value


FAILOVER_PAY = """\
apiVersion: snapbright.io/v1alpha1
kind: FailoverPolicy
metadata: {name: pay-failover}
spec:
  service: pay
  triggers: {errorRate: {enter: 10%, exit: 5%}}
  evidence: {enterSpan: 3s}
"""


async def test_explain_shows_the_failover_decisions_for_a_service(tmp_path: Path) -> None:
    config = write_config(tmp_path, "us-west")
    (tmp_path / "policies" / "failover.yaml").write_text(FAILOVER_PAY)
    async with control_plane(config) as plane:
        unknown = await call("GET", f"{plane.admin_url}/api/v1/explain/nothing")
        assert unknown[0] == 404
        body = registration("pay-1", "pay", 9001)
        body["endpoint"]["health"] = "critical"
        assert (await call("POST", f"{plane.admin_url}/api/v1/registrations", body))[0] == 200
        await until(lambda: _rule(plane, "pay") == "no-healthy-local")
        status, explained = await call("GET", f"{plane.admin_url}/api/v1/explain/pay")
        now = time.time()
        observed = plane.health.observe("pay", "us-west", now)
    assert status == 200
    assert explained["service"] == "pay"
    assert explained["policy"] == "pay-failover"
    assert explained["live"]["explanation"]
    # The health view observes pay over its policy's enter span (3 s, not the default 1 s).
    assert observed.targets[0].recent_start == math.floor(now) - 3
    assert all(r["service"] == "pay" for r in explained["records"])


async def test_a_service_nobody_calls_without_a_policy_is_explained_as_default(
    tmp_path: Path,
) -> None:
    async with control_plane(write_config(tmp_path, "us-west")) as plane:
        body = registration("pay-1", "pay", 9001)
        body["endpoint"]["health"] = "critical"
        assert (await call("POST", f"{plane.admin_url}/api/v1/registrations", body))[0] == 200
        await until(lambda: ("pay", "us-west") in plane.health.pairs(0.0))
        known = time.time()
        await until(lambda: (plane.failover.ticked_at or 0.0) > known)
        decision = plane.failover.last_decision("pay", "us-west")
        status, explained = await call("GET", f"{plane.admin_url}/api/v1/explain/pay")
        _, answer = await call("GET", f"{plane.admin_url}/api/v1/status")
    assert decision is None  # a local-only copy nobody calls: nowhere to move, nothing to do
    assert status == 200
    assert explained["policy"] is None
    live = explained["live"]
    assert (live["mode"], live["rule"]) == ("default", "default")
    assert live["weights"] == {"us-west": 10_000}
    assert live["explanation"].startswith("default: no callers, no policy; discovery's weights")
    (pay,) = answer["failover"]
    assert (pay["service"], pay["caller"], pay["mode"], pay["rule"]) == (
        "pay",
        "us-west",
        "default",
        "default",
    )
    assert pay["lastRecord"] is None


async def test_metrics_ready_and_live_answer_and_other_hosts_are_refused(tmp_path: Path) -> None:
    async with control_plane(write_config(tmp_path, "us-west")) as plane:
        metrics = await asyncio.to_thread(_get, f"{plane.admin_url}/metrics")
        assert b'snapbright_config_reload_total{result="ok"} 1.0' in metrics
        assert b"snapbright_discovery_subscribers" in metrics
        assert (await call("GET", f"{plane.admin_url}/live"))[0] == 200
        assert (await call("GET", f"{plane.admin_url}/ready"))[0] == 200
        rebinding = await asyncio.to_thread(
            _status_with_host, f"{plane.admin_url}/api/v1/status", "evil.example"
        )
        assert rebinding == 421  # DNS rebinding: the admin API answers only its own names


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
        body: bytes = response.read()
        return body


def _status_with_host(url: str, host: str) -> int:
    request = urllib.request.Request(url, headers={"Host": host})  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code


async def test_heartbeat_and_deregister_follow_the_registration(tmp_path: Path) -> None:
    async with control_plane(write_config(tmp_path, "us-west")) as plane:
        base = f"{plane.admin_url}/api/v1/registrations"
        assert (await call("PUT", f"{base}/pay-1/heartbeat"))[0] == 404
        status, body = await call("POST", base, registration("pay-1", "pay", 9001) | {"ttl": "5s"})
        assert (status, body["ttlSeconds"]) == (200, 5.0)
        assert (await call("PUT", f"{base}/pay-1/heartbeat"))[0] == 200
        assert (await call("DELETE", f"{base}/pay-1"))[0] == 204
        assert (await call("DELETE", f"{base}/pay-1"))[0] == 404
        status, body = await call("POST", base, registration("pay-1", "pay", 9001) | {"ttl": "0s"})
        assert (status, body["error"]) == (400, "ttl must be above 0s and at most 720h")


async def test_the_dashboard_is_served_on_the_admin_port_with_this_cluster(
    tmp_path: Path,
) -> None:
    async with control_plane(write_config(tmp_path, "us-west")) as plane:
        await until(lambda: bool(plane.board.snapshot().regions))
        status, state = await call("GET", f"{plane.admin_url}/api/v1/state")
        page = await asyncio.to_thread(_get, f"{plane.admin_url}/")
    assert status == 200
    assert state["cluster"] == "us-west"
    assert b"<html" in page.lower()


async def test_status_reports_the_ca_the_failover_state_and_explain_honours_a_limit(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, "us-west")
    (tmp_path / "policies" / "failover.yaml").write_text(FAILOVER_PAY)
    async with control_plane(config) as plane:
        body = registration("pay-1", "pay", 9001)
        body["endpoint"]["health"] = "critical"
        assert (await call("POST", f"{plane.admin_url}/api/v1/registrations", body))[0] == 200
        # With a policy, pay is decided from the start (no-local-data until it registers).
        await until(lambda: _rule(plane, "pay") == "no-healthy-local")
        status, answer = await call("GET", f"{plane.admin_url}/api/v1/status")
        limited = await call("GET", f"{plane.admin_url}/api/v1/explain/pay?limit=1")
        bad = await call("GET", f"{plane.admin_url}/api/v1/explain/pay?limit=x")
    assert status == 200
    (root,) = answer["certificates"]["authorities"]
    assert root["kind"] == "root"
    assert root["notBefore"] < answer["now"] < root["notAfter"]
    assert root["retireAt"] is None
    svid = answer["certificates"]["controlPlane"]
    assert svid["notBefore"] < svid["renewAt"] < svid["notAfter"]
    assert (answer["probeGateways"], answer["staleGraceSeconds"]) == (False, 60.0)
    assert answer["bundles"][0]["refreshHintSeconds"] == 300
    assert (answer["mirrors"], answer["exports"]) == ([], [])
    (pay,) = answer["failover"]
    assert (pay["service"], pay["caller"], pay["mode"], pay["rule"]) == (
        "pay",
        "us-west",
        "local-down",
        "no-healthy-local",
    )
    assert pay["lastRecord"]["rule"] == "no-healthy-local"
    assert limited[0] == 200
    assert len(limited[1]["records"]) == 1
    assert bad == (400, {"error": "limit must be a whole number"})


async def test_status_shows_each_peers_trust_both_ways_mirrors_and_exports(
    tmp_path: Path,
) -> None:
    west = write_config(tmp_path / "west", "us-west")
    east = write_config(tmp_path / "east", "ap-southeast")
    (tmp_path / "east" / "policies" / "exports.yaml").write_text(
        EXPORT_PAY.replace("[ap-southeast, eu-central]", "[us-west]")
    )
    async with control_plane(east) as exporter, control_plane(west) as importer:
        body = registration("pay-1", "pay", 9001)
        assert (await call("POST", f"{exporter.admin_url}/api/v1/registrations", body))[0] == 200
        token = (await call("POST", f"{exporter.admin_url}/api/v1/peering/token", {}))[1]
        establish = {"token": token["token"]}
        assert (await call("POST", f"{importer.admin_url}/api/v1/peering/establish", establish))[
            0
        ] == 200
        await until(lambda: importer.peering.bundle_acked("ap-southeast") == 1)
        await until(lambda: "ap-southeast" in importer.view.peer_bundles)
        await until(lambda: "ap-southeast" in importer.view.peers)
        await until(lambda: bool(importer.view.peers["ap-southeast"].imports))
        _, imported = await call("GET", f"{importer.admin_url}/api/v1/status")
        _, exported = await call("GET", f"{exporter.admin_url}/api/v1/status")
    (peer,) = imported["peers"]
    assert peer["trustDomain"] == "ap-southeast.acme"
    assert peer["gateways"] == [f"127.0.0.1:{exporter.ports['peering']}"]
    assert peer["bundleAcked"] == 1
    assert (peer["bundle"]["trustDomain"], peer["bundle"]["sequence"]) == ("ap-southeast.acme", 1)
    assert imported["mirrors"] == [
        {
            "service": "pay",
            "namespace": "default",
            "peer": "ap-southeast",
            "present": True,
            "stale": False,
            "staleSince": None,
            "probeAlive": True,
            "endpoints": 1,
            "healthyEndpoints": 1,
        }
    ]
    assert exported["exports"] == [
        {
            "service": "pay",
            "namespace": "default",
            "peers": ["us-west"],
            "endpoints": ["127.0.0.1:9001"],
        }
    ]
