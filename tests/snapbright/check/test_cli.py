"""`snapbright check` against real control planes started in this process."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

from typer.testing import CliRunner, Result

from snapbright.cli.app import app
from snapbright.controlplane.process import ControlPlane
from tests.snapbright.controlplane.conftest import (
    BAD_POLICY,
    GOOD_POLICY,
    call,
    control_plane,
    registration,
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


async def _cli(*args: str) -> Result:
    # The CLI blocks on HTTP; the control planes it asks run in this loop.
    return await asyncio.to_thread(CliRunner().invoke, app, list(args))


def _lines(result: Result) -> list[str]:
    return result.output.splitlines()


async def test_a_healthy_single_cluster_passes_and_exits_0(tmp_path: Path) -> None:
    async with control_plane(write_config(tmp_path, "us-west")) as plane:
        result = await _cli("check", "--state-dir", str(plane.state_dir))
    assert result.exit_code == 0, result.output
    lines = _lines(result)
    assert f"✓ control plane of us-west answers at {plane.admin_url}" in lines
    assert "✓ ready: catalog read and policies loaded" in lines
    assert not [line for line in lines if line.startswith(("×", "‼"))]
    assert lines[-1] == "Status check results: ✓ all checks passed: the mesh is healthy"


async def test_a_rejected_policy_file_fails_with_file_line_and_column(tmp_path: Path) -> None:
    config = write_config(tmp_path, "us-west")
    (tmp_path / "policies" / "pay.yaml").write_text(GOOD_POLICY)
    async with control_plane(config) as plane:
        (tmp_path / "policies" / "pay.yaml").write_text(BAD_POLICY)
        await until(lambda: not plane.policies.state.ok)
        result = await _cli("check", "--api", plane.admin_url)
    assert result.exit_code == 1, result.output
    lines = _lines(result)
    failed = lines.index("× the last policy reload was rejected: the last good set stays in force")
    assert lines[failed + 1].startswith(f"    {tmp_path / 'policies' / 'pay.yaml'}:6:")
    assert "spec.timeouts.request" in lines[failed + 1]
    assert lines[failed + 2].startswith("    hint: fix the file")
    assert lines[-1].startswith("Status check results: × 1 check(s) failed")


async def test_an_unreachable_control_plane_fails_with_a_hint(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    result = await _cli("check", "--api", f"http://127.0.0.1:{port}")
    assert result.exit_code == 1
    lines = _lines(result)
    assert lines[2].startswith(f"× cannot reach the control plane at http://127.0.0.1:{port}")
    assert lines[3].startswith("    hint: is it running?")
    missing = await _cli("check", "--state-dir", str(tmp_path), "-o", "json")
    assert missing.exit_code == 1
    (only,) = json.loads(missing.output)["clusters"][0]["groups"][0]["checks"]
    assert only["level"] == "fail"
    assert "endpoints.json: is a control plane running?" in only["message"]


async def test_json_output_carries_the_same_checks(tmp_path: Path) -> None:
    async with control_plane(write_config(tmp_path, "us-west")) as plane:
        text = await _cli("check", "--api", plane.admin_url)
        result = await _cli("check", "--api", plane.admin_url, "-o", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["ok"], report["failures"], report["warnings"]) == (True, 0, 0)
    (cluster,) = report["clusters"]
    assert cluster["cluster"] == "us-west"
    messages = [c["message"] for g in cluster["groups"] for c in g["checks"]]
    assert [line[2:] for line in _lines(text) if line.startswith("✓ ")] == messages
    assert [g["group"] for g in cluster["groups"]][:2] == ["control plane", "policies"]


async def _peer(exporter: ControlPlane, importer: ControlPlane) -> None:
    body = registration("pay-1", "pay", 9001)
    assert (await call("POST", f"{exporter.admin_url}/api/v1/registrations", body))[0] == 200
    token = (await call("POST", f"{exporter.admin_url}/api/v1/peering/token", {}))[1]
    establish = {"token": token["token"]}
    status, answer = await call("POST", f"{importer.admin_url}/api/v1/peering/establish", establish)
    assert status == 200, answer
    await until(lambda: importer.peering.bundle_acked("ap-southeast") == 1)
    await until(lambda: exporter.peering.bundle_acked("us-west") == 1)
    await until(lambda: "ap-southeast" in importer.view.peer_bundles)
    await until(lambda: "us-west" in exporter.view.peer_bundles)
    await until(
        lambda: (
            "ap-southeast" in importer.view.peers
            and bool(importer.view.peers["ap-southeast"].imports)
        )
    )


def _peered_configs(tmp_path: Path) -> tuple[Path, Path]:
    # us-west has no local `pay`: after one registration TTL (a restarted control plane's grace
    # for its services to register) that means no healthy local endpoint, so keep it short.
    west = write_config(tmp_path / "west", "us-west", catalog="{registrationTtl: 1s}")
    east = write_config(tmp_path / "east", "ap-southeast")
    (tmp_path / "east" / "policies" / "exports.yaml").write_text(EXPORT_PAY)
    return west, east


async def test_two_peered_clusters_show_the_peer_connected_and_bundles_both_ways(
    tmp_path: Path,
) -> None:
    west, east = _peered_configs(tmp_path)
    async with control_plane(east) as exporter, control_plane(west) as importer:
        await _peer(exporter, importer)
        result = await _cli("check", "--api", importer.admin_url)
        exporting = await _cli("check", "--api", exporter.admin_url)
        assert (await call("DELETE", f"{importer.admin_url}/api/v1/peering/ap-southeast"))[0] == 204
        after = await _cli("check", "--api", importer.admin_url)
        # The peer hears "peering deleted" and lets go of us as well.
        await until(lambda: not exporter.peering.list())
        after_there = await _cli("check", "--api", exporter.admin_url)
    assert result.exit_code == 0, result.output
    lines = _lines(result)
    assert any(line.startswith("✓ ap-southeast connected (last heard ") for line in lines), lines
    assert "✓ ap-southeast holds our bundle (sequence 1)" in lines
    assert any(
        line.startswith("✓ ap-southeast's bundle is here (sequence 1, 1 root(s)") for line in lines
    )
    assert "✓ 1 mirror(s) have gateway endpoints, fresh" in lines
    assert "‼ gateway probes are off: a dead peer's mirrors stay until staleGrace ends" in lines
    assert lines[-1] == "Status check results: ‼ all checks passed, with 1 warning(s) worth a look"
    assert exporting.exit_code == 0, exporting.output
    assert "✓ no mirrored service is re-exported (1 service(s) exported)" in _lines(exporting)
    assert "✓ us-west holds our bundle (sequence 1)" in _lines(exporting)

    assert after.exit_code == 0, after.output
    after_lines = _lines(after)
    assert "✓ no peerings" in after_lines
    assert not [line for line in after_lines if "ap-southeast" in line]
    assert after_there.exit_code == 0, after_there.output
    assert "✓ no peerings" in _lines(after_there)


async def test_all_checks_every_cluster_of_endpoints_json_grouped_by_cluster(
    tmp_path: Path,
) -> None:
    west, east = _peered_configs(tmp_path)
    async with control_plane(east) as exporter, control_plane(west) as importer:
        await _peer(exporter, importer)
        endpoints = {
            "version": 1,
            "clusters": {
                "ap-southeast": {"admin": exporter.admin_url},
                "us-west": {"admin": importer.admin_url},
            },
        }
        (tmp_path / "endpoints.json").write_text(json.dumps(endpoints))
        result = await _cli("check", "--all", "--state-dir", str(tmp_path))
        report = await _cli("check", "--all", "--state-dir", str(tmp_path), "-o", "json")
        both = await _cli("check", "--all", "--api", importer.admin_url)
    assert result.exit_code == 0, result.output
    lines = _lines(result)
    headings = [
        line
        for line in lines
        if line.endswith(("  " + exporter.admin_url, "  " + importer.admin_url))
    ]
    assert headings == [
        f"ap-southeast  {exporter.admin_url}",
        f"us-west  {importer.admin_url}",
    ]
    assert "✓ us-west holds our bundle (sequence 1)" in lines
    assert "✓ ap-southeast holds our bundle (sequence 1)" in lines
    across = lines.index("across clusters")
    assert lines[across + 3 : across + 6] == [
        "trust bundles match",
        "-------------------",
        "✓ ap-southeast holds us-west's current bundle (sequence 1)",
    ]
    assert "✓ us-west holds ap-southeast's current bundle (sequence 1)" in lines
    assert [c["cluster"] for c in json.loads(report.output)["clusters"]] == [
        "ap-southeast",
        "us-west",
        "across clusters",
    ]
    assert both.exit_code == 1
    assert "--all takes every cluster of endpoints.json" in both.output


async def test_a_mirror_registered_and_exported_again_is_flagged_as_a_daisy_chain(
    tmp_path: Path,
) -> None:
    west, east = _peered_configs(tmp_path)
    (tmp_path / "west" / "policies" / "exports.yaml").write_text(
        EXPORT_PAY.replace("[us-west]", "[ap-southeast]")
    )
    async with control_plane(east) as exporter, control_plane(west) as importer:
        await _peer(exporter, importer)
        # Someone registers ap-southeast's gateway as a local endpoint of pay in us-west,
        # which exports pay: ap-southeast's own service comes back to it through us-west.
        gateway = registration("pay-via-east", "pay", exporter.ports["peering"])
        assert (await call("POST", f"{importer.admin_url}/api/v1/registrations", gateway))[0] == 200
        await until(
            lambda: bool(importer.peering.book.exports_to("ap-southeast").snapshot().services)
        )
        result = await _cli("check", "--api", importer.admin_url)
    assert result.exit_code == 1, result.output
    lines = _lines(result)
    assert (
        "× pay is exported to ap-southeast, but its endpoints are ap-southeast's gateway: "
        "a mirror re-exported (daisy chain)"
    ) in lines


async def test_all_reports_a_cluster_that_is_down_and_still_checks_the_others(
    tmp_path: Path,
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    async with control_plane(write_config(tmp_path / "west", "us-west")) as plane:
        endpoints = {
            "version": 1,
            "clusters": {"eu-central": {"admin": dead}, "us-west": {"admin": plane.admin_url}},
        }
        (tmp_path / "endpoints.json").write_text(json.dumps(endpoints))
        result = await _cli("check", "--all", "--state-dir", str(tmp_path), "-o", "json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert [(c["cluster"], c["failures"]) for c in report["clusters"]] == [
        ("eu-central", 1),
        ("us-west", 0),
    ]
