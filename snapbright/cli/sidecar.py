"""`snapbright sidecar --config FILE`: run the sidecar next to one workload."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from proxy.config.source import ConfigRejected
from proxy.sidecar.process import run


def sidecar(
    config: Annotated[
        Path,
        typer.Option("--config", "-c", help="A SidecarConfig YAML file.", show_default=False),
    ],
) -> None:
    """Run the sidecar: outbound HTTP and TCP listeners, inbound mTLS, admin on loopback.

    With static upstreams, the config and the files it names are re-read when they change
    (and on SIGHUP); with controlPlane, the configuration comes from its discovery stream.
    SIGTERM drains (requests in flight finish within drainTimeout) and stops.
    """
    try:
        code = run(config)
    except ConfigRejected as error:
        typer.echo(f"snapbright sidecar: {error}", err=True)
        raise typer.Exit(code=2) from None
    except OSError as error:
        typer.echo(f"snapbright sidecar: cannot listen: {error}", err=True)
        raise typer.Exit(code=1) from None
    raise typer.Exit(code=code)
