"""The shell of `snapbright check` and `status`: find the control planes, fetch their status.

``--api URL`` names one control plane; otherwise ``<state-dir>/endpoints.json`` does
(``--cluster`` picks one of several, ``--all`` takes every cluster listed). A control plane
that cannot be reached, or answers a status this CLI cannot read, becomes an
:class:`~snapbright.check.core.Unreachable` value: `check` reports it as a failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError

from snapbright.check.core import Unreachable
from snapbright.check.model import ClusterStatus
from snapbright.controlplane.client import AdminApiError, admin_url, load_endpoints, request
from snapbright.controlplane.model import ENDPOINTS_FILE


@dataclass(frozen=True, slots=True)
class Target:
    """One control plane to ask: its cluster's name (if known before asking) and admin URL."""

    cluster: str
    api: str


def targets(api: str | None, cluster: str | None, every: bool, state_dir: Path) -> list[Target]:
    """The control planes the flags name; :class:`AdminApiError` says why none can be found.

    With no ``--api`` and no ``--cluster``, a mesh of several clusters (``snapbright up``) means
    all of them, as ``--all`` does: the question is "is my mesh healthy?".
    """
    if every and (api is not None or cluster is not None):
        raise AdminApiError("--all takes every cluster of endpoints.json: drop --api/--cluster")
    if every:
        return _every_cluster(state_dir)
    if api is None and cluster is None and (state_dir / ENDPOINTS_FILE).is_file():
        found = _every_cluster(state_dir)
        if len(found) > 1:
            return found
    return [Target(cluster or "", admin_url(api, cluster, state_dir))]


def _every_cluster(state_dir: Path) -> list[Target]:
    path = state_dir / ENDPOINTS_FILE
    endpoints = load_endpoints(state_dir, "is a mesh running? (pass --state-dir DIR, or --api URL)")
    if not endpoints.clusters:
        raise AdminApiError(f"{path} lists no cluster")
    return [
        Target(name, found.admin.rstrip("/")) for name, found in sorted(endpoints.clusters.items())
    ]


def fetch(target: Target, *, timeout: float = 10.0) -> ClusterStatus | Unreachable:
    """The status of ``target``'s control plane, or why there is none."""
    try:
        raw = request(target.api, "GET", "/api/v1/status", timeout=timeout)
    except AdminApiError as error:
        return Unreachable(target.api, str(error))
    try:
        return ClusterStatus.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return Unreachable(target.api, f"{where}: {first['msg']}", unreadable=True)


def explain(target: Target, service: str, limit: int, *, timeout: float = 10.0) -> dict[str, Any]:
    """The live decision chain of ``service`` (``GET /api/v1/explain/{service}``)."""
    path = f"/api/v1/explain/{quote(service, safe='')}" + (f"?limit={limit}" if limit > 0 else "")
    return request(target.api, "GET", path, timeout=timeout)
