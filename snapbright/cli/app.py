"""The `snapbright` command: command groups composed in one readable place."""

from __future__ import annotations

import typer

from snapbright.cli import ca, policy
from snapbright.cli.controlplane import controlplane
from snapbright.cli.gateway import gateway
from snapbright.cli.peering import app as peering_app

app = typer.Typer(
    name="snapbright",
    help="Multi-cluster gateway and latency-aware failover.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(ca.app, name="ca")
app.add_typer(policy.app, name="policy")
app.command()(gateway)
app.command()(controlplane)
app.add_typer(peering_app, name="peering")


@app.command()
def up() -> None:
    """Start a local multi-region mesh on this machine (not available yet)."""
    typer.echo(
        "snapbright up: the local multi-region mesh is not available yet "
        "(it arrives with the Federation issue). Everything is installed; "
        "try `snapbright --help`, `snapbright ca --help` and `snapbright policy --help`.",
        err=True,
    )
    raise typer.Exit(code=2)


def main() -> None:
    """Console-script entry point."""
    app()
