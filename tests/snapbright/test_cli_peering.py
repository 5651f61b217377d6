"""`snapbright peering token|establish --gateway`: per-peer gateway addresses, end to end
through two real control planes' admin APIs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from typer.testing import CliRunner, Result

from federation.peering.model import GatewayAddress
from federation.peering.store import load_state
from federation.peering.token import decode_token
from snapbright.cli.app import app
from tests.snapbright.check.test_cli import _peered_configs
from tests.snapbright.controlplane.conftest import call, control_plane, registration, until


async def _cli(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, app, list(args))


async def test_each_side_is_reached_at_the_addresses_given_for_that_peer(tmp_path: Path) -> None:
    west, east = _peered_configs(tmp_path)
    async with control_plane(east) as exporter, control_plane(west) as importer:
        body = registration("pay-1", "pay", 9001)
        assert (await call("POST", f"{exporter.admin_url}/api/v1/registrations", body))[0] == 200
        # Where us-west reaches ap-southeast (first: its peering port, which the dialer
        # dials), and where ap-southeast reaches us-west: neither is the default.
        east_for_west = [f"127.0.0.1:{exporter.ports['peering']}", "127.0.0.1:7443"]
        west_for_east = [f"127.0.0.1:{importer.ports['peering']}", "127.0.0.1:7444"]
        token = await _cli(
            "peering",
            "token",
            "--api",
            exporter.admin_url,
            *(f"--gateway={address}" for address in east_for_west),
        )
        assert token.exit_code == 0, token.output
        text = token.stdout.strip()
        assert [str(g) for g in decode_token(text, now=0).gateways] == east_for_west
        established = await _cli(
            "peering",
            "establish",
            text,
            "--api",
            importer.admin_url,
            *(f"--gateway={address}" for address in west_for_east),
        )
        assert established.exit_code == 0, established.output
        assert established.stdout.strip() == "peered with ap-southeast"

        parsed = tuple(GatewayAddress.parse(a) for a in east_for_west)
        await until(lambda: bool(importer.view.peers.get("ap-southeast")))
        assert importer.view.peers["ap-southeast"].gateways == parsed
        # us-west exports nothing, so ap-southeast has no mirrors of it: read its record.
        (record,) = load_state(exporter.state_dir / "peering").peers
        assert [str(g) for g in record.gateways] == west_for_east
        assert [str(g) for g in record.advertised] == east_for_west


async def test_a_bad_gateway_address_is_refused_with_the_reason(tmp_path: Path) -> None:
    _, east = _peered_configs(tmp_path)
    async with control_plane(east) as exporter:
        result = await _cli(
            "peering", "token", "--api", exporter.admin_url, "--gateway", "gw.example"
        )
    assert result.exit_code == 1
    assert "gateways: gateway address 'gw.example' must be host:port" in result.stderr
