"""The admin API as the CLI calls it: find the control plane, send one request, read JSON.

The control plane's admin URL comes from ``--api URL`` when given; else from
``<state-dir>/endpoints.json`` (``snapbright up`` writes one for all its clusters, and each
control plane writes one for itself into its own state directory), picking ``--cluster`` or
the only cluster listed. Calls are blocking (the CLI has nothing else to do meanwhile).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from snapbright.controlplane.model import ENDPOINTS_FILE, EndpointsFile

DEFAULT_STATE_DIR = Path(".snapbright")


class AdminApiError(Exception):
    """The control plane could not be found or reached, or refused the request."""


def load_endpoints(state_dir: Path, hint: str) -> EndpointsFile:
    """The state directory's endpoints file; :class:`AdminApiError` (with ``hint`` when it is
    missing) if it cannot be read."""
    path = state_dir / ENDPOINTS_FILE
    try:
        return EndpointsFile.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise AdminApiError(f"no {path}: {hint}") from None
    except (OSError, ValidationError) as error:
        raise AdminApiError(f"cannot read {path}: {error}") from None


def admin_url(api: str | None, cluster: str | None, state_dir: Path) -> str:
    """The admin API's base URL, from ``api`` or the state directory's endpoints file."""
    if api is not None:
        parts = urllib.parse.urlsplit(api)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise AdminApiError(f"--api {api!r} is not an http(s)://host:port URL")
        return api.rstrip("/")
    path = state_dir / ENDPOINTS_FILE
    endpoints = load_endpoints(
        state_dir, "is a control plane running? (pass --api URL or --state-dir DIR)"
    )
    if cluster is not None:
        found = endpoints.clusters.get(cluster)
        if found is None:
            known = ", ".join(sorted(endpoints.clusters)) or "none"
            raise AdminApiError(f"{path} lists no cluster {cluster!r} (it lists: {known})")
        return found.admin.rstrip("/")
    if len(endpoints.clusters) != 1:
        known = ", ".join(sorted(endpoints.clusters)) or "none"
        raise AdminApiError(f"{path} lists several clusters ({known}): pass --cluster NAME")
    (only,) = endpoints.clusters.values()
    return only.admin.rstrip("/")


def request(
    base: str, method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float = 30
) -> dict[str, Any]:
    """One call; the decoded JSON body ({} for none). A 4xx/5xx raises with its reason."""
    data = None if body is None else json.dumps(body).encode()
    outgoing = urllib.request.Request(base + path, data=data, method=method)  # noqa: S310
    outgoing.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(outgoing, timeout=timeout) as response:  # noqa: S310
            raw = response.read()
    except urllib.error.HTTPError as error:
        raise AdminApiError(_reason(error)) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise AdminApiError(f"cannot reach the control plane at {base}: {reason}") from None
    if not raw:
        return {}
    try:
        decoded = json.loads(raw)
    except ValueError:
        raise AdminApiError(f"{base}{path} answered something that is not JSON") from None
    if not isinstance(decoded, dict):
        raise AdminApiError(f"{base}{path} answered JSON that is not an object")
    return decoded


def _reason(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read())
        reason = body["error"] if isinstance(body, dict) else None
    except (ValueError, KeyError, OSError):
        reason = None
    return f"{error.code}: {reason or error.reason}"
