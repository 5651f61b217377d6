"""`snapbright policy validate|schema`, run as the installed command in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SNAPBRIGHT = str(Path(sys.executable).parent / "snapbright")
ROOT = Path(__file__).resolve().parents[2]

# Line numbers matter below: each mistake sits on a known line and column.
BAD = """\
apiVersion: snapbright.io/v1alpha1
kind: TrafficPolicy
metadata:
  name: payments
spec:
  service: payments
  timeouts:
    connect: 1s
    connect: 2s
  retries:
    attempts: three
  circuitBreakers:
    maxConnections: 10
"""

BROKEN = """\
apiVersion: snapbright.io/v1alpha1
kind: ExportPolicy
metadata:
  name: us-west
spec:
  exports:
    - service: payments
      peers: [ap-southeast
"""

GOOD = """\
apiVersion: snapbright.io/v1alpha1
kind: ExportPolicy
metadata: {name: us-west}
spec:
  exports: [{service: payments, peers: [ap-southeast]}]
"""


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SNAPBRIGHT, "policy", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def _write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return name


def test_validate_prints_each_error_at_its_line_and_column_and_exits_1(tmp_path: Path) -> None:
    bad = _write(tmp_path, "pay.yaml", BAD)
    broken = _write(tmp_path, "broken.yaml", BROKEN)
    done = _run("validate", bad, broken, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "Error [SB0002] pay.yaml:9:5: spec.timeouts.connect: duplicate key 'connect' "
        "(first at line 8)",
        "Error [SB0204] pay.yaml:11:15: spec.retries.attempts: must be an integer, got 'three'",
        "Error [SB0203] pay.yaml:12:3: spec.circuitBreakers: unknown field "
        "(did you mean 'circuitBreaker'?)",
        "Error [SB0001] broken.yaml:9:1: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence)",
    ]
    assert "4 error(s) in 2 of 2 file(s)" in done.stderr


def test_validate_exits_0_for_valid_files(tmp_path: Path) -> None:
    good = _write(tmp_path, "good.yaml", GOOD)
    done = _run(
        "validate", good, str(ROOT / "deploy/examples/traffic-policy-payments.yaml"), cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout
    assert done.stdout.startswith("✔ 2 file(s), 2 document(s)")


def test_validate_json_output_lists_diagnostics(tmp_path: Path) -> None:
    bad = _write(tmp_path, "pay.yaml", BAD)
    good = _write(tmp_path, "good.yaml", GOOD)
    done = _run("validate", "-o", "json", good, bad, "missing.yaml", cwd=tmp_path)
    assert done.returncode == 1
    diagnostics = json.loads(done.stdout)
    assert [(d["code"], d["file"], d["line"], d["column"], d["path"]) for d in diagnostics] == [
        ("SB0002", "pay.yaml", 9, 5, "spec.timeouts.connect"),
        ("SB0204", "pay.yaml", 11, 15, "spec.retries.attempts"),
        ("SB0203", "pay.yaml", 12, 3, "spec.circuitBreakers"),
        ("SB0007", "missing.yaml", 1, 1, ""),
    ]
    assert {d["severity"] for d in diagnostics} == {"error"}
    assert json.loads(_run("validate", "-o", "json", good, cwd=tmp_path).stdout) == []


def test_schema_prints_the_committed_schema_of_a_kind(tmp_path: Path) -> None:
    done = _run("schema", "TrafficPolicy", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout == (ROOT / "deploy/schemas/TrafficPolicy.json").read_text()
    unknown = _run("schema", "Gateway", cwd=tmp_path)
    assert unknown.returncode == 2
    assert "known kinds: AuthorizationPolicy, ControlPlaneConfig, ExportPolicy" in unknown.stderr
