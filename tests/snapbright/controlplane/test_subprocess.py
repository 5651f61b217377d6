"""`snapbright controlplane` as a real process: it serves, and a kill -9 loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from federation.peering.store import load_state
from federation.trust.store import load_ca
from tests.snapbright.controlplane.conftest import (
    BAD_POLICY,
    GOOD_POLICY,
    call,
    control_plane,
    next_snapshot,
    registration,
    sidecar,
    until,
    write_config,
)
from tests.snapbright.controlplane.test_peering import EXPORT_PAY

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def _control_plane_process(config: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "snapbright",
        "controlplane",
        "--config",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def _until_ready(admin: str, process: asyncio.subprocess.Process) -> None:
    async def ready() -> bool:
        with contextlib.suppress(OSError):
            return (await call("GET", f"{admin}/ready"))[0] == 200
        return False

    async with asyncio.timeout(20):
        while not await ready():
            assert process.returncode is None, "the control plane exited"
            await asyncio.sleep(0.1)


async def _subscriber_acking(admin: str, version: str) -> dict[str, Any]:
    """The subscriber that says it holds ``version`` (it said so in its Hello)."""
    async with asyncio.timeout(15):
        while True:
            status, body = await call("GET", f"{admin}/api/v1/status")
            if status == 200:
                for subscriber in body["subscribers"]:
                    if subscriber["ackedVersion"] == version:
                        found: dict[str, Any] = subscriber
                        return found
            await asyncio.sleep(0.05)


async def test_kill_9_and_restart_keeps_registry_and_ca_and_resends_nothing_unchanged(
    tmp_path: Path,
) -> None:
    discovery, peering, admin_port = _free_port(), _free_port(), _free_port()
    config = write_config(tmp_path, "us-west", ports=(discovery, peering, admin_port))
    (tmp_path / "policies" / "pay.yaml").write_text(GOOD_POLICY)
    admin = f"http://127.0.0.1:{admin_port}"
    async with _control_plane_process(config) as first:
        await _until_ready(admin, first)
        body = registration("pay-1", "pay", 9001)
        assert (await call("POST", f"{admin}/api/v1/registrations", body))[0] == 200
        ca = load_ca(tmp_path / "state")
        client = sidecar(ca, f"127.0.0.1:{discovery}", "us-west", "web")
        task = asyncio.create_task(client.run())
        try:
            snapshot = await next_snapshot(client)
            held = snapshot.version
            assert [e.port for e in snapshot.upstreams[0].targets[0].endpoints] == [9001]

            first.send_signal(signal.SIGKILL)
            await first.wait()
            async with _control_plane_process(config) as second:
                await _until_ready(admin, second)
                await until(lambda: client.reconnects >= 1)

                subscriber = await _subscriber_acking(admin, held)
                assert subscriber["sentVersion"] == ""  # the unchanged content was not resent
                assert client.version == held
                services = (await call("GET", f"{admin}/api/v1/services"))[1]["services"]
                assert [
                    (s["service"], s["targets"][0]["endpoints"][0]["port"]) for s in services
                ] == [("pay", 9001)]
                assert load_ca(tmp_path / "state").bundle().roots == ca.bundle().roots
                status = (await call("GET", f"{admin}/api/v1/status"))[1]
                assert status["bundles"][0]["sequence"] == ca.sequence
        finally:
            client.close()
            task.cancel()


async def test_a_restarted_acceptor_sends_no_exports_before_they_are_complete(
    tmp_path: Path,
) -> None:
    discovery, peering, admin_port = _free_port(), _free_port(), _free_port()
    east = write_config(tmp_path / "east", "ap-southeast", ports=(discovery, peering, admin_port))
    (tmp_path / "east" / "policies" / "exports.yaml").write_text(EXPORT_PAY)
    admin = f"http://127.0.0.1:{admin_port}"
    async with (
        _control_plane_process(east) as first,
        control_plane(write_config(tmp_path / "west", "us-west")) as dialer,
    ):
        await _until_ready(admin, first)
        body = registration("pay-1", "pay", 9001)
        assert (await call("POST", f"{admin}/api/v1/registrations", body))[0] == 200
        token = (await call("POST", f"{admin}/api/v1/peering/token", {}))[1]
        status, _ = await call(
            "POST", f"{dialer.admin_url}/api/v1/peering/establish", {"token": token["token"]}
        )
        assert status == 200

        def received() -> dict[str, int]:
            return dict(dialer.peering.messages_received("ap-southeast"))

        def imported() -> int:
            return dialer.peering.list()[0].imported

        def acceptor_holds_our_bundle() -> bool:
            # Saved once our bundle arrives; killed before that, it could not let us back in.
            state = load_state(tmp_path / "east" / "state" / "peering")
            return any(p.name == "us-west" and p.bundle_json for p in state.peers)

        await until(lambda: imported() == 1 and acceptor_holds_our_bundle())
        before = received()

        first.send_signal(signal.SIGKILL)
        await first.wait()
        # Restarted with a policy set it refuses: not ready, its ExportPolicy not yet in force.
        bad = tmp_path / "east" / "policies" / "zz-bad.yaml"
        bad.write_text(BAD_POLICY)
        async with _control_plane_process(east) as second:
            # The dialer redials with jittered exponential backoff while the process starts.
            await until(lambda: received()["open"] == before["open"] + 1, within=30)
            # A heartbeat after the new Open would have followed a snapshot sent on it.
            beats = received()["heartbeat"]
            await until(lambda: received()["heartbeat"] >= beats + 2)
            assert received().get("services_snapshot") == before["services_snapshot"]
            assert imported() == 1

            bad.unlink()
            await _until_ready(admin, second)
            await until(lambda: received()["services_snapshot"] == before["services_snapshot"] + 1)
            assert imported() == 1
