"""The Grafana board in deploy/grafana parses, lays out on the grid, and speaks valid PromQL."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
BOARD = ROOT / "deploy" / "grafana" / "snapbright-regions.json"

# Grafana fills these in before Prometheus sees the query.
_GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$__interval": "15s",
}


def _board() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(BOARD.read_text())
    return board


def _expressions(board: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in board["annotations"]["list"] if "expr" in a]
    return exprs


def _as_prometheus(expr: str) -> str:
    for variable, value in _GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return re.sub(r"\$[a-z_]+", ".*", expr)


def test_panels_have_unique_ids_and_fit_the_24_column_grid() -> None:
    panels = _board()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_every_region_pair_view_the_issue_asks_for_is_there() -> None:
    titles = {p["title"] for p in _board()["panels"]}
    assert {
        "Success rate",
        "Request rate",
        "p95 latency",
        "Gateway up",
        "Route weights",
        "Failover transitions",
    } <= titles


def test_metric_names_follow_prometheus_conventions() -> None:
    names = {
        name
        for expr in _expressions(_board())
        for name in re.findall(r"\b(snapbright_[a-z_]+)\b", expr)
    }
    assert names
    for name in names:
        assert not name.endswith("_ms"), f"{name}: use base units (seconds)"
        if "_total" in name:
            assert name.endswith("_total"), name


def _promtool_check(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Check expressions the way Prometheus parses them: as recording rules."""
    rules = {
        "groups": [
            {
                "name": "grafana-board",
                "rules": [
                    {"record": f"snapbright:board_query_{i}", "expr": _as_prometheus(expr)}
                    for i, expr in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False
    )


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    run = _promtool_check(_expressions(_board()), tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_promql_check_catches_a_broken_query(tmp_path: Path) -> None:
    run = _promtool_check(["sum by (peer (snapbright_gateway_up)"], tmp_path)
    assert run.returncode != 0
