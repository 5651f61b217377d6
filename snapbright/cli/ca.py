"""`snapbright ca …`: the cluster CA (init, issue, show, rotate)."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Manage this cluster's certificate authority and SVIDs.", no_args_is_help=True
)
