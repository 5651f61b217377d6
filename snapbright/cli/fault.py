"""`snapbright fault set|clear`: make a service slow or flaky in one cluster of a running
`snapbright up` mesh, and undo it.

Two ways, said on every use:

- ``policy``: a TrafficPolicy with fault injection (``faults.delay`` and ``faults.abort``),
  written as ``snapbright-fault-<service>.yaml`` into the cluster's policy directory; its
  control plane reloads it and pushes it to the cluster's sidecars, which inject the faults
  into calls they make to the service.
- ``app``: the demo app replicas of the service in that cluster change their own added latency
  and error rate (their runtime knobs), so the service itself is slow wherever it is called
  from: what a brownout of the local copy looks like.

``auto`` (the default) uses ``policy`` when the cluster's replicas run with sidecars, else
``app``. The mesh is found through ``<state-dir>/endpoints.json``. Errors print one line and
exit 1.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from pydantic import TypeAdapter, ValidationError

from proxy.config.loader import load_file
from proxy.config.model import API_VERSION, Duration, Share
from proxy.policy.model import TrafficPolicy
from snapbright.policy.kinds import KINDS
from snapbright.up.endpoints import NoMeshRunning, read_endpoints, write_atomic

app = typer.Typer(
    help="Inject latency and errors into a service of a running `snapbright up` mesh.",
    no_args_is_help=True,
)

DEFAULT_STATE_DIR = Path(".snapbright")
FAULT_PREFIX = "snapbright-fault-"
_DURATION: TypeAdapter[float] = TypeAdapter(Duration)
_SHARE: TypeAdapter[float] = TypeAdapter(Share)


class Via(StrEnum):
    """How a fault is injected."""

    auto = "auto"
    policy = "policy"
    app = "app"


StateDirOption = Annotated[
    Path, typer.Option("--state-dir", help="The state directory `snapbright up` runs from.")
]
ViaOption = Annotated[
    Via,
    typer.Option(
        "--via",
        help="policy: TrafficPolicy fault injection in the sidecars; app: the demo apps' knobs; "
        "auto: policy when sidecars run.",
    ),
]


class _FaultError(Exception):
    """A user-facing failure: one line, exit code 1."""


@app.command("set")
def set_fault(
    cluster: Annotated[str, typer.Option("--cluster", help="The cluster, e.g. us-west.")],
    service: Annotated[str, typer.Option("--service", help="The service, e.g. payments.")],
    latency: Annotated[
        str | None, typer.Option("--latency", help="Delay added to each call, e.g. 400ms.")
    ] = None,
    error_rate: Annotated[
        str | None, typer.Option("--error-rate", help="Share of calls that fail: 0.2 or 20%.")
    ] = None,
    status: Annotated[
        int, typer.Option("--status", help="The HTTP status failed calls get.", min=500, max=599)
    ] = 503,
    via: ViaOption = Via.auto,
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Make SERVICE in CLUSTER slow (--latency) and/or flaky (--error-rate)."""
    try:
        if latency is None and error_rate is None:
            raise _FaultError("give --latency, --error-rate or both (`fault clear` removes them)")
        delay = None if latency is None else _parse(_DURATION, latency, "--latency")
        errors = (
            None if error_rate is None else _parse(_SHARE, _share_text(error_rate), "--error-rate")
        )
        endpoints = read_endpoints(state_dir)
        entry = _cluster(endpoints, cluster)
        replicas = _replicas(entry, cluster, service)
        chosen = _choose(via, replicas)
        if chosen is Via.policy:
            path = _write_policy(entry, service, delay, errors, status)
            typer.echo(
                f"fault set on {service} in {cluster} via TrafficPolicy fault injection: {path}"
            )
        else:
            for replica in replicas:
                _knobs(replica["app"], {"latency": latency, "errorRate": errors})
            typer.echo(
                f"fault set on {service} in {cluster} via the demo apps' knobs "
                f"({len(replicas)} replica{'s' if len(replicas) != 1 else ''})"
            )
    except (_FaultError, NoMeshRunning) as error:
        _fail(str(error))


@app.command()
def clear(
    cluster: Annotated[
        str | None, typer.Option("--cluster", help="Only this cluster (default: all).")
    ] = None,
    service: Annotated[
        str | None, typer.Option("--service", help="Only this service (default: all).")
    ] = None,
    via: ViaOption = Via.auto,
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Remove faults set with `fault set` (all of them, or one cluster's, or one service's)."""
    try:
        endpoints = read_endpoints(state_dir)
        clusters = [cluster] if cluster is not None else sorted(endpoints["clusters"])
        cleared = 0
        for name in clusters:
            entry = _cluster(endpoints, name)
            services = [service] if service is not None else sorted(entry.get("services", {}))
            for each in services:
                replicas = _replicas(entry, name, each)
                chosen = _choose(via, replicas)
                if chosen is Via.policy:
                    path = Path(entry["policyDirectory"]) / f"{FAULT_PREFIX}{each}.yaml"
                    if path.exists():
                        path.unlink()
                        typer.echo(f"cleared the fault policy of {each} in {name}: {path}")
                        cleared += 1
                else:
                    for replica in replicas:
                        _knobs(replica["app"], {"latency": None, "errorRate": None, "reset": True})
                    typer.echo(f"reset the demo apps' knobs of {each} in {name}")
                    cleared += 1
        if not cleared:
            typer.echo("no fault to clear")
    except (_FaultError, NoMeshRunning) as error:
        _fail(str(error))


def _share_text(text: str) -> str | float:
    # A bare number is a share (0.2); "20%" is passed on as written.
    try:
        return float(text)
    except ValueError:
        return text


def _parse(adapter: TypeAdapter[float], value: object, option: str) -> float:
    try:
        return adapter.validate_python(value)
    except ValidationError as error:
        reason = error.errors()[0]["msg"].removeprefix("Value error, ")
        raise _FaultError(f"{option}: {reason}") from None


def _cluster(endpoints: dict[str, Any], cluster: str) -> dict[str, Any]:
    entry = endpoints["clusters"].get(cluster)
    if not isinstance(entry, dict):
        known = ", ".join(sorted(endpoints["clusters"])) or "none"
        raise _FaultError(f"the mesh has no cluster {cluster!r} (it has: {known})")
    return entry


def _replicas(entry: dict[str, Any], cluster: str, service: str) -> list[dict[str, Any]]:
    services = entry.get("services", {})
    replicas = services.get(service)
    if not replicas:
        known = ", ".join(sorted(services)) or "none"
        raise _FaultError(f"{service!r} does not run in {cluster} (services there: {known})")
    return list(replicas)


def _choose(via: Via, replicas: list[dict[str, Any]]) -> Via:
    if via is Via.auto:
        via = Via.policy if all("sidecar" in r for r in replicas) else Via.app
    if via is Via.app and not all("app" in r for r in replicas):
        raise _FaultError("no demo app runs for this service: use --via policy")
    return via


def _write_policy(
    entry: dict[str, Any], service: str, delay: float | None, errors: float | None, status: int
) -> Path:
    directory = Path(entry["policyDirectory"])
    path = directory / f"{FAULT_PREFIX}{service}.yaml"
    _refuse_a_second_policy(directory, path, service)
    faults: dict[str, Any] = {}
    if delay is not None and delay > 0:
        faults["delay"] = {"duration": f"{delay * 1000:g}ms", "percentage": "100%"}
    if errors is not None and errors > 0:
        faults["abort"] = {"status": status, "percentage": f"{errors * 100:g}%"}
    document = {
        "apiVersion": API_VERSION,
        "kind": TrafficPolicy.KIND,
        "metadata": {"name": f"fault-{service}"},
        "spec": {"service": service, "faults": faults},
    }
    text = "# Written by `snapbright fault set`; `snapbright fault clear` removes it.\n"
    text += yaml.safe_dump(document, sort_keys=False)
    write_atomic(path, text)
    return path


def _refuse_a_second_policy(directory: Path, ours: Path, service: str) -> None:
    """Two TrafficPolicies for one service would contradict: say where the other one is."""
    for path in sorted(directory.glob("*.y*ml")):
        if path == ours or path.name.startswith("."):
            continue
        for document in load_file(path, KINDS).documents:
            if isinstance(document, TrafficPolicy) and document.spec.service == service:
                raise _FaultError(
                    f"{path} already holds a TrafficPolicy for {service}: add "
                    "spec.faults there instead"
                )


def _knobs(app_url: str, body: dict[str, Any]) -> None:
    """Set a demo app's runtime knobs (``POST /_demo/knobs``)."""
    parts = urllib.parse.urlsplit(app_url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        payload = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
        connection.request(
            "POST", "/_demo/knobs", body=payload, headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        answer = response.read()
    except OSError as error:
        raise _FaultError(f"the demo app at {app_url} does not answer ({error})") from None
    finally:
        connection.close()
    if response.status != 200:
        raise _FaultError(
            f"the demo app at {app_url} refused: HTTP {response.status} {answer[:200]!r}"
        )


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)
