"""Where a running local mesh is: ``endpoints.json`` in its state directory, and the table
`snapbright up` prints.

The file extends the control plane's :class:`~snapbright.controlplane.model.EndpointsFile`
(``version`` and per cluster ``admin``, ``discovery``, ``peering``, ``dashboard``; readers ignore
what they do not know) with everything else ``snapbright up`` started::

    {"version": 1, "mesh": "demo", "stateDir": "/abs/.snapbright",
     "clusters": {"us-west": {"admin": "http://127.0.0.1:17000", …, "metrics": "…/metrics",
                              "policyDirectory": "…", "stateDir": "…",
                              "gateway": {"listen": "127.0.0.1:17006", "admin": "…"},
                              "services": {"payments": [{"replica": 0,
                                  "app": "http://127.0.0.1:17010", "grpc": "127.0.0.1:17011",
                                  "sidecar": {"outbound": …, "inbound": …, "admin": …}}]}}},
     "wan": {"admin": "http://127.0.0.1:17030",
             "links": [{"from": "us-west", "to": "ap-southeast", "listen": "127.0.0.1:17031",
                        "target": "127.0.0.1:17006"}]},
     "processes": [{"name": "us-west.controlplane", "role": "controlplane",
                    "cluster": "us-west", "pid": 4242, "log": "…/logs/us-west.controlplane.log"}]}

``sidecar`` is absent for a replica whose sidecar is not part of the run, ``app`` and ``grpc``
for one whose demo app is not (a replica with neither is not listed).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from snapbright.controlplane.model import ENDPOINTS_FILE, EndpointsFile
from snapbright.up.plan import HOST, Plan, ProcessStep

__all__ = ["NoMeshRunning", "endpoints_document", "format_table", "read_endpoints", "write_atomic"]


class NoMeshRunning(Exception):
    """There is no (readable) ``endpoints.json`` in the state directory."""


def endpoints_document(plan: Plan, pids: Mapping[str, int]) -> dict[str, Any]:
    """The ``endpoints.json`` of ``plan`` running with these process ids."""
    steps = {step.name: step for step in plan.steps if isinstance(step, ProcessStep)}
    clusters: dict[str, Any] = {}
    for cluster in plan.clusters:
        control_plane = steps[f"{cluster}.controlplane"].ports
        gateway = steps[f"{cluster}.gateway"].ports
        admin = f"http://{HOST}:{control_plane['admin']}"
        services: dict[str, list[dict[str, Any]]] = {}
        for replica in plan.replicas:
            if replica.cluster != cluster:
                continue
            entry: dict[str, Any] = {"replica": replica.replica}
            if replica.name in steps:
                entry |= {"app": f"http://{HOST}:{replica.app}", "grpc": f"{HOST}:{replica.grpc}"}
            if f"{replica.name}.sidecar" in steps:
                entry["sidecar"] = {
                    "outbound": f"{HOST}:{replica.outbound}",
                    "inbound": f"{HOST}:{replica.inbound}",
                    "admin": f"http://{HOST}:{replica.admin}",
                }
            if len(entry) > 1:
                services.setdefault(replica.service, []).append(entry)
        clusters[cluster] = {
            "admin": admin,
            "discovery": f"{HOST}:{control_plane['discovery']}",
            "peering": f"{HOST}:{control_plane['peering']}",
            "dashboard": f"{admin}/",
            "metrics": f"{admin}/metrics",
            "policyDirectory": str(plan.policy_dir(cluster)),
            "stateDir": str(plan.state_of(cluster)),
            "gateway": {
                "listen": f"{HOST}:{gateway['listen']}",
                "admin": f"http://{HOST}:{gateway['admin']}",
                "metrics": f"http://{HOST}:{gateway['admin']}/metrics",
            },
            "services": services,
        }
    wan = steps.get("wan")
    document: dict[str, Any] = {
        "version": 1,
        "mesh": plan.mesh,
        "stateDir": str(plan.state_dir),
        "clusters": clusters,
    }
    if wan is not None:
        document["wan"] = {
            "admin": f"http://{HOST}:{plan.wan_admin}",
            "links": [
                {
                    "from": source,
                    "to": destination,
                    "listen": f"{HOST}:{port}",
                    "target": f"{HOST}:{steps[f'{destination}.gateway'].ports['listen']}",
                }
                for (source, destination), port in plan.wan_listeners.items()
            ],
        }
    document["processes"] = [
        {
            "name": name,
            "role": str(steps[name].role),
            "cluster": steps[name].cluster,
            "pid": pid,
            "log": str(plan.log_path(name)),
        }
        for name, pid in pids.items()
    ]
    # The control plane's own reader must accept what we write.
    EndpointsFile.model_validate(document)
    return document


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def read_endpoints(state_dir: Path) -> dict[str, Any]:
    """The ``endpoints.json`` of the mesh running from ``state_dir``."""
    path = state_dir / ENDPOINTS_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NoMeshRunning(
            f"no mesh is running from {state_dir} (no {ENDPOINTS_FILE}): start one with "
            "`snapbright up`, or pass the --state-dir it was started with"
        ) from None
    except (OSError, ValueError) as error:
        raise NoMeshRunning(f"{path}: cannot be read: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("clusters"), dict):
        raise NoMeshRunning(f"{path}: not an endpoints file of `snapbright up`")
    return document


def format_table(document: Mapping[str, Any]) -> str:
    """What `snapbright up` prints once the mesh is ready: where everything is."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("CLUSTER", "WHAT", "WHERE"):
        table.add_column(column)
    for cluster, entry in document["clusters"].items():
        rows = [
            ("dashboard", entry["dashboard"]),
            ("metrics", entry["metrics"]),
            ("control plane", f"admin {entry['admin']}  discovery {entry['discovery']}"),
            ("gateway", f"{entry['gateway']['listen']}  admin {entry['gateway']['admin']}"),
        ]
        for service, replicas in entry["services"].items():
            for replica in replicas:
                label = f"{service}-{replica['replica']}"
                if "app" in replica:
                    rows.append((label, f"app {replica['app']}"))
                sidecar = replica.get("sidecar")
                if sidecar is not None:
                    port = sidecar["outbound"].rpartition(":")[2]
                    rows.append(
                        (
                            f"{label} sidecar",
                            f"curl -H 'Host: <service>' http://{HOST}:{port}/  "
                            f"(admin {sidecar['admin']})",
                        )
                    )
        for what, where in rows:
            table.add_row(cluster, what, where)
            cluster = ""
    wan = document.get("wan")
    if wan is not None:
        admin = wan["admin"].removeprefix("http://")
        table.add_row("wan", "admin", f"{wan['admin']}  (snapbright wan show --admin {admin})")
        for link in wan["links"]:
            table.add_row(
                "", f"{link['from']} → {link['to']}", f"{link['listen']} → {link['target']}"
            )
    buffer = io.StringIO()
    Console(file=buffer, width=160, no_color=True, highlight=False).print(table)
    return buffer.getvalue()
