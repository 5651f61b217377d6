"""`snapbright policy …`: validate policy files, print their JSON Schemas."""

from __future__ import annotations

import typer

app = typer.Typer(help="Validate policy files and print their JSON Schemas.", no_args_is_help=True)
