"""Three clusters as real processes (issue 4, "What this issue must show" 1).

C exports ``pay`` to A by an ExportPolicy and keeps ``secret`` to itself; A runs a caller.
A calls ``pay`` by its plain name through its sidecar: mTLS from A's sidecar across the WAN,
through C's gateway (SNI passthrough) to C's sidecar and app, which sees A's SPIFFE ID.
``secret`` has no route in A, and a ClientHello naming it at C's gateway is closed and counted.
After ``snapbright peering delete``, within 5 s no mirror of C is left in A and nothing
reaches C any more.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path

import pytest

from federation.peering.store import load_state
from tests.integration.conftest import (
    LocalMeshRun,
    StartMesh,
    get_json,
    http,
    metric,
    wait_for,
)

pytestmark = pytest.mark.e2e

_MESH = "fed"
_TOPOLOGY = f"""
apiVersion: snapbright.io/v1alpha1
kind: LocalMesh
metadata: {{name: three}}
spec:
  mesh: {_MESH}
  clusters:
    - {{name: a, region: a}}
    - {{name: b, region: b}}
    - {{name: c, region: c}}
  peerings:
    - between: [a, c]
    - between: [a, b]
  links:
    - {{between: [a, c], latency: 5ms}}
    - {{between: [a, b], latency: 5ms}}
  services:
    - {{name: pay, clusters: [c], latency: 1ms}}
    - {{name: secret, clusters: [c], latency: 1ms}}
    - {{name: caller, clusters: [a], upstreams: [pay], latency: 1ms}}
  policies: [exports.yaml]
"""
_EXPORTS = """
apiVersion: snapbright.io/v1alpha1
kind: ExportPolicy
metadata: {name: c-exports}
spec:
  exports:
    - {service: pay, peers: [a]}
"""
_WITHDRAWN_WITHIN = 5.0


def _topology(tmp_path: Path) -> Path:
    (tmp_path / "exports.yaml").write_text(_EXPORTS)
    path = tmp_path / "three.yaml"
    path.write_text(_TOPOLOGY)
    return path


def _call(mesh: LocalMeshRun, service: str) -> tuple[int, dict[str, object]]:
    outbound = mesh.sidecar("a", "caller")["outbound"]
    status, body = http("GET", f"http://{outbound}/hello", headers={"Host": service})
    try:
        answer = json.loads(body)
    except ValueError:
        answer = {"raw": body[:200].decode(errors="replace")}
    return status, answer if isinstance(answer, dict) else {"raw": answer}


def _mirrors_of_c(mesh: LocalMeshRun) -> list[str]:
    services = get_json(f"{mesh.cluster('a')['admin']}/api/v1/services")
    return [t for t in json.dumps(services).split('"') if t.endswith("@c")]


def _forced_sni(mesh: LocalMeshRun, server_name: str) -> str:
    """Dial C's gateway (through the WAN, as A would) with A's caller's own SVID and ``SNI``:
    what happened to the TLS handshake."""
    link = next(
        link for link in mesh.document["wan"]["links"] if (link["from"], link["to"]) == ("a", "c")
    )
    host, port = link["listen"].rsplit(":", 1)
    svid = Path(mesh.cluster("a")["stateDir"]) / "svid"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    caller = next(p for p in svid.iterdir() if "caller" in p.name)
    context.load_cert_chain(caller / "svid.pem", caller / "key.pem")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=server_name) as tls:
                tls.settimeout(3)
                tls.sendall(b"GET / HTTP/1.1\r\nHost: secret\r\n\r\n")
                return f"answered {tls.recv(200)!r}"
        except (ssl.SSLError, ConnectionError, TimeoutError) as error:
            return f"closed: {error!r}"


def _recorded_gateways(mesh: LocalMeshRun, cluster: str, peer: str) -> list[str]:
    """Where ``cluster``'s control plane reaches ``peer``'s gateway, from its peering state."""
    state = load_state(Path(mesh.cluster(cluster)["stateDir"]) / "peering")
    (record,) = [r for r in state.peers if r.name == peer]
    return [str(gateway) for gateway in record.gateways]


def _wan_listener(mesh: LocalMeshRun, source: str, destination: str) -> str:
    return str(
        next(
            link["listen"]
            for link in mesh.document["wan"]["links"]
            if (link["from"], link["to"]) == (source, destination)
        )
    )


def _gateway_metrics(mesh: LocalMeshRun) -> str:
    status, body = http("GET", mesh.cluster("c")["gateway"]["metrics"])
    assert status == 200
    return body.decode()


def test_a_calls_c_by_plain_name_secret_stays_hidden_and_delete_withdraws_c(
    tmp_path: Path, start_mesh: StartMesh
) -> None:
    mesh = start_mesh(_topology(tmp_path), preferred_base=21000)
    began = time.monotonic()
    logs = (
        "a.controlplane",
        "c.controlplane",
        "c.gateway",
        "a.caller-0.sidecar",
        "c.pay-0.sidecar",
    )

    # pay by its plain name, answered in C, and C's sidecar saw A's SPIFFE ID.
    wait_for("A reaches pay", lambda: _call(mesh, "pay")[0] == 200, 15, lambda: mesh.logs(*logs))
    status, answer = _call(mesh, "pay")
    assert (status, answer.get("cluster"), answer.get("service")) == (200, "c", "pay"), answer
    peer_id = str(answer.get("peerId"))
    assert peer_id.startswith(f"spiffe://a.{_MESH}/ns/"), peer_id
    assert "/sa/" in peer_id, peer_id
    assert _mirrors_of_c(mesh) == ["pay@c"], mesh.logs("a.controlplane")

    # Each peer reaches each cluster over its own WAN link: A peers with C and with B, and
    # names to each its own listener for that link, not one list for all.
    for cluster, peer in (("a", "c"), ("c", "a"), ("a", "b"), ("b", "a")):
        assert _recorded_gateways(mesh, cluster, peer) == [_wan_listener(mesh, cluster, peer)]

    # secret: A has no route; C's gateway closes a ClientHello naming it, and counts it.
    status, answer = _call(mesh, "secret")
    assert status != 200, answer
    assert answer.get("service") != "secret", answer
    before = metric(
        _gateway_metrics(mesh), "snapbright_gateway_rejected_total", reason="not-exported"
    )
    outcome = _forced_sni(mesh, f"secret.default.c.{_MESH}")
    assert outcome.startswith("closed"), f"C's gateway let secret through: {outcome}"
    after = metric(
        _gateway_metrics(mesh), "snapbright_gateway_rejected_total", reason="not-exported"
    )
    assert after == before + 1, f"not-exported rejections {before} -> {after}\n{mesh.logs(*logs)}"

    # peering delete: within the bound, no pay@c in A and nothing reaches C.
    deleted = time.monotonic()
    mesh.cli("peering", "delete", "c", "--cluster", "a", "--state-dir", str(mesh.state_dir))
    wait_for(
        "pay@c withdrawn from A",
        lambda: _mirrors_of_c(mesh) == [],
        _WITHDRAWN_WITHIN,
        lambda: mesh.logs(*logs),
    )
    time.sleep(max(0.0, _WITHDRAWN_WITHIN - (time.monotonic() - deleted)))
    forwarded = metric(_gateway_metrics(mesh), "snapbright_gateway_connections_total")
    calls_to_c = [_call(mesh, "pay") for _ in range(10)]
    time.sleep(2.0)  # the caller app keeps calling pay on its own meanwhile
    assert [a for s, a in calls_to_c if a.get("cluster") == "c"] == []
    assert metric(_gateway_metrics(mesh), "snapbright_gateway_connections_total") == forwarded, (
        f"connections still reach C's gateway after the peering was deleted\n{mesh.logs(*logs)}"
    )
    assert time.monotonic() - began < 60
