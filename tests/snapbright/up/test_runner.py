"""The runner with small real processes standing in for the mesh's: readiness, the failure
report with the log's tail, teardown of whole process groups, and PR_SET_PDEATHSIG."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapbright.up.plan import HttpReady, Plan, ProcessStep, Role, TcpReady
from snapbright.up.runner import PID_FILE, AlreadyRunning, prepare_state_dir, run

PY = sys.executable
SLEEPER = (PY, "-c", "import time; time.sleep(60)")


def _plan(state_dir: Path, *steps: ProcessStep) -> Plan:
    return Plan(
        mesh="test",
        state_dir=state_dir,
        steps=steps,
        files=(),
        clusters=(),
        replicas=(),
        wan_admin=0,
        wan_listeners={},
    )


def _step(name: str, argv: tuple[str, ...], **kwargs: object) -> ProcessStep:
    return ProcessStep(name=name, role=Role.DEMO, cluster=None, argv=argv, **kwargs)  # type: ignore[arg-type]


def _writes_pid_then_sleeps(path: Path) -> tuple[str, ...]:
    code = f"import os, time; open({str(path)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    return (PY, "-c", code)


def _sleeps_if_exists(path: Path) -> tuple[str, ...]:
    code = f"import os, sys, time; os.path.exists({str(path)!r}) or sys.exit(5); time.sleep(60)"
    return (PY, "-c", code)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _group_members(pgids: set[int]) -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) in pgids and fields[0] != "Z":
            yield int(entry.name)


async def _endpoints(state_dir: Path, within: float = 15.0) -> dict[str, object]:
    path = state_dir / "endpoints.json"
    deadline = time.monotonic() + within
    while not path.exists():
        assert time.monotonic() < deadline, "endpoints.json did not appear"
        await asyncio.sleep(0.05)
    document: dict[str, object] = json.loads(path.read_text())
    return document


def _pids(document: dict[str, object]) -> dict[str, int]:
    processes = document["processes"]
    assert isinstance(processes, list)
    return {p["name"]: p["pid"] for p in processes}


class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


async def test_processes_run_until_stopped_and_none_is_left_behind(tmp_path: Path) -> None:
    port = _free_port()
    marker = tmp_path / "grandchild.pid"
    # A process that starts a child of its own in its group, and exits on SIGTERM without it.
    parent_of_one = (
        PY,
        "-c",
        "import subprocess, sys, time; "
        f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(marker)!r}, 'w').write(str(c.pid)); time.sleep(60)",
    )
    plan = _plan(
        tmp_path / "run",
        _step(
            "web",
            (PY, "-m", "http.server", "--bind", "127.0.0.1", str(port)),
            ready=HttpReady(f"http://127.0.0.1:{port}/"),
        ),
        _step("sleeper", SLEEPER, ready=TcpReady("127.0.0.1", port), after=("web",)),
        _step("parent", parent_of_one),
    )
    stop = asyncio.Event()
    report = _Lines()
    running = asyncio.create_task(run(plan, report=report, stop=stop, grace=2.0))
    pids = _pids(await _endpoints(plan.state_dir))
    assert set(pids) == {"web", "sleeper", "parent"}
    assert all(_alive(pid) for pid in pids.values())
    deadline = time.monotonic() + 5
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    grandchild = int(marker.read_text())
    assert _alive(grandchild)

    stop.set()
    assert await asyncio.wait_for(running, 15) == 0
    assert not [pid for pid in [*pids.values(), grandchild] if _alive(pid)]
    assert list(_group_members(set(pids.values()))) == []
    assert not (plan.state_dir / "endpoints.json").exists()
    assert not (plan.state_dir / PID_FILE).exists()


async def test_a_step_that_fails_is_named_with_its_log_tail_and_everything_stops(
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "sleeper.pid"
    plan = _plan(
        tmp_path / "run",
        _step("sleeper", _writes_pid_then_sleeps(pid_file)),
        _step(
            "broken",
            (PY, "-c", "import sys; print('line one'); print('boom: bad config'); sys.exit(3)"),
            ready=TcpReady("127.0.0.1", _free_port()),
            after=("sleeper",),
        ),
    )
    report = _Lines()
    assert await asyncio.wait_for(run(plan, report=report, grace=2.0), 20) == 1
    assert "✗ broken: exited with code 3 before it was ready" in report.text
    assert "boom: bad config" in report.text
    assert str(plan.log_path("broken")) in report.text
    assert not _alive(int(pid_file.read_text()))


async def test_a_step_not_ready_in_time_fails_the_start(tmp_path: Path) -> None:
    port = _free_port()
    plan = _plan(
        tmp_path / "run",
        _step(
            "mute",
            (PY, "-c", "print('waiting'); import time; time.sleep(60)"),
            ready=TcpReady("127.0.0.1", port),
        ),
    )
    report = _Lines()
    started = time.monotonic()
    assert await asyncio.wait_for(run(plan, report=report, ready_timeout=1.0), 20) == 1
    assert time.monotonic() - started < 10
    assert f"✗ mute: not ready in time ({port})" in report.text
    assert "waiting" in report.text


async def test_a_oneshot_step_finishes_before_its_dependents_start(tmp_path: Path) -> None:
    made = tmp_path / "made"
    plan = _plan(
        tmp_path / "run",
        _step(
            "init",
            (PY, "-c", f"import time; time.sleep(0.3); open({str(made)!r}, 'w').write('x')"),
            oneshot=True,
        ),
        _step("user", _sleeps_if_exists(made), after=("init",)),
    )
    stop = asyncio.Event()
    running = asyncio.create_task(run(plan, report=_Lines(), stop=stop))
    pids = _pids(await _endpoints(plan.state_dir))
    assert set(pids) == {"user"}
    await asyncio.sleep(0.3)
    assert _alive(pids["user"])
    stop.set()
    assert await asyncio.wait_for(running, 15) == 0


async def test_a_oneshot_step_that_fails_stops_the_start(tmp_path: Path) -> None:
    plan = _plan(
        tmp_path / "run",
        _step("init", (PY, "-c", "import sys; print('no CA here'); sys.exit(1)"), oneshot=True),
        _step("user", SLEEPER, after=("init",)),
    )
    report = _Lines()
    assert await asyncio.wait_for(run(plan, report=report), 20) == 1
    assert "✗ init: exited with code 1" in report.text
    assert "no CA here" in report.text
    assert not plan.log_path("user").exists()


async def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period(
    tmp_path: Path,
) -> None:
    stubborn = (
        PY,
        "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)",
    )
    plan = _plan(tmp_path / "run", _step("stubborn", stubborn))
    stop = asyncio.Event()
    report = _Lines()
    running = asyncio.create_task(run(plan, report=report, stop=stop, grace=0.5))
    pids = _pids(await _endpoints(plan.state_dir))
    await asyncio.sleep(0.3)  # let it install its handler
    stop.set()
    assert await asyncio.wait_for(running, 15) == 0
    assert "stubborn did not stop within 0.5s: killed" in report.text
    assert not _alive(pids["stubborn"])


async def test_a_process_that_dies_later_is_reported_and_the_rest_keeps_running(
    tmp_path: Path,
) -> None:
    plan = _plan(
        tmp_path / "run",
        _step("steady", SLEEPER),
        _step(
            "short", (PY, "-c", "import time; time.sleep(0.5); print('bye'); raise SystemExit(7)")
        ),
    )
    stop = asyncio.Event()
    report = _Lines()
    running = asyncio.create_task(run(plan, report=report, stop=stop))
    pids = _pids(await _endpoints(plan.state_dir))
    deadline = time.monotonic() + 10
    while "‼ short" not in report.text:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert "exited with code 7" in report.text
    assert "bye" in report.text
    assert _alive(pids["steady"])
    stop.set()
    assert await asyncio.wait_for(running, 15) == 0


async def test_sigint_stops_the_mesh(tmp_path: Path) -> None:
    plan = _plan(tmp_path / "run", _step("steady", SLEEPER))
    running = asyncio.create_task(run(plan, report=_Lines()))
    pids = _pids(await _endpoints(plan.state_dir))
    os.kill(os.getpid(), signal.SIGINT)
    assert await asyncio.wait_for(running, 15) == 0
    assert not _alive(pids["steady"])


async def test_a_busy_port_is_named_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        plan = _plan(tmp_path / "run", _step("web", SLEEPER, ports={"http": port}))
        report = _Lines()
        assert await run(plan, report=report) == 1
    assert f"{port} (web http)" in report.text
    assert not plan.log_path("web").exists()


def test_a_live_run_in_the_state_directory_is_refused(tmp_path: Path) -> None:
    prepare_state_dir(tmp_path, _Lines())  # writes our own pid: we are alive
    with pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"):
        prepare_state_dir(tmp_path, _Lines())


def test_a_stale_run_is_cleaned_and_its_leftover_processes_stopped(tmp_path: Path) -> None:
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    leftover = subprocess.Popen(SLEEPER, start_new_session=True)
    try:
        started = Path(f"/proc/{leftover.pid}/stat").read_text().rpartition(")")[2].split()[19]
        (tmp_path / PID_FILE).write_text(
            json.dumps({"pid": dead.pid, "started": 1, "children": [[leftover.pid, int(started)]]})
        )
        (tmp_path / "logs").mkdir()
        (tmp_path / "logs" / "old.log").write_text("old")
        (tmp_path / "endpoints.json").write_text("{}")
        (tmp_path / "mine.txt").write_text("not ours")
        report = _Lines()
        prepare_state_dir(tmp_path, report)
        assert leftover.wait(timeout=5) == -signal.SIGKILL
        assert f"stopping pid {leftover.pid}" in report.text
        assert not (tmp_path / "logs").exists()
        assert not (tmp_path / "endpoints.json").exists()
        assert (tmp_path / "mine.txt").read_text() == "not ours"
    finally:
        leftover.kill()
        leftover.wait()


_RUN_ALONE = """
import asyncio, sys
from pathlib import Path
from snapbright.up.plan import Plan, ProcessStep, Role
from snapbright.up.runner import run
steps = tuple(
    ProcessStep(name=f"s{i}", role=Role.DEMO, cluster=None,
                argv=(sys.executable, "-c", "import time; time.sleep(60)"))
    for i in range(2)
)
plan = Plan(mesh="t", state_dir=Path(sys.argv[1]), steps=steps, files=(), clusters=(),
            replicas=(), wan_admin=0, wan_listeners={})
asyncio.run(run(plan, report=print))
"""


def test_children_die_when_snapbright_up_is_killed_with_sigkill(tmp_path: Path) -> None:
    state_dir = tmp_path / "run"
    parent = subprocess.Popen(
        [PY, "-c", _RUN_ALONE, str(state_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pids = _pids(asyncio.run(_endpoints(state_dir)))
        assert len(pids) == 2
        assert all(_alive(pid) for pid in pids.values())
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in pids.values()):
            assert time.monotonic() < deadline, "children outlived snapbright up"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()
