"""`snapbright up` for real: the default two-region mesh from a tmp state directory, every
listed process alive and ready, peered through the WAN, then Ctrl-C leaves nothing behind."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from snapbright.cli.app import app

pytestmark = pytest.mark.e2e

_PORTS = 64
_DEADLINE = 60.0


def _free_range() -> int:
    """A base port with the next ``_PORTS`` ports free (below the ephemeral range)."""
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(24000, 32000 - _PORTS)
        sockets = []
        try:
            for port in range(base, base + _PORTS):
                probe = socket.socket()
                sockets.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()
    raise AssertionError("no free port range")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _in_groups(pgids: set[int]) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) in pgids and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - loopback
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        status: int = response.status
        return status, response.read()


def _has_command(name: str) -> bool:
    return name in {group.name for group in app.registered_groups} | {
        command.name for command in app.registered_commands
    }


@pytest.mark.skipif(not _has_command("wan"), reason="`snapbright wan` is not registered yet")
def test_up_runs_the_default_mesh_and_ctrl_c_leaves_no_process(tmp_path: Path) -> None:
    started = time.monotonic()
    state_dir = tmp_path / "mesh"
    output = tmp_path / "up.out"
    with open(output, "wb") as stream:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "snapbright",
                "up",
                "--state-dir",
                str(state_dir),
                "--base-port",
                str(_free_range()),
                "--timeout",
                "40",
            ],
            stdout=stream,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    pids: dict[str, int] = {}
    try:
        endpoints = state_dir / "endpoints.json"
        while not endpoints.exists():
            assert up.poll() is None, f"snapbright up exited:\n{output.read_text()}"
            assert time.monotonic() - started < 50, f"not up in time:\n{output.read_text()}"
            time.sleep(0.2)
        document: dict[str, Any] = json.loads(endpoints.read_text())
        pids = {p["name"]: p["pid"] for p in document["processes"]}
        assert {"us-west.controlplane", "ap-southeast.gateway", "wan"} <= set(pids)
        assert [name for name, pid in pids.items() if not _alive(pid)] == []
        # The table is printed right after endpoints.json is written: wait for it (bounded).
        while "Ctrl-C stops the mesh" not in output.read_text():
            assert time.monotonic() - started < 55, f"no table:\n{output.read_text()}"
            time.sleep(0.1)

        for cluster in ("us-west", "ap-southeast"):
            entry = document["clusters"][cluster]
            assert _get(f"{entry['admin']}/ready")[0] == 200
            assert _get(entry["dashboard"])[0] == 200
            assert b"snapbright_" in _get(entry["metrics"])[1]
            assert _get(f"{entry['gateway']['admin']}/ready")[0] == 200
            for replicas in entry["services"].values():
                for replica in replicas:
                    if "app" in replica:
                        assert _get(replica["app"] + "/")[0] == 200
                    if "sidecar" in replica:
                        assert _get(f"{replica['sidecar']['admin']}/ready")[0] == 200
                        outbound = f"http://{replica['sidecar']['outbound']}/"
                        status, answer = _get(outbound, {"Host": "payments"})
                        assert status == 200
                        # mTLS end to end: the callee's sidecar saw the caller's SPIFFE ID.
                        caller = json.loads(answer)["peerId"]
                        assert caller.startswith(f"spiffe://{cluster}.demo/ns/default/sa/")
        assert _get(f"{document['wan']['admin']}/healthz")[0] == 200
        _, body = _get(f"{document['clusters']['us-west']['admin']}/api/v1/peering")
        peers = {p["peer"]: p["state"].lower() for p in json.loads(body)["peers"]}
        assert peers == {"ap-southeast": "active"}
        _, body = _get(f"{document['wan']['admin']}/links")
        carried = {
            (link["from"], link["to"]): link["deliveredBytes"] for link in json.loads(body)["links"]
        }
        assert carried[("us-west", "ap-southeast")] > 0, "peering did not cross the WAN"

        _fault_through_the_policy_directory(state_dir, document)

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=max(1.0, _DEADLINE - (time.monotonic() - started))) == 0
        assert [name for name, pid in pids.items() if _alive(pid)] == []
        assert _in_groups(set(pids.values())) == []
        assert not endpoints.exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for pid in pids.values():
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
    assert time.monotonic() - started < _DEADLINE


def _fault_through_the_policy_directory(state_dir: Path, document: dict[str, Any]) -> None:
    """`snapbright fault set` slows calls from us-west to payments within seconds; `clear`
    undoes it."""
    replicas = document["clusters"]["us-west"]["services"]["checkout"]
    if "sidecar" not in replicas[0]:
        return
    outbound = f"http://{replicas[0]['sidecar']['outbound']}/"
    where = ["--cluster", "us-west", "--service", "payments", "--state-dir", str(state_dir)]

    def slowed() -> bool:
        began = time.monotonic()
        _get(outbound, {"Host": "payments"})
        return time.monotonic() - began >= 0.3

    steps = (
        (["set", *where, "--latency", "300ms"], True),
        (["clear", "--state-dir", str(state_dir)], False),
    )
    for command, expected in steps:
        subprocess.run(
            [sys.executable, "-m", "snapbright", "fault", *command], check=True, timeout=20
        )
        deadline = time.monotonic() + 8
        while slowed() is not expected:
            assert time.monotonic() < deadline, f"fault {command[0]} did not take effect"
            time.sleep(0.2)
