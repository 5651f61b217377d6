"""Failover benchmark: a brownout, a hard failure and noise on a live `snapbright up` mesh.

The default topology (two regions 80 ms apart, payments in both, checkout in us-west) runs
from a scratch state directory. An open-loop caller sends a constant rate of requests to
``payments`` through us-west's checkout sidecar (its outbound port, ``Host: payments``); each
latency is measured from the request's *intended* send time, so a stalled caller cannot hide
queueing, and each answer is tagged with the cluster that served it (the demo app says so).
A poller records the weights the us-west control plane holds for payments (``/api/v1/services``)
and the failover transitions it counted (``/metrics``). Every figure is derived from these
recorded timelines afterwards.

Phases, in one run:

1. warm-up, no FailoverPolicy;
2. static brownout: us-west's payments replicas get +400 ms (their demo-app knobs) with no
   FailoverPolicy: default behaviour keeps traffic local while local endpoints are healthy;
3. the FailoverPolicy of deploy/examples/failover-payments.yaml is dropped into us-west's policy
   directory (hot-reloaded): the controller is on;
4. noise: ±30 ms jitter on the local copy, no real degradation;
5. brownout with the controller, then recovery (failback);
6. hard failure: us-west's payments demo apps and their sidecars are killed (SIGKILL).

ap-southeast's copy of payments has no callers of its own (unless ``--remote-rate``): the
controller can choose it only on the latency its control plane measures by probing it, which
its health summary publishes (``source: probes``) while it serves too few requests.

Prints a table and, last, one line of JSON::

    .venv/bin/python -m bench.failover [--rate 60] [--brownout 120] [--static-brownout 120]
        [--policy deploy/examples/failover-payments.yaml] [--remote-rate 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import TypeAdapter

from health.failover.model import TOTAL_WEIGHT
from proxy.config.model import Duration
from snapbright.topology.files import default_topology

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "deploy" / "examples" / "failover-payments.yaml"
SERVICE = "payments"
LOCAL = "us-west"
REMOTE = "ap-southeast"
CALLER = "checkout"
BROWNOUT = 0.400
NOISE = 0.030
# A request still unanswered after this is a failure (and the caller moves on).
REQUEST_TIMEOUT = 5.0
TARGETS = {
    "first_shift_s": ("<=", 2.0),
    "shift_90_s": ("<=", 5.0),
    "p95_reduction": (">=", 0.7),
    "failed_requests_hard_failure": ("==", 0),
    "transitions_brownout": ("<=", 2),
    "transitions_noise": ("==", 0),
}
_DURATION: TypeAdapter[float] = TypeAdapter(Duration)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request of the open-loop caller."""

    intended: float
    """When it should have been sent (monotonic)."""
    latency: float
    """From the intended send time to the end of the answer (or the failure)."""
    ok: bool
    cluster: str | None


@dataclass(frozen=True, slots=True)
class WeightSample:
    """The control plane's weights for payments (basis points by cluster) at ``at``."""

    at: float
    weights: dict[str, int]

    @property
    def local(self) -> int:
        """The share kept by us-west, in basis points."""
        return self.weights.get(LOCAL, 0)


@dataclass
class Recording:
    """Everything the run records: requests, weights, transitions and phase marks."""

    outcomes: list[Outcome] = field(default_factory=list)
    weights: list[WeightSample] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    transitions: dict[str, float] = field(default_factory=dict)

    def between(self, start: str, end: str) -> list[Outcome]:
        """Requests whose intended send time lies between two marks."""
        low, high = self.marks[start], self.marks[end]
        return [o for o in self.outcomes if low <= o.intended < high]

    def weights_between(self, start: str, end: str) -> list[WeightSample]:
        """Weight samples taken between two marks."""
        low, high = self.marks[start], self.marks[end]
        return [s for s in self.weights if low <= s.at < high]


# --- The mesh ---


def _free_base(count: int = 64) -> int:
    """A base port with ``count`` free ports after it (below the ephemeral range)."""
    import random
    import socket

    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(24000, 32000 - count)
        probes: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError("no free range of 64 ports")


@contextlib.contextmanager
def _mesh(state_dir: Path, timeout: float) -> Iterator[dict[str, Any]]:
    """`snapbright up` (default topology) until the block ends; yields endpoints.json."""
    log = state_dir.parent / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [
                *(sys.executable, "-m", "snapbright", "up", "--state-dir", str(state_dir)),
                *("--base-port", str(_free_base()), "--timeout", "60"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=state_dir.parent,
        )
    endpoints = state_dir / "endpoints.json"
    try:
        deadline = time.monotonic() + timeout
        while not endpoints.exists():
            if up.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"snapbright up did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield json.loads(endpoints.read_text())
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(timeout=30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()


# --- Recording ---


async def _caller(
    session: aiohttp.ClientSession, url: str, rate: float, record: Recording, stop: asyncio.Event
) -> None:
    """Open loop: request ``i`` is due at ``start + i / rate`` whatever earlier ones did."""
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def one(intended: float) -> None:
        ok, cluster = False, None
        try:
            async with session.get(url, headers={"Host": SERVICE}) as response:
                body = await response.read()
                ok = response.status == 200
                if ok:
                    cluster = json.loads(body).get("cluster")
        except (aiohttp.ClientError, TimeoutError, ValueError):
            ok = False
        record.outcomes.append(Outcome(intended, loop.time() - intended, ok, cluster))

    start = loop.time()
    sent = 0
    while not stop.is_set():
        due = start + sent / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(due))
        pending.add(task)
        task.add_done_callback(pending.discard)
        sent += 1
    await asyncio.gather(*pending)


async def _poll_weights(
    session: aiohttp.ClientSession, admin: str, record: Recording, stop: asyncio.Event
) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with session.get(f"{admin}/api/v1/services") as response:
                view = await response.json()
            for entry in view["services"]:
                if entry["service"] == SERVICE:
                    weights = {t["cluster"]: int(t["weight"]) for t in entry["targets"]}
                    record.weights.append(WeightSample(loop.time(), weights))
        await asyncio.sleep(0.2)


async def _transitions(session: aiohttp.ClientSession, admin: str) -> float:
    """snapbright_failover_transitions_total for payments, summed over its labels."""
    async with session.get(f"{admin}/metrics") as response:
        text = await response.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("snapbright_failover_transitions_total{") and (
            f'service="{SERVICE}"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _knobs(session: aiohttp.ClientSession, apps: Sequence[str], body: dict[str, Any]) -> None:
    for app in apps:
        async with session.post(f"{app}/_demo/knobs", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"{app}/_demo/knobs: {response.status} {await response.text()}")


async def _policy_in_force(session: aiohttp.ClientSession, admin: str) -> str | None:
    async with session.get(f"{admin}/api/v1/explain/{SERVICE}") as response:
        policy = (await response.json()).get("policy")
    return policy if isinstance(policy, str) else None


async def _until_policy(
    session: aiohttp.ClientSession, admin: str, expected: str | None, within: float = 15.0
) -> None:
    deadline = time.monotonic() + within
    while await _policy_in_force(session, admin) != expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the control plane did not take policy {expected!r} in {within}s")
        await asyncio.sleep(0.25)


# --- The run ---


@dataclass(frozen=True, slots=True)
class Plan:
    """Phase lengths in seconds."""

    rate: float
    remote_rate: float
    warmup: float
    baseline: float
    brownout: float
    static_brownout: float
    recovery: float
    noise: float
    hard_failure: float
    policy: Path = POLICY


async def _run(plan: Plan, endpoints: dict[str, Any], record: Recording, remote: Recording) -> None:
    loop = asyncio.get_running_loop()
    cluster = endpoints["clusters"][LOCAL]
    admin = cluster["admin"]
    policy_file = Path(cluster["policyDirectory"]) / plan.policy.name
    outbound = cluster["services"][CALLER][0]["sidecar"]["outbound"]
    # Optional: the remote region's own users (by default none: its copy is idle, and the
    # health it publishes to us-west rests on its control plane's probes of it).
    remote_outbound = endpoints["clusters"][REMOTE]["services"][SERVICE][0]["sidecar"]["outbound"]
    replicas = cluster["services"][SERVICE]
    apps = [r["app"] for r in replicas]
    base = next(s for s in default_topology().spec.services if s.name == SERVICE).latency
    victims = [
        p["pid"]
        for p in endpoints["processes"]
        if p["cluster"] == LOCAL and p["name"].startswith(f"{LOCAL}.{SERVICE}-")
    ]

    def mark(name: str) -> None:
        record.marks[name] = loop.time()

    async def count(name: str) -> None:
        record.transitions[name] = await _transitions(control, admin)

    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    calls = aiohttp.TCPConnector(limit=0, force_close=False)
    async with (
        aiohttp.ClientSession(connector=calls, timeout=timeout, auto_decompress=False) as traffic,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as control,
    ):
        if policy_file.exists():
            policy_file.unlink()
        await _until_policy(control, admin, None)
        tasks = [
            asyncio.create_task(_caller(traffic, f"http://{outbound}/", plan.rate, record, stop)),
            asyncio.create_task(_poll_weights(control, admin, record, stop)),
        ]
        if plan.remote_rate > 0:
            remote_url = f"http://{remote_outbound}/"
            tasks.append(
                asyncio.create_task(_caller(traffic, remote_url, plan.remote_rate, remote, stop))
            )
        try:
            say(f"warm-up {plan.warmup:.0f}s at {plan.rate:.0f} req/s, no FailoverPolicy")
            await asyncio.sleep(plan.warmup)

            say(f"static brownout: +{BROWNOUT * 1000:.0f} ms on {LOCAL} {SERVICE}, no policy")
            mark("static_baseline")
            await asyncio.sleep(plan.baseline)
            mark("static_fault")
            await _knobs(control, apps, {"latency": f"{(base + BROWNOUT) * 1000:.0f}ms"})
            await asyncio.sleep(plan.static_brownout)
            mark("static_recovered")
            await _knobs(control, apps, {"reset": True})
            await asyncio.sleep(plan.baseline)
            mark("static_end")

            say("FailoverPolicy on (hot reload)")
            shutil.copyfile(plan.policy, policy_file)
            await _until_policy(control, admin, SERVICE)
            await asyncio.sleep(plan.baseline)

            say(f"noise: ±{NOISE * 1000:.0f} ms jitter on {LOCAL} {SERVICE}")
            await count("noise_start")
            mark("noise_start")
            await _knobs(control, apps, {"jitter": f"{NOISE * 1000:.0f}ms"})
            await asyncio.sleep(plan.noise)
            await _knobs(control, apps, {"reset": True})
            mark("noise_end")
            await count("noise_end")
            await asyncio.sleep(plan.baseline)

            say(f"brownout with the controller: +{BROWNOUT * 1000:.0f} ms for {plan.brownout}s")
            await count("brownout_start")
            mark("baseline")
            await asyncio.sleep(plan.baseline)
            mark("fault")
            await _knobs(control, apps, {"latency": f"{(base + BROWNOUT) * 1000:.0f}ms"})
            await asyncio.sleep(plan.brownout)
            say(f"recovery, {plan.recovery:.0f}s for failback")
            mark("recovered")
            await _knobs(control, apps, {"reset": True})
            await asyncio.sleep(plan.recovery)
            mark("recovery_end")
            await count("brownout_end")

            if not record.weights or record.weights[-1].local < TOTAL_WEIGHT:
                # A hard failure of a copy that serves nothing proves nothing: bring traffic
                # home first (no policy: default behaviour keeps it local), then the policy again.
                say("failback incomplete: policy off until traffic is local, then on again")
                policy_file.unlink()
                await _until_policy(control, admin, None)
                for _ in range(int(plan.recovery * 2)):
                    if record.weights[-1].local >= TOTAL_WEIGHT:
                        break
                    await asyncio.sleep(0.5)
                shutil.copyfile(plan.policy, policy_file)
                await _until_policy(control, admin, SERVICE)
            mark("hard_baseline")
            await asyncio.sleep(plan.baseline)
            say(f"hard failure: SIGKILL {LOCAL}'s {SERVICE} apps and sidecars {victims}")
            await asyncio.sleep(plan.baseline / 2)
            mark("killed")
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(plan.hard_failure)
            mark("end")
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(OSError):
                policy_file.unlink()


# --- Figures ---


def _p(values: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values``; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


def _first(samples: Sequence[WeightSample], start: float, test: Any) -> float | None:
    for sample in samples:
        if sample.at >= start and test(sample):
            return sample.at - start
    return None


def _remote_share(outcomes: Sequence[Outcome]) -> float:
    answered = [o for o in outcomes if o.ok]
    if not answered:
        return float("nan")
    return sum(o.cluster == REMOTE for o in answered) / len(answered)


def figures(record: Recording) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """The JSON line and the table rows, from the recorded timelines alone."""
    m = record.marks
    fault_weights = record.weights_between("fault", "recovered")
    moved = [TOTAL_WEIGHT - s.local for s in fault_weights]
    peak = max(moved, default=0)
    first_shift = _first(fault_weights, m["fault"], lambda s: s.local < TOTAL_WEIGHT)
    shift_90 = (
        _first(fault_weights, m["fault"], lambda s: TOTAL_WEIGHT - s.local >= 0.9 * peak)
        if peak
        else None
    )
    # With the policy in force only (the bench may take it away afterwards).
    back = record.weights_between("recovered", "recovery_end")
    # Nothing moved, nothing to bring back.
    failback = _first(back, m["recovered"], lambda s: s.local == TOTAL_WEIGHT) if peak else None
    at_kill = [s.local for s in record.weights if s.at <= m["killed"]][-1:] or [0]
    failback_levels = sorted({s.local for s in back if s.local < TOTAL_WEIGHT})
    first_remote = next(
        (
            o.intended - m["fault"]
            for o in record.between("fault", "recovered")
            if o.cluster == REMOTE
        ),
        None,
    )

    def lat(start: str, end: str) -> list[float]:
        return [o.latency for o in record.between(start, end)]

    p95_with = _p(lat("fault", "recovered"), 0.95) * 1000
    p95_static = _p(lat("static_fault", "static_recovered"), 0.95) * 1000
    killed = record.between("killed", "end")
    hard_failed = sum(not o.ok for o in killed)
    hard_tail = [o for o in killed if o.intended >= m["killed"] + 5]
    t = record.transitions
    result: dict[str, Any] = {
        "first_shift_s": None if first_shift is None else round(first_shift, 2),
        "shift_90_s": None if shift_90 is None else round(shift_90, 2),
        "p95_brownout_ms": round(p95_with, 1),
        "p95_brownout_static_ms": round(p95_static, 1),
        "p95_reduction": round(1 - p95_with / p95_static, 3),
        "failed_requests_hard_failure": hard_failed,
        "transitions_brownout": int(t["brownout_end"] - t["brownout_start"]),
        "transitions_noise": int(t["noise_end"] - t["noise_start"]),
        "failback_s": None if failback is None else round(failback, 2),
    }

    def ms(values: list[float], q: float) -> str:
        return f"{_p(values, q) * 1000:.0f}"

    def pct(share: float) -> str:
        return f"{share * 100:.1f}%"

    rows: list[tuple[str, str, str]] = []
    for label, start, end in (
        ("baseline, no policy", "static_baseline", "static_fault"),
        ("brownout, static local routing", "static_fault", "static_recovered"),
        ("noise ±30ms, controller", "noise_start", "noise_end"),
        ("baseline, controller", "baseline", "fault"),
        ("brownout, controller", "fault", "recovered"),
        ("recovery, controller", "recovered", "recovery_end"),
        ("hard failure (after kill)", "killed", "end"),
    ):
        outcomes = record.between(start, end)
        values = [o.latency for o in outcomes]
        failed = sum(not o.ok for o in outcomes)
        rows.append(
            (
                label,
                f"n={len(outcomes)} p50={ms(values, 0.5)} p95={ms(values, 0.95)} "
                f"p99={ms(values, 0.99)} ms, failed={failed}",
                f"answered by {REMOTE}: {pct(_remote_share(outcomes))}",
            )
        )
    rows += [
        ("first remote answer after fault", _s(first_remote), "data plane"),
        ("first weight shift after fault", _s(first_shift), "control plane weights"),
        ("90% of the peak shift", _s(shift_90), f"peak moved {peak / 100:.1f}%"),
        (
            "failback complete after recovery",
            _s(failback),
            "local share " + " → ".join(f"{v / 100:.0f}%" for v in failback_levels) + " → 100%",
        ),
        ("local share when the replicas were killed", f"{at_kill[0] / 100:.0f}%", "weights"),
        (
            "hard failure: failed after kill + 5 s",
            str(sum(not o.ok for o in hard_tail)),
            f"of {len(hard_tail)}",
        ),
    ]
    return result, rows


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def verdicts(result: dict[str, Any]) -> dict[str, bool]:
    """Each target: met or not (a missing figure is not met)."""
    met: dict[str, bool] = {}
    for name, (op, bound) in TARGETS.items():
        value = result.get(name)
        if value is None:
            met[name] = False
        elif op == "<=":
            met[name] = value <= bound
        elif op == ">=":
            met[name] = value >= bound
        else:
            met[name] = value == bound
    return met


def _recording_of(saved: dict[str, Any]) -> Recording:
    return Recording(
        outcomes=[Outcome(*row) for row in saved.get("outcomes", [])],
        weights=[WeightSample(at, weights) for at, weights in saved.get("weights", [])],
        marks=saved.get("marks", {}),
        transitions=saved.get("transitions", {}),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table, then the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=60.0, help="requests per second")
    parser.add_argument(
        "--remote-rate",
        type=float,
        default=0.0,
        help=f"requests per second of {REMOTE}'s own callers to its {SERVICE} (default 0: "
        "none, its copy is idle and known only by its probes)",
    )
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--baseline", type=float, default=8.0)
    parser.add_argument("--brownout", type=float, default=120.0, help="with the controller")
    # As long as the controller's: both p95s over windows of the same length.
    parser.add_argument("--static-brownout", type=float, default=120.0)
    parser.add_argument("--recovery", type=float, default=45.0)
    parser.add_argument("--noise", type=float, default=25.0)
    parser.add_argument("--hard-failure", type=float, default=20.0)
    parser.add_argument("--workdir", type=Path, help="keep the mesh's state and logs here")
    parser.add_argument(
        "--policy",
        type=Path,
        default=POLICY,
        help="the FailoverPolicy file for the controller phases (default: the example)",
    )
    parser.add_argument(
        "--from-recording",
        type=Path,
        help="no run: the figures of a recording.json an earlier run wrote",
    )
    args = parser.parse_args(argv)
    plan = Plan(
        args.rate,
        args.remote_rate,
        args.warmup,
        args.baseline,
        args.brownout,
        args.static_brownout,
        args.recovery,
        args.noise,
        args.hard_failure,
        args.policy,
    )
    if args.from_recording is not None:
        saved = json.loads(args.from_recording.read_text())
        record, remote = _recording_of(saved), _recording_of({"outcomes": saved["remote"]})
        recording = args.from_recording
    else:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="snapbright-failover-"))
        workdir.mkdir(parents=True, exist_ok=True)
        record, remote = Recording(), Recording()
        with _mesh(workdir / "state", timeout=120) as endpoints:
            asyncio.run(_run(plan, endpoints, record, remote))
        recording = workdir / "recording.json"
        recording.write_text(
            json.dumps(
                {
                    "marks": record.marks,
                    "transitions": record.transitions,
                    "weights": [[s.at, s.weights] for s in record.weights],
                    "outcomes": [[o.intended, o.latency, o.ok, o.cluster] for o in record.outcomes],
                    "remote": [[o.intended, o.latency, o.ok, o.cluster] for o in remote.outcomes],
                }
            )
        )
    result, rows = figures(record)
    if remote.outcomes:
        values = [o.latency for o in remote.outcomes]
        failed = sum(not o.ok for o in remote.outcomes)
        rows.append(
            (
                f"{REMOTE}'s own callers (local to it)",
                f"n={len(values)} p50={_p(values, 0.5) * 1000:.0f} "
                f"p95={_p(values, 0.95) * 1000:.0f} ms, failed={failed}",
                f"{plan.remote_rate:.0f} req/s",
            )
        )
    width = max(len(r[0]) for r in rows)
    shown = plan.policy.relative_to(REPO) if plan.policy.is_relative_to(REPO) else plan.policy
    print(
        f"failover benchmark: {SERVICE} called from {LOCAL} at {plan.rate:.0f} req/s "
        f"(open loop; {REMOTE}'s own callers at {plan.remote_rate:.0f} req/s); policy {shown}"
    )
    for label, value, note in rows:
        print(f"  {label:<{width}}  {value:<58}  {note}")
    print()
    for name, met in verdicts(result).items():
        op, bound = TARGETS[name]
        print(f"  {'✓' if met else '×'} {name} = {result[name]} (target {op} {bound})")
    print(f"  recording: {recording}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
