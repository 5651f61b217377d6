"""A Consul HTTP API fake: a real aiohttp server on 127.0.0.1 with scriptable misbehaviour.

What it imitates: the Consul HTTP API v1 as documented for Consul 1.20 (developer.hashicorp.com
/consul/api-docs), one agent that is also the only server, in datacenter ``dc1``, on one node
(``fake-node``), with ACLs disabled and the ``default`` namespace only. Endpoints:

- ``PUT /v1/agent/service/register`` (JSON body, field names case-insensitive as Consul's Go
  decoder treats them: ``Name``, ``ID``, ``Tags``, ``Address``, ``Port``, ``Meta``,
  ``Locality``, ``Check``/``Checks`` whose ``Status`` is the initial status, else
  ``critical`` as Consul starts checks) and ``PUT /v1/agent/service/deregister/<id>`` (404
  for an unknown id);
- ``GET /v1/catalog/services``: ``{name: [tags]}``;
- ``GET /v1/health/service/<name>`` with ``?passing`` (only entries whose checks all pass):
  ``[{Node, Service, Checks}]`` with the node's ``serfHealth`` check and one check per
  service;
- ``GET/PUT/DELETE /v1/kv/<key>`` with ``?acquire=``, ``?release=`` and ``?cas=``; GET returns
  ``[{Key, Value (base64), Flags, CreateIndex, ModifyIndex, LockIndex, Session}]`` or 404;
- ``PUT /v1/session/create`` (``Name``, ``TTL``, ``LockDelay``, ``Behavior``),
  ``PUT /v1/session/renew/<id>`` (404 once invalidated), ``PUT /v1/session/destroy/<id>``,
  ``GET /v1/session/info/<id>``.

Semantics kept faithfully: one Raft-like index that every write increments, reported in
``X-Consul-Index`` (per resource: the index of the last write that touched the service, the
services table or the key), with ``X-Consul-KnownLeader: true``; blocking queries
(``?index=N&wait=D``) return at once when ``N`` is 0 or the resource's index is above ``N``,
else when it rises or ``wait`` (default 5 m, capped at 10 m) runs out, returning the current
index either way; acquiring a lock needs a live session, fails while another session holds it
or during the lock-delay that follows an invalidated holder; invalidating a session (destroy
or TTL) releases (``behavior=release``) or deletes (``behavior=delete``) its keys.

What it does not do: ACLs, tokens, datacenters other than dc1, namespaces/partitions,
consistency modes (every read is consistent), Consul's own wait jitter (``wait/16``), the 2x
grace Consul allows before a TTL session is invalidated (this fake invalidates at the TTL; its
minimum TTL is the agent's ``session_ttl_min``, 10 s unless the test lowers it),
health-check execution (check statuses change only through :meth:`ConsulFake.set_status`),
``near``/``filter``/``tag`` query parameters, prepared queries, Connect, peering, txn.

Scriptable misbehaviour, each for the next ``times`` requests whose path starts with a
prefix: an HTTP error status (429, 500...), a hang before answering, a truncated JSON body, a
body of the test's choosing, a forced ``X-Consul-Index``; and at any time: spurious wake-ups
of blocked queries, an index that goes back (a restore or a new cluster: every index is
clamped to the given value), and a full outage (:meth:`stop` closes the listener and drops
connections, :meth:`start` serves the same state again on the same port).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
NODE = "fake-node"
DATACENTER = "dc1"

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: str) -> float:
    """A Go duration (``10s``, ``150ms``, ``1m30s``); a bare number is seconds."""
    if re.fullmatch(r"\d+", text):
        return float(text)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _lower_keys(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="Request decode failed: expected an object")
    return {str(k).lower(): v for k, v in body.items()}


@dataclass
class _Service:
    id: str
    name: str
    address: str
    port: int
    tags: list[str]
    meta: dict[str, str]
    locality: dict[str, str] | None
    status: str
    index: int


@dataclass
class _Key:
    value: bytes
    flags: int
    create_index: int
    modify_index: int
    lock_index: int = 0
    session: str | None = None


@dataclass
class _Session:
    id: str
    name: str
    ttl: float | None
    lock_delay: float
    behavior: str
    create_index: int
    expiry: asyncio.TimerHandle | None = None


@dataclass
class _Fault:
    prefix: str
    remaining: int
    status: int | None = None
    hang: float | None = None
    truncate: bool = False
    index: int | None = None
    body: bytes | None = None


@dataclass
class _Counters:
    """What clients asked, for tests that assert on traffic (e.g. only the leader writes)."""

    requests: dict[str, int] = field(default_factory=dict)

    def count(self, method: str, path: str) -> None:
        key = f"{method} {path}"
        self.requests[key] = self.requests.get(key, 0) + 1


class ConsulFake:
    """The fake agent. ``await start()``, use ``url``, ``await stop()``."""

    def __init__(self, *, node_address: str = "10.0.0.10", session_ttl_min: float = 10.0) -> None:
        self.node_address = node_address
        self.session_ttl_min = session_ttl_min
        self.index = 1
        self.catalog_index = 1
        self.kv_table_index = 1
        self.services: dict[str, _Service] = {}
        self.service_index: dict[str, int] = {}
        self.keys: dict[str, _Key] = {}
        self.sessions: dict[str, _Session] = {}
        self.lock_delay_until: dict[str, float] = {}
        self.counters = _Counters()
        self._faults: list[_Fault] = []
        self._changed = asyncio.Event()
        self._spurious = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (again) on 127.0.0.1; the first start picks a free port, later ones reuse it."""

        @web.middleware
        async def misbehave(request: web.Request, handler: _Handler) -> web.StreamResponse:
            return await self._misbehave(request, handler)

        app = web.Application(middlewares=[misbehave])
        app.router.add_put("/v1/agent/service/register", self._register)
        app.router.add_put("/v1/agent/service/deregister/{id}", self._deregister)
        app.router.add_get("/v1/catalog/services", self._catalog_services)
        app.router.add_get("/v1/health/service/{name}", self._health_service)
        app.router.add_get("/v1/kv/{key:.+}", self._kv_get)
        app.router.add_put("/v1/kv/{key:.+}", self._kv_put)
        app.router.add_delete("/v1/kv/{key:.+}", self._kv_delete)
        app.router.add_put("/v1/session/create", self._session_create)
        app.router.add_put("/v1/session/renew/{id}", self._session_renew)
        app.router.add_put("/v1/session/destroy/{id}", self._session_destroy)
        app.router.add_get("/v1/session/info/{id}", self._session_info)
        runner = web.AppRunner(app, shutdown_timeout=0.05, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            self.port = int(runner.addresses[0][1])
        self._runner = runner

    async def stop(self) -> None:
        """An outage: stop listening and drop every connection, blocked queries included."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- scripting ---------------------------------------------------------------------------

    def fail_next(self, prefix: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` matching requests with ``status`` (e.g. 429, 500)."""
        self._faults.append(_Fault(prefix, times, status=status))

    def hang_next(self, prefix: str, seconds: float, times: int = 1) -> None:
        """Hold the next matching requests ``seconds`` before serving them normally."""
        self._faults.append(_Fault(prefix, times, hang=seconds))

    def truncate_next(self, prefix: str, times: int = 1) -> None:
        """Serve the next matching responses with half their JSON body (status 200)."""
        self._faults.append(_Fault(prefix, times, truncate=True))

    def report_index_next(self, prefix: str, index: int, times: int = 1) -> None:
        """Send ``X-Consul-Index: index`` on the next matching responses (e.g. 0)."""
        self._faults.append(_Fault(prefix, times, index=index))

    def body_next(self, prefix: str, body: bytes, times: int = 1) -> None:
        """Serve the next matching responses (status 200, real headers) with ``body``."""
        self._faults.append(_Fault(prefix, times, body=body))

    def wake_spuriously(self) -> None:
        """Return every blocked query now, with nothing changed (same index, same data)."""
        self._spurious += 1
        self._wake()

    def reset_index(self, to: int) -> None:
        """Make indexes go back, as after a snapshot restore: every index is clamped to ``to``.

        Blocked queries are not woken: like Consul, they wait for their index to be passed.
        """
        self.index = to
        self.catalog_index = min(self.catalog_index, to)
        self.kv_table_index = min(self.kv_table_index, to)
        self.service_index = {k: min(v, to) for k, v in self.service_index.items()}
        for entry in self.keys.values():
            entry.modify_index = min(entry.modify_index, to)
            entry.create_index = min(entry.create_index, to)

    def put_service(
        self,
        name: str,
        address: str,
        port: int,
        *,
        service_id: str | None = None,
        tags: list[str] | None = None,
        meta: dict[str, str] | None = None,
        status: str = "passing",
        zone: str | None = None,
    ) -> None:
        """Register a service instance directly (what another agent's workload would do)."""
        self._put_service(
            _Service(
                id=service_id or name,
                name=name,
                address=address,
                port=port,
                tags=tags or [],
                meta=meta or {},
                locality={"Zone": zone} if zone else None,
                status=status,
                index=0,
            )
        )

    def remove_service(self, service_id: str) -> None:
        """Deregister a service instance directly."""
        self._remove_service(service_id)

    def set_status(self, service_id: str, status: str) -> None:
        """Change the status of a service instance's check."""
        service = self.services[service_id]
        service.status = status
        self._touch_service(service.name)

    # -- writes --------------------------------------------------------------------------------

    def _write(self) -> int:
        self.index += 1
        return self.index

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _touch_service(self, name: str) -> None:
        index = self._write()
        self.service_index[name] = index
        self.catalog_index = index
        self._wake()

    def _put_service(self, service: _Service) -> None:
        old = self.services.get(service.id)
        self.services[service.id] = service
        if old is not None and old.name != service.name:
            self._touch_service(old.name)
        self._touch_service(service.name)
        service.index = self.index

    def _remove_service(self, service_id: str) -> None:
        service = self.services.pop(service_id)
        self._touch_service(service.name)

    def _set_key(self, key: str, entry: _Key | None) -> None:
        index = self._write()
        if entry is None:
            self.keys.pop(key, None)
        else:
            entry.modify_index = index
            self.keys[key] = entry
        self.kv_table_index = index
        self._wake()

    def _invalidate(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        if session.expiry is not None:
            session.expiry.cancel()
        now = asyncio.get_running_loop().time()
        for key, entry in list(self.keys.items()):
            if entry.session != session_id:
                continue
            if session.lock_delay > 0:
                self.lock_delay_until[key] = now + session.lock_delay
            if session.behavior == "delete":
                self._set_key(key, None)
            else:
                entry.session = None
                self._set_key(key, entry)
        self._write()
        self._wake()

    def _arm_ttl(self, session: _Session) -> None:
        if session.expiry is not None:
            session.expiry.cancel()
        if session.ttl is not None:
            loop = asyncio.get_running_loop()
            session.expiry = loop.call_later(session.ttl, self._invalidate, session.id)

    # -- HTTP plumbing ---------------------------------------------------------------------

    async def _misbehave(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        self.counters.count(request.method, request.path)
        fault = self._take_fault(request.path)
        if fault is not None and fault.hang is not None:
            await asyncio.sleep(fault.hang)
        if fault is not None and fault.status is not None:
            return web.Response(status=fault.status, text=f"fake: scripted {fault.status}\n")
        response = await handler(request)
        if fault is not None and isinstance(response, web.Response):
            if fault.index is not None:
                response.headers["X-Consul-Index"] = str(fault.index)
            if fault.body is not None:
                response.body = fault.body
            if fault.truncate and response.body is not None:
                body = bytes(response.body)  # type: ignore[arg-type]
                response.body = body[: len(body) // 2]
        return response

    def _take_fault(self, path: str) -> _Fault | None:
        for fault in self._faults:
            if path.startswith(fault.prefix) and fault.remaining > 0:
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                return fault
        return None

    async def _block(self, request: web.Request, index_of: Callable[[], int]) -> None:
        """Hold a blocking query until its resource's index passes ``?index`` or ``wait``."""
        raw_index = request.query.get("index")
        if raw_index is None:
            return
        try:
            requested = int(raw_index)
            wait = min(_duration(request.query.get("wait", "5m")), MAX_WAIT)
        except ValueError as error:
            raise web.HTTPBadRequest(text=f"Invalid blocking query: {error}") from None
        if requested <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        spurious = self._spurious
        while index_of() <= requested and spurious == self._spurious:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return

    def _json(self, data: object, index: int, status: int = 200) -> web.Response:
        return web.Response(
            status=status,
            text=json.dumps(data),
            content_type="application/json",
            headers={
                "X-Consul-Index": str(index),
                "X-Consul-KnownLeader": "true",
                "X-Consul-LastContact": "0",
            },
        )

    async def _body(self, request: web.Request) -> dict[str, Any]:
        text = await request.text()
        if not text:
            return {}
        try:
            return _lower_keys(json.loads(text))
        except json.JSONDecodeError:
            raise web.HTTPBadRequest(text="Request decode failed: invalid JSON") from None

    # -- agent and catalog -------------------------------------------------------------------

    async def _register(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise web.HTTPBadRequest(text="Missing service name")
        checks = list(body.get("checks") or [])
        if body.get("check"):
            checks.append(body["check"])
        status = "passing"
        if checks:
            first = _lower_keys(checks[0])
            status = str(first.get("status") or "critical")
        locality = body.get("locality")
        self._put_service(
            _Service(
                id=str(body.get("id") or name),
                name=name,
                address=str(body.get("address") or ""),
                port=int(body.get("port") or 0),
                tags=list(body.get("tags") or []),
                meta=dict(body.get("meta") or {}),
                locality=dict(locality) if isinstance(locality, dict) else None,
                status=status,
                index=0,
            )
        )
        return web.Response(text="")

    async def _deregister(self, request: web.Request) -> web.Response:
        service_id = request.match_info["id"]
        if service_id not in self.services:
            raise web.HTTPNotFound(text=f'Unknown service ID "{service_id}". Ensure that ...')
        self._remove_service(service_id)
        return web.Response(text="")

    async def _catalog_services(self, request: web.Request) -> web.Response:
        await self._block(request, lambda: self.catalog_index)
        listing: dict[str, list[str]] = {}
        for service in self.services.values():
            tags = listing.setdefault(service.name, [])
            tags.extend(t for t in service.tags if t not in tags)
        return self._json(listing, self.catalog_index)

    async def _health_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await self._block(request, lambda: self.service_index.get(name, self.catalog_index))
        passing_only = "passing" in request.query
        entries = []
        for service in self.services.values():
            if service.name != name or (passing_only and service.status != "passing"):
                continue
            entries.append(self._health_entry(service))
        return self._json(entries, self.service_index.get(name, self.catalog_index))

    def _health_entry(self, service: _Service) -> dict[str, Any]:
        described: dict[str, Any] = {
            "ID": service.id,
            "Service": service.name,
            "Tags": service.tags,
            "Address": service.address,
            "Meta": service.meta,
            "Port": service.port,
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": False,
            "CreateIndex": service.index,
            "ModifyIndex": service.index,
        }
        if service.locality is not None:
            described["Locality"] = service.locality
        return {
            "Node": {
                "ID": "00000000-0000-0000-0000-000000000001",
                "Node": NODE,
                "Address": self.node_address,
                "Datacenter": DATACENTER,
                "TaggedAddresses": {"lan": self.node_address, "wan": self.node_address},
                "Meta": {},
            },
            "Service": described,
            "Checks": [
                {
                    "Node": NODE,
                    "CheckID": "serfHealth",
                    "Name": "Serf Health Status",
                    "Status": "passing",
                    "ServiceID": "",
                    "ServiceName": "",
                },
                {
                    "Node": NODE,
                    "CheckID": f"service:{service.id}",
                    "Name": f"Service '{service.name}' check",
                    "Status": service.status,
                    "ServiceID": service.id,
                    "ServiceName": service.name,
                },
            ],
        }

    # -- KV ------------------------------------------------------------------------------------

    def _kv_index(self, key: str) -> int:
        entry = self.keys.get(key)
        return entry.modify_index if entry is not None else self.kv_table_index

    async def _kv_get(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        await self._block(request, lambda: self._kv_index(key))
        entry = self.keys.get(key)
        if entry is None:
            response = self._json(None, self.kv_table_index, status=404)
            response.text = ""
            return response
        described: dict[str, Any] = {
            "Key": key,
            "Value": base64.b64encode(entry.value).decode() if entry.value else None,
            "Flags": entry.flags,
            "CreateIndex": entry.create_index,
            "ModifyIndex": entry.modify_index,
            "LockIndex": entry.lock_index,
        }
        if entry.session is not None:
            described["Session"] = entry.session
        return self._json([described], entry.modify_index)

    async def _kv_put(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        value = await request.read()
        flags = int(request.query.get("flags", "0"))
        entry = self.keys.get(key)
        if "cas" in request.query:
            cas = int(request.query["cas"])
            current = 0 if entry is None else entry.modify_index
            if cas != current:
                return self._json(False, self.index)
        acquire = request.query.get("acquire")
        release = request.query.get("release")
        if acquire is not None:
            return self._acquire(key, entry, acquire, value, flags)
        if release is not None:
            if entry is None or entry.session != release:
                return self._json(False, self.index)
            entry.session = None
            entry.value, entry.flags = value, flags
            self._set_key(key, entry)
            return self._json(True, self.index)
        if entry is None:
            entry = _Key(value, flags, create_index=self.index + 1, modify_index=0)
        else:
            entry.value, entry.flags = value, flags
        self._set_key(key, entry)
        return self._json(True, self.index)

    def _acquire(
        self, key: str, entry: _Key | None, session_id: str, value: bytes, flags: int
    ) -> web.Response:
        if session_id not in self.sessions:
            raise web.HTTPInternalServerError(text=f"invalid session {session_id!r}")
        now = asyncio.get_running_loop().time()
        if entry is not None and entry.session not in (None, session_id):
            return self._json(False, self.index)
        if self.lock_delay_until.get(key, 0.0) > now:
            return self._json(False, self.index)
        if entry is None:
            entry = _Key(value, flags, create_index=self.index + 1, modify_index=0)
        if entry.session != session_id:
            entry.lock_index += 1
            entry.session = session_id
        entry.value, entry.flags = value, flags
        self._set_key(key, entry)
        return self._json(True, self.index)

    async def _kv_delete(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if key in self.keys:
            self._set_key(key, None)
        return self._json(True, self.index)

    # -- sessions ------------------------------------------------------------------------------

    async def _session_create(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        try:
            ttl = _duration(body["ttl"]) if body.get("ttl") else None
            lock_delay = _duration(str(body.get("lockdelay", "15s")))
        except ValueError as error:
            raise web.HTTPBadRequest(text=f"Request decode failed: {error}") from None
        if ttl is not None and not self.session_ttl_min <= ttl <= 86400:
            raise web.HTTPBadRequest(text="Invalid Session TTL: out of range")
        behavior = str(body.get("behavior") or "release")
        if behavior not in ("release", "delete"):
            raise web.HTTPBadRequest(text=f"Invalid Behavior setting '{behavior}'")
        session = _Session(
            id=str(uuid.uuid4()),
            name=str(body.get("name") or ""),
            ttl=ttl,
            lock_delay=lock_delay,
            behavior=behavior,
            create_index=self._write(),
        )
        self.sessions[session.id] = session
        self._arm_ttl(session)
        return self._json({"ID": session.id}, self.index)

    def _describe(self, session: _Session) -> dict[str, Any]:
        return {
            "ID": session.id,
            "Name": session.name,
            "Node": NODE,
            "LockDelay": int(session.lock_delay * 1e9),
            "Behavior": session.behavior,
            "TTL": f"{session.ttl:g}s" if session.ttl is not None else "",
            "NodeChecks": ["serfHealth"],
            "ServiceChecks": None,
            "CreateIndex": session.create_index,
            "ModifyIndex": session.create_index,
        }

    async def _session_renew(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            raise web.HTTPNotFound(text=f"Session id '{request.match_info['id']}' not found")
        self._arm_ttl(session)
        return self._json([self._describe(session)], self.index)

    async def _session_destroy(self, request: web.Request) -> web.Response:
        self._invalidate(request.match_info["id"])
        return self._json(True, self.index)

    async def _session_info(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["id"])
        return self._json([] if session is None else [self._describe(session)], self.index)
