"""Both config sources produce one SidecarState: the file (and the files it names) and the
control plane's snapshots; a bad update keeps the last good state."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from proxy.api.v1 import discovery_pb2 as pb
from proxy.config.source import ConfigRejected, ReloadResult
from proxy.identity.bundle import format_bundle
from proxy.identity.model import TrustDomain
from proxy.sidecar.model import SidecarConfig
from proxy.sidecar.source import (
    SidecarFileSource,
    load_sidecar_config,
    state_from_config,
    state_from_snapshot,
)
from tests.proxy.sidecar.mesh import (
    Cluster,
    sidecar_document,
    target,
    write_bundle,
    write_config,
    write_svid,
)


def _files(tmp_path: Path, **kwargs: Any) -> tuple[Cluster, Path]:
    west = Cluster.create("us-west")
    bundles = {west.trust_domain.name: write_bundle(tmp_path, west.ca.bundle())}
    cert, key = write_svid(tmp_path, "checkout", west.issue("checkout"))
    document = sidecar_document(west, "checkout", 8080, cert, key, bundles, **kwargs)
    return west, write_config(tmp_path / "checkout.yaml", document)


def test_a_static_file_becomes_a_state(tmp_path: Path) -> None:
    _, path = _files(
        tmp_path, upstreams=[{"service": "payments", "targets": [target("us-west", 15006)]}]
    )
    state = state_from_config(load_sidecar_config(path))
    assert str(state.local) == "spiffe://us-west.acme/ns/default/sa/checkout"
    assert state.upstreams["payments"].targets[0].endpoints == (("127.0.0.1", 15006),)
    assert TrustDomain("us-west.acme") in state.bundles


def test_an_svid_of_another_identity_is_refused(tmp_path: Path) -> None:
    west, path = _files(tmp_path)
    write_svid(tmp_path, "checkout", west.issue("cart"))
    with pytest.raises(ConfigRejected, match=r"the SVID is .*/sa/cart"):
        state_from_config(load_sidecar_config(path))


def test_a_key_that_is_not_the_certificates_is_refused(tmp_path: Path) -> None:
    west, path = _files(tmp_path)
    other = west.issue("checkout")
    (tmp_path / "checkout.key").write_bytes(other.key_pem())
    with pytest.raises(ConfigRejected, match="does not belong"):
        state_from_config(load_sidecar_config(path))


async def test_a_bad_update_keeps_the_last_good_state_and_says_why(tmp_path: Path) -> None:
    _, path = _files(tmp_path)
    results: list[ReloadResult] = []
    source = SidecarFileSource(path, poll_interval=0.02, on_reload=results.append)
    good = source.current()
    path.write_text(path.read_text().replace("port: 8080", "port: eighty"))
    assert not source.reload().ok
    assert source.current() is good
    assert f"{path}:" in results[-1].reason
    source.close()


async def test_a_changed_svid_file_is_picked_up_without_touching_the_config(
    tmp_path: Path,
) -> None:
    west, path = _files(tmp_path)
    source = SidecarFileSource(path, poll_interval=0.02)
    before = source.current().svid.serial
    updates = source.updates()
    write_svid(tmp_path, "checkout", west.issue("checkout"))
    state = await asyncio.wait_for(anext(updates), 5.0)
    assert state.svid.serial != before
    source.close()


def test_a_snapshot_becomes_a_state(tmp_path: Path) -> None:
    west, path = _files(tmp_path)
    config = load_sidecar_config(path)
    assert isinstance(config, SidecarConfig)
    svid = west.issue("checkout")
    east = Cluster.create("ap-southeast")
    traffic = {
        "apiVersion": "snapbright.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": "payments"},
        "spec": {"service": "payments", "retries": {"attempts": 3}},
    }
    snapshot = pb.Snapshot(
        version="v7",
        upstreams=[
            pb.Upstream(
                service="payments",
                namespace="default",
                targets=[
                    pb.Target(
                        name="payments",
                        cluster="us-west",
                        weight=8000,
                        endpoints=[pb.Endpoint(address="10.0.0.7", port=15006)],
                    ),
                    pb.Target(
                        name="payments@ap-southeast",
                        cluster="ap-southeast",
                        weight=2000,
                        endpoints=[pb.Endpoint(address="10.1.0.2", port=15443)],
                        sni="payments.default.ap-southeast.acme",
                        trust_domain="ap-southeast.acme",
                    ),
                ],
            )
        ],
        policies=[
            pb.PolicyDocument(
                kind="TrafficPolicy", namespace="default", name="payments", json=json.dumps(traffic)
            )
        ],
        trust_bundles=[
            pb.TrustBundle(
                trust_domain=c.trust_domain.name, spiffe_bundle_json=format_bundle(c.ca.bundle())
            )
            for c in (west, east)
        ],
    )
    state = state_from_snapshot(config, lambda: svid)(snapshot)
    targets = state.upstreams["payments"].targets
    assert [(t.name, t.weight, t.trust_domain.name) for t in targets] == [
        ("payments", 0.8, "us-west.acme"),
        ("payments@ap-southeast", 0.2, "ap-southeast.acme"),
    ]
    assert state.traffic["payments"].spec.retries.attempts == 3
    assert set(state.bundles) == {west.trust_domain, east.trust_domain}
    assert state.version == "v7"
    assert state.svid is svid


def test_a_snapshot_with_a_bad_policy_is_refused(tmp_path: Path) -> None:
    west, path = _files(tmp_path)
    snapshot = pb.Snapshot(
        version="v8",
        policies=[pb.PolicyDocument(kind="TrafficPolicy", json='{"spec": {}}')],
    )
    with pytest.raises(ConfigRejected, match="snapshot v8"):
        state_from_snapshot(load_sidecar_config(path), lambda: west.issue("checkout"))(snapshot)
