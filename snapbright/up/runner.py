"""Run a Plan: start its processes, wait until they are ready, supervise, stop them all.

Each process runs in its own session (so a terminal's Ctrl-C reaches only `snapbright up`,
which then stops everything in order) with ``PR_SET_PDEATHSIG``: if `snapbright up` itself is
killed (even with -9) the kernel kills its children. Output goes to
``<state-dir>/logs/<step>.log``. Steps start as soon as the steps they wait for are ready, a
few at a time (starting a Python process costs a core for a second or so). A step that fails to
start, or is not ready within the timeout, is named with the tail of its log and everything
started is stopped. Once up, a process that dies is reported loudly and the rest keeps running
(the failover benchmark kills replicas on purpose).

A state directory runs one mesh at a time: ``up.pid`` names the running `snapbright up`. A new
run refuses while that process lives, and otherwise removes everything an old run left
(configs, CA, state, logs, endpoints) before writing its own files.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from snapbright.controlplane.model import ENDPOINTS_FILE
from snapbright.up.endpoints import endpoints_document, format_table, write_atomic
from snapbright.up.plan import HttpReady, PeeringStep, Plan, ProcessStep, Step, TcpReady

__all__ = [
    "PID_FILE",
    "AlreadyRunning",
    "Mesh",
    "StartFailed",
    "prepare_state_dir",
    "run",
]

PID_FILE = "up.pid"
_OWNED = ("config", "logs", "policies", "state", ENDPOINTS_FILE, PID_FILE)
_PR_SET_PDEATHSIG = 1
_TAIL_LINES = 20
_POLL = 0.1

Report = Callable[[str], None]


class AlreadyRunning(Exception):
    """Another `snapbright up` runs from this state directory."""


class StartFailed(Exception):
    """A step did not start: ``step`` says which, ``reason`` why, ``tail`` its last log lines."""

    def __init__(self, step: str, reason: str, tail: str = "") -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason
        self.tail = tail


# --- The state directory ---


def prepare_state_dir(state_dir: Path, report: Report) -> None:
    """Make ``state_dir`` ready for a fresh run, or raise :class:`AlreadyRunning`."""
    pid_file = state_dir / PID_FILE
    record = _read_pid_file(pid_file)
    if record is not None:
        pid, started = record["pid"], record["started"]
        if _start_time(pid) == started:
            raise AlreadyRunning(
                f"snapbright up (pid {pid}) is already running from {state_dir}: stop it "
                f"(Ctrl-C there, or kill {pid}) or pass another --state-dir"
            )
        # Its children die with it (PDEATHSIG); anything still alive is killed, not reused.
        for child, child_started in record.get("children", []):
            if _start_time(child) == child_started:
                report(f"stopping pid {child}, left by an earlier run from {state_dir}")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child, signal.SIGKILL)
    for name in _OWNED:
        path = state_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    state_dir.mkdir(parents=True, exist_ok=True)
    _write_pid_file(state_dir, {})


def _read_pid_file(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return None
    return record


def _write_pid_file(state_dir: Path, children: Mapping[int, int | None]) -> None:
    pid = os.getpid()
    record = {
        "pid": pid,
        "started": _start_time(pid),
        "children": [[child, started] for child, started in children.items()],
    }
    write_atomic(state_dir / PID_FILE, json.dumps(record) + "\n")


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a pid from its reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat.rpartition(")")[2].split()
    return int(fields[19])


def _busy_ports(plan: Plan) -> list[str]:
    busy = []
    for step, name, port in plan.ports():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                busy.append(f"{port} ({step} {name})")
    return busy


# --- Processes ---


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGKILL when ``parent`` dies, even if it is killed -9."""

    def preexec() -> None:
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody would tell us.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


@dataclass
class _Running:
    step: ProcessStep
    process: asyncio.subprocess.Process
    log: Path
    started: int | None


@dataclass
class Mesh:
    """The processes of a plan that are running (in start order), and stopping them."""

    plan: Plan
    report: Report
    running: dict[str, _Running] = field(default_factory=dict)
    stopping: bool = False

    @property
    def pids(self) -> dict[str, int]:
        """Every running process of the mesh by step name."""
        return {name: r.process.pid for name, r in self.running.items() if not r.step.oneshot}

    async def spawn(self, step: ProcessStep) -> _Running:
        """Start one step's process, its output to its log."""
        log = self.plan.log_path(step.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        output = _open_log(log)
        try:
            spawning = asyncio.ensure_future(
                asyncio.create_subprocess_exec(
                    *step.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=output,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent(os.getpid()),
                )
            )
            try:
                process = await asyncio.shield(spawning)
            except asyncio.CancelledError:
                # Cancelled while forking: the process may exist all the same; keep it known
                # so that stopping the mesh stops it.
                with contextlib.suppress(Exception):
                    self._record(step, await spawning, log)
                raise
        finally:
            os.close(output)
        return self._record(step, process, log)

    def _record(
        self, step: ProcessStep, process: asyncio.subprocess.Process, log: Path
    ) -> _Running:
        running = _Running(step, process, log, _start_time(process.pid))
        self.running[step.name] = running
        if not step.oneshot:
            _write_pid_file(
                self.plan.state_dir,
                {r.process.pid: r.started for r in self.running.values() if not r.step.oneshot},
            )
        return running

    async def stop(self, grace: float, hurry: asyncio.Event | None = None) -> None:
        """SIGTERM every process group (last started first), SIGKILL what is left after
        ``grace`` seconds (or at once when ``hurry`` is set), and wait for all of them."""
        self.stopping = True
        alive = [r for r in reversed(self.running.values()) if r.process.returncode is None]
        for running in alive:
            _signal_group(running.process.pid, signal.SIGTERM)
        waits = [asyncio.ensure_future(r.process.wait()) for r in alive]
        if waits:
            hurried = asyncio.ensure_future((hurry or asyncio.Event()).wait())
            all_done = asyncio.ensure_future(asyncio.wait(waits))
            await asyncio.wait(
                [all_done, hurried], timeout=grace, return_when=asyncio.FIRST_COMPLETED
            )
            hurried.cancel()
            all_done.cancel()
            late = [w for w in waits if not w.done()]
            for running in alive:
                if running.process.returncode is None:
                    self.report(f"{running.step.name} did not stop within {grace:g}s: killed")
                    _signal_group(running.process.pid, signal.SIGKILL)
            if late:
                await asyncio.wait(late)
        # Anything a process left in its group (a child of its own) goes too.
        for running in self.running.values():
            _signal_group(running.process.pid, signal.SIGKILL)


def _open_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _tail(path: Path, lines: int = _TAIL_LINES) -> str:
    try:
        with open(path, "rb") as stream:
            stream.seek(0, os.SEEK_END)
            stream.seek(max(0, stream.tell() - 16384))
            text = stream.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --- Bringing steps up ---


async def _ready(check: HttpReady | TcpReady, session: aiohttp.ClientSession) -> bool:
    try:
        if isinstance(check, TcpReady):
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(check.host, check.port), timeout=1.0
            )
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True
        async with session.get(check.url, timeout=aiohttp.ClientTimeout(total=1.0)) as response:
            return response.status == 200
    except (OSError, TimeoutError, aiohttp.ClientError):
        return False


async def _bring_up_process(
    mesh: Mesh, step: ProcessStep, session: aiohttp.ClientSession, deadline: float
) -> None:
    running = await mesh.spawn(step)
    process = running.process
    while True:
        if step.oneshot:
            try:
                code = await asyncio.wait_for(process.wait(), timeout=_left(deadline))
            except TimeoutError:
                raise StartFailed(step.name, "did not finish in time", _tail(running.log)) from None
            if code != 0:
                raise StartFailed(step.name, f"exited with code {code}", _tail(running.log))
            return
        if process.returncode is not None:
            raise StartFailed(
                step.name,
                f"exited with code {process.returncode} before it was ready",
                _tail(running.log),
            )
        if step.ready is None or await _ready(step.ready, session):
            return
        if time.monotonic() >= deadline:
            what = step.ready.url if isinstance(step.ready, HttpReady) else f"{step.ready.port}"
            raise StartFailed(step.name, f"not ready in time ({what})", _tail(running.log))
        await asyncio.sleep(_POLL)


async def _establish(step: PeeringStep, session: aiohttp.ClientSession, deadline: float) -> str:
    """A token from the accepting side, established on the dialing side; retried (with a new
    one-time token each time) until the deadline, since a fresh mesh may need a moment."""
    reason = "no attempt"
    while time.monotonic() < deadline:
        try:
            token = await _post(
                session,
                f"{step.accepting_admin}/api/v1/peering/token",
                {"ttl": "10m", "gateways": list(step.dial_via)},
            )
            answer = await _post(
                session,
                f"{step.dialing_admin}/api/v1/peering/establish",
                {"token": token["token"], "gateways": list(step.advertise)},
            )
            return str(answer.get("peer", step.accepting))
        except (OSError, TimeoutError, aiohttp.ClientError, _Refused, KeyError) as error:
            reason = str(error) or type(error).__name__
        await asyncio.sleep(0.5)
    raise StartFailed(step.name, f"{step.dialing} could not peer with {step.accepting}: {reason}")


class _Refused(Exception):
    pass


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=15)) as response:
        try:
            answer = await response.json(content_type=None)
        except ValueError:
            answer = {}
        if response.status != 200 or not isinstance(answer, dict):
            error = answer.get("error") if isinstance(answer, dict) else None
            raise _Refused(f"{url}: HTTP {response.status}: {error or 'no reason given'}")
        return answer


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


async def start(mesh: Mesh, *, ready_timeout: float, concurrency: int, stop: asyncio.Event) -> None:
    """Bring every step of the plan up (dependencies first), or raise :class:`StartFailed`."""
    plan = mesh.plan
    done = {step.name: asyncio.Event() for step in plan.steps}
    slots = asyncio.Semaphore(concurrency)

    async def bring_up(step: Step, session: aiohttp.ClientSession) -> None:
        for dependency in step.after:
            await done[dependency].wait()
        async with slots:
            deadline = time.monotonic() + ready_timeout
            if isinstance(step, PeeringStep):
                peer = await _establish(step, session, deadline)
                mesh.report(f"  ✓ {step.dialing} peered with {peer}")
            else:
                began = time.monotonic()
                await _bring_up_process(mesh, step, session, deadline)
                if not step.oneshot:
                    mesh.report(f"  ✓ {step.name} ready ({time.monotonic() - began:.1f}s)")
        done[step.name].set()

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.ensure_future(bring_up(step, session)) for step in plan.steps]
        stopper = asyncio.ensure_future(stop.wait())
        try:
            pending: set[asyncio.Future[Any]] = set(tasks)
            while pending:
                finished, pending = await asyncio.wait(
                    pending | {stopper}, return_when=asyncio.FIRST_COMPLETED
                )
                if stopper in finished:
                    raise StartFailed("snapbright up", "interrupted while starting")
                pending.discard(stopper)
                for task in finished:
                    task.result()
        finally:
            stopper.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)


async def _supervise(mesh: Mesh, stop: asyncio.Event) -> None:
    """Until ``stop``: report loudly any process that dies (the others keep running)."""

    async def watch(running: _Running) -> None:
        code = await running.process.wait()
        if not mesh.stopping:
            mesh.report(
                f"‼ {running.step.name} (pid {running.process.pid}) exited with code {code}; "
                f"its log: {running.log}\n{_indent(_tail(running.log))}"
            )

    watchers = [
        asyncio.ensure_future(watch(r)) for r in mesh.running.values() if not r.step.oneshot
    ]
    try:
        await stop.wait()
    finally:
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())


async def run(
    plan: Plan,
    *,
    report: Report,
    ready_timeout: float = 45.0,
    grace: float = 5.0,
    concurrency: int | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run ``plan`` until SIGINT or SIGTERM (or ``stop``); 0 after a clean stop, 1 if the mesh
    did not come up. Raises :class:`AlreadyRunning` before starting anything."""
    stop = stop or asyncio.Event()
    prepare_state_dir(plan.state_dir, report)
    busy = _busy_ports(plan)
    if busy:
        report(
            f"✗ ports already in use: {', '.join(busy[:5])}{' …' if len(busy) > 5 else ''}; "
            "stop what holds them or pass another --base-port"
        )
        (plan.state_dir / PID_FILE).unlink(missing_ok=True)
        return 1
    for planned in plan.files:
        write_atomic(planned.path, planned.text)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    hurry = asyncio.Event()

    def on_signal() -> None:
        # The first Ctrl-C stops gracefully; a second one does not wait for the grace period.
        (hurry if stop.is_set() else stop).set()

    for signum in signals:
        loop.add_signal_handler(signum, on_signal)
    mesh = Mesh(plan, report)
    code = 0
    try:
        logs = plan.log_path("x").parent
        report(f"starting mesh {plan.mesh!r} from {plan.state_dir} (logs in {logs})")
        try:
            await start(
                mesh,
                ready_timeout=ready_timeout,
                concurrency=concurrency or 2 * (os.cpu_count() or 2),
                stop=stop,
            )
        except StartFailed as failure:
            report(f"✗ {failure.step}: {failure.reason}")
            if failure.tail:
                log = plan.log_path(failure.step)
                report(f"  last lines of {log}:\n{_indent(failure.tail)}")
            report("stopping everything that was started")
            return 1
        document = endpoints_document(plan, mesh.pids)
        write_atomic(plan.state_dir / ENDPOINTS_FILE, json.dumps(document, indent=2) + "\n")
        report(format_table(document))
        report(f"the same is in {plan.state_dir / ENDPOINTS_FILE}; Ctrl-C stops the mesh")
        await _supervise(mesh, stop)
        report("stopping the mesh")
    finally:
        try:
            await mesh.stop(grace, hurry)
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)
        (plan.state_dir / ENDPOINTS_FILE).unlink(missing_ok=True)
        (plan.state_dir / PID_FILE).unlink(missing_ok=True)
    return code
