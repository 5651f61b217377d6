"""`snapbright policy …`: validate policy files, print their JSON Schemas, simulate failover."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from health.failover.core import simulate as simulate_trace
from health.failover.model import Decision, FailoverPolicy, Trace
from proxy.config.model import Document
from snapbright.check.gather import Target
from snapbright.check.gather import explain as ask
from snapbright.cli.status import format_weights
from snapbright.controlplane.client import AdminApiError, admin_url
from snapbright.policy.kinds import KINDS, load_files, schema_text

_D = TypeVar("_D", bound=Document)

app = typer.Typer(
    help="Validate policy files, print their JSON Schemas, simulate failover policies.",
    no_args_is_help=True,
)


class Output(StrEnum):
    """How `validate` prints its diagnostics."""

    text = "text"
    json = "json"


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Policy or topology files (YAML).")],
    output: Annotated[
        Output, typer.Option("--output", "-o", help="text, or json: a list of diagnostics.")
    ] = Output.text,
) -> None:
    """Check files as the control plane would load them; exit 1 if any is invalid.

    A file is valid or not as a whole. Every error names its code, file, line, column and
    field, e.g. `Error [SB0201] pay.yaml:12:5: spec.retries.attempts: must be ...`.
    """
    results = load_files(files)
    diagnostics = [diagnostic for result in results for diagnostic in result.diagnostics]
    if output is Output.json:
        typer.echo(json.dumps([d.to_json() for d in diagnostics], indent=2, ensure_ascii=False))
    elif diagnostics:
        for diagnostic in diagnostics:
            typer.echo(f"Error [{diagnostic.code.value}] {diagnostic}")
        bad = sum(1 for result in results if not result.ok)
        typer.echo(f"✘ {len(diagnostics)} error(s) in {bad} of {len(results)} file(s).", err=True)
    else:
        documents = sum(len(result.documents) for result in results)
        typer.echo(f"✔ {len(results)} file(s), {documents} document(s): no validation issues.")
    raise typer.Exit(code=1 if diagnostics else 0)


@app.command()
def schema(
    kind: Annotated[str, typer.Argument(help=f"One of: {', '.join(sorted(KINDS))}.")],
) -> None:
    """Print the JSON Schema of a document kind (as in deploy/schemas/<kind>.json)."""
    matches = [known for known in KINDS if known.lower() == kind.lower()]
    if not matches:
        typer.echo(f"unknown kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}", err=True)
        raise typer.Exit(code=2)
    typer.echo(schema_text(matches[0]), nl=False)


@app.command()
def simulate(
    policy: Annotated[Path, typer.Argument(help="A file holding one FailoverPolicy.")],
    trace: Annotated[
        Path, typer.Option("--trace", "-t", help="A FailoverTrace file: observations over time.")
    ],
    every_tick: Annotated[
        bool, typer.Option("--every-tick", help="Print every tick, not only the changes.")
    ] = False,
    output: Annotated[
        Output, typer.Option("--output", "-o", help="text, or json: every decision.")
    ] = Output.text,
) -> None:
    """Replay a trace through the failover controller and print the timeline of weights.

    The same decision core that runs in the control plane, fed the trace one tick at a time:
    each line shows the time, the rule that fired, the weights per cluster and why.
    """
    policy_doc = _one(policy, FailoverPolicy)
    trace_doc = _one(trace, Trace)
    decisions = simulate_trace(policy_doc, trace_doc)
    if output is Output.json:
        typer.echo(json.dumps([_decision_json(d) for d in decisions], indent=2))
        return
    clusters = sorted({c for d in decisions for c in d.weights} | set(trace_doc.spec.clusters))
    header = f"{'TIME':>8}  {'RULE':<20}" + "".join(f"{c:>14}" for c in clusters) + "  WHY"
    typer.echo(header)
    for decision in decisions:
        if not (every_tick or decision.changed or decision.transition is not None):
            continue
        weights = "".join(f"{decision.weights.get(c, 0) / 100:>13.2f}%" for c in clusters)
        typer.echo(
            f"{decision.at:>7.1f}s  {decision.rule.value:<20}{weights}  {decision.explanation}"
        )
    typer.echo(_summary(decisions, trace_doc.spec.caller))


def _one(path: Path, kind: type[_D]) -> _D:
    """The single document of ``kind`` in ``path``, or exit 1 with the loader's diagnostics."""
    (result,) = load_files([path])
    if not result.ok:
        for diagnostic in result.diagnostics:
            typer.echo(f"Error [{diagnostic.code.value}] {diagnostic}", err=True)
        raise typer.Exit(code=1)
    found = [d for d in result.documents if isinstance(d, kind)]
    if len(found) != 1:
        typer.echo(f"{path}: expected exactly one {kind.KIND}, found {len(found)}", err=True)
        raise typer.Exit(code=1)
    return found[0]


def _decision_json(decision: Decision) -> dict[str, object]:
    return {
        "at": decision.at,
        "rule": decision.rule.value,
        "weights": dict(decision.weights),
        "previous_weights": dict(decision.previous_weights),
        "transition": decision.transition.value if decision.transition else None,
        "expected_latency_s": dict(decision.expected_latency),
        "explanation": decision.explanation,
    }


def _summary(decisions: tuple[Decision, ...], caller: str) -> str:
    changes = sum(1 for d in decisions if d.changed)
    transitions = [d for d in decisions if d.transition is not None]
    lowest = min((d.weights.get(caller, 0) for d in decisions), default=10000)
    moves = ", ".join(f"{d.transition.value} at {d.at:g}s" for d in transitions if d.transition)
    return (
        f"{len(decisions)} ticks, {changes} weight changes, {len(transitions)} transitions"
        f"{f' ({moves})' if moves else ''}; lowest share kept on {caller}: {lowest / 100:.2f}%"
    )


@app.command()
def explain(
    service: Annotated[str, typer.Argument(help="The service whose decisions to show.")],
    cluster: Annotated[
        str | None, typer.Option("--cluster", help="Which cluster of endpoints.json to ask.")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, help="How many recorded decisions to show.")
    ] = 10,
    output: Annotated[
        Output, typer.Option("--output", "-o", help="text, or json: the decisions as data.")
    ] = Output.text,
    state_dir: Annotated[
        Path, typer.Option("--state-dir", help="Where endpoints.json is (from `snapbright up`).")
    ] = Path(".snapbright"),
    api: Annotated[
        str | None, typer.Option("--api", help="The control plane's admin URL (http://host:port).")
    ] = None,
) -> None:
    """Ask the running control plane why SERVICE's traffic goes where it goes.

    Prints the current weights and mode, then the last decisions newest first: when, the
    rule that fired, the weights before and after, and the explanation.
    """
    try:
        answer = ask(Target(cluster or "", admin_url(api, cluster, state_dir)), service, limit)
    except AdminApiError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=1) from None
    records = list(reversed(answer.get("records") or []))
    if output is Output.json:
        shown = {key: value for key, value in answer.items() if key != "records"}
        typer.echo(json.dumps(shown | {"decisions": records}, indent=2, ensure_ascii=False))
        return
    caller = str(answer.get("cluster", ""))
    policy = answer.get("policy")
    said = f"policy {policy}" if policy else "no FailoverPolicy: default behaviour"
    typer.echo(f"{service} called from {caller} ({said})")
    live = answer.get("live")
    if isinstance(live, dict):
        typer.echo(
            f"now: {format_weights(live.get('weights') or {}, caller)}  "
            f"(mode {live.get('mode')}, rule {live.get('rule')})"
        )
        typer.echo(f"     {live.get('explanation', '')}")
    else:
        typer.echo("now: no live decision yet")
    typer.echo("")
    if not records:
        typer.echo("no recorded decisions yet")
        return
    typer.echo(f"decisions, newest first ({len(records)}):")
    for record in records:
        at = _when(record.get("unixTime"))
        typer.echo(f"{at}  {record.get('rule')}  (mode {record.get('mode')})")
        before = format_weights(record.get("previousWeights") or {}, caller)
        after = format_weights(record.get("weights") or {}, caller)
        typer.echo(f"    {before} → {after}")
        typer.echo(f"    {record.get('explanation', '')}")


def _when(unix_time: object) -> str:
    if not isinstance(unix_time, int | float):
        return "?"
    return datetime.fromtimestamp(unix_time, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
