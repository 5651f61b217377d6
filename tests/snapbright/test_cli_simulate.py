"""`snapbright policy simulate` replays the example traces through the real controller core."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "examples"
POLICY = EXAMPLES / "failover-payments.yaml"


def _snapbright(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapbright", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_brownout_moves_away_in_steps_and_fails_back_gradually() -> None:
    run = _snapbright("policy", "simulate", POLICY, "--trace", EXAMPLES / "trace-brownout.yaml")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split()[:2] == ["TIME", "RULE"]
    rules = [line.split()[1] for line in lines[1:-1]]
    assert rules[0] == "enter-degraded"
    assert rules[-1] == "failback-complete"
    assert rules.count("failback-step") >= 2  # gradual, not all at once
    assert "2 transitions (away at 62s, back at" in lines[-1]
    assert "lowest share kept on us-west: 1.50%" in lines[-1]


def test_noise_moves_nothing() -> None:
    run = _snapbright("policy", "simulate", POLICY, "--trace", EXAMPLES / "trace-noise.yaml")
    assert run.returncode == 0, run.stderr
    assert "0 weight changes, 0 transitions" in run.stdout.splitlines()[-1]


def test_json_output_lists_every_tick_with_weights_summing_to_the_total() -> None:
    run = _snapbright(
        "policy", "simulate", POLICY, "--trace", EXAMPLES / "trace-brownout.yaml", "-o", "json"
    )
    assert run.returncode == 0, run.stderr
    decisions = json.loads(run.stdout)
    assert len(decisions) == 301
    assert all(sum(d["weights"].values()) == 10000 for d in decisions)
    assert {d["transition"] for d in decisions} == {None, "away", "back"}


def test_a_bad_policy_file_is_reported_with_its_position_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.read_text().replace("step: 50%", "step: 150%"))
    run = _snapbright("policy", "simulate", bad, "--trace", EXAMPLES / "trace-brownout.yaml")
    assert run.returncode == 1
    assert f"{bad}:" in run.stderr
    assert "spec.ramp.step" in run.stderr


def test_a_trace_where_a_policy_is_expected_is_refused() -> None:
    trace = EXAMPLES / "trace-noise.yaml"
    run = _snapbright("policy", "simulate", trace, "--trace", trace)
    assert run.returncode == 1
    assert "expected exactly one FailoverPolicy, found 0" in run.stderr
