"""`snapbright gateway --config FILE`: run the east-west gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gateway.probe import ProbeIdentityError
from gateway.process import run
from proxy.config.source import ConfigRejected


def gateway(
    config: Annotated[
        Path,
        typer.Option("--config", "-c", help="A GatewayConfig YAML file.", show_default=False),
    ],
) -> None:
    """Run the east-west gateway: SNI routing of cross-cluster mTLS and the probe endpoint.

    SIGHUP re-reads the config; SIGTERM drains (stop accepting, let connections finish for
    drainTimeout, then close).
    """
    try:
        code = run(config)
    except (ConfigRejected, ProbeIdentityError) as error:
        typer.echo(f"snapbright gateway: {error}", err=True)
        raise typer.Exit(code=2) from None
    except OSError as error:
        typer.echo(f"snapbright gateway: cannot listen: {error}", err=True)
        raise typer.Exit(code=1) from None
    raise typer.Exit(code=code)
