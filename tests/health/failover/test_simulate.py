"""Replaying traces: the example brownout and noise traces keep their expected shape."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from health.failover.core import simulate
from health.failover.model import (
    TOTAL_WEIGHT,
    Decision,
    Direction,
    FailoverPolicy,
    Mode,
    Rule,
    Trace,
)
from proxy.config.loader import Registry, load_bytes, load_file
from proxy.config.model import Document

EXAMPLES = Path(__file__).parents[3] / "deploy" / "examples"
KINDS: Registry = {"FailoverPolicy": FailoverPolicy, "FailoverTrace": Trace}
LOCAL = "us-west"


def _document(path: Path | str, kind: type[Document]) -> Document:
    result = (
        load_file(path, KINDS) if isinstance(path, Path) else load_bytes(path, KINDS, source="t")
    )
    assert result.diagnostics == ()
    document = result.documents[0]
    assert isinstance(document, kind)
    return document


def _example_policy() -> FailoverPolicy:
    policy = _document(EXAMPLES / "failover-payments.yaml", FailoverPolicy)
    assert isinstance(policy, FailoverPolicy)
    return policy


def _trace(source: Path | str) -> Trace:
    trace = _document(source, Trace)
    assert isinstance(trace, Trace)
    return trace


def _away(decision: Decision) -> int:
    return TOTAL_WEIGHT - decision.weights[LOCAL]


def _transitions(decisions: tuple[Decision, ...]) -> list[Direction]:
    return [d.transition for d in decisions if d.transition is not None]


BROWNOUT_START, BROWNOUT_END = 60.0, 180.0  # as written in trace-brownout.yaml


def test_the_brownout_trace_starts_and_ends_where_this_test_expects() -> None:
    change = _trace(EXAMPLES / "trace-brownout.yaml").spec.clusters[LOCAL].changes[0]
    assert (change.from_, change.until, change.add_latency) == (BROWNOUT_START, BROWNOUT_END, 0.4)


def test_brownout_first_shift_comes_within_2s_of_the_brownout() -> None:
    decisions = simulate(_example_policy(), _trace(EXAMPLES / "trace-brownout.yaml"))
    first = next(d for d in decisions if d.changed)
    assert first.rule is Rule.ENTER_DEGRADED
    assert BROWNOUT_START < first.at <= BROWNOUT_START + 2


def test_brownout_moves_90_percent_within_5s_of_the_brownout() -> None:
    decisions = simulate(_example_policy(), _trace(EXAMPLES / "trace-brownout.yaml"))
    shifted = next(d for d in decisions if _away(d) >= 0.9 * TOTAL_WEIGHT)
    assert shifted.at <= BROWNOUT_START + 5
    assert shifted.weights["ap-southeast"] == _away(shifted)  # the nearer region takes it all


def test_brownout_makes_one_transition_away_and_one_back() -> None:
    decisions = simulate(_example_policy(), _trace(EXAMPLES / "trace-brownout.yaml"))
    assert _transitions(decisions) == [Direction.AWAY, Direction.BACK]


def test_brownout_fails_back_gradually_and_completely_after_recovery() -> None:
    decisions = simulate(_example_policy(), _trace(EXAMPLES / "trace-brownout.yaml"))
    back = [d for d in decisions if d.at >= BROWNOUT_END and d.changed]
    assert len(back) >= 4
    assert all(d.rule in {Rule.FAILBACK_STEP, Rule.FAILBACK_COMPLETE} for d in back)
    assert all(0 < d.weights[LOCAL] - d.previous_weights[LOCAL] <= 0.2 * TOTAL_WEIGHT for d in back)
    assert back[0].at >= BROWNOUT_END + 5 + 10  # exitAfter, then the stable period
    assert decisions[-1].weights[LOCAL] == TOTAL_WEIGHT


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 7])
def test_the_noise_trace_makes_zero_transitions(seed: int) -> None:
    decisions = simulate(
        _example_policy(), _trace(EXAMPLES / "trace-noise.yaml"), rng=random.Random(seed)
    )
    assert _transitions(decisions) == []
    assert not any(d.changed for d in decisions)
    # It is noise that crosses the threshold, not a trace that never does.
    assert sum(d.expected_latency[LOCAL] > 0.300 for d in decisions) >= 30


def test_a_replay_is_repeatable() -> None:
    trace = _trace(EXAMPLES / "trace-brownout.yaml")
    assert simulate(_example_policy(), trace) == simulate(_example_policy(), trace)


SMALL = """\
apiVersion: snapbright.io/v1alpha1
kind: FailoverTrace
metadata: {name: small}
spec:
  caller: us-west
  duration: 40s
  requestRate: 200
  clusters:
    us-west:
      start: {p95: 40ms, samples: 100}
      changes:
        - {from: 10s, until: 20s, addLatency: 400ms}
        - {from: 30s, every: 4s, for: 1s, set: {p95: 1s}}
        - {from: 36s, set: {age: 20s}}
    ap-southeast:
      start: {p95: 50ms, rtt: 80ms, headroom: 50}
"""


def test_trace_steps_segments_and_pulses_shape_the_observations() -> None:
    decisions = simulate(None, _trace(SMALL))
    local = {int(d.at): round(d.expected_latency.get(LOCAL, -1.0), 3) for d in decisions}
    assert [local[t] for t in (0, 9, 10, 19, 20)] == [0.040, 0.040, 0.440, 0.440, 0.040]
    assert [local[t] for t in (30, 31, 33, 34, 35)] == [1.0, 0.040, 0.040, 1.0, 0.040]
    assert local[36] == -1.0  # 20s old: stale, so no evidence
    assert decisions[0].expected_latency["ap-southeast"] == pytest.approx(0.130)


SLOW_CALLER = """\
apiVersion: snapbright.io/v1alpha1
kind: FailoverTrace
metadata: {name: slow-caller}
spec:
  caller: us-west
  duration: 150s
  requestRate: 60
  clusters:
    us-west:
      start: {p95: 45ms, samples: 600}
      changes:
        - {from: 10s, until: 40s, addLatency: 400ms}
    ap-southeast:
      start: {p95: 50ms, rtt: 80ms, headroom: 500, samples: 4000}
"""


def test_a_kept_share_of_a_slow_caller_is_enough_to_fail_back_completely() -> None:
    # 60 requests/s over a 10s window: 600 samples, 9 of them on the kept 1.5% (minSamples
    # 20): above the 5 that a copy sent a small share needs, so its recovery is seen.
    decisions = simulate(_example_policy(), _trace(SLOW_CALLER))
    assert min(d.weights[LOCAL] for d in decisions) == 150
    assert "only 9 samples" not in decisions[60].explanation
    assert decisions[-1].weights[LOCAL] == TOTAL_WEIGHT
    assert decisions[-1].state.mode is Mode.STEADY
    assert [d.transition for d in decisions if d.transition] == [Direction.AWAY, Direction.BACK]


HARD_FAILURE = """\
apiVersion: snapbright.io/v1alpha1
kind: FailoverTrace
metadata: {name: hard-failure}
spec:
  caller: us-west
  duration: 30s
  requestRate: 200
  clusters:
    us-west:
      start: {p95: 40ms}
      changes:
        - {from: 5s, set: {healthyEndpoints: 0}}
    ap-southeast:
      start: {p95: 50ms, rtt: 80ms, headroom: 50}
"""


def test_simulated_headroom_accounts_for_what_the_caller_already_sends() -> None:
    decisions = simulate(_example_policy(), _trace(HARD_FAILURE))
    # 50 spare requests/s of the caller's 200: a quarter, on every tick, not a quarter more each.
    assert [d.weights["ap-southeast"] for d in decisions[5:]] == [2500] * 26
