"""The control plane process in this event loop: readiness, registrations, policies."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from prometheus_client import CollectorRegistry

from federation.trust.store import load_ca, save_ca
from proxy.api.v1 import discovery_pb2 as pb
from tests.snapbright.controlplane.conftest import (
    BAD_POLICY,
    GOOD_POLICY,
    call,
    control_plane,
    next_snapshot,
    registration,
    sidecar,
    until,
    write_config,
)


def _endpoints(snapshot: pb.Snapshot, service: str) -> list[tuple[str, int]]:
    for upstream in snapshot.upstreams:
        if upstream.service == service:
            return [(e.address, e.port) for t in upstream.targets for e in t.endpoints]
    return []


def _metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_nothing_is_pushed_until_policies_load_then_the_registered_endpoints_are(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, "us-west")
    (tmp_path / "policies" / "pay.yaml").write_text(BAD_POLICY)
    async with control_plane(config) as plane:
        status, _ = await call(
            "POST", f"{plane.admin_url}/api/v1/registrations", registration("pay-1", "pay", 9001)
        )
        assert status == 200
        client = sidecar(plane.ca(), plane.discovery_target, "us-west", "web")
        task = asyncio.create_task(client.run())
        try:
            await until(lambda: bool(plane.discovery.subscribers()))
            await asyncio.sleep(0.3)
            assert client.version == ""  # subscribed, but not ready: nothing, not an empty set
            assert (await call("GET", f"{plane.admin_url}/ready"))[0] == 503

            (tmp_path / "policies" / "pay.yaml").write_text(GOOD_POLICY)
            snapshot = await next_snapshot(client)
            assert _endpoints(snapshot, "pay") == [("127.0.0.1", 9001)]
            assert [p.kind for p in snapshot.policies] == ["TrafficPolicy"]
            assert snapshot.trust_bundles[0].trust_domain == "us-west.acme"
            assert (await call("GET", f"{plane.admin_url}/ready"))[0] == 200
        finally:
            client.close()
            task.cancel()


async def test_a_bad_policy_file_is_rejected_with_its_position_and_the_last_good_set_stays(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, "us-west")
    policy = tmp_path / "policies" / "pay.yaml"
    policy.write_text(GOOD_POLICY)
    async with control_plane(config) as plane:
        client = sidecar(plane.ca(), plane.discovery_target, "us-west", "web")
        task = asyncio.create_task(client.run())
        try:
            first = await next_snapshot(client)
            assert plane.policies.state.ok
            policy.write_text(BAD_POLICY)
            await until(lambda: not plane.policies.state.ok)

            errors = plane.policies.state.errors
            assert len(errors) == 1
            assert errors[0].startswith(f"{policy}:6:23: spec.timeouts.request:"), errors
            assert _metric(plane.metrics, "snapbright_config_reload_total", result="rejected") == 1
            assert _metric(plane.metrics, "snapbright_config_reload_total", result="ok") == 1
            assert plane.policies.current() is not None
            assert plane.policies.current().traffic[0].spec.timeouts.request == 2.0  # type: ignore[union-attr]
            status, body = await call("GET", f"{plane.admin_url}/api/v1/status")
            assert status == 200
            assert body["policies"]["ok"] is False
            assert body["policies"]["errors"] == list(errors)
            await asyncio.sleep(0.2)
            assert client.version == first.version  # nothing new was pushed
        finally:
            client.close()
            task.cancel()


async def test_an_expired_registration_leaves_the_snapshot_in_a_new_version(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, "us-west")
    async with control_plane(config) as plane:
        body = registration("pay-1", "pay", 9001) | {"ttl": "300ms"}
        assert (await call("POST", f"{plane.admin_url}/api/v1/registrations", body))[0] == 200
        keep = registration("pay-2", "pay", 9002)
        assert (await call("POST", f"{plane.admin_url}/api/v1/registrations", keep))[0] == 200
        client = sidecar(plane.ca(), plane.discovery_target, "us-west", "web")
        task = asyncio.create_task(client.run())
        try:
            first = await next_snapshot(client)
            if len(_endpoints(first, "pay")) == 2:
                snapshot = await next_snapshot(client, after=first.version)
            else:
                snapshot = first  # it expired before the first push
            assert _endpoints(snapshot, "pay") == [("127.0.0.1", 9002)]
            assert plane.registry is not None
            assert plane.registry.registration("pay-1") is None
        finally:
            client.close()
            task.cancel()


async def test_registrations_pointing_at_our_own_listeners_are_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, "us-west")
    async with control_plane(config) as plane:
        for port in plane.ports.values():
            status, body = await call(
                "POST",
                f"{plane.admin_url}/api/v1/registrations",
                registration("evil", "pay", port),
            )
            assert status == 422
            assert body["error"].startswith("endpoint: address-denied"), body
        status, body = await call("POST", f"{plane.admin_url}/api/v1/registrations", {"id": "x"})
        assert status == 400
        assert "workload and an endpoint" in body["error"]


async def test_a_rotated_ca_reaches_subscribed_proxies_without_a_restart(tmp_path: Path) -> None:
    config = write_config(tmp_path, "us-west")
    async with control_plane(config) as plane:
        client = sidecar(plane.ca(), plane.discovery_target, "us-west", "web")
        task = asyncio.create_task(client.run())
        try:
            first = await next_snapshot(client)
            assert [b.sequence for b in first.trust_bundles] == [1]
            # What `snapbright ca rotate` does to the state directory.
            save_ca(plane.state_dir, load_ca(plane.state_dir).rotate(datetime.now(UTC)))
            rotated = await next_snapshot(client, after=first.version)
            assert [b.sequence for b in rotated.trust_bundles] == [2]
            assert len(client.bundle.roots) == 2  # old and new root, during the overlap
            assert plane.ca().sequence == 2
            assert plane.svid().chain[-1].issuer == plane.ca().active.root.subject
        finally:
            client.close()
            task.cancel()


async def test_after_a_rotation_acked_by_every_peer_proxies_get_leaves_under_the_new_root(
    tmp_path: Path,
) -> None:
    # Found by tests/integration/test_root_rotation.py: leaves stayed under the old root until
    # their own renewal, past a short overlap that retired it. With no peer, all have acked.
    config = write_config(tmp_path, "us-west")
    async with control_plane(config) as plane:
        client = sidecar(plane.ca(), plane.discovery_target, "us-west", "web")
        task = asyncio.create_task(client.run())
        try:
            await next_snapshot(client)
            issuer = _authority_key_id(client.svid.chain[0])
            save_ca(plane.state_dir, load_ca(plane.state_dir).rotate(datetime.now(UTC)))
            await until(lambda: _authority_key_id(client.svid.chain[0]) != issuer, 10)
            active = plane.ca().active
            signer = (active.intermediate or active.root).extensions
            ski = signer.get_extension_for_class(x509.SubjectKeyIdentifier).value
            assert _authority_key_id(client.svid.chain[0]) == ski.digest
        finally:
            client.close()
            task.cancel()


def _authority_key_id(leaf: x509.Certificate) -> bytes | None:
    # Old and new roots share a subject name: the key id tells them apart.
    return leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
