"""`snapbright up [TOPOLOGY]`: run a whole multi-cluster mesh on this machine.

With no TOPOLOGY it runs the built-in two-region demo (``snapbright/topology/default.yaml``).
Everything lives under ``--state-dir`` (default ``.snapbright/``): configs, each cluster's CA
and state, policy directories, one log per process, and ``endpoints.json``. Ctrl-C stops
every process; a second Ctrl-C does not wait for them to finish gracefully.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

from proxy.config.source import ConfigRejected
from snapbright.policy.kinds import load_files
from snapbright.topology.files import default_topology, load_topology
from snapbright.topology.model import LocalMesh
from snapbright.up.plan import (
    DEFAULT_BASE_PORT,
    Plan,
    PlanError,
    PolicyFile,
    Role,
    build_plan,
    sequential_ports,
)
from snapbright.up.runner import AlreadyRunning, run

DEFAULT_STATE_DIR = Path(".snapbright")

# The commands a role's processes run, for roles whose command may be missing from a build.
_ROLE_COMMANDS = {Role.SIDECAR: "sidecar", Role.DEMO: "demo-app"}


def up(
    topology: Annotated[
        Path | None,
        typer.Argument(help="A LocalMesh file; none runs the two-region demo.", show_default=False),
    ] = None,
    state_dir: Annotated[
        Path, typer.Option("--state-dir", help="Where configs, state, logs and endpoints.json go.")
    ] = DEFAULT_STATE_DIR,
    base_port: Annotated[
        int,
        typer.Option("--base-port", help="Ports are given out from here, one by one.", min=1),
    ] = DEFAULT_BASE_PORT,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds each process has to become ready.", min=1)
    ] = 45.0,
) -> None:
    """Start a local multi-region mesh on this machine; Ctrl-C stops it all.

    Control planes, gateways, the WAN emulator, demo services and their sidecars, each a real
    process on 127.0.0.1; the clusters are peered; then it prints where everything is.
    """
    try:
        mesh = default_topology() if topology is None else load_topology(topology)
        policies = _policies(mesh, topology)
        plan = build_plan(
            mesh,
            state_dir=state_dir.resolve(),
            command=(sys.executable, "-m", "snapbright"),
            ports=sequential_ports(base_port),
            policies=policies,
        )
    except (ConfigRejected, PlanError) as error:
        typer.echo(f"snapbright up: {error}", err=True)
        raise typer.Exit(code=2) from None
    plan = _available(plan)
    try:
        code = asyncio.run(run(plan, report=typer.echo, ready_timeout=timeout))
    except AlreadyRunning as error:
        typer.echo(f"snapbright up: {error}", err=True)
        raise typer.Exit(code=1) from None
    raise typer.Exit(code=code)


def _policies(mesh: LocalMesh, topology: Path | None) -> tuple[PolicyFile, ...]:
    """The topology's policy files (relative to it), each validated whole."""
    base = Path(".") if topology is None else topology.parent
    paths = [base / name for name in mesh.spec.policies]
    names = [path.name for path in paths]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ConfigRejected(f"two policy files are both called {name}: rename one")
    loaded = []
    for path, result in zip(paths, load_files(paths), strict=True):
        documents = result.raise_for_errors()
        loaded.append(
            PolicyFile(
                name=path.name,
                text=path.read_text(encoding="utf-8"),
                kinds=frozenset(document.kind for document in documents),
            )
        )
    return tuple(loaded)


def _available(plan: Plan) -> Plan:
    """The plan without the roles whose command this build does not have yet, said aloud."""
    from snapbright.cli.app import app  # here: app.py imports this module

    commands = {command.name for command in app.registered_commands} | {
        group.name for group in app.registered_groups
    }
    commands |= {
        command.callback.__name__.replace("_", "-")
        for command in app.registered_commands
        if command.callback is not None
    }
    for role, command in _ROLE_COMMANDS.items():
        if command not in commands:
            typer.echo(
                f"note: this build has no `snapbright {command}` yet: running without {role}s",
                err=True,
            )
            plan = plan.without(role)
    return plan
