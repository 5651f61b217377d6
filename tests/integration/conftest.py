"""Fixtures that start whole meshes: `snapbright up` as a real subprocess on loopback.

``start_mesh(topology, base_port)`` runs ``snapbright up`` from a fresh state directory, waits
for ``endpoints.json`` and hands back a :class:`LocalMeshRun`: where every process is, the
tail of any process log (for failure messages), and small HTTP helpers. At the end of the test
the mesh gets Ctrl-C, and anything left (a process a test restarted by hand included) is
killed by its process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

_PORTS = 100
_UP_DEADLINE = 120.0  # a busy 2-core machine starts a process in up to ~10 s


def free_base_port(preferred: int) -> int:
    """``preferred`` if the ``_PORTS`` ports from it are free, else a random free range below
    the ephemeral range (tests use distinct preferred bases so they can run side by side)."""
    rng = random.Random()
    candidates = [preferred, *(rng.randrange(20000, 32000 - _PORTS) for _ in range(50))]
    for base in candidates:
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


def tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log, or why there are none."""
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"({path}: {error})"
    return "\n".join(text.splitlines()[-lines:])


def http(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    """One HTTP request on loopback: the status and body (4xx/5xx are answers, not errors)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - loopback only
        url,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            status: int = response.status
            return status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def get_json(url: str, timeout: float = 5.0) -> Any:
    """GET ``url`` and parse its JSON; a non-200 answer fails with the body."""
    status, body = http("GET", url, timeout=timeout)
    assert status == 200, f"GET {url}: {status} {body[:300]!r}"
    return json.loads(body)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus text family's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, label_text = head.partition("{")
        if sample != name:
            continue
        if all(f'{key}="{val}"' in label_text for key, val in labels.items()):
            total += float(value)
    return total


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_for(
    what: str, check: Callable[[], bool], timeout: float, explain: Callable[[], str] = str
) -> None:
    """Poll ``check`` every 0.2 s until it holds; fail after ``timeout`` s with ``explain()``."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, AssertionError, ValueError, KeyError):
            if check():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s\n{explain()}")
        time.sleep(0.2)


@dataclass
class LocalMeshRun:
    """A running `snapbright up`: its endpoints document, output, and processes the test
    started on its own (restarts), killed at the end with the rest."""

    state_dir: Path
    output: Path
    up: subprocess.Popen[bytes]
    document: dict[str, Any]
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cluster(self, name: str) -> dict[str, Any]:
        """The endpoints.json entry of one cluster."""
        entry: dict[str, Any] = self.document["clusters"][name]
        return entry

    def process(self, name: str) -> dict[str, Any]:
        """The endpoints.json record of one process (name, pid, log)."""
        for record in self.document["processes"]:
            if record["name"] == name:
                found: dict[str, Any] = record
                return found
        raise KeyError(f"no process {name!r} in endpoints.json")

    def sidecar(self, cluster: str, service: str, replica: int = 0) -> dict[str, str]:
        """Where one replica's sidecar listens (outbound, inbound, admin)."""
        entry: dict[str, str] = self.cluster(cluster)["services"][service][replica]["sidecar"]
        return entry

    def logs(self, *names: str, lines: int = 25) -> str:
        """The tails of these processes' logs and of `snapbright up`'s output, for a failure
        message."""
        parts = [f"--- snapbright up ---\n{tail(self.output, lines)}"]
        for name in names:
            log = Path(self.process(name)["log"])
            parts.append(f"--- {name} ({log}) ---\n{tail(log, lines)}")
        return "\n".join(parts)

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``snapbright ARGS`` as a person would; fail with its output if it fails."""
        result = subprocess.run(
            [sys.executable, "-m", "snapbright", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert result.returncode == 0, (
            f"snapbright {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
        return result

    def spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        """Start a process for the test (e.g. a restarted control plane), in its own process
        group, appending to ``log``; it is killed when the mesh stops."""
        with open(log, "ab") as stream:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=stream,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.extra.append(process)
        return process

    def stop(self) -> None:
        """Ctrl-C the mesh, then kill whatever is left of it and of the test's own processes."""
        if self.up.poll() is None:
            self.up.send_signal(signal.SIGINT)
            try:
                self.up.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.up.kill()
                self.up.wait()
        pids = [record["pid"] for record in self.document.get("processes", [])]
        for pid in [*pids, *(p.pid for p in self.extra)]:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        for process in self.extra:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)


StartMesh = Callable[..., LocalMeshRun]


@dataclass
class SteadyLoad:
    """Requests at a fixed rate through a sidecar, in a thread of its own; every outcome is
    counted (``200``, another status, or the exception's name) with when it happened."""

    url: str
    host: str
    rate: float = 50.0
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            pending: set[asyncio.Task[None]] = set()
            tick = time.monotonic()
            while not self._stop.is_set():
                task = asyncio.ensure_future(self._one(session))
                pending.add(task)
                task.add_done_callback(pending.discard)
                tick += 1 / self.rate
                await asyncio.sleep(max(0.0, tick - time.monotonic()))
            if pending:
                await asyncio.wait(pending)

    async def _one(self, session: aiohttp.ClientSession) -> None:
        try:
            async with session.get(self.url, headers={"Host": self.host}) as response:
                await response.read()
                outcome = str(response.status)
        except (aiohttp.ClientError, TimeoutError) as error:
            outcome = type(error).__name__
        self.outcomes[outcome] += 1
        if outcome != "200":
            self.failures.append((time.time(), outcome))


@pytest.fixture
def start_mesh(tmp_path: Path) -> Iterator[StartMesh]:
    """A factory: ``start_mesh(topology=None, preferred_base=…)`` runs `snapbright up` and
    returns the running mesh once ``endpoints.json`` is written (everything ready, peered)."""
    runs: list[LocalMeshRun] = []

    def start(topology: Path | None = None, preferred_base: int = 21000) -> LocalMeshRun:
        state_dir = tmp_path / f"mesh{len(runs)}"
        output = tmp_path / f"up{len(runs)}.out"
        argv = [sys.executable, "-m", "snapbright", "up"]
        if topology is not None:
            argv.append(str(topology))
        argv += [
            "--state-dir",
            str(state_dir),
            "--base-port",
            str(free_base_port(preferred_base)),
            "--timeout",
            "40",
        ]
        with open(output, "wb") as stream:
            up = subprocess.Popen(
                argv, stdout=stream, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True
            )
        run = LocalMeshRun(state_dir, output, up, {})
        runs.append(run)
        endpoints = state_dir / "endpoints.json"
        started = time.monotonic()
        while not endpoints.exists():
            assert up.poll() is None, f"snapbright up exited:\n{tail(output, 60)}"
            assert time.monotonic() - started < _UP_DEADLINE, (
                f"snapbright up not ready in {_UP_DEADLINE:g}s:\n{tail(output, 60)}"
            )
            time.sleep(0.2)
        run.document = json.loads(endpoints.read_text())
        return run

    try:
        yield start
    finally:
        for run in runs:
            run.stop()
