"""The `snapbright` command: command groups composed in one readable place."""

from __future__ import annotations

import typer

from snapbright.cli import ca, demo, fault, policy, wan
from snapbright.cli.check import check
from snapbright.cli.controlplane import controlplane
from snapbright.cli.gateway import gateway
from snapbright.cli.peering import app as peering_app
from snapbright.cli.sidecar import sidecar
from snapbright.cli.status import status
from snapbright.cli.up import up

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
app.command()(sidecar)
app.command()(controlplane)
app.add_typer(peering_app, name="peering")
app.command()(up)
app.add_typer(fault.app, name="fault")
app.add_typer(wan.app, name="wan")
app.command(name="demo-app")(demo.demo_app)
app.command()(check)
app.command()(status)


def main() -> None:
    """Console-script entry point."""
    app()
