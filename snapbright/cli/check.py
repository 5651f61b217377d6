"""`snapbright check`: is the mesh healthy? In the style of `linkerd check`.

Groups of lines, each ✓ (ok), ‼ (warning) or × (failure); every warning and failure has a
hint (``    hint: …``) and often a pointer (``    see: …``); the last line says whether all
is well. ``-o json`` prints the same content as one JSON object. Exit status 1 on any ×.
``--all`` checks every cluster of ``endpoints.json``, grouped by cluster, and then whether each
cluster holds its peers' current trust bundles.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from snapbright.check.core import (
    SYMBOLS,
    ClusterReport,
    Level,
    Unreachable,
    check_across,
    check_cluster,
    summary,
)
from snapbright.check.gather import fetch, targets
from snapbright.check.model import ClusterStatus
from snapbright.cli.peering import ApiOption, ClusterOption, StateDirOption
from snapbright.controlplane.client import DEFAULT_STATE_DIR, AdminApiError


class Output(StrEnum):
    """How `check` prints."""

    text = "text"
    json = "json"


AllOption = Annotated[
    bool, typer.Option("--all", help="Every cluster of endpoints.json, grouped by cluster.")
]
OutputOption = Annotated[Output, typer.Option("--output", "-o", help="text, or json.")]


def check(
    cluster: ClusterOption = None,
    every: AllOption = False,
    output: OutputOption = Output.text,
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
    api: ApiOption = None,
) -> None:
    """Check the mesh's health, linkerd-check style: ✓ ok, ‼ warning, × failure (exit 1).

    Control plane, policies, gateways, peers, trust bundles, certificates, mirrors, exports
    and proxies, each failure with a hint.
    """
    reports = run(api, cluster, every, state_dir, time.time)
    if output is Output.json:
        typer.echo(json.dumps(to_json(reports), indent=2, ensure_ascii=False))
    else:
        for line in to_text(reports, headings=every):
            typer.echo(line)
    if any(report.failures for report in reports):
        raise typer.Exit(code=1)


def run(
    api: str | None,
    cluster: str | None,
    every: bool,
    state_dir: Path,
    clock: Callable[[], float],
) -> list[ClusterReport]:
    """Find the control planes, ask each one, check what it said."""
    try:
        found = targets(api, cluster, every, state_dir)
    except AdminApiError as error:
        # Not even an address: the first check (control plane reachable) fails, with why.
        return [check_cluster(cluster or "", api or "", Unreachable(api or "", str(error)), 0.0)]
    answers = [(t, fetch(t)) for t in found]
    now = clock()
    reports = [check_cluster(t.cluster, t.api, answer, now) for t, answer in answers]
    if every:
        across = check_across(a for _, a in answers if isinstance(a, ClusterStatus))
        if across.checks:
            reports.append(across)
    return reports


def to_text(reports: list[ClusterReport], *, headings: bool) -> list[str]:
    """The report as lines: groups with underlined titles, hints indented, a last line."""
    lines: list[str] = []
    for report in reports:
        if headings:
            title = f"{report.cluster or '?'}" + (f"  {report.api}" if report.api else "")
            lines += [title, "=" * len(title), ""]
        group = None
        for check in report.checks:
            if check.group != group:
                if group is not None:
                    lines.append("")
                group = check.group
                lines += [group, "-" * len(group)]
            lines.append(f"{SYMBOLS[check.level]} {check.message}")
            lines += [f"    {detail}" for detail in check.details]
            if check.hint:
                lines.append(f"    hint: {check.hint}")
            if check.see:
                lines.append(f"    see: {check.see}")
        lines.append("")
    level, said = summary(reports)
    lines.append(f"Status check results: {SYMBOLS[level]} {said}")
    return lines


def to_json(reports: list[ClusterReport]) -> dict[str, Any]:
    """The report as one JSON object, the same content as the text."""
    level, said = summary(reports)
    return {
        "ok": level is not Level.FAIL,
        "level": level.value,
        "summary": said,
        "failures": sum(r.failures for r in reports),
        "warnings": sum(r.warnings for r in reports),
        "clusters": [
            {
                "cluster": report.cluster,
                "api": report.api,
                "failures": report.failures,
                "warnings": report.warnings,
                "groups": _groups(report),
            }
            for report in reports
        ],
    }


def _groups(report: ClusterReport) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for check in report.checks:
        groups.setdefault(check.group, []).append(
            {
                "level": check.level.value,
                "message": check.message,
                "hint": check.hint,
                "see": check.see,
                "details": list(check.details),
            }
        )
    return [{"group": name, "checks": checks} for name, checks in groups.items()]
