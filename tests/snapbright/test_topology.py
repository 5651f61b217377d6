"""LocalMesh: the default topology, and names that must agree across the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config.loader import LoadResult, load_bytes
from proxy.config.source import ConfigRejected
from snapbright.topology.files import default_topology, load_topology
from snapbright.topology.model import LocalMesh

HEAD = "apiVersion: snapbright.io/v1alpha1\nkind: LocalMesh\nmetadata: {name: t}\nspec:\n"
CLUSTERS = (
    "  mesh: demo\n"
    "  clusters:\n"
    "    - {name: us-west, region: us-west}\n"
    "    - {name: ap-southeast, region: ap-southeast}\n"
    "    - {name: eu-central, region: eu-central}\n"
    "  peerings:\n"
    "    - between: [us-west, ap-southeast]\n"
)
# CLUSTERS ends on line 11; the body under test starts on line 12.


def _load(body: str) -> LoadResult:
    return load_bytes(HEAD + CLUSTERS + body, {LocalMesh.KIND: LocalMesh}, source="t.yaml")


def test_default_topology_is_two_regions_80ms_apart_with_a_caller_in_one() -> None:
    mesh = default_topology()
    assert [c.name for c in mesh.spec.clusters] == ["us-west", "ap-southeast"]
    assert mesh.peers_of("us-west") == ("ap-southeast",)
    link = mesh.link_between("ap-southeast", "us-west")
    assert link is not None
    assert 2 * link.latency == pytest.approx(0.080)  # "80 ms apart" is the round trip
    assert link.bandwidth == 100_000_000
    payments, checkout = mesh.spec.services
    assert set(payments.clusters) == {"us-west", "ap-southeast"}
    assert (checkout.clusters, checkout.upstreams) == (("us-west",), ("payments",))
    assert [s.name for s in mesh.services_in("ap-southeast")] == ["payments"]
    assert str(mesh.trust_domain("us-west")) == "us-west.demo"
    with pytest.raises(KeyError):
        mesh.trust_domain("eu-central")


def test_a_topology_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(HEAD + CLUSTERS + "  services:\n    - {name: pay, clusters: [us-west]}\n")
    mesh = load_topology(path)
    assert mesh.spec.mesh == "demo"
    assert mesh.link_between("us-west", "ap-southeast") is None


def test_a_bad_topology_file_is_refused_with_its_position(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(HEAD + CLUSTERS.replace("mesh: demo", "mesh: Demo"))
    with pytest.raises(ConfigRejected, match=r"mesh\.yaml:5:9: spec\.mesh: "):
        load_topology(path)


ERRORS = [
    pytest.param(
        "    - between: [us-west, mars]\n",
        ("SB0201", 12, 26, "spec.peerings[1].between[1]"),
        "unknown cluster 'mars'",
        id="peering-unknown-cluster",
    ),
    pytest.param(
        "    - between: [eu-central, eu-central]\n",
        ("SB0201", 12, 29, "spec.peerings[1].between[1]"),
        "with itself",
        id="peering-with-itself",
    ),
    pytest.param(
        "    - between: [ap-southeast, us-west]\n",
        ("SB0201", 12, 16, "spec.peerings[1].between"),
        "paired twice",
        id="peering-twice",
    ),
    pytest.param(
        "    - between: [us-west]\n",
        ("SB0202", 12, 16, "spec.peerings[1].between[1]"),
        "item 1 is missing",
        id="peering-not-a-pair",
    ),
    pytest.param(
        "  links:\n    - {between: [us-west, eu-central], latency: 10ms}\n",
        ("SB0201", 13, 17, "spec.links[0].between"),
        "add a peering",
        id="link-without-peering",
    ),
    pytest.param(
        "  links:\n    - {between: [us-west, ap-southeast], latency: 10ms, jitter: 20ms}\n",
        ("SB0201", 13, 65, "spec.links[0].jitter"),
        "must not exceed latency",
        id="jitter-over-latency",
    ),
    pytest.param(
        "  links:\n    - {between: [us-west, ap-southeast], loss: 101%}\n",
        ("SB0201", 13, 48, "spec.links[0].loss"),
        "between 0% and 100%",
        id="loss-over-100",
    ),
    pytest.param(
        "  links:\n    - {between: [us-west, ap-southeast], bandwidth: 10MB}\n",
        ("SB0201", 13, 53, "spec.links[0].bandwidth"),
        "kbps, Mbps or Gbps",
        id="bandwidth-unit",
    ),
    pytest.param(
        "  services:\n    - {name: pay, clusters: [moon]}\n",
        ("SB0201", 13, 30, "spec.services[0].clusters[0]"),
        "unknown cluster 'moon'",
        id="service-unknown-cluster",
    ),
    pytest.param(
        "  services:\n    - {name: web, clusters: [us-west], upstreams: [pay]}\n",
        ("SB0201", 13, 52, "spec.services[0].upstreams[0]"),
        "unknown service 'pay'",
        id="unknown-upstream",
    ),
    pytest.param(
        "  services:\n    - {name: web, clusters: [us-west], upstreams: [web]}\n",
        ("SB0201", 13, 52, "spec.services[0].upstreams[0]"),
        "does not call itself",
        id="self-upstream",
    ),
    pytest.param(
        "  services:\n"
        "    - {name: pay, clusters: [eu-central]}\n"
        "    - {name: web, clusters: [us-west], upstreams: [pay]}\n",
        ("SB0201", 14, 52, "spec.services[1].upstreams[0]"),
        "cannot call it",
        id="upstream-unreachable",
    ),
    pytest.param(
        "  services:\n"
        "    - {name: pay, clusters: [us-west]}\n"
        "    - {name: pay, clusters: [us-west]}\n",
        ("SB0201", 14, 14, "spec.services[1].name"),
        "listed twice",
        id="service-twice",
    ),
    pytest.param(
        "  services:\n    - {name: pay, clusters: [us-west], replicas: 0}\n",
        ("SB0201", 13, 50, "spec.services[0].replicas"),
        "greater than or equal to 1",
        id="zero-replicas",
    ),
    pytest.param(
        "  services:\n    - {name: pay, clusters: [us-west], errorRate: 2}\n",
        ("SB0201", 13, 51, "spec.services[0].errorRate"),
        "between 0% and 100%",
        id="error-rate-over-one",
    ),
    pytest.param(
        "  policies: [a.yaml, a.yaml]\n",
        ("SB0201", 12, 22, "spec.policies[1]"),
        "listed twice",
        id="policy-twice",
    ),
]


@pytest.mark.parametrize(("body", "where", "reason"), ERRORS)
def test_config_error(body: str, where: tuple[str, int, int, str], reason: str) -> None:
    result = _load(body)
    assert len(result.diagnostics) == 1, result.diagnostics
    (diagnostic,) = result.diagnostics
    assert (diagnostic.code.value, diagnostic.line, diagnostic.column, diagnostic.path) == where
    assert reason in diagnostic.message


def test_duplicate_cluster_names_are_refused() -> None:
    text = (
        HEAD + "  mesh: demo\n  clusters:\n    - {name: a, region: r}\n    - {name: a, region: r}\n"
    )
    (diagnostic,) = load_bytes(text, {LocalMesh.KIND: LocalMesh}).diagnostics
    assert (diagnostic.line, diagnostic.column, diagnostic.path) == (8, 14, "spec.clusters[1].name")
