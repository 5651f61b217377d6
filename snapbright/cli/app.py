"""The `snapbright` command: command groups composed in one readable place.

`snapbright sidecar` and `snapbright gateway` are long-lived data-plane processes, one per
workload or per cluster: :func:`main` parses their one flag (``--config/-c FILE``) with
argparse and imports only what that process runs, not typer and rich nor the other command
groups (control plane, dashboard, failover controller, …), which would otherwise stay
resident for the life of the process. Their ``--help`` is typer's, from the same command
functions as in the full app, which is built on first use (``snapbright.cli.app.app``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import typer

__all__ = ["app", "build", "main"]

app: typer.Typer  # the full app, built on first access by `__getattr__` below

_DATA_PLANE = ("sidecar", "gateway")


def build() -> typer.Typer:
    """The full `snapbright` app, every command group registered."""
    import typer

    from snapbright.cli import ca, demo, fault, policy, wan
    from snapbright.cli.check import check
    from snapbright.cli.controlplane import controlplane
    from snapbright.cli.gateway import gateway
    from snapbright.cli.peering import app as peering_app
    from snapbright.cli.sidecar import sidecar
    from snapbright.cli.status import status
    from snapbright.cli.up import up

    full = typer.Typer(
        name="snapbright",
        help="Multi-cluster gateway and latency-aware failover.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    full.add_typer(ca.app, name="ca")
    full.add_typer(policy.app, name="policy")
    full.command()(gateway)
    full.command()(sidecar)
    full.command()(controlplane)
    full.add_typer(peering_app, name="peering")
    full.command()(up)
    full.add_typer(fault.app, name="fault")
    full.add_typer(wan.app, name="wan")
    full.command(name="demo-app")(demo.demo_app)
    full.command()(check)
    full.command()(status)
    return full


def __getattr__(name: str) -> typer.Typer:
    # `app` is built on first access (tests, `snapbright up`), then kept as a plain global.
    if name == "app":
        full = build()
        globals()["app"] = full
        return full
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _data_plane(command: str) -> typer.Typer:
    """An app of the one command ``command`` (``sidecar`` or ``gateway``), for its help."""
    import typer

    if command == "sidecar":
        from snapbright.cli.sidecar import sidecar as run
    else:
        from snapbright.cli.gateway import gateway as run
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command()(run)
    return single


def _run_data_plane(command: str, argv: list[str]) -> int:
    """Run ``command`` (``sidecar`` or ``gateway``) as snapbright/cli/sidecar.py and
    gateway.py do, without typer; the process exit code."""
    parser = argparse.ArgumentParser(prog=f"snapbright {command}", add_help=False)
    parser.add_argument("--config", "-c", type=Path, required=True)
    config: Path = parser.parse_args(argv).config

    from proxy.config.source import ConfigRejected
    from snapbright.cli import logs

    # The sidecar's "ready (hot path: compiled)" and config refusals reach its log.
    logs.configure()

    run: Callable[[Path], int]
    refused: tuple[type[Exception], ...]
    if command == "sidecar":
        from proxy.sidecar.process import run as run_sidecar

        run, refused = run_sidecar, (ConfigRejected,)
    else:
        from gateway.probe import ProbeIdentityError
        from gateway.process import run as run_gateway

        run, refused = run_gateway, (ConfigRejected, ProbeIdentityError)
    try:
        return run(config)
    except refused as error:
        print(f"snapbright {command}: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"snapbright {command}: cannot listen: {error}", file=sys.stderr)
        return 1


def main() -> None:
    """Console-script entry point."""
    argv = sys.argv[1:]
    if argv and argv[0] in _DATA_PLANE:
        if "--help" in argv:
            _data_plane(argv[0])(args=argv[1:], prog_name=f"snapbright {argv[0]}")
        sys.exit(_run_data_plane(argv[0], argv[1:]))
    build()()
