"""The regional health dashboard over HTTP: the page, its JSON API and a server-sent event stream.

- ``GET /``: the page (static HTML, one ES module, one stylesheet; no inline script).
- ``GET /api/v1/state``: the whole view as JSON (``deploy/openapi/dashboard.yaml``).
- ``GET /api/v1/decisions?service=&limit=&after=``: the decision timeline, newest first.
- ``GET /api/v1/events?after=``: server-sent events: ``state`` (the whole view) whenever it
  changed, at most once per ``min_interval``; ``decision`` (one timeline entry, its ``id`` as
  the event id) for each new decision; a comment line as heartbeat when nothing else was sent
  for ``heartbeat`` seconds. A client that does not keep up is disconnected: the producer never
  waits for a reader. On connect the stream sends the current state, after the decisions newer
  than ``after`` (or ``Last-Event-ID``).

:func:`dashboard_app` builds the ``web.Application`` (mount it on the control plane's runner,
in the loop that also runs grpc.aio); :func:`start_dashboard` runs it alone on 127.0.0.1. Every
response carries a strict Content-Security-Policy and no CORS headers, and requests naming a
host other than the loopback names are refused (DNS rebinding), unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.typedefs import Handler, Middleware

from health.dashboard.model import DashboardState, decision_json, snapshot_json

__all__ = [
    "HUB",
    "STATE",
    "DashboardServer",
    "DashboardSettings",
    "EventHub",
    "dashboard_app",
    "start_dashboard",
]

_log = logging.getLogger(__name__)

STATIC: Final = Path(__file__).parent / "static"

CONTENT_SECURITY_POLICY: Final = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "::1"})

_MAX_LIMIT: Final = 500
_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@dataclass(frozen=True, slots=True)
class DashboardSettings:
    """How the event stream paces itself and which Host headers the server answers."""

    # At most one state event per this many seconds; changes in between are coalesced.
    min_interval: float = 0.5
    heartbeat: float = 15.0
    # Messages a client may have waiting before it is dropped as too slow.
    client_queue: int = 64
    # Decisions replayed to a (re)connecting client, and per broadcast at most.
    replay: int = 200
    # None answers any Host (behind a proxy that checks it).
    allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS

    def __post_init__(self) -> None:
        if self.min_interval < 0 or self.heartbeat <= 0 or self.client_queue < 1:
            raise ValueError("min_interval ≥ 0, heartbeat > 0 and client_queue ≥ 1 are required")


@dataclass(eq=False, slots=True)
class _Client:
    queue: asyncio.Queue[bytes]
    transport: asyncio.Transport | None
    dropped: bool = False


_END: Final = b""


class EventHub:
    """Fans the state's changes out to every connected event stream, never waiting on one."""

    def __init__(self, state: DashboardState, settings: DashboardSettings) -> None:
        self._state = state
        self._settings = settings
        self._clients: set[_Client] = set()
        self.dropped = 0

    @property
    def clients(self) -> int:
        """How many event streams are connected."""
        return len(self._clients)

    async def run(self) -> None:
        """Broadcast until cancelled."""
        loop = asyncio.get_running_loop()
        version = self._state.version
        newest = self._state.decisions(limit=1)
        last_id = newest[0].id if newest else 0
        last_sent = -float("inf")
        while True:
            await self._state.changed(version)
            wait = self._settings.min_interval - (loop.time() - last_sent)
            if wait > 0:
                await asyncio.sleep(wait)
            version = self._state.version
            if not self._clients:
                # Nobody listens, and the state costs O(services) to build: skip it. A stream
                # that connects later opens with the current state (and its own replay).
                newest = self._state.decisions(limit=1)
                last_id = newest[0].id if newest else last_id
                continue
            try:
                fresh = self._state.decisions(after=last_id, limit=self._settings.replay)
                messages = [_event("decision", decision_json(e), e.id) for e in reversed(fresh)]
                messages.append(_event("state", snapshot_json(self._state.snapshot())))
            except Exception:
                # A provider bug must not end the stream for good: the next change retries.
                _log.exception("dashboard state could not be read; skipping version %d", version)
                last_sent = loop.time()
                continue
            for message in messages:
                self._broadcast(message)
            if fresh:
                last_id = fresh[0].id
            last_sent = loop.time()

    def close(self) -> None:
        """End every stream (server shutdown)."""
        for client in list(self._clients):
            self._leave(client)
            try:
                client.queue.put_nowait(_END)
            except asyncio.QueueFull:
                self._abort(client)

    def _join(self, transport: asyncio.Transport | None) -> _Client:
        client = _Client(asyncio.Queue(self._settings.client_queue), transport)
        self._clients.add(client)
        return client

    def _leave(self, client: _Client) -> None:
        self._clients.discard(client)

    def _broadcast(self, message: bytes) -> None:
        for client in list(self._clients):
            try:
                client.queue.put_nowait(message)
            except asyncio.QueueFull:
                # Too slow: cut it off rather than buffer without bound or wait for it. The
                # browser reconnects and gets the current state.
                self._leave(client)
                self._abort(client)
                self.dropped += 1

    @staticmethod
    def _abort(client: _Client) -> None:
        client.dropped = True
        if client.transport is not None:
            # abort, not close: close would wait to flush to a reader that does not read.
            client.transport.abort()


STATE: Final = web.AppKey("dashboard_state", DashboardState)
"""The state the dashboard serves."""

HUB: Final = web.AppKey("dashboard_hub", EventHub)
"""The event stream fan-out (its ``clients`` and ``dropped`` counts)."""

_SETTINGS: Final = web.AppKey("dashboard_settings", DashboardSettings)


def dashboard_app(
    state: DashboardState, settings: DashboardSettings | None = None
) -> web.Application:
    """The dashboard as an aiohttp application: run it alone or ``add_subapp`` it (the page
    uses relative URLs, so any prefix works)."""
    chosen = settings if settings is not None else DashboardSettings()
    app = web.Application(middlewares=[_security_headers(chosen.allowed_hosts)])
    app[STATE] = state
    app[_SETTINGS] = chosen
    app[HUB] = EventHub(state, chosen)
    app.router.add_get("/", _index)
    app.router.add_get("/api/v1/state", _state)
    app.router.add_get("/api/v1/decisions", _decisions)
    app.router.add_get("/api/v1/events", _events)
    app.router.add_static("/static/", STATIC, append_version=False)
    app.cleanup_ctx.append(_run_hub)
    app.on_shutdown.append(_end_streams)
    return app


@dataclass(slots=True)
class DashboardServer:
    """A dashboard running on its own runner; ``url`` ends with ``/``."""

    runner: web.AppRunner
    host: str
    port: int
    app: web.Application = field(repr=False)

    @property
    def url(self) -> str:
        """The page's address."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def close(self) -> None:
        """Stop serving: end the event streams, then the listener."""
        await self.runner.cleanup()


async def start_dashboard(
    state: DashboardState,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    settings: DashboardSettings | None = None,
) -> DashboardServer:
    """Serve the dashboard on ``host:port`` (loopback by default: it is an admin endpoint;
    port 0 picks a free one)."""
    app = dashboard_app(state, settings)
    runner = web.AppRunner(app, shutdown_timeout=2.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    addresses = runner.addresses
    bound = int(addresses[0][1]) if addresses else port
    return DashboardServer(runner=runner, host=host, port=bound, app=app)


# --- Handlers ---


def _security_headers(allowed_hosts: frozenset[str] | None) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = (request.url.host or "").strip("[]").lower()
        if allowed_hosts is not None and host not in allowed_hosts:
            # A page on another origin that rebinds its name to 127.0.0.1 lands here.
            response: web.StreamResponse = web.json_response(
                {"error": "this dashboard answers only its own host names"}, status=421
            )
        else:
            try:
                response = await handler(request)
            except web.HTTPException as error:
                # 404s, 405s and our 400s are raised: they get the headers too.
                _secure(error.headers)
                raise
        _secure(response.headers)
        return response

    return middleware


def _secure(headers: MutableMapping[str, str]) -> None:
    for name, value in _SECURITY_HEADERS.items():
        headers.setdefault(name, value)


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


async def _state(request: web.Request) -> web.Response:
    return _json(snapshot_json(request.app[STATE].snapshot()))


async def _decisions(request: web.Request) -> web.Response:
    state = request.app[STATE]
    service = request.query.get("service") or None
    limit = _int_param(request, "limit", default=50, low=1, high=_MAX_LIMIT)
    after = _int_param(request, "after", default=0, low=0, high=2**63 - 1)
    entries = state.decisions(service=service, limit=limit, after=after)
    return _json({"cluster": state.cluster, "decisions": [decision_json(e) for e in entries]})


async def _events(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    settings = request.app[_SETTINGS]
    hub = request.app[HUB]
    after = _int_param(
        request,
        "after",
        default=_last_event_id(request),
        low=0,
        high=2**63 - 1,
    )
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    client = hub._join(request.transport)
    try:
        replay = state.decisions(after=after, limit=settings.replay) if after else ()
        opening = [b"retry: 2000\n\n"]
        opening += [_event("decision", decision_json(e), e.id) for e in reversed(replay)]
        opening.append(_event("state", snapshot_json(state.snapshot())))
        await response.write(b"".join(opening))
        while not client.dropped:
            try:
                message = await asyncio.wait_for(client.queue.get(), settings.heartbeat)
            except TimeoutError:
                message = b": heartbeat\n\n"
            if message == _END:
                break
            await response.write(message)
    except (ConnectionResetError, ClientConnectionResetError):
        pass  # the reader went away, or was dropped as too slow
    finally:
        hub._leave(client)
    return response


async def _run_hub(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[HUB].run(), name="dashboard-events")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _end_streams(app: web.Application) -> None:
    app[HUB].close()


def _event(name: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    # One line of JSON: it escapes CR and LF, so no value can end the event or start another.
    lines = f"event: {name}\n"
    if event_id is not None:
        lines += f"id: {event_id}\n"
    lines += f"data: {_dumps(data)}\n\n"
    return lines.encode()


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _json(data: Any) -> web.Response:
    return web.json_response(data, dumps=_dumps, headers={"Cache-Control": "no-store"})


def _last_event_id(request: web.Request) -> int:
    value = request.headers.get("Last-Event-ID", "")
    return int(value) if value.isdigit() and len(value) < 19 else 0


def _int_param(request: web.Request, name: str, *, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    if not text.isdigit() or len(text) > 19 or not low <= int(text) <= high:
        raise web.HTTPBadRequest(
            text=_dumps({"error": f"{name} must be an integer from {low} to {high}"}),
            content_type="application/json",
        )
    return int(text)
