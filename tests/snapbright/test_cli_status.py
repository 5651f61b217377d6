"""`snapbright status` and `snapbright policy explain` against real control planes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from snapbright.cli.app import app
from snapbright.cli.status import format_weights, table
from tests.snapbright.check.test_cli import _peer, _peered_configs
from tests.snapbright.controlplane.conftest import (
    call,
    control_plane,
    registration,
    until,
    write_config,
)


def _rule(plane: Any, service: str) -> str | None:
    decision = plane.failover.last_decision(service, "us-west")
    return None if decision is None else str(decision.rule.value)


async def _cli(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, app, list(args))


@pytest.mark.parametrize(
    ("weights", "local", "shown"),
    [
        ({"ap-southeast": 9800, "us-west": 200}, "us-west", "us-west 2% · ap-southeast 98%"),
        ({"us-west": 10_000}, "us-west", "us-west 100%"),
        ({"eu": 25, "us-west": 9975}, "us-west", "us-west 99.75% · eu 0.25%"),
        ({}, "us-west", "-"),
    ],
)
def test_weights_read_as_percentages_local_first(
    weights: dict[str, int], local: str, shown: str
) -> None:
    assert format_weights(weights, local) == shown


def test_tables_are_aligned_columns_without_borders() -> None:
    assert table(("A", "LONGER"), [("wide-cell", "x"), ("b", "")]) == [
        "A          LONGER",
        "wide-cell  x",
        "b",
    ]


async def test_status_prints_the_gateways_table_and_failover_per_service(
    tmp_path: Path,
) -> None:
    west, east = _peered_configs(tmp_path)
    async with control_plane(east) as exporter, control_plane(west) as importer:
        await _peer(exporter, importer)
        # Imported only, nobody here calls it, no policy: not decided, the default weights.
        await until(lambda: ("pay", "us-west") in importer.health.pairs(0.0))
        idle = await _cli("status", "--api", importer.admin_url)
        idle_explained = await _cli("policy", "explain", "pay", "--api", importer.admin_url)
        # A policy makes it decided: after the start-up grace (one registration TTL) the
        # missing local copy is a failure.
        (tmp_path / "west" / "policies" / "failover.yaml").write_text(FAILOVER_PAY)
        await until(lambda: _rule(importer, "pay") == "no-healthy-local")
        await until(lambda: bool(importer.journal.for_service("pay")))
        result = await _cli("status", "--api", importer.admin_url)
        as_json = await _cli("status", "--api", importer.admin_url, "-o", "json")
    assert idle.exit_code == 0, idle.output
    idle_lines = idle.output.splitlines()
    header = next(i for i, line in enumerate(idle_lines) if line.startswith("SERVICE"))
    assert idle_lines[header + 1].split() == [
        "pay",
        "us-west",
        "default",
        "ap-southeast",
        "100%",
        "default",
        "-",
    ]
    assert idle_explained.exit_code == 0, idle_explained.output
    said = idle_explained.output.splitlines()
    assert said[0] == "pay called from us-west (no FailoverPolicy: default behaviour)"
    assert said[1] == "now: ap-southeast 100%  (mode default, rule default)"
    assert said[2].strip().startswith("default: no callers, no policy; discovery's weights (")

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "us-west (mesh acme, ready)"
    gateways = next(i for i, line in enumerate(lines) if line.startswith("CLUSTER"))
    assert lines[gateways].split() == ["CLUSTER", "ALIVE", "SERVICES", "RTT", "PEERING"]
    assert lines[gateways + 1].split()[:3] == ["ap-southeast", "yes", "1"]
    assert lines[gateways + 1].split()[-1] == "active"
    header = next(i for i, line in enumerate(lines) if line.startswith("SERVICE"))
    assert lines[header].split() == ["SERVICE", "CALLER", "MODE", "WEIGHTS", "LAST-RULE", "SINCE"]
    row = lines[header + 1]
    assert row.split()[:3] == ["pay", "us-west", "local-down"]
    assert "us-west 0% · ap-southeast 100%" in row
    assert row.rstrip().endswith("ago")
    # Columns line up: cells start where their headings do.
    assert row.index("us-west 0% · ") == lines[header].index("WEIGHTS")
    assert row.index("no-healthy-local") == lines[header].index("LAST-RULE")

    (cluster,) = json.loads(as_json.output)
    assert cluster["gateways"][0] | {"rttSeconds": None} == {
        "cluster": "ap-southeast",
        "alive": True,
        "services": 1,
        "rttSeconds": None,
        "peering": "active",
    }
    (pay,) = cluster["services"]
    assert (pay["service"], pay["mode"], pay["weights"]["ap-southeast"]) == (
        "pay",
        "local-down",
        10_000,
    )


async def test_status_of_a_control_plane_that_does_not_answer_exits_1(tmp_path: Path) -> None:
    result = await _cli("status", "--state-dir", str(tmp_path))
    assert result.exit_code == 1
    assert "endpoints.json: is a control plane running?" in result.output


FAILOVER_PAY = (
    (Path(__file__).parents[2] / "deploy" / "examples" / "failover-payments.yaml")
    .read_text()
    .replace("name: payments", "name: pay-failover")
    .replace("service: payments", "service: pay")
)


async def test_explain_prints_the_decision_chain_newest_first(tmp_path: Path) -> None:
    config = write_config(tmp_path, "us-west")
    (tmp_path / "policies" / "failover.yaml").write_text(FAILOVER_PAY)
    async with control_plane(config) as plane:
        body = registration("pay-1", "pay", 9001)
        body["endpoint"]["health"] = "critical"
        assert (await call("POST", f"{plane.admin_url}/api/v1/registrations", body))[0] == 200
        await until(lambda: _rule(plane, "pay") == "no-healthy-local")
        result = await _cli("policy", "explain", "pay", "--state-dir", str(plane.state_dir))
        as_json = await _cli("policy", "explain", "pay", "--api", plane.admin_url, "-o", "json")
        limited = await _cli(
            "policy", "explain", "pay", "--api", plane.admin_url, "--limit", "1", "-o", "json"
        )
        unknown = await _cli("policy", "explain", "nothing", "--api", plane.admin_url)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "pay called from us-west (policy pay-failover)"
    assert lines[1].startswith("now: us-west 0%") or lines[1].startswith("now: us-west 100%")
    assert "(mode local-down, rule no-healthy-local)" in lines[1]
    assert lines[2].strip()  # the live explanation
    first = lines.index(next(line for line in lines if line.startswith("decisions, newest first")))
    decision = lines[first + 1]
    assert decision.endswith("no-healthy-local  (mode local-down)")
    assert " → " in lines[first + 2]
    assert lines[first + 3].strip()

    answer = json.loads(as_json.output)
    assert answer["service"] == "pay"
    assert answer["live"]["rule"] == "no-healthy-local"
    assert answer["policy"] == "pay-failover"
    times = [d["unixTime"] for d in answer["decisions"]]
    assert times == sorted(times, reverse=True)
    assert len(json.loads(limited.output)["decisions"]) == 1
    assert unknown.exit_code == 1
    assert "404: no service 'nothing' here" in unknown.output
