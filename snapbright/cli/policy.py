"""`snapbright policy …`: validate policy files, print their JSON Schemas."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from snapbright.policy.kinds import KINDS, load_files, schema_text

app = typer.Typer(help="Validate policy files and print their JSON Schemas.", no_args_is_help=True)


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
