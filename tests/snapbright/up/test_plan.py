"""The plan of a local mesh: ports, order, WAN placement and configs, with nothing started."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from federation.export.model import ExportPolicy
from gateway.config.model import GatewayConfig
from proxy.config.loader import load_bytes
from proxy.config.model import Document
from proxy.policy.model import AuthorizationPolicy
from proxy.sidecar.model import SidecarConfig
from snapbright.controlplane.model import ControlPlaneConfig
from snapbright.topology.files import default_topology
from snapbright.topology.model import LocalMesh
from snapbright.up.plan import (
    AUTHORIZATION_FILE,
    EXPORTS_FILE,
    PeeringStep,
    Plan,
    PlanError,
    PolicyFile,
    ProcessStep,
    Role,
    build_plan,
    sequential_ports,
)
from snapbright.wan.model import WanConfig

STATE = Path("/srv/mesh")
COMMAND = ("python", "-m", "snapbright")

THREE_CLUSTERS = """
apiVersion: snapbright.io/v1alpha1
kind: LocalMesh
metadata: {name: three}
spec:
  mesh: acme
  clusters:
    - {name: a, region: r1}
    - {name: b, region: r2}
    - {name: c, region: r3}
  peerings:
    - between: [a, c]
    - between: [b, c]
    - between: [a, b]
  links:
    - {between: [a, c], latency: 30ms, jitter: 1ms, loss: 1%, bandwidth: 10Mbps}
  services:
    - {name: pay, clusters: [c], replicas: 3}
    - {name: web, clusters: [a, b], upstreams: [pay]}
"""


def _three() -> LocalMesh:
    document = load_bytes(THREE_CLUSTERS, {LocalMesh.KIND: LocalMesh}).raise_for_errors()[0]
    assert isinstance(document, LocalMesh)
    return document


def _plan(mesh: LocalMesh | None = None, *, policies: tuple[PolicyFile, ...] = ()) -> Plan:
    return build_plan(
        mesh or default_topology(),
        state_dir=STATE,
        command=COMMAND,
        ports=sequential_ports(20000),
        policies=policies,
    )


def _process(plan: Plan, name: str) -> ProcessStep:
    step = plan.step(name)
    assert isinstance(step, ProcessStep)
    return step


def _config(plan: Plan, name: str, kind: type[Document]) -> Document:
    step = _process(plan, name)
    assert step.config is not None
    documents = load_bytes(step.config.text, {kind.KIND: kind}).raise_for_errors()
    assert len(documents) == 1
    return documents[0]


@pytest.mark.parametrize("mesh", [default_topology(), _three()], ids=["default", "three"])
def test_no_port_is_used_twice(mesh: LocalMesh) -> None:
    ports = [port for _, _, port in _plan(mesh).ports()]
    assert ports
    assert [p for p, n in Counter(ports).items() if n > 1] == []


@pytest.mark.parametrize("mesh", [default_topology(), _three()], ids=["default", "three"])
def test_every_dependency_starts_before_its_dependents(mesh: LocalMesh) -> None:
    plan = _plan(mesh)
    names = [step.name for step in plan.steps]
    assert len(names) == len(set(names))
    for index, step in enumerate(plan.steps):
        for dependency in step.after:
            assert dependency in names[:index], f"{step.name} waits for {dependency}"


def test_each_cluster_starts_ca_then_control_plane_then_gateway_then_replicas() -> None:
    plan = _plan()
    order = [step.name for step in plan.steps]
    for cluster in ("us-west", "ap-southeast"):
        assert order.index(f"{cluster}.ca-init") < order.index("us-west.controlplane")
        assert order.index(f"{cluster}.controlplane") < order.index(f"{cluster}.gateway")
        assert order.index(f"{cluster}.gateway") < order.index(f"{cluster}.payments-0")
        assert order.index(f"{cluster}.payments-0") < order.index(f"{cluster}.payments-0.sidecar")
    assert order[-1] == "peering.us-west.ap-southeast"


def test_same_topology_and_base_give_the_same_plan() -> None:
    assert _plan() == _plan()


def test_an_allocator_that_repeats_a_port_is_refused() -> None:
    with pytest.raises(PlanError, match="port 20000 is given to both"):
        build_plan(default_topology(), state_dir=STATE, command=COMMAND, ports=lambda _: 20000)


def test_a_port_out_of_range_is_refused() -> None:
    with pytest.raises(PlanError, match="not between 1 and 65535"):
        build_plan(
            default_topology(), state_dir=STATE, command=COMMAND, ports=sequential_ports(65530)
        )


def test_every_sidecar_and_gateway_gets_a_bootstrap_svid_after_the_ca_exists() -> None:
    plan = _plan()
    issued = {
        step.name: step.argv
        for step in plan.steps
        if isinstance(step, ProcessStep) and step.role is Role.CA and "issue" in step.argv
    }
    assert set(issued) == {
        "us-west.ca.gateway",
        "us-west.ca.payments-0",
        "us-west.ca.payments-1",
        "us-west.ca.checkout-0",
        "ap-southeast.ca.gateway",
        "ap-southeast.ca.payments-0",
        "ap-southeast.ca.payments-1",
    }
    for name, argv in issued.items():
        assert argv[argv.index("--ttl") + 1] == "1h"
        assert plan.step(name).after == (f"{name.split('.')[0]}.ca-init",)


@pytest.mark.parametrize("mesh", [default_topology(), _three()], ids=["default", "three"])
def test_a_wan_forward_sits_in_front_of_each_remote_gateway_in_both_directions(
    mesh: LocalMesh,
) -> None:
    plan = _plan(mesh)
    wan = _process(plan, "wan")
    assert wan.config is not None
    config = WanConfig.model_validate_json(wan.config.text)
    expected = {
        pair
        for peering in mesh.spec.peerings
        for pair in (tuple(peering.between), tuple(reversed(peering.between)))
    }
    forwards = {tuple(f.link): f for f in config.forwards}
    assert set(forwards) == expected
    for (source, destination), forward in forwards.items():
        gateway = _process(plan, f"{destination}.gateway")
        assert forward.target_port == gateway.ports["listen"]
        assert forward.listen_port == plan.wan_listeners[(source, destination)]
        assert plan.gateway_view(source, destination) == f"127.0.0.1:{forward.listen_port}"


def test_the_wan_carries_the_topology_link_shape() -> None:
    plan = _plan(_three())
    wan = _process(plan, "wan")
    assert wan.config is not None
    links = {
        tuple(link.between): link for link in WanConfig.model_validate_json(wan.config.text).links
    }
    shaped = links[("a", "c")]
    assert shaped.latency == pytest.approx(0.030)
    assert shaped.jitter == pytest.approx(0.001)
    assert shaped.loss == pytest.approx(0.01)
    assert shaped.bandwidth == 10_000_000
    assert links[("a", "b")].latency == 0.0


def test_peering_dials_from_the_first_cluster_through_its_own_wan_listener() -> None:
    plan = _plan(_three())
    peerings = [step for step in plan.steps if isinstance(step, PeeringStep)]
    assert [(p.dialing, p.accepting) for p in peerings] == [("a", "c"), ("b", "c"), ("a", "b")]
    for peering in peerings:
        assert peering.dial_via == (plan.gateway_view(peering.dialing, peering.accepting),)
        assert peering.advertise == (plan.gateway_view(peering.accepting, peering.dialing),)
        accepting = _process(plan, f"{peering.accepting}.controlplane")
        assert peering.accepting_admin == f"http://127.0.0.1:{accepting.ports['admin']}"


def test_each_control_plane_names_its_gateway_as_its_peer_reaches_it_through_the_wan() -> None:
    plan = _plan()
    accepting = _config(plan, "ap-southeast.controlplane", ControlPlaneConfig)
    dialing = _config(plan, "us-west.controlplane", ControlPlaneConfig)
    assert isinstance(accepting, ControlPlaneConfig)
    assert isinstance(dialing, ControlPlaneConfig)
    assert accepting.spec.gateways == (plan.gateway_view("us-west", "ap-southeast"),)
    # The dialer's Open names its gateways too, or the acceptor cannot reach what it exports.
    assert dialing.spec.gateways == (plan.gateway_view("ap-southeast", "us-west"),)


def test_control_plane_config_validates_and_points_at_the_cluster_directories() -> None:
    plan = _plan()
    config = _config(plan, "us-west.controlplane", ControlPlaneConfig)
    assert isinstance(config, ControlPlaneConfig)
    step = _process(plan, "us-west.controlplane")
    spec = config.spec
    assert (spec.cluster, spec.mesh) == ("us-west", "demo")
    assert config.state_dir(Path("/elsewhere")) == plan.state_of("us-west")
    assert config.policy_directory(Path("/elsewhere")) == plan.policy_dir("us-west")
    assert spec.admission.allow_loopback
    assert spec.catalog.registration_ttl == 5.0
    assert {
        "admin": spec.listen.admin.port,
        "discovery": spec.listen.discovery.port,
        "peering": spec.listen.peering.port,
    } == step.ports
    ca_init = _process(plan, "us-west.ca-init")
    assert ca_init.argv[ca_init.argv.index("--state-dir") + 1] == str(plan.state_of("us-west"))


def test_gateway_config_validates_and_routes_to_local_sidecars_and_the_control_plane() -> None:
    plan = _plan()
    config = _config(plan, "us-west.gateway", GatewayConfig)
    assert isinstance(config, GatewayConfig)
    spec = config.spec
    control_plane = _process(plan, "us-west.controlplane")
    assert spec.control_plane is not None
    assert spec.control_plane.port == control_plane.ports["peering"]
    routes = {service.name: service for service in spec.services}
    assert set(routes) == {"payments", "checkout"}
    inbound = {_process(plan, f"us-west.payments-{i}.sidecar").ports["inbound"] for i in range(2)}
    assert {e.port for e in routes["payments"].endpoints} == inbound
    assert all(route.exported for route in routes.values())
    assert spec.probe is not None
    assert [b.trust_domain for b in spec.probe.bundles] == ["ap-southeast.demo"]
    assert "ap-southeast.ca.gateway" in plan.step("us-west.gateway").after


def test_without_an_export_policy_every_service_is_exported_to_every_peer() -> None:
    plan = _plan()
    files = {f.path: f.text for f in plan.files}
    text = files[plan.policy_dir("us-west") / EXPORTS_FILE]
    policy = load_bytes(text, {ExportPolicy.KIND: ExportPolicy}).raise_for_errors()[0]
    assert isinstance(policy, ExportPolicy)
    assert policy.exported_to("ap-southeast") == {"payments", "checkout"}


def test_a_topology_export_policy_replaces_the_generated_one_in_every_cluster() -> None:
    text = yaml.safe_dump(
        {
            "apiVersion": "snapbright.io/v1alpha1",
            "kind": "ExportPolicy",
            "metadata": {"name": "mine"},
            "spec": {"exports": [{"service": "payments", "peers": ["us-west"]}]},
        }
    )
    plan = _plan(policies=(PolicyFile("exports.yaml", text, frozenset({"ExportPolicy"})),))
    paths = {f.path for f in plan.files}
    for cluster in ("us-west", "ap-southeast"):
        assert plan.policy_dir(cluster) / "exports.yaml" in paths
        assert plan.policy_dir(cluster) / EXPORTS_FILE not in paths


def test_with_a_topology_export_policy_the_gateway_routes_only_exported_names() -> None:
    # Found by tests/integration/test_three_clusters.py: an unexported service was routed.
    text = yaml.safe_dump(
        {
            "apiVersion": "snapbright.io/v1alpha1",
            "kind": "ExportPolicy",
            "metadata": {"name": "mine"},
            "spec": {"exports": [{"service": "payments", "peers": ["us-west"]}]},
        }
    )
    plan = _plan(policies=(PolicyFile("exports.yaml", text, frozenset({"ExportPolicy"})),))
    exported = {}
    for cluster in ("us-west", "ap-southeast"):
        config = _config(plan, f"{cluster}.gateway", GatewayConfig)
        assert isinstance(config, GatewayConfig)
        exported[cluster] = {s.name: s.exported for s in config.spec.services}
    assert exported == {
        "us-west": {"payments": False, "checkout": False},
        "ap-southeast": {"payments": True},
    }


def test_a_caller_reaches_its_upstreams_through_its_own_sidecar() -> None:
    plan = _plan()
    checkout = _process(plan, "us-west.checkout-0")
    sidecar = _process(plan, "us-west.checkout-0.sidecar")
    upstream = checkout.argv[checkout.argv.index("--upstream") + 1]
    assert upstream == f"payments=http://127.0.0.1:{sidecar.ports['outbound']}"
    assert sidecar.after[0] == "us-west.checkout-0"


def test_without_a_role_drops_its_steps_and_the_waits_on_them() -> None:
    plan = _plan().without(Role.SIDECAR)
    assert not [step for step in plan.steps if step.role is Role.SIDECAR]
    names = {step.name for step in plan.steps}
    assert all(dependency in names for step in plan.steps for dependency in step.after)


def test_sidecar_config_validates_and_joins_app_identity_and_control_plane() -> None:
    plan = _plan()
    config = _config(plan, "us-west.payments-1.sidecar", SidecarConfig)
    assert isinstance(config, SidecarConfig)
    spec = config.spec
    step = _process(plan, "us-west.payments-1.sidecar")
    control_plane = _process(plan, "us-west.controlplane")
    demo = _process(plan, "us-west.payments-1")
    assert (spec.identity.cluster, spec.identity.service) == ("us-west", "payments")
    assert spec.app.port == demo.ports["http"]
    assert spec.control_plane is not None
    assert spec.control_plane.port == control_plane.ports["discovery"]
    assert spec.control_plane.admin_url == f"http://127.0.0.1:{control_plane.ports['admin']}"
    listeners = spec.listeners
    assert {
        "outbound": listeners.outbound.port,
        "inbound": listeners.inbound.port,
        "admin": listeners.admin.port,
    } == step.ports
    assert spec.tls.certificate.endswith("svid/payments-1/svid.pem")
    assert [b.trust_domain for b in spec.tls.bundles] == ["us-west.demo"]
    assert "us-west.ca.payments-1" in step.after


def test_without_an_authorization_policy_the_cluster_and_its_peers_may_call_each_service() -> None:
    plan = _plan()
    files = {f.path: f.text for f in plan.files}
    text = files[plan.policy_dir("ap-southeast") / AUTHORIZATION_FILE]
    policies = load_bytes(text, {AuthorizationPolicy.KIND: AuthorizationPolicy}).raise_for_errors()
    assert [p.spec.service for p in policies if isinstance(p, AuthorizationPolicy)] == ["payments"]
    (policy,) = policies
    assert isinstance(policy, AuthorizationPolicy)
    (rule,) = policy.spec.rules
    assert [p.trust_domain for p in rule.from_] == ["ap-southeast.demo", "us-west.demo"]


def test_a_cluster_without_services_gets_no_empty_authorization_file() -> None:
    # Found by tests/integration/test_three_clusters.py: the control plane of a cluster with
    # no service never became ready ("the file holds no document").
    text = THREE_CLUSTERS.replace("    - {name: web, clusters: [a, b], upstreams: [pay]}\n", "")
    mesh = load_bytes(text, {LocalMesh.KIND: LocalMesh}).raise_for_errors()[0]
    assert isinstance(mesh, LocalMesh)
    plan = _plan(mesh)
    paths = {f.path for f in plan.files}
    assert plan.policy_dir("a") / AUTHORIZATION_FILE not in paths
    assert plan.policy_dir("c") / AUTHORIZATION_FILE in paths


def test_peering_waits_for_every_process_of_both_clusters() -> None:
    plan = _plan()
    peering = plan.step("peering.us-west.ap-southeast")
    running = {
        step.name for step in plan.steps if isinstance(step, ProcessStep) and not step.oneshot
    }
    assert set(peering.after) == running
