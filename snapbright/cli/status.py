"""`snapbright status`: the peers' gateways as this cluster sees them, and failover per service.

Two plain, aligned tables per cluster, like `linkerd multicluster gateways`::

    CLUSTER       ALIVE  SERVICES  RTT     PEERING
    ap-southeast  yes    3         81.2ms  active

    SERVICE  CALLER   MODE      WEIGHTS                         LAST-RULE  SINCE
    pay      us-west  shifting  us-west 2% · ap-southeast 98%   ramp-step  4s ago

ALIVE is the gateway probe's verdict (the peering's state when probes are off), SERVICES how
many services the cluster exports to us, RTT the probe's EWMA ("-" when not probed).
LAST-RULE is the last rule that changed something, SINCE how long ago. ``-o json`` prints the
same rows; ``--all`` every cluster of ``endpoints.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import typer

from snapbright.check.core import Unreachable
from snapbright.check.gather import fetch, targets
from snapbright.check.model import ClusterStatus
from snapbright.cli.check import AllOption, Output, OutputOption
from snapbright.cli.peering import ApiOption, ClusterOption, StateDirOption
from snapbright.controlplane.client import DEFAULT_STATE_DIR, AdminApiError

TOTAL_WEIGHT = 10_000


def status(
    cluster: ClusterOption = None,
    every: AllOption = False,
    output: OutputOption = Output.text,
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
    api: ApiOption = None,
) -> None:
    """Show the peers' gateways and the failover state of each service.

    Two tables: CLUSTER ALIVE SERVICES RTT, and SERVICE CALLER MODE WEIGHTS LAST-RULE SINCE.
    """
    try:
        found = targets(api, cluster, every, state_dir)
    except AdminApiError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=1) from None
    results = [(t, fetch(t)) for t in found]
    now = time.time()
    statuses = [s for _, s in results if isinstance(s, ClusterStatus)]
    if output is Output.json:
        typer.echo(json.dumps([_json(s, now) for s in statuses], indent=2, ensure_ascii=False))
    else:
        for index, (target, answer) in enumerate(results):
            if index:
                typer.echo("")
            if isinstance(answer, Unreachable):
                typer.echo(f"{target.cluster or target.api}: {answer.reason}")
                continue
            for line in to_text(answer, now):
                typer.echo(line)
    unreachable = [s for _, s in results if isinstance(s, Unreachable)]
    if output is Output.json:
        for answer in unreachable:
            typer.echo(f"error: {answer.reason}", err=True)
    if unreachable:
        raise typer.Exit(code=1)


def to_text(answer: ClusterStatus, now: float) -> list[str]:
    """One cluster: a heading, the gateways table and the failover table."""
    ready = "ready" if answer.ready.catalog and answer.ready.policies else "NOT READY"
    lines = [f"{answer.cluster} (mesh {answer.mesh}, {ready})", ""]
    gateways = [
        (name, alive, str(count), _ms(rtt), state)
        for name, alive, count, rtt, state in _gateways(answer)
    ]
    if gateways:
        lines += table(("CLUSTER", "ALIVE", "SERVICES", "RTT", "PEERING"), gateways)
    else:
        lines.append("no peers")
    lines.append("")
    services = _service_rows(answer, now)
    if services:
        lines += table(("SERVICE", "CALLER", "MODE", "WEIGHTS", "LAST-RULE", "SINCE"), services)
    else:
        lines.append("no failover decisions yet")
    return lines


def _gateways(answer: ClusterStatus) -> list[tuple[str, str, int, float | None, str]]:
    """Per peer: its name, alive (yes/no/unknown), services imported, RTT, peering state."""
    probes = {g.peer: g for g in answer.gateways}
    rows = []
    for peer in sorted(answer.peers, key=lambda p: p.peer):
        probe = probes.get(peer.peer)
        if probe is not None:
            alive = "yes" if probe.alive else ("no" if probe.state == "down" else "unknown")
            rtt = probe.rtt_seconds
        else:
            # Not probed (probes off, or nothing imported from it): the peering stream, which
            # runs through its gateway, says whether it is alive; RTT is the probe's only.
            alive = "yes" if peer.state == "active" else "no"
            rtt = None
        rows.append((peer.peer, alive, peer.imported, rtt, peer.state))
    return rows


def _service_rows(answer: ClusterStatus, now: float) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for state in answer.failover:
        last = state.last_record
        rows.append(
            (
                state.service,
                state.caller,
                state.mode,
                format_weights(state.weights, state.caller),
                last.rule if last is not None else state.rule,
                _ago(now - last.unix_time) if last is not None else "-",
            )
        )
    return rows


def _json(answer: ClusterStatus, now: float) -> dict[str, Any]:
    return {
        "cluster": answer.cluster,
        "ready": answer.ready.catalog and answer.ready.policies,
        "gateways": [
            {
                "cluster": name,
                "alive": {"yes": True, "no": False}.get(alive),  # None: not known yet
                "services": count,
                "rttSeconds": rtt,
                "peering": state,
            }
            for name, alive, count, rtt, state in _gateways(answer)
        ],
        "services": [
            {
                "service": s.service,
                "caller": s.caller,
                "policy": s.policy,
                "mode": s.mode,
                "weights": s.weights,
                "lastRule": s.last_record.rule if s.last_record is not None else s.rule,
                "since": s.last_record.unix_time if s.last_record is not None else None,
            }
            for s in answer.failover
        ],
    }


def format_weights(weights: Mapping[str, int], local: str) -> str:
    """``us-west 2% · ap-southeast 98%``: the local cluster first, then by name."""
    order = sorted(weights, key=lambda c: (c != local, c))
    return " · ".join(f"{c} {_percent(weights[c])}" for c in order) or "-"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Plain columns, two spaces apart, no borders."""
    everything = [tuple(header), *(tuple(r) for r in rows)]
    widths = [max(len(row[i]) for row in everything) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in everything
    ]


def _percent(basis_points: int) -> str:
    value = basis_points * 100 / TOTAL_WEIGHT
    return f"{value:.2f}".rstrip("0").rstrip(".") + "%"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}ms"


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"
