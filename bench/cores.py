"""Micro-benchmark of the data plane's per-request decision calls (not a timed test).

Prints nanoseconds per call of each hot call, then one line of JSON with the same numbers.
Each figure is the best of several timeit repeats over a few interleaved rounds (the machine
is shared, so the best is the least disturbed), with the cost of advancing the virtual clock
subtracted. ``request_path`` adds up what one proxied request calls: a target pick among
three, P2C over ten endpoints, start/end and observe, the retry budget's request count, a
breaker slot, the fault check with no fault configured, and one stats record.

    .venv/bin/python bench/cores.py
"""

from __future__ import annotations

import json
import sys
import timeit
from random import Random
from typing import Any

from proxy.balance.core import Endpoint, WeightedTargets, p2c_pick
from proxy.resilience.core import CircuitBreaker, FaultSpec, RetryBudget, decide_fault
from proxy.stats.core import Outcome, StatsRecorder

_NUMBER = 100_000
_REPEATS = 5
_ROUNDS = 3


def _namespace() -> dict[str, Any]:
    endpoints = [Endpoint("10.0.0.1", 8000 + i, 0.0) for i in range(10)]
    for i, endpoint in enumerate(endpoints):
        endpoint.observe(0.001 * (i + 1), 0.0)
    recorder = StatsRecorder()
    return {
        "rng": Random(1),
        "local_only": WeightedTargets({"payments": 100}),
        "three_clusters": WeightedTargets(
            {"payments": 80, "payments@ap-southeast": 15, "payments@eu-west": 5}
        ),
        "p2c_pick": p2c_pick,
        "endpoints": endpoints,
        "endpoint": endpoints[0],
        "budget": RetryBudget(),
        "breaker": CircuitBreaker(),
        "decide_fault": decide_fault,
        "no_fault": FaultSpec(),
        "some_fault": FaultSpec(delay_s=0.1, delay_share=0.01, abort_share=0.01),
        "recorder": recorder,
        "series": recorder.series("payments", "us-west"),
        "ok": Outcome.HTTP_2XX,
    }


# name -> statement; ``t`` is a virtual clock advanced by 1 µs per call.
_CALLS = {
    "pick_one_target": "local_only.pick(rng)",
    "pick_three_targets": "three_clusters.pick(rng)",
    "p2c_pick_10": "p2c_pick(endpoints, rng, t)",
    "observe": "endpoint.observe(0.0042, t)",
    "start_end": "endpoint.start(); endpoint.end()",
    "budget_record_request": "budget.record_request(t)",
    "breaker_acquire_release": "breaker.try_acquire(); breaker.release()",
    "decide_fault_off": "decide_fault(no_fault, rng)",
    "decide_fault_on": "decide_fault(some_fault, rng)",
    "stats_record": "recorder.record('payments', 'us-west', ok, 0.0042, t)",
    "series_record": "series.record(ok, 0.0042, t)",
}


def _ns_per_call(statement: str, namespace: dict[str, Any]) -> float:
    timer = timeit.Timer(f"t += 1e-6; {statement}", setup="t = 0.0", globals=namespace)
    best = min(timer.repeat(repeat=_REPEATS, number=_NUMBER)) / _NUMBER
    return best * 1e9


_REQUEST_PATH = (
    "pick_three_targets",
    "p2c_pick_10",
    "start_end",
    "observe",
    "budget_record_request",
    "breaker_acquire_release",
    "decide_fault_off",
    "series_record",
)


def main() -> None:
    """Run every call, print a table, then the JSON line."""
    namespace = _namespace()
    best: dict[str, float] = {}
    for _ in range(_ROUNDS):
        baseline = _ns_per_call("pass", namespace)
        best["(clock advance)"] = min(best.get("(clock advance)", baseline), baseline)
        for name, statement in _CALLS.items():
            ns = max(0.0, _ns_per_call(statement, namespace) - baseline)
            best[name] = min(best.get(name, ns), ns)
    results = {name: round(best[name], 1) for name in _CALLS}
    results["request_path"] = round(sum(best[name] for name in _REQUEST_PATH), 1)
    for name, ns in results.items():
        print(f"{name:<26} {ns:8.1f} ns/call")
    print(f"{'(clock advance, subtracted)':<26} {best['(clock advance)']:8.1f} ns/call")
    print(json.dumps({"python": sys.version.split()[0], "ns_per_call": results}))


if __name__ == "__main__":
    main()
