"""`snapbright peering …` against running control planes, found through endpoints.json."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from typer.testing import CliRunner, Result

from snapbright.cli.app import app
from tests.snapbright.controlplane.conftest import control_plane, write_config


async def _cli(*args: str) -> Result:
    # The CLI blocks on HTTP; the control planes it talks to run in this loop.
    return await asyncio.to_thread(CliRunner().invoke, app, list(args))


async def test_token_establish_list_and_delete_through_the_cli(tmp_path: Path) -> None:
    west = write_config(tmp_path / "west", "us-west")
    east = write_config(tmp_path / "east", "ap-southeast")
    async with control_plane(east) as accepting, control_plane(west) as dialing:
        east_state = str(accepting.state_dir)
        token = await _cli("peering", "token", "--state-dir", east_state, "--ttl", "10m")
        assert token.exit_code == 0, token.output
        assert token.output.startswith("sbpt1.")

        established = await _cli(
            "peering", "establish", token.output.strip(), "--api", dialing.admin_url
        )
        assert established.exit_code == 0, established.output
        assert established.output == "peered with ap-southeast\n"

        listed = await _cli("peering", "list", "--state-dir", str(dialing.state_dir))
        assert listed.exit_code == 0, listed.output
        header, row = listed.output.splitlines()
        assert header.split() == ["PEER", "STATE", "LAST-HEARTBEAT", "RTT", "IMPORTED", "EXPORTED"]
        assert row.split()[:2] == ["ap-southeast", "ACTIVE"]

        again = await _cli("peering", "establish", token.output.strip(), "--api", dialing.admin_url)
        assert again.exit_code == 1
        assert "already peered with ap-southeast" in again.output

        deleted = await _cli(
            "peering", "delete", "ap-southeast", "--state-dir", str(dialing.state_dir)
        )
        assert deleted.exit_code == 0, deleted.output
        listed = await _cli("peering", "list", "--api", dialing.admin_url)
        assert listed.output.splitlines()[1:] == []


async def test_the_cli_says_where_it_looked_when_it_finds_no_control_plane(
    tmp_path: Path,
) -> None:
    missing = await _cli("peering", "list", "--state-dir", str(tmp_path))
    assert missing.exit_code == 1
    assert f"no {tmp_path}/endpoints.json: is a control plane running?" in missing.output

    (tmp_path / "endpoints.json").write_text(
        json.dumps(
            {
                "version": 1,
                "clusters": {
                    "a": {"admin": "http://127.0.0.1:1"},
                    "b": {"admin": "http://127.0.0.1:1"},
                },
            }
        )
    )
    several = await _cli("peering", "list", "--state-dir", str(tmp_path))
    assert several.exit_code == 1
    assert "lists several clusters (a, b): pass --cluster NAME" in several.output
    unknown = await _cli("peering", "list", "--state-dir", str(tmp_path), "--cluster", "c")
    assert "lists no cluster 'c' (it lists: a, b)" in unknown.output
    refused = await _cli("peering", "list", "--state-dir", str(tmp_path), "--cluster", "a")
    assert refused.exit_code == 1
    assert "cannot reach the control plane at http://127.0.0.1:1" in refused.output


async def test_the_control_plane_writes_its_own_endpoints_file(tmp_path: Path) -> None:
    async with control_plane(write_config(tmp_path, "us-west")) as plane:
        written = json.loads((plane.state_dir / "endpoints.json").read_text())
        assert written == {
            "version": 1,
            "clusters": {
                "us-west": {
                    "admin": plane.admin_url,
                    "discovery": f"127.0.0.1:{plane.ports['discovery']}",
                    "peering": f"127.0.0.1:{plane.ports['peering']}",
                    "dashboard": plane.admin_url + "/",
                }
            },
        }


def test_a_bad_config_file_stops_the_control_plane_before_it_starts(tmp_path: Path) -> None:
    config = write_config(tmp_path, "us-west")
    config.write_text(config.read_text().replace("mesh: acme", "mesh: Acme"))
    result = CliRunner().invoke(app, ["controlplane", "--config", str(config)])
    assert result.exit_code == 2
    assert f"{config}:6:9: spec.mesh: must be dot-separated DNS labels" in result.output
    assert not (tmp_path / "state").exists()  # nothing was created
