"""`snapbright peering …`: tokens, establish, list and delete, through the admin API.

``token`` runs on the accepting cluster and prints a one-time token; ``establish TOKEN`` on
the dialing cluster peers with the token's cluster. Both take ``--gateway HOST:PORT``
(repeatable): where the *other* cluster reaches this one's east-west gateway, when that is not
the control plane's configured address (a per-network or per-link address); the token carries
them to the dialer, which dials there, and each side names its own in its Open so the other's
sidecars reach its exported services there. ``list`` prints
PEER STATE LAST-HEARTBEAT RTT IMPORTED EXPORTED; ``delete PEER`` withdraws the peer's mirrors
and trust. The control plane is found with ``--api URL``, or in ``--state-dir``'s
``endpoints.json`` (``--cluster`` picks one of several). Errors print one line, exit 1.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from federation.peering.core import PeerStatus
from federation.peering.manager import format_status
from federation.peering.model import PeerState
from snapbright.controlplane.client import DEFAULT_STATE_DIR, AdminApiError, admin_url, request

app = typer.Typer(help="Peer this cluster with others.", no_args_is_help=True)

ApiOption = Annotated[
    str | None, typer.Option("--api", help="The control plane's admin URL (http://host:port).")
]
ClusterOption = Annotated[
    str | None, typer.Option("--cluster", help="Which cluster of endpoints.json to talk to.")
]
StateDirOption = Annotated[
    Path, typer.Option("--state-dir", help="Where endpoints.json is (from `snapbright up`).")
]
GatewayOption = Annotated[
    list[str] | None,
    typer.Option(
        "--gateway",
        help="HOST:PORT where the other cluster reaches our gateway (repeatable); default: "
        "the control plane's configured gateways.",
    ),
]


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except AdminApiError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=1) from None


@app.command()
def token(
    api: ApiOption = None,
    cluster: ClusterOption = None,
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
    ttl: Annotated[str, typer.Option("--ttl", help="How long the token is valid.")] = "24h",
    gateway: GatewayOption = None,
) -> None:
    """Print a one-time token for another cluster to establish a peering with this one."""
    with _errors():
        base = admin_url(api, cluster, state_dir)
        body: dict[str, Any] = {"ttl": ttl}
        if gateway:
            body["gateways"] = gateway
        answer = request(base, "POST", "/api/v1/peering/token", body)
    typer.echo(answer["token"])


@app.command()
def establish(
    token: Annotated[str, typer.Argument(help="The token `snapbright peering token` printed.")],
    api: ApiOption = None,
    cluster: ClusterOption = None,
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
    gateway: GatewayOption = None,
) -> None:
    """Peer this cluster with the cluster that generated TOKEN."""
    with _errors():
        base = admin_url(api, cluster, state_dir)
        body: dict[str, Any] = {"token": token}
        if gateway:
            body["gateways"] = gateway
        answer = request(base, "POST", "/api/v1/peering/establish", body)
    typer.echo(f"peered with {answer['peer']}")


@app.command("list")
def list_(
    api: ApiOption = None,
    cluster: ClusterOption = None,
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """List the peerings: PEER STATE LAST-HEARTBEAT RTT IMPORTED EXPORTED."""
    with _errors():
        base = admin_url(api, cluster, state_dir)
        answer = request(base, "GET", "/api/v1/peering")
        statuses = [_status(row) for row in answer.get("peers", [])]
    now = answer.get("now")
    for line in format_status(statuses, now if isinstance(now, int | float) else time.time()):
        typer.echo(line)


def _status(row: Any) -> PeerStatus:
    try:
        return PeerStatus(
            peer=str(row["peer"]),
            state=PeerState(row["state"]),
            last_heard_at=row.get("lastHeardAt"),
            rtt_seconds=row.get("rttSeconds"),
            imported=int(row["imported"]),
            exported=int(row["exported"]),
            stale_since=row.get("staleSince"),
        )
    except (KeyError, TypeError, ValueError):
        raise AdminApiError(
            f"the control plane listed a peer in a shape we do not know: {row!r}"
        ) from None


@app.command()
def delete(
    peer: Annotated[str, typer.Argument(help="The peer cluster's name.")],
    api: ApiOption = None,
    cluster: ClusterOption = None,
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Delete a peering: the peer's mirrors and trust are withdrawn."""
    with _errors():
        base = admin_url(api, cluster, state_dir)
        request(base, "DELETE", f"/api/v1/peering/{peer}")
    typer.echo(f"deleted the peering with {peer}")
