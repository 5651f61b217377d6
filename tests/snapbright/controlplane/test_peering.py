"""Two control planes peered through their admin APIs, the way the CLI does it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from proxy.api.v1 import discovery_pb2 as pb
from tests.snapbright.controlplane.conftest import (
    call,
    control_plane,
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
      peers: [us-west]
"""


def _targets(snapshot: pb.Snapshot, service: str) -> dict[str, pb.Target]:
    for upstream in snapshot.upstreams:
        if upstream.service == service:
            return {t.name: t for t in upstream.targets}
    return {}


async def test_an_exported_service_appears_as_a_mirror_target_on_the_importing_side(
    tmp_path: Path,
) -> None:
    # A 1 s TTL: the failover loop may call "no local copy" one TTL after the catalog's read.
    west = write_config(tmp_path / "west", "us-west", catalog="{registrationTtl: 1s}")
    east = write_config(tmp_path / "east", "ap-southeast")
    (tmp_path / "east" / "policies" / "exports.yaml").write_text(EXPORT_PAY)
    async with control_plane(east) as exporter, control_plane(west) as importer:
        body = registration("pay-1", "pay", 9001)
        assert (await call("POST", f"{exporter.admin_url}/api/v1/registrations", body))[0] == 200
        status, answer = await call("POST", f"{exporter.admin_url}/api/v1/peering/token", {})
        assert status == 200, answer
        status, answer = await call(
            "POST", f"{importer.admin_url}/api/v1/peering/establish", {"token": answer["token"]}
        )
        assert (status, answer) == (200, {"peer": "ap-southeast"})
        token = (await call("POST", f"{exporter.admin_url}/api/v1/peering/token", {}))[1]
        status, answer = await call(
            "POST", f"{importer.admin_url}/api/v1/peering/establish", {"token": token["token"]}
        )
        assert (status, answer["error"]) == (
            409,
            "already peered with ap-southeast: delete it first",
        )

        client = sidecar(importer.ca(), importer.discovery_target, "us-west", "web")
        task = asyncio.create_task(client.run())
        try:
            await until(
                lambda: (
                    "pay@ap-southeast" in _targets(client.current(), "pay")
                    if client.version
                    else False
                )
            )
            target = _targets(client.current(), "pay")["pay@ap-southeast"]
            assert target.cluster == "ap-southeast"
            assert target.sni == "pay.default.ap-southeast.acme"
            assert target.trust_domain == "ap-southeast.acme"
            assert [(e.address, e.port) for e in target.endpoints] == [
                ("127.0.0.1", exporter.ports["peering"])
            ]
            assert target.weight == 10_000  # no local copy: all to the mirror
            domains = [b.trust_domain for b in client.current().trust_bundles]
            assert domains == ["us-west.acme", "ap-southeast.acme"]

            status, listed = await call("GET", f"{importer.admin_url}/api/v1/peering")
            assert status == 200
            assert [(p["peer"], p["state"], p["imported"]) for p in listed["peers"]] == [
                ("ap-southeast", "active", 1)
            ]
            status, services = await call("GET", f"{importer.admin_url}/api/v1/services")
            assert [t["name"] for t in services["services"][0]["targets"]] == ["pay@ap-southeast"]
            # Nobody here calls it and it has no policy: the failover loop leaves it to the
            # default weights (health/failover/loop.py), also after ticks that saw it.
            seen = time.time()
            await until(lambda: (importer.failover.ticked_at or 0.0) > seen)
            assert "pay" not in importer.view.weights
            status, services = await call("GET", f"{importer.admin_url}/api/v1/services")
            assert services["services"][0]["note"] == (
                "no local copy: split across 1 healthy remote target(s)"
            )

            assert (await call("DELETE", f"{importer.admin_url}/api/v1/peering/ap-southeast"))[
                0
            ] == 204
            await until(lambda: "pay" not in {u.service for u in client.current().upstreams})
            assert [b.trust_domain for b in client.current().trust_bundles] == ["us-west.acme"]
        finally:
            client.close()
            task.cancel()


async def test_a_bad_token_is_refused_with_a_reason(tmp_path: Path) -> None:
    async with control_plane(write_config(tmp_path, "us-west")) as plane:
        status, body = await call(
            "POST", f"{plane.admin_url}/api/v1/peering/establish", {"token": "sbpt1.nope.x"}
        )
        assert status == 400
        assert body["error"].startswith("bad token"), body
        status, body = await call("POST", f"{plane.admin_url}/api/v1/peering/establish", {})
        assert status == 400
        status, body = await call("DELETE", f"{plane.admin_url}/api/v1/peering/nobody")
        assert status == 404


async def test_a_restarted_control_plane_reconnects_to_its_peers_without_a_new_token(
    tmp_path: Path,
) -> None:
    west = write_config(tmp_path / "west", "us-west")
    east = write_config(tmp_path / "east", "ap-southeast")
    (tmp_path / "east" / "policies" / "exports.yaml").write_text(EXPORT_PAY)
    async with control_plane(east) as exporter:
        body = registration("pay-1", "pay", 9001)
        assert (await call("POST", f"{exporter.admin_url}/api/v1/registrations", body))[0] == 200
        token = (await call("POST", f"{exporter.admin_url}/api/v1/peering/token", {}))[1]
        async with control_plane(west) as importer:
            status, _ = await call(
                "POST", f"{importer.admin_url}/api/v1/peering/establish", {"token": token["token"]}
            )
            assert status == 200
        async with control_plane(west) as restarted:
            client = sidecar(restarted.ca(), restarted.discovery_target, "us-west", "web")
            task = asyncio.create_task(client.run())
            try:
                await until(
                    lambda: (
                        bool(client.version)
                        and "pay@ap-southeast" in _targets(client.current(), "pay")
                    ),
                )
            finally:
                client.close()
                task.cancel()


EXPORT_INV = """\
apiVersion: snapbright.io/v1alpha1
kind: ExportPolicy
metadata: {name: exports}
spec:
  exports:
    - service: inv
      peers: [ap-southeast]
"""


async def test_exports_flow_both_ways_whichever_side_dialed(tmp_path: Path) -> None:
    west = write_config(tmp_path / "west", "us-west")
    east = write_config(tmp_path / "east", "ap-southeast")
    (tmp_path / "east" / "policies" / "exports.yaml").write_text(EXPORT_PAY)
    (tmp_path / "west" / "policies" / "exports.yaml").write_text(EXPORT_INV)
    async with control_plane(east) as acceptor, control_plane(west) as dialer:
        body = registration("pay-1", "pay", 9001)
        assert (await call("POST", f"{acceptor.admin_url}/api/v1/registrations", body))[0] == 200
        body = registration("inv-1", "inv", 9002)
        assert (await call("POST", f"{dialer.admin_url}/api/v1/registrations", body))[0] == 200
        token = (await call("POST", f"{acceptor.admin_url}/api/v1/peering/token", {}))[1]
        status, _ = await call(
            "POST", f"{dialer.admin_url}/api/v1/peering/establish", {"token": token["token"]}
        )
        assert status == 200

        west_web = sidecar(dialer.ca(), dialer.discovery_target, "us-west", "web")
        east_web = sidecar(acceptor.ca(), acceptor.discovery_target, "ap-southeast", "web")
        tasks = [asyncio.create_task(c.run()) for c in (west_web, east_web)]
        try:
            for client, service, mirror in (
                (west_web, "pay", "pay@ap-southeast"),
                (east_web, "inv", "inv@us-west"),
            ):
                await until(
                    lambda c=client, s=service, m=mirror: (  # type: ignore[misc]
                        bool(c.version) and m in _targets(c.current(), s)
                    )
                )
            pay = _targets(west_web.current(), "pay")["pay@ap-southeast"]
            assert [(e.address, e.port) for e in pay.endpoints] == [
                ("127.0.0.1", acceptor.ports["peering"])
            ]
            inv = _targets(east_web.current(), "inv")["inv@us-west"]
            assert inv.sni == "inv.default.us-west.acme"
            assert inv.trust_domain == "us-west.acme"
            assert [(e.address, e.port) for e in inv.endpoints] == [
                ("127.0.0.1", dialer.ports["peering"])
            ]
            # The heartbeat is echoed at once: RTT on loopback is milliseconds, not the
            # peer's one-second heartbeat interval (polled: a loaded machine may delay one).
            for plane in (acceptor, dialer):
                await until(
                    lambda p=plane: (  # type: ignore[misc]
                        (rtt := p.peering.list()[0].rtt_seconds) is not None and rtt < 0.1
                    )
                )
                status, listed = await call("GET", f"{plane.admin_url}/api/v1/peering")
                (peer,) = listed["peers"]
                assert 0 <= peer["rttSeconds"] < 1.0, peer  # as `snapbright peering list` shows
        finally:
            for client in (west_web, east_web):
                client.close()
            for task in tasks:
                task.cancel()
