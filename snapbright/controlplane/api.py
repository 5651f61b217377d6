"""The control plane's admin HTTP API (loopback only by default), beside the dashboard.

The CLI (``snapbright peering …``, ``status``, ``check``, ``policy explain``) and sidecars
(registration) speak to it; JSON in and out, errors as ``{"error": "<reason>"}`` with a 4xx
status that says whose fault it was.

- ``POST /api/v1/peering/token`` ``{"ttl": "24h", "gateways"?: ["host:port"]}`` →
  ``{"token": "sbpt1…"}`` (``gateways``: where that peer reaches our gateway, if not at the
  default addresses)
- ``POST /api/v1/peering/establish`` ``{"token": "sbpt1…", "gateways"?: ["host:port"]}`` →
  ``{"peer": "<cluster>"}`` (``gateways``: where the token's cluster reaches our gateway)
- ``GET /api/v1/peering`` → ``{"now": …, "peers": [{peer, state, lastHeardAt, rttSeconds,
  imported, exported, staleSince}]}``
- ``DELETE /api/v1/peering/{peer}`` → 204
- ``GET /api/v1/services`` → the federated view: per service its targets with weights,
  endpoints and stale flags, and why the weights are what they are
- ``GET /api/v1/explain/{service}`` → the decision journal of a service and its live decision
- ``GET /api/v1/status`` → what ``status`` and ``check`` need (see :func:`status`)
- ``POST /api/v1/registrations`` ``{id, ttl?, workload: {name, namespace, serviceAccount},
  endpoint: {service, namespace?, address, port, zone?, health?, tags?, meta?}}``,
  ``PUT /api/v1/registrations/{id}/heartbeat``, ``DELETE /api/v1/registrations/{id}``: a
  sidecar registers its workload at start with the address callers dial (its inbound
  listener), heartbeats within the TTL (default ``catalog.registrationTtl``) and deregisters
  at shutdown; a registration not renewed in time expires. The endpoint passes the admission
  policy: never one of this control plane's own listeners.
- ``GET /metrics`` (this control plane's own Prometheus registry), ``GET /ready``,
  ``GET /live``

The API has no authentication of its own: it listens on loopback, like a Consul agent's.
The dashboard's own routes (``/``, ``/api/v1/state``, ``/api/v1/decisions``,
``/api/v1/events``) live on the same app, with its Host check and security headers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter, ValidationError

from federation.catalog.model import (
    Catalog,
    CatalogEntryError,
    Registration,
    Rejection,
    admit_endpoint,
    admit_workload,
)
from federation.catalog.store import RegistrationRejected
from federation.mirror.core import FederatedUpstream
from federation.peering.manager import PeeringError
from federation.peering.model import MAX_GATEWAYS, GatewayAddress, PeeringValueError
from proxy.config.model import Duration
from proxy.identity.bundle import TrustBundle

if TYPE_CHECKING:
    from snapbright.controlplane.process import ControlPlane

PLANE: Final = web.AppKey["ControlPlane"]("snapbright_controlplane")

_DURATION: Final = TypeAdapter(Duration)
_MAX_TOKEN_TTL_S: Final = 30 * 24 * 3600.0


def add_api(app: web.Application, plane: ControlPlane) -> None:
    """Add the admin API's routes to ``app`` (the dashboard's app, on the admin socket)."""
    app[PLANE] = plane
    router = app.router
    router.add_post("/api/v1/peering/token", _token)
    router.add_post("/api/v1/peering/establish", _establish)
    router.add_get("/api/v1/peering", _peerings)
    router.add_delete("/api/v1/peering/{peer}", _delete_peering)
    router.add_get("/api/v1/services", _services)
    router.add_get("/api/v1/explain/{service}", _explain)
    router.add_get("/api/v1/status", _status)
    router.add_post("/api/v1/registrations", _register)
    router.add_put("/api/v1/registrations/{id}/heartbeat", _heartbeat)
    router.add_delete("/api/v1/registrations/{id}", _deregister)
    router.add_get("/metrics", _metrics)
    router.add_get("/ready", _ready)
    router.add_get("/live", _live)


class _BadRequest(Exception):
    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def _error(reason: str, status: int) -> web.Response:
    return web.json_response({"error": reason}, status=status)


async def _body(request: web.Request) -> Mapping[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _BadRequest("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise _BadRequest("the body must be a JSON object")
    return body


# --- Peering ---


async def _token(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    try:
        body = await _body(request)
        ttl = _ttl(body.get("ttl", "24h"))
        token = plane.peering.generate_token(ttl, _gateways(body.get("gateways", [])))
    except _BadRequest as error:
        return _error(error.reason, error.status)
    except PeeringError as error:
        return _error(str(error), 409)
    return web.json_response({"token": token, "cluster": plane.cluster})


def _ttl(value: object) -> float:
    try:
        seconds = _DURATION.validate_python(value)
    except ValidationError:
        raise _BadRequest(f"ttl {value!r} is not a duration such as 1h or 30m") from None
    if not 0 < seconds <= _MAX_TOKEN_TTL_S:
        raise _BadRequest("ttl must be above 0s and at most 720h")
    return seconds


def _gateways(value: object) -> tuple[GatewayAddress, ...]:
    """Gateway addresses given for one peer: a list of ``host:port`` strings."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _BadRequest("gateways must be a list of host:port strings")
    if len(value) > MAX_GATEWAYS:
        raise _BadRequest(f"gateways: at most {MAX_GATEWAYS} addresses, not {len(value)}")
    try:
        gateways = tuple(GatewayAddress.parse(item) for item in value)
    except PeeringValueError as error:
        raise _BadRequest(f"gateways: {error.reason}") from None
    if len(set(gateways)) != len(gateways):
        raise _BadRequest("gateways: an address is listed twice")
    return gateways


async def _establish(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    try:
        body = await _body(request)
        gateways = _gateways(body.get("gateways", []))
    except _BadRequest as error:
        return _error(error.reason, error.status)
    token = body.get("token")
    if not isinstance(token, str) or not token.strip():
        return _error('the body must carry the token: {"token": "sbpt1…"}', 400)
    try:
        peer = await plane.peering.establish(token.strip(), gateways=gateways)
    except PeeringError as error:
        return _error(str(error), _establish_status(str(error)))
    return web.json_response({"peer": peer})


def _establish_status(reason: str) -> int:
    """A token that cannot be used is a bad request; a peering that exists already, a
    conflict; a peer that refused us or could not be reached, a bad gateway."""
    if reason.startswith("already peered"):
        return 409
    if reason.startswith("establish with"):
        return 502
    return 400


async def _peerings(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    return web.json_response({"now": time.time(), "peers": _peer_rows(plane)})


def _peer_rows(plane: ControlPlane) -> list[dict[str, Any]]:
    return [
        {
            "peer": s.peer,
            "state": s.state.value,
            "lastHeardAt": s.last_heard_at,
            "rttSeconds": s.rtt_seconds,
            "imported": s.imported,
            "exported": s.exported,
            "staleSince": s.stale_since,
            **_peer_trust(plane, s.peer),
        }
        for s in plane.peering.list()
    ]


def _peer_trust(plane: ControlPlane, peer: str) -> dict[str, Any]:
    """Who the peer is to us, its gateways, its bundle as we hold it and ours as it acked it."""
    view = plane.view.peers.get(peer)
    bundle = plane.view.peer_bundles.get(peer)
    return {
        "trustDomain": None if view is None else view.trust_domain.name,
        "gateways": [] if view is None else [f"{g.host}:{g.port}" for g in view.gateways],
        "bundleAcked": plane.peering.bundle_acked(peer),
        "bundle": None if bundle is None else _bundle(bundle),
    }


async def _delete_peering(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    try:
        await plane.peering.delete(request.match_info["peer"])
    except PeeringError as error:
        return _error(str(error), 404)
    return web.Response(status=204)


# --- Services and decisions ---


async def _services(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    if not plane.ready:
        return _error("the catalog or the policies are not loaded yet", 503)
    upstreams = plane.view.upstreams(time.time())
    return web.json_response(
        {"cluster": plane.cluster, "services": [_upstream(u) for _, u in sorted(upstreams.items())]}
    )


def _upstream(upstream: FederatedUpstream) -> dict[str, Any]:
    return {
        "service": upstream.key.name,
        "namespace": upstream.key.namespace,
        "note": upstream.note,
        "targets": [
            {
                "name": t.name,
                "cluster": t.cluster,
                "weight": t.weight,
                "stale": t.stale,
                "sni": t.sni,
                "trustDomain": t.trust_domain.name,
                "healthyEndpoints": t.healthy_endpoints,
                "endpoints": [
                    {"address": e.address, "port": e.port, "zone": e.zone, "healthy": e.healthy}
                    for e in t.endpoints
                ],
            }
            for t in upstream.targets
        ],
    }


async def _explain(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    service = request.match_info["service"]
    try:
        limit = int(request.query.get("limit", "0"))
    except ValueError:
        return _error("limit must be a whole number", 400)
    if limit < 0:
        return _error("limit must not be negative", 400)
    # Oldest first; with a limit, the newest ``limit`` records.
    records = plane.journal.for_service(service, caller_cluster=plane.cluster, limit=limit or None)
    live = plane.failover.last_decision(service, plane.cluster)
    now = time.time()
    upstream = _upstreams_by_name(plane, now).get(service)
    if not records and live is None and upstream is None:
        return _error(f"no service {service!r} here, and no decision about it", 404)
    policy = plane.failover.policies.get(service)
    shown: dict[str, Any] | None = None
    if live is not None:
        shown = {
            "at": live.at,
            "rule": live.rule.value,
            "mode": live.state.mode.value,
            "explanation": live.explanation,
            "weights": dict(live.weights),
            "expectedLatency": dict(live.expected_latency),
        }
    elif upstream is not None:
        shown = _default(upstream, now) | {"expectedLatency": {}}
    return web.json_response(
        {
            "service": service,
            "cluster": plane.cluster,
            "policy": None if policy is None else policy.metadata.name,
            "live": shown,
            "records": [r.to_json() for r in records],
        },
        dumps=_dumps,
    )


_DEFAULT = "default"
"""The mode and rule shown for a service the failover loop does not decide."""


def _default(upstream: FederatedUpstream | None, now: float) -> dict[str, Any]:
    """A service the failover loop does not decide (no callers here, no policy; see
    health/failover/loop.py): discovery's default weights, and why."""
    note = "" if upstream is None else f"; discovery's weights ({upstream.note})"
    return {
        "at": now,
        "rule": _DEFAULT,
        "mode": _DEFAULT,
        "explanation": f"default: no callers, no policy{note}",
        "weights": {} if upstream is None else upstream.weights(),
    }


def _upstreams_by_name(plane: ControlPlane, now: float) -> dict[str, FederatedUpstream]:
    """The federated upstreams by service name (the failover loop's key; the first
    namespace's if a name is in several)."""
    by_name: dict[str, FederatedUpstream] = {}
    for key, upstream in sorted(plane.view.upstreams(now).items(), reverse=True):
        by_name[key.name] = upstream
    return by_name


def _dumps(value: Any) -> str:
    # Journal records may hold infinities; JSON has no such number.
    return json.dumps(value, allow_nan=False, default=str)


# --- Status ---


async def _status(request: web.Request) -> web.Response:
    return web.json_response(status(request.app[PLANE]))


def status(plane: ControlPlane) -> dict[str, Any]:
    """Everything ``snapbright status`` and ``snapbright check`` look at, as JSON: readiness,
    policies, peers with their trust both ways, gateway probes, our CA and SVID, mirrors of
    imported services, what we export and where its endpoints are, proxies' acks and nacks,
    and the failover state per service."""
    now = time.time()
    probes = plane.prober.statuses() if plane.prober is not None else {}
    catalog = plane.catalog.current() if plane.catalog is not None else None
    policies = plane.policies.state
    svid = plane.svid()
    return {
        "cluster": plane.cluster,
        "mesh": plane.config.spec.mesh,
        "trustDomain": plane.trust_domain.name,
        "now": now,
        "startedAt": plane.started_at,
        "ready": {
            "catalog": plane.catalog is not None and plane.catalog.ready,
            "policies": plane.policies.ready,
        },
        "listeners": dict(plane.ports),
        "catalog": {
            "backend": plane.config.spec.catalog.backend,
            "index": None if catalog is None else catalog.index,
            "services": 0 if catalog is None else len(catalog.services),
            "endpoints": 0 if catalog is None else len(catalog.endpoints),
            "rejections": {}
            if plane.registry is None
            else {str(k): v for k, v in plane.registry.rejections.items()},
        },
        "peers": _peer_rows(plane),
        "gateways": [
            {
                "peer": peer,
                "alive": s.alive,
                "state": s.state.value,
                "rttSeconds": s.rtt,
                "lastError": s.last_error,
            }
            for peer, s in sorted(probes.items())
        ],
        "bundles": [_bundle(b) for b in plane.view.bundles()],
        "certificates": {
            "controlPlane": {
                "spiffeId": str(svid.spiffe_id),
                "notBefore": svid.leaf.not_valid_before_utc.timestamp(),
                "notAfter": svid.not_after.timestamp(),
                "renewAt": svid.renew_at.timestamp(),
            },
            "authorities": _authorities(plane),
        },
        "subscribers": [
            {
                "proxy": s.proxy,
                "role": s.proxy_class.role.value,
                "service": s.proxy_class.service,
                "sentVersion": s.sent_version,
                "ackedVersion": s.acked_version,
                "svidRenewAt": s.svid_renew_at.timestamp(),
            }
            for s in plane.discovery.subscribers()
        ],
        "nacks": [
            {"proxy": n.proxy, "version": n.version, "reason": n.reason, "at": _epoch(n.at)}
            for n in plane.discovery.nacks()
        ],
        "policies": {
            "ok": policies.ok,
            "errors": list(policies.errors),
            "attemptedAt": policies.attempted_at,
            "lastSuccessAt": policies.last_success_at,
            "files": list(policies.files),
        },
        "probeGateways": plane.config.spec.probe_gateways,
        "staleGraceSeconds": plane.config.spec.stale_grace,
        "mirrors": _mirrors(plane, now),
        "exports": _exports(plane, catalog),
        "failover": _failover(plane, now),
    }


def _mirrors(plane: ControlPlane, now: float) -> list[dict[str, Any]]:
    """Every service a peer exports to us, and the mirror target we route to (if any)."""
    targets = {
        (key.namespace, key.name, t.cluster): t
        for key, upstream in plane.view.upstreams(now).items()
        for t in upstream.targets
    }
    rows = []
    for name, peer in sorted(plane.view.peers.items()):
        for key in sorted(peer.imports, key=lambda k: (k.namespace, k.name)):
            target = targets.get((key.namespace, key.name, name))
            rows.append(
                {
                    "service": key.name,
                    "namespace": key.namespace,
                    "peer": name,
                    "present": target is not None,
                    "stale": target is not None and target.stale,
                    "staleSince": peer.unreachable_since,
                    "probeAlive": peer.probe_alive,
                    "endpoints": 0 if target is None else len(target.endpoints),
                    "healthyEndpoints": peer.imports[key].healthy_endpoints,
                }
            )
    return rows


def _exports(plane: ControlPlane, catalog: Catalog | None) -> list[dict[str, Any]]:
    """Every service we export, to whom, and where its local endpoints are."""
    peers_of: dict[tuple[str, str], list[str]] = {}
    for status in plane.peering.list():
        for service in plane.peering.book.exports_to(status.peer).snapshot().services:
            peers_of.setdefault((service.key.namespace, service.key.name), []).append(status.peer)
    return [
        {
            "service": name,
            "namespace": namespace,
            "peers": sorted(peers),
            "endpoints": []
            if catalog is None
            else [f"{e.address}:{e.port}" for e in catalog.endpoints_of(name, namespace)],
        }
        for (namespace, name), peers in sorted(peers_of.items())
    ]


def _failover(plane: ControlPlane, now: float) -> list[dict[str, Any]]:
    """The failover state of every (service, caller) we know of: the loop's live decision,
    or for a service it does not decide (no callers, no policy), the default weights."""
    pairs = dict.fromkeys(plane.health.pairs(now))
    pairs.update(dict.fromkeys((service, plane.cluster) for service in plane.failover.policies))
    rows = []
    upstreams: dict[str, FederatedUpstream] | None = None  # built once, if needed
    for service, caller in sorted(pairs):
        live = plane.failover.last_decision(service, caller)
        policy = plane.failover.policies.get(service)
        if live is None:
            if upstreams is None:
                upstreams = _upstreams_by_name(plane, now)
            default = _default(upstreams.get(service), now)
            rows.append(
                {
                    "service": service,
                    "caller": caller,
                    "policy": None if policy is None else policy.metadata.name,
                    **default,
                    "lastRecord": None,
                }
            )
            continue
        recorded = plane.journal.for_service(service, caller_cluster=caller, limit=1)
        rows.append(
            {
                "service": service,
                "caller": caller,
                "policy": None if policy is None else policy.metadata.name,
                "mode": live.state.mode.value,
                "weights": dict(live.weights),
                "rule": live.rule.value,
                "at": live.at,
                "lastRecord": None
                if not recorded
                else {
                    "rule": recorded[-1].rule.value,
                    "mode": recorded[-1].mode.value,
                    "unixTime": recorded[-1].unix_time,
                    "explanation": recorded[-1].explanation,
                },
            }
        )
    return rows


def _bundle(bundle: TrustBundle) -> dict[str, Any]:
    expiries = [root.not_valid_after_utc for root in bundle.roots]
    return {
        "trustDomain": bundle.trust_domain.name,
        "sequence": bundle.sequence,
        "roots": len(bundle.roots),
        "notAfter": min(expiries).timestamp() if expiries else None,
        "latestNotAfter": max(expiries).timestamp() if expiries else None,
        "refreshHintSeconds": bundle.refresh_hint_seconds,
    }


def _authorities(plane: ControlPlane) -> list[dict[str, Any]]:
    """Our CA's roots and intermediates, with their validity and when a retiring one leaves."""
    rows = []
    for authority in plane.ca().authorities:
        retire_at = None if authority.retire_at is None else authority.retire_at.timestamp()
        for kind, cert in (("root", authority.root), ("intermediate", authority.intermediate)):
            if cert is None:
                continue
            rows.append(
                {
                    "kind": kind,
                    "name": authority.name,
                    "notBefore": cert.not_valid_before_utc.timestamp(),
                    "notAfter": cert.not_valid_after_utc.timestamp(),
                    "retireAt": retire_at,
                }
            )
    return rows


def _epoch(value: datetime | float) -> float:
    return value.timestamp() if isinstance(value, datetime) else float(value)


# --- Registrations (embedded registry) ---


async def _register(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    registry = plane.registry
    if registry is None:
        return _error("this control plane reads Consul: register workloads with Consul", 409)
    try:
        body = await _body(request)
        registration, ttl = _registration(body, plane)
        index = registry.register(registration, ttl, time.time())
    except _BadRequest as error:
        return _error(error.reason, error.status)
    except RegistrationRejected as error:
        return _error(f"{error.rejection.reason}: {error.rejection.detail}", 422)
    return web.json_response({"id": registration.id, "index": index, "ttlSeconds": ttl})


def _registration(body: Mapping[str, Any], plane: ControlPlane) -> tuple[Registration, float]:
    workload_raw = body.get("workload")
    endpoint_raw = body.get("endpoint")
    if not isinstance(workload_raw, dict) or not isinstance(endpoint_raw, dict):
        raise _BadRequest("a registration needs a workload and an endpoint object")
    workload = admit_workload(
        {
            "name": workload_raw.get("name"),
            "namespace": workload_raw.get("namespace", "default"),
            "service_account": workload_raw.get("serviceAccount", "default"),
        }
    )
    if isinstance(workload, Rejection):
        raise _BadRequest(f"workload: {workload.reason}: {workload.detail}", 422)
    endpoint = admit_endpoint(
        {"namespace": workload.namespace, "workload": workload.name, **endpoint_raw},
        plane.admission,
    )
    if isinstance(endpoint, Rejection):
        raise _BadRequest(
            f"endpoint: {endpoint.reason}: {endpoint.subject}: {endpoint.detail}", 422
        )
    ttl = _ttl(body["ttl"]) if "ttl" in body else plane.config.spec.catalog.registration_ttl
    try:
        return Registration(str(body.get("id", "")), workload, endpoint), ttl
    except CatalogEntryError as error:
        raise _BadRequest(f"{error.rejection.reason}: {error.rejection.detail}", 422) from None


async def _heartbeat(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    if plane.registry is None:
        return _error("this control plane reads Consul: no registrations here", 409)
    if not plane.registry.heartbeat(request.match_info["id"], time.time()):
        return _error("no such registration (expired?): register again", 404)
    return web.json_response({"id": request.match_info["id"]})


async def _deregister(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    if plane.registry is None:
        return _error("this control plane reads Consul: no registrations here", 409)
    if not plane.registry.deregister(request.match_info["id"]):
        return _error("no such registration", 404)
    return web.Response(status=204)


# --- Probes and metrics ---


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[PLANE].metrics)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def _ready(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    if not plane.ready:
        return _error("not ready: the catalog or the policies are not loaded yet", 503)
    return web.json_response({"ready": True})


async def _live(_request: web.Request) -> web.Response:
    return web.json_response({"live": True, "at": datetime.now(UTC).timestamp()})
