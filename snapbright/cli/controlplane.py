"""`snapbright controlplane --config FILE`: run one cluster's control plane."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from federation.peering.store import PeeringStoreError
from federation.trust.store import StoreError
from proxy.config.source import ConfigRejected
from snapbright.cli import logs
from snapbright.controlplane.process import run


def controlplane(
    config: Annotated[
        Path,
        typer.Option("--config", "-c", help="A ControlPlaneConfig YAML file.", show_default=False),
    ],
) -> None:
    """Run a cluster's control plane: registry, CA, discovery, peering, failover, dashboard.

    SIGTERM or SIGINT stops it; everything acknowledged is already on disk.
    """
    logs.configure()
    try:
        run(config)
    except ConfigRejected as error:
        typer.echo(f"snapbright controlplane: {error}", err=True)
        raise typer.Exit(code=2) from None
    except (StoreError, PeeringStoreError) as error:
        typer.echo(f"snapbright controlplane: {error}", err=True)
        raise typer.Exit(code=1) from None
    except OSError as error:
        typer.echo(f"snapbright controlplane: cannot listen: {error}", err=True)
        raise typer.Exit(code=1) from None
