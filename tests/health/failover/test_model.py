"""FailoverPolicy and FailoverTrace files: what they accept, their defaults, and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from health.failover.model import FailoverPolicy, Trace, TraceChange
from proxy.config.diagnostics import Code
from proxy.config.loader import LoadResult, Registry, load_bytes, load_file

EXAMPLES = Path(__file__).parents[3] / "deploy" / "examples"
KINDS: Registry = {"FailoverPolicy": FailoverPolicy, "FailoverTrace": Trace}

MINIMAL = """\
apiVersion: snapbright.io/v1alpha1
kind: FailoverPolicy
metadata: {name: payments}
spec:
  service: payments
  triggers:
    latency: {enter: 300ms, exit: 150ms}
"""


def _load(text: str) -> LoadResult:
    return load_bytes(text, KINDS, source="policy.yaml")


def _policy(text: str) -> FailoverPolicy:
    result = _load(text)
    assert result.diagnostics == ()
    document = result.documents[0]
    assert isinstance(document, FailoverPolicy)
    return document


@pytest.mark.parametrize(
    "name", ["failover-payments.yaml", "trace-brownout.yaml", "trace-noise.yaml"]
)
def test_example_files_are_valid(name: str) -> None:
    result = load_file(EXAMPLES / name, KINDS)
    assert result.diagnostics == ()
    assert len(result.documents) == 1


def test_a_minimal_policy_gets_small_safe_defaults() -> None:
    spec = _policy(MINIMAL).spec
    assert spec.targets == "nearest"
    assert spec.keep_share == 0.02
    assert spec.max_share == 1.0
    assert (spec.ramp.step, spec.ramp.interval) == (0.25, 1.0)
    assert (spec.failback.stable_for, spec.failback.step, spec.failback.interval) == (10, 0.2, 2)
    assert spec.capacity.respect_headroom is True
    assert spec.evidence.enter_span == 1.0  # the newest closed second, as before it was set
    assert spec.triggers.latency is not None
    assert spec.triggers.latency.percentile == "p95"
    assert (spec.triggers.latency.enter_after, spec.triggers.latency.exit_after) == (1.0, 5.0)
    assert spec.triggers.error_rate is None


def test_an_ordered_target_list_is_kept_in_order() -> None:
    text = MINIMAL + "  targets: [eu-central, ap-southeast]\n"
    assert _policy(text).spec.targets == ("eu-central", "ap-southeast")


@pytest.mark.parametrize(
    ("replace", "by", "path", "reason"),
    [
        ("exit: 150ms", "exit: 300ms", "spec.triggers.latency.exit", "must be below enter"),
        ("enter: 300ms", "enter: 0ms", "spec.triggers.latency.enter", "above 0ms"),
        ("latency: {", "latency: {percentile: p42, ", "spec.triggers.latency.percentile",
         "'p50', 'p90', 'p95' or 'p99'"),
        ("exit: 150ms}", "exit: 150ms, enterAfter: soon}", "spec.triggers.latency.enterAfter",
         "invalid duration 'soon'"),
        ("latency: {enter: 300ms, exit: 150ms}", "errorRate: {enter: 5%, exit: 5%}",
         "spec.triggers.errorRate.exit", "must be below enter"),
        ("latency: {enter: 300ms, exit: 150ms}", "errorRate: {enter: 5%, exit: 1}",
         "spec.triggers.errorRate.exit", "must be below enter"),
        ("latency: {enter: 300ms, exit: 150ms}", "{}", "spec.triggers",
         "set a latency trigger, an errorRate trigger, or both"),
        ("exit: 150ms}", "exit: 150ms, after: 2s}", "spec.triggers.latency.after",
         "unknown field"),
    ],
)  # fmt: skip
def test_a_bad_trigger_is_reported_at_its_field(
    replace: str, by: str, path: str, reason: str
) -> None:
    assert replace in MINIMAL
    result = _load(MINIMAL.replace(replace, by, 1))
    assert result.documents == ()
    assert [d.path for d in result.diagnostics] == [path]
    assert reason in result.diagnostics[0].message


@pytest.mark.parametrize(
    ("extra", "path", "reason"),
    [
        ("targets: closest", "spec.targets", "must be `nearest` or a non-empty list"),
        ("targets: []", "spec.targets", "must be `nearest` or a non-empty list"),
        ("targets: [us-west, US-East]", "spec.targets", "item 1 ('US-East') is not a cluster"),
        ("targets: [us-west, us-west]", "spec.targets", "must not name a cluster twice"),
        ("keepShare: 60%", "spec.keepShare", "at most 50%"),
        ("maxShare: 0%", "spec.maxShare", "above 0%"),
        ("maxShare: 120%", "spec.maxShare", "between 0% and 100%"),
        ("ramp: {step: 0%}", "spec.ramp.step", "above 0%"),
        ("ramp: {interval: often}", "spec.ramp.interval", "invalid duration"),
        ("failback: {step: 0}", "spec.failback.step", "above 0%"),
        ("capacity: {respectHeadroom: yes please}", "spec.capacity.respectHeadroom",
         "must be true or false"),
        ("evidence: {minSamples: 0}", "spec.evidence.minSamples", "greater than or equal to 1"),
        ("evidence: {enterSpan: 1500ms}", "spec.evidence.enterSpan", "whole number of seconds"),
        ("evidence: {enterSpan: 0s}", "spec.evidence.enterSpan", "from 1s to 10s"),
        ("evidence: {enterSpan: 11s}", "spec.evidence.enterSpan", "from 1s to 10s"),
        ("keep_share: 2%", "spec.keep_share", "unknown field"),
    ],
)  # fmt: skip
def test_a_bad_spec_field_is_reported_at_its_field(extra: str, path: str, reason: str) -> None:
    result = _load(MINIMAL + f"  {extra}\n")
    assert result.documents == ()
    assert [d.path for d in result.diagnostics] == [path]
    assert result.diagnostics[0].code in {Code.INVALID_VALUE, Code.WRONG_TYPE, Code.UNKNOWN_FIELD}
    assert reason in result.diagnostics[0].message


TRACE = """\
apiVersion: snapbright.io/v1alpha1
kind: FailoverTrace
metadata: {name: t}
spec:
  caller: us-west
  duration: 1m
  clusters:
    us-west:
      start: {p95: 40ms}
      changes:
        - {from: 10s, until: 20s, addLatency: 400ms}
"""


@pytest.mark.parametrize(
    ("replace", "by", "path", "reason"),
    [
        ("until: 20s", "until: 5s", "spec.clusters.us-west.changes[0].until", "after from"),
        ("until: 20s", "every: 5s", "spec.clusters.us-west.changes[0].every", "needs `for`"),
        ("until: 20s", "every: 5s, for: 5s", "spec.clusters.us-west.changes[0].for",
         "shorter than every"),
        (", addLatency: 400ms", "", "spec.clusters.us-west.changes[0]", "needs `set` values"),
        ("caller: us-west", "caller: us-east", "spec.clusters", "must include the caller"),
        ("duration: 1m", "duration: 0s", "spec.duration", "at least one tick"),
        ("start: {p95: 40ms}", "start: {p95: 40ms, samples: -1}",
         "spec.clusters.us-west.start.samples", "greater than or equal to 0"),
    ],
)  # fmt: skip
def test_a_bad_trace_is_reported_at_its_field(
    replace: str, by: str, path: str, reason: str
) -> None:
    assert replace in TRACE
    result = load_bytes(TRACE.replace(replace, by, 1), KINDS, source="trace.yaml")
    assert [d.path for d in result.diagnostics] == [path]
    assert reason in result.diagnostics[0].message


@pytest.mark.parametrize(
    ("change", "inside", "outside"),
    [
        ({"from": "10s", "set": {"p95": "1s"}}, [10, 11, 500], [0, 9.5]),
        ({"from": "10s", "until": "20s", "addLatency": "1s"}, [10, 19.5], [9, 20, 30]),
        ({"from": "5s", "every": "10s", "for": "2s", "addLatency": "1s"}, [5, 6, 15, 16.9],
         [4, 7, 14, 17]),
    ],
)  # fmt: skip
def test_a_trace_change_applies_inside_its_window_only(
    change: dict[str, object], inside: list[float], outside: list[float]
) -> None:
    parsed = TraceChange.model_validate(change)
    assert [t for t in inside if not parsed.applies(t)] == []
    assert [t for t in outside if parsed.applies(t)] == []
