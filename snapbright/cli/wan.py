"""`snapbright wan …`: run the WAN emulator, and reshape its links while it runs.

`set` and `show` talk to a running emulator's admin API on 127.0.0.1: ``--admin`` (or
``SNAPBRIGHT_WAN_ADMIN``) if given, else the one in the ``endpoints.json`` of the mesh that
`snapbright up` runs from ``--state-dir``, else port 7900 (`wan serve`'s default). A link is a
pair of clusters; `set` changes both directions unless ``--one-way``. Errors print one line
saying why and exit 1.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from pathlib import Path
from typing import Annotated, Any

import typer
import uvloop
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from snapbright.cli.lifecycle import fail, until_stopped
from snapbright.up.endpoints import NoMeshRunning, read_endpoints
from snapbright.wan.model import DEFAULT_ADMIN_PORT, WanConfig
from snapbright.wan.server import WanEmulator

app = typer.Typer(
    help="The emulated WAN between the clusters of a local mesh.", no_args_is_help=True
)

_ADMIN = f"127.0.0.1:{DEFAULT_ADMIN_PORT}"

Admin = Annotated[
    str | None,
    typer.Option(
        "--admin",
        envvar="SNAPBRIGHT_WAN_ADMIN",
        help="The emulator's admin address (HOST:PORT on loopback).",
        show_default=False,
    ),
]
StateDir = Annotated[
    Path,
    typer.Option("--state-dir", help="Where `snapbright up` runs from (to find the emulator)."),
]
_STATE_DIR = Path(".snapbright")


@app.command()
def serve(
    config: Annotated[
        Path, typer.Argument(help="JSON: adminPort, links, forwards (see snapbright.wan.model).")
    ],
) -> None:
    """Run the emulator in the foreground until interrupted."""
    try:
        settings = WanConfig.model_validate_json(config.read_bytes())
    except OSError as error:
        fail(f"{config}: {error.strerror or error}")
    except ValidationError as error:
        fail(f"{config}: {_reasons(error)}")

    async def _run() -> None:
        emulator = await WanEmulator(settings).start()
        ports = ", ".join(
            f"{f.link[0]}→{f.link[1]} :{port} → {f.target_host}:{f.target_port}"
            for f, port in zip(settings.forwards, emulator.listen_ports, strict=True)
        )
        typer.echo(f"wan: admin on 127.0.0.1:{emulator.admin_port}; forwards: {ports or 'none'}")
        try:
            await until_stopped()
        finally:
            await emulator.close()

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_run())
    except KeyboardInterrupt:
        pass
    except OSError as error:
        fail(f"wan: {error}")


@app.command("set")
def set_link(
    source: Annotated[str, typer.Argument(help="A cluster, e.g. us-west.")],
    destination: Annotated[str, typer.Argument(help="The cluster at the other end.")],
    latency: Annotated[
        str | None, typer.Option(help="One-way delay, e.g. 120ms (a round trip costs twice).")
    ] = None,
    jitter: Annotated[
        str | None, typer.Option(help="± this around the latency, e.g. 10ms.")
    ] = None,
    loss: Annotated[
        str | None,
        typer.Option(help="Share of segments lost, 0.01 or 1% (each costs a 200 ms RTO)."),
    ] = None,
    bandwidth: Annotated[
        str | None, typer.Option(help="100mbit, 100Mbps, 512kbit, or unlimited.")
    ] = None,
    partition: Annotated[
        bool | None,
        typer.Option(
            "--partition/--no-partition",
            help="Hold all traffic (blackhole) / heal.",
            show_default=False,
        ),
    ] = None,
    reset: Annotated[
        bool | None,
        typer.Option(
            "--reset/--no-reset",
            help="A partition resets connections instead of stalling them.",
            show_default=False,
        ),
    ] = None,
    one_way: Annotated[
        bool, typer.Option("--one-way", help="Only SOURCE → DESTINATION, not back.")
    ] = False,
    admin: Admin = None,
    state_dir: StateDir = _STATE_DIR,
) -> None:
    """Change a running link; what is not given stays as it is."""
    body: dict[str, Any] = {"oneWay": one_way}
    for name, value in (("latency", latency), ("jitter", jitter), ("bandwidth", bandwidth)):
        if value is not None:
            body[name] = value
    if loss is not None:
        body["loss"] = _loss(loss)
    if partition is not None:
        body["partition"] = partition
    if reset is not None:
        body["reset"] = reset
    links = _call(_admin(admin, state_dir), "POST", f"/links/{source}/{destination}", body)
    _print_links(links)


@app.command()
def show(admin: Admin = None, state_dir: StateDir = _STATE_DIR) -> None:
    """Print every directed link: its shape and what it has carried."""
    _print_links(_call(_admin(admin, state_dir), "GET", "/links", None))


def _admin(given: str | None, state_dir: Path) -> str:
    if given is not None:
        return given
    try:
        document = read_endpoints(state_dir)
    except NoMeshRunning:
        return _ADMIN
    wan = document.get("wan")
    if not isinstance(wan, dict) or not isinstance(wan.get("admin"), str):
        fail(f"the mesh running from {state_dir} has no WAN emulator (no links to shape)")
    return str(wan["admin"]).removeprefix("http://").rstrip("/")


def _loss(text: str) -> float | str:
    # A bare number is a share (0.01); "1%" is passed on as written.
    try:
        return float(text)
    except ValueError:
        return text


def _call(admin: str, method: str, path: str, body: dict[str, Any] | None) -> list[dict[str, Any]]:
    host, _, port_text = admin.rpartition(":")
    if not host or not port_text.isdigit():
        fail(f"--admin {admin!r}: write HOST:PORT, e.g. {_ADMIN}")
    connection = http.client.HTTPConnection(host, int(port_text), timeout=10)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {} if body is None else {"Content-Type": "application/json"}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        answer = json.loads(response.read() or b"{}")
    except OSError as error:
        fail(
            f"no WAN emulator answers on {admin} ({error}); is `snapbright up` running? "
            "(--admin or SNAPBRIGHT_WAN_ADMIN)"
        )
    except ValueError:
        fail(f"{admin} did not answer with JSON: is it the WAN emulator's admin port?")
    finally:
        connection.close()
    if response.status != 200:
        fail(str(answer.get("error", f"HTTP {response.status}")))
    links: list[dict[str, Any]] = answer["links"]
    return links


def _print_links(links: list[dict[str, Any]]) -> None:
    table = Table(box=None, header_style="bold")
    for column in ("FROM", "TO", "LATENCY", "JITTER", "LOSS", "BANDWIDTH", "PARTITION", "CONNS"):
        table.add_column(column)
    table.add_column("BYTES", justify="right")
    table.add_column("RETRANSMITS", justify="right")
    for link in links:
        partition = ("reset" if link["reset"] else "stall") if link["partition"] else "-"
        table.add_row(
            link["from"],
            link["to"],
            link["latency"],
            link["jitter"],
            f"{link['loss'] * 100:g}%",
            link["bandwidth"],
            partition,
            str(link["connections"]),
            str(link["deliveredBytes"]),
            str(link["retransmits"]),
        )
    Console(width=200).print(table)


def _reasons(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in error.errors()
    )
