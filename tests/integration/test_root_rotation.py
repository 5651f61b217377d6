"""Root rotation across clusters with traffic flowing (issue 4, section 5).

`snapbright up` runs the default mesh; us-west's own payments replicas are killed so that its
checkout calls cross to payments@ap-southeast; a steady load runs through us-west's checkout
sidecar. ``snapbright ca rotate`` on ap-southeast's state directory (a short overlap) must:
bring the new root to us-west (bundle sequence up, two roots) no later than the first leaf
issued under it is served, re-issue ap-southeast's leaves under it, retire the old root after
the overlap, and fail no request throughout.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from federation.trust import store as ca_store
from tests.integration.conftest import (
    LocalMeshRun,
    StartMesh,
    SteadyLoad,
    get_json,
    http,
    wait_for,
)

pytestmark = pytest.mark.e2e

_OVERLAP = 8.0
_DOMAIN = "ap-southeast.demo"


def _peer_bundle(mesh: LocalMeshRun) -> dict[str, Any]:
    """ap-southeast's bundle as us-west's control plane holds it."""
    status = get_json(f"{mesh.cluster('us-west')['admin']}/api/v1/status")
    bundle: dict[str, Any] = next(b for b in status["bundles"] if b["trustDomain"] == _DOMAIN)
    return bundle


def _served_leaf_key_id(mesh: LocalMeshRun) -> bytes:
    """The authority key id of the leaf ap-southeast's payments sidecar serves now."""
    inbound = mesh.sidecar("ap-southeast", "payments")["inbound"]
    host, port = inbound.rsplit(":", 1)
    svid = Path(mesh.cluster("us-west")["stateDir"]) / "svid" / "checkout-0"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(svid / "svid.pem", svid / "key.pem")
    with (
        socket.create_connection((host, int(port)), timeout=3) as raw,
        context.wrap_socket(raw, server_hostname=f"payments.default.{_DOMAIN}") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    leaf = x509.load_der_x509_certificate(der)
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    return aki.key_identifier


def _root_key_ids(mesh: LocalMeshRun) -> list[bytes]:
    """The subject key ids of ap-southeast's CA authorities, oldest first (issuers of leaves:
    the intermediate when there is one, else the root)."""
    ca = ca_store.load_ca(Path(mesh.cluster("ap-southeast")["stateDir"]))
    ids = []
    for authority in ca.authorities:
        issuer = authority.intermediate or authority.root
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        ids.append(ski.digest)
    return ids


def _answered_by(mesh: LocalMeshRun) -> str:
    outbound = mesh.sidecar("us-west", "checkout")["outbound"]
    status, body = http("GET", f"http://{outbound}/", headers={"Host": "payments"})
    return body.decode(errors="replace") if status == 200 else f"status {status}"


def test_a_root_rotation_reaches_the_peer_first_reissues_leaves_and_fails_no_request(
    start_mesh: StartMesh,
) -> None:
    mesh = start_mesh(preferred_base=21600)
    began = time.monotonic()
    logs = (
        "us-west.controlplane",
        "ap-southeast.controlplane",
        "us-west.checkout-0.sidecar",
        "ap-southeast.payments-0.sidecar",
    )
    # us-west's own payments go away: its callers cross to ap-southeast.
    for record in mesh.document["processes"]:
        if record["name"].startswith("us-west.payments-"):
            os.killpg(record["pid"], signal.SIGKILL)
    wait_for(
        "us-west's checkout answered from ap-southeast only",
        lambda: all('"cluster": "ap-southeast"' in _answered_by(mesh) for _ in range(5)),
        20,
        lambda: mesh.logs(*logs),
    )
    (old_root,) = _root_key_ids(mesh)
    assert _served_leaf_key_id(mesh) == old_root
    before = _peer_bundle(mesh)
    assert before["roots"] == 1, before

    load = SteadyLoad(f"http://{mesh.sidecar('us-west', 'checkout')['outbound']}/", "payments")
    load.start()
    order: list[str] = []
    try:
        time.sleep(1.0)
        state_dir = mesh.cluster("ap-southeast")["stateDir"]
        rotated = time.monotonic()
        mesh.cli("ca", "rotate", "--state-dir", state_dir, "--overlap", f"{_OVERLAP:g}s")
        old_root, new_root = _root_key_ids(mesh)

        # Watch, until the old root is retired at us-west, for the new root there and for a
        # leaf under it served in ap-southeast, noting which came first.
        def retired_at_us_west() -> bool:
            bundle = _peer_bundle(mesh)
            if (
                "bundle" not in order
                and bundle["sequence"] > before["sequence"]
                and bundle["roots"] == 2
            ):
                order.append("bundle")
            if "leaf" not in order and _served_leaf_key_id(mesh) == new_root:
                order.append("leaf")
            return bool(bundle["roots"] == 1 and bundle["sequence"] > before["sequence"] + 1)

        wait_for(
            "the old root retired at us-west",
            retired_at_us_west,
            _OVERLAP + 15,
            lambda: f"{_peer_bundle(mesh)} {order}\n{mesh.logs(*logs)}",
        )
        retired = time.monotonic() - rotated
        time.sleep(2.0)
        served = _served_leaf_key_id(mesh)
    finally:
        load.stop()
    outcome = (
        f"order {order}, old root retired after {retired:.1f}s, load {dict(load.outcomes)}, "
        f"first failures {load.failures[:5]}"
    )
    print(outcome)
    assert order[:1] == ["bundle"], f"no new root at us-west before a leaf under it: {outcome}"
    assert "leaf" in order, f"ap-southeast's leaves were not re-issued: {outcome}"
    assert retired >= _OVERLAP - 0.5, outcome
    assert _root_key_ids(mesh) == [new_root]
    assert served == new_root
    total = sum(load.outcomes.values())
    assert total >= 50 * (_OVERLAP + 2), f"the load ran short: {load.outcomes}"
    assert load.failures == [], (
        f"{len(load.failures)} of {total} requests failed: {load.failures[:10]}\n{mesh.logs(*logs)}"
    )
    print(f"outcomes {dict(load.outcomes)}; {time.monotonic() - began:.1f}s after up")
