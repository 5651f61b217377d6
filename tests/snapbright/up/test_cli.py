"""`snapbright up` and `snapbright fault` as a person types them, on files in a tmp directory
(the running mesh is the end-to-end test's)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from proxy.config.loader import load_file
from proxy.policy.model import TrafficPolicy
from snapbright.cli.app import app
from snapbright.controlplane.model import EndpointsFile
from snapbright.demo.core import Knobs
from snapbright.demo.server import DemoApp, DemoSettings
from snapbright.topology.files import default_topology
from snapbright.up.endpoints import endpoints_document, format_table
from snapbright.up.plan import Plan, ProcessStep, Role, build_plan, sequential_ports
from snapbright.up.runner import prepare_state_dir

runner = CliRunner()


def _plan(state_dir: Path) -> Plan:
    return build_plan(
        default_topology(),
        state_dir=state_dir,
        command=("snapbright",),
        ports=sequential_ports(20000),
    )


def _running_mesh(state_dir: Path, *, sidecars: bool = True) -> Plan:
    """endpoints.json as `snapbright up` writes it, and the policy directories."""
    plan = _plan(state_dir)
    if not sidecars:
        plan = plan.without(Role.SIDECAR)
    pids = {s.name: 1000 + i for i, s in enumerate(plan.steps) if isinstance(s, ProcessStep)}
    (state_dir / "endpoints.json").write_text(json.dumps(endpoints_document(plan, pids)))
    for cluster in plan.clusters:
        plan.policy_dir(cluster).mkdir(parents=True)
    return plan


def test_endpoints_json_is_readable_by_the_control_plane_cli(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    document = endpoints_document(plan, {"us-west.controlplane": 42})
    endpoints = EndpointsFile.model_validate_json(json.dumps(document))
    admin = plan.step("us-west.controlplane")
    assert isinstance(admin, ProcessStep)
    assert endpoints.clusters["us-west"].admin == f"http://127.0.0.1:{admin.ports['admin']}"
    assert document["processes"] == [
        {
            "name": "us-west.controlplane",
            "role": "controlplane",
            "cluster": "us-west",
            "pid": 42,
            "log": str(plan.log_path("us-west.controlplane")),
        }
    ]


def test_the_table_shows_dashboards_sidecar_ports_and_the_wan(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    table = format_table(endpoints_document(plan, {}))
    for cluster in ("us-west", "ap-southeast"):
        admin = plan.step(f"{cluster}.controlplane")
        assert isinstance(admin, ProcessStep)
        assert f"http://127.0.0.1:{admin.ports['admin']}/metrics" in table
    outbound = next(r.outbound for r in plan.replicas if r.service == "checkout")
    assert f"curl -H 'Host: <service>' http://127.0.0.1:{outbound}/" in table
    assert f"snapbright wan show --admin 127.0.0.1:{plan.wan_admin}" in table
    assert "us-west → ap-southeast" in table


def test_a_replica_without_its_sidecar_lists_no_sidecar_ports(tmp_path: Path) -> None:
    document = endpoints_document(_plan(tmp_path).without(Role.SIDECAR), {})
    replicas = document["clusters"]["us-west"]["services"]["payments"]
    assert [sorted(r) for r in replicas] == [["app", "grpc", "replica"]] * 2


def test_fault_set_writes_a_traffic_policy_with_delay_and_abort(tmp_path: Path) -> None:
    plan = _running_mesh(tmp_path)
    result = runner.invoke(
        app,
        [
            "fault",
            "set",
            "--cluster",
            "us-west",
            "--service",
            "payments",
            "--latency",
            "400ms",
            "--error-rate",
            "0.2",
            "--state-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "via TrafficPolicy fault injection" in result.output
    path = plan.policy_dir("us-west") / "snapbright-fault-payments.yaml"
    (policy,) = load_file(path, {TrafficPolicy.KIND: TrafficPolicy}).raise_for_errors()
    assert isinstance(policy, TrafficPolicy)
    faults = policy.spec.faults
    assert policy.spec.service == "payments"
    assert faults.delay is not None
    assert faults.delay.duration == pytest.approx(0.4)
    assert faults.delay.percentage == 1.0
    assert faults.abort is not None
    assert faults.abort.status == 503
    assert faults.abort.percentage == pytest.approx(0.2)
    assert list(plan.policy_dir("ap-southeast").iterdir()) == []


def test_fault_clear_removes_what_fault_set_wrote(tmp_path: Path) -> None:
    plan = _running_mesh(tmp_path)
    base = ["--state-dir", str(tmp_path)]
    for cluster in ("us-west", "ap-southeast"):
        command = ["fault", "set", "--cluster", cluster, "--service", "payments", "--latency", "1s"]
        assert runner.invoke(app, [*command, *base]).exit_code == 0
    result = runner.invoke(app, ["fault", "clear", "--cluster", "us-west", *base])
    assert result.exit_code == 0, result.output
    assert not (plan.policy_dir("us-west") / "snapbright-fault-payments.yaml").exists()
    assert (plan.policy_dir("ap-southeast") / "snapbright-fault-payments.yaml").exists()
    assert runner.invoke(app, ["fault", "clear", *base]).exit_code == 0
    assert list(plan.policy_dir("ap-southeast").iterdir()) == []
    again = runner.invoke(app, ["fault", "clear", *base])
    assert "no fault to clear" in again.output


def test_fault_set_refuses_to_contradict_another_traffic_policy(tmp_path: Path) -> None:
    plan = _running_mesh(tmp_path)
    mine = plan.policy_dir("us-west") / "payments.yaml"
    mine.write_text(
        "apiVersion: snapbright.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: pay}\n"
        "spec: {service: payments}\n"
    )
    result = runner.invoke(
        app,
        [
            "fault",
            "set",
            "--cluster",
            "us-west",
            "--service",
            "payments",
            "--latency",
            "1s",
            "--state-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 1
    assert f"{mine} already holds a TrafficPolicy for payments" in result.output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--cluster", "eu", "--service", "payments", "--latency", "1s"], "no cluster 'eu'"),
        (
            ["--cluster", "ap-southeast", "--service", "checkout", "--latency", "1s"],
            "'checkout' does not run in ap-southeast",
        ),
        (["--cluster", "us-west", "--service", "payments"], "give --latency, --error-rate"),
        (
            ["--cluster", "us-west", "--service", "payments", "--latency", "fast"],
            "--latency: invalid duration 'fast'",
        ),
        (
            ["--cluster", "us-west", "--service", "payments", "--error-rate", "2"],
            "--error-rate: must be between 0% and 100%",
        ),
    ],
)
def test_fault_set_names_what_is_wrong(tmp_path: Path, arguments: list[str], message: str) -> None:
    _running_mesh(tmp_path)
    result = runner.invoke(app, ["fault", "set", *arguments, "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert message in result.output


def test_fault_without_a_running_mesh_says_how_to_start_one(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["fault", "clear", "--state-dir", str(tmp_path)],
    )
    assert result.exit_code == 1
    assert "no mesh is running from" in result.output
    assert "`snapbright up`" in result.output


def test_up_rejects_a_bad_topology_with_its_position(tmp_path: Path) -> None:
    topology = tmp_path / "mesh.yaml"
    topology.write_text(
        "apiVersion: snapbright.io/v1alpha1\nkind: LocalMesh\nmetadata: {name: m}\n"
        "spec:\n  mesh: demo\n  clusters:\n    - {name: a, region: r}\n"
        "  peerings:\n    - between: [a, b]\n"
    )
    result = runner.invoke(app, ["up", str(topology), "--state-dir", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert f"{topology}:9:" in result.output
    assert "unknown cluster 'b'" in result.output
    assert not (tmp_path / "s").exists()


def test_up_refuses_while_another_run_lives_in_the_state_directory(tmp_path: Path) -> None:
    prepare_state_dir(tmp_path, print)  # as if this process were a running `snapbright up`
    result = runner.invoke(app, ["up", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "is already running from" in result.output


async def test_without_sidecars_fault_set_turns_the_demo_apps_knobs(tmp_path: Path) -> None:
    plan = _plan(tmp_path).without(Role.SIDECAR)
    demos = [
        await DemoApp(DemoSettings(name="payments", cluster="us-west", replica=str(i))).start()
        for i in range(2)
    ]
    try:
        document = endpoints_document(plan, {})
        replicas = document["clusters"]["us-west"]["services"]["payments"]
        for replica, demo in zip(replicas, demos, strict=True):
            replica["app"] = f"http://127.0.0.1:{demo.port}"
        (tmp_path / "endpoints.json").write_text(json.dumps(document))
        base = ["--cluster", "us-west", "--service", "payments", "--state-dir", str(tmp_path)]
        command = ["fault", "set", *base, "--latency", "400ms", "--error-rate", "20%"]
        result = await asyncio.to_thread(runner.invoke, app, command)
        assert result.exit_code == 0, result.output
        assert "via the demo apps' knobs (2 replicas)" in result.output
        assert [demo.knobs for demo in demos] == [Knobs(latency=0.4, error_rate=0.2)] * 2
        result = await asyncio.to_thread(runner.invoke, app, ["fault", "clear", *base])
        assert result.exit_code == 0, result.output
        assert [demo.knobs for demo in demos] == [Knobs()] * 2
    finally:
        for demo in demos:
            await demo.close()
