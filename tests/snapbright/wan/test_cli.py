"""`snapbright wan set|show|serve` against a running emulator's admin API."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from snapbright.cli.wan import app
from snapbright.wan.server import WanEmulator
from tests.snapbright.wan.conftest import StartWan


async def _wan(*args: str) -> Result:
    # The CLI blocks on its HTTP call, so it runs in a thread while the loop serves the admin.
    runner = CliRunner()
    return await asyncio.to_thread(lambda: runner.invoke(app, list(args)))


def _admin(wan: WanEmulator) -> str:
    return f"127.0.0.1:{wan.admin_port}"


async def test_set_changes_both_directions_and_prints_them(
    start_wan: StartWan, echo_port: int
) -> None:
    wan = await start_wan(echo_port, latency="80ms")
    result = await _wan(
        "set", "a", "b", "--latency", "120ms", "--jitter", "10ms", "--loss", "0.01",
        "--bandwidth", "100mbit", "--admin", _admin(wan),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    shapes = {(s.source, s.destination): s.shape for s in wan.links()}
    for pair in (("a", "b"), ("b", "a")):
        assert (shapes[pair].latency, shapes[pair].jitter) == (0.12, 0.01)
        assert (shapes[pair].loss, shapes[pair].bandwidth) == (0.01, 1e8)
    assert result.output.count("120ms") == 2
    assert "100Mbps" in result.output


async def test_set_one_way_partition_changes_one_direction(
    start_wan: StartWan, echo_port: int
) -> None:
    wan = await start_wan(echo_port)
    result = await _wan("set", "b", "a", "--partition", "--one-way", "--admin", _admin(wan))
    assert result.exit_code == 0, result.output
    shapes = {(s.source, s.destination): s.shape for s in wan.links()}
    assert shapes[("b", "a")].partition
    assert not shapes[("a", "b")].partition
    assert "stall" in result.output


async def test_show_prints_every_directed_link(start_wan: StartWan, echo_port: int) -> None:
    wan = await start_wan(echo_port, latency="80ms", loss="2%", bandwidth="1Gbps")
    result = await _wan("show", "--admin", _admin(wan))
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()]
    assert rows[0][:6] == ["FROM", "TO", "LATENCY", "JITTER", "LOSS", "BANDWIDTH"]
    assert [row[:6] for row in rows[1:]] == [
        ["a", "b", "80ms", "0ms", "2%", "1Gbps"],
        ["b", "a", "80ms", "0ms", "2%", "1Gbps"],
    ]


async def test_show_finds_the_emulator_of_the_mesh_running_from_the_state_dir(
    start_wan: StartWan, echo_port: int, tmp_path: Path
) -> None:
    wan = await start_wan(echo_port, latency="33ms")
    endpoints = {"version": 1, "clusters": {}, "wan": {"admin": f"http://{_admin(wan)}"}}
    (tmp_path / "endpoints.json").write_text(json.dumps(endpoints))
    result = await _wan("show", "--state-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert result.output.count("33ms") == 2


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["a", "b", "--jitter", "50ms"], "must not exceed latency"),
        (["a", "x", "--latency", "5ms"], "no link a→x"),
        (["a", "b", "--latency", "fast"], "invalid duration"),
        (["a", "b", "--bandwidth", "100mbps"], "invalid bandwidth"),
        (["a", "b", "--loss", "1.5"], "between 0% and 100%"),
    ],
)
async def test_set_refuses_a_bad_change_and_says_why(
    start_wan: StartWan, echo_port: int, args: list[str], reason: str
) -> None:
    wan = await start_wan(echo_port, latency="10ms")
    result = await _wan("set", *args, "--admin", _admin(wan))
    assert result.exit_code == 1
    assert reason in result.stderr
    assert {s.shape.latency for s in wan.links()} == {0.01}


async def test_set_without_an_emulator_says_none_answers(unused_port: int) -> None:
    result = await _wan("show", "--admin", f"127.0.0.1:{unused_port}")
    assert result.exit_code == 1
    assert "no WAN emulator answers" in result.stderr


def test_serve_refuses_a_bad_config_file(tmp_path: Path) -> None:
    config = tmp_path / "wan.json"
    config.write_text(json.dumps({"adminHost": "0.0.0.0"}))
    result = CliRunner().invoke(app, ["serve", str(config)])
    assert result.exit_code == 1
    assert "adminHost" in result.stderr or "admin_host" in result.stderr
    assert "not a loopback address" in result.stderr


@pytest.mark.e2e
async def test_serve_runs_forwards_until_interrupted(tmp_path: Path, echo_port: int) -> None:
    config = tmp_path / "wan.json"
    config.write_text(
        json.dumps(
            {
                "adminPort": 0,
                "links": [{"between": ["a", "b"], "latency": "5ms"}],
                "forwards": [
                    {"link": ["a", "b"], "targetHost": "127.0.0.1", "targetPort": echo_port}
                ],
            }
        )
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from snapbright.cli.wan import app; app()", "serve", str(config),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=10)).decode()
        assert line.startswith("wan: admin on 127.0.0.1:")
        port = int(line.split(" :")[1].split()[0])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"through")
        assert await asyncio.wait_for(reader.readexactly(7), timeout=5) == b"through"
        writer.close()
    finally:
        process.send_signal(2)  # SIGINT, as Ctrl-C
        assert await asyncio.wait_for(process.wait(), timeout=5) == 0
