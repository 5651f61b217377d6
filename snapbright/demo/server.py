"""The demo app process: an HTTP/1.1 echo, a gRPC echo, and optionally a caller.

HTTP (aiohttp: this is the app, not the proxy):

- any path: after the knobs' delay, ``200`` with JSON naming the service, cluster, replica,
  method, path and the caller identity the sidecar passed on (``x-snapbright-peer-id``), or
  ``503`` when the knobs' error rate says so;
- ``GET /healthz``: ``200`` at once, knobs or not (health is the app's, not the demo's faults);
- ``GET|POST /_demo/knobs``: read or change latency, jitter and error rate while running
  (``{"latency": "200ms", "jitter": "20ms", "errorRate": "10%"}``, only what is given
  changes; ``{"reset": true}`` goes back to the knobs the app started with);
- ``GET /_demo/calls``: the caller's view of its upstreams.

The ``/_demo/`` paths are local only: from a loopback address and not through a sidecar (a
request carrying ``x-snapbright-peer-id`` came from the mesh, so it is refused with 403).

gRPC (``snapbright.demo.v1.Echo/Echo``): the same answer and knobs (errors as UNAVAILABLE),
the caller identity read from the same name in the metadata.

With upstreams, the app also calls each one at ``rate`` per second through the given URL (its
sidecar's outbound listener, with ``Host`` set to the upstream's name), and prints one line per
upstream every ``report_every`` seconds: calls, errors, p50/p99 and which clusters answered.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Self, TextIO

import aiohttp
import grpc
from aiohttp import web
from pydantic import ValidationError

from snapbright.demo.api.v1 import echo_pb2, echo_pb2_grpc
from snapbright.demo.core import CallSummary, CallWindow, Knobs, KnobsUpdate, plan

__all__ = ["PEER_ID_HEADER", "DemoApp", "DemoSettings", "Upstream", "serve_demo_app"]

PEER_ID_HEADER = "x-snapbright-peer-id"
"""The header (and gRPC metadata key) in which the sidecar passes the caller's SPIFFE ID."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """A service the app calls, and the URL it calls it through."""

    name: str
    url: str


@dataclass(frozen=True, slots=True)
class DemoSettings:
    """One replica of a demo service."""

    name: str
    cluster: str
    replica: str = "0"
    host: str = "127.0.0.1"
    port: int = 0
    grpc_port: int | None = None
    knobs: Knobs = field(default_factory=Knobs)
    upstreams: tuple[Upstream, ...] = ()
    rate: float = 2.0
    report_every: float = 5.0
    call_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not self.name or not self.cluster:
            raise ValueError("a demo app needs a service name and a cluster")
        if self.rate <= 0:
            raise ValueError(f"rate must be above 0 calls per second, not {self.rate!r}")


class DemoApp:
    """A running demo replica: `start` it, read its ports, change its knobs, `close` it."""

    def __init__(
        self, settings: DemoSettings, *, rng: random.Random | None = None, out: TextIO | None = None
    ) -> None:
        self.settings = settings
        self.knobs = settings.knobs
        self._rng = rng if rng is not None else random.Random()
        self._out = out if out is not None else sys.stdout
        self._windows = {upstream.name: CallWindow() for upstream in settings.upstreams}
        self._runner: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._port = 0
        self._grpc_port: int | None = None

    async def start(self) -> Self:
        """Listen (HTTP, and gRPC if asked) and start calling the upstreams."""
        try:
            app = web.Application()
            me: DemoApp = self
            app[_DEMO] = me
            app.router.add_get("/healthz", _healthz)
            app.router.add_route("GET", "/_demo/knobs", _get_knobs)
            app.router.add_route("POST", "/_demo/knobs", _set_knobs)
            app.router.add_get("/_demo/calls", _calls)
            app.router.add_route("*", "/{tail:.*}", _echo)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            await self._runner.setup()
            await web.TCPSite(self._runner, self.settings.host, self.settings.port).start()
            self._port = self._runner.addresses[0][1]
            if self.settings.grpc_port is not None:
                self._grpc = grpc.aio.server()
                echo_pb2_grpc.add_EchoServicer_to_server(_EchoServicer(self), self._grpc)
                address = f"{self.settings.host}:{self.settings.grpc_port}"
                self._grpc_port = self._grpc.add_insecure_port(address)
                await self._grpc.start()
            for upstream in self.settings.upstreams:
                self._tasks.append(asyncio.create_task(self._call_loop(upstream)))
            if self.settings.upstreams:
                self._tasks.append(asyncio.create_task(self._report_loop()))
        except BaseException:
            await self.close()
            raise
        return self

    @property
    def port(self) -> int:
        """The HTTP port bound."""
        return self._port

    @property
    def grpc_port(self) -> int | None:
        """The gRPC port bound, if gRPC was asked for."""
        return self._grpc_port

    def calls(self, upstream: str) -> CallSummary:
        """The caller's view of ``upstream`` over the last seconds."""
        return self._windows[upstream].summary(time.monotonic())

    def answer(self, request: web.Request) -> dict[str, Any]:
        """The JSON an echo answers with."""
        settings = self.settings
        return {
            "service": settings.name,
            "cluster": settings.cluster,
            "replica": settings.replica,
            "method": request.method,
            "host": request.host,
            "path": request.path,
            "peerId": request.headers.get(PEER_ID_HEADER),
        }

    async def misbehave(self) -> bool:
        """Wait as the knobs say; whether this request should then fail."""
        delay, fail = plan(self.knobs, self._rng)
        if delay > 0.0:
            await asyncio.sleep(delay)
        return fail

    async def _call_loop(self, upstream: Upstream) -> None:
        window = self._windows[upstream.name]
        interval = 1.0 / self.settings.rate
        timeout = aiohttp.ClientTimeout(total=self.settings.call_timeout)
        headers = {"Host": upstream.name}
        async with aiohttp.ClientSession(timeout=timeout) as session:
            next_at = time.monotonic()
            while True:
                started = time.monotonic()
                ok, cluster = False, None
                try:
                    async with session.get(upstream.url, headers=headers) as response:
                        body = await response.read()
                        ok = response.status < 500
                        cluster = _cluster_of(body)
                except (aiohttp.ClientError, TimeoutError):
                    pass
                ended = time.monotonic()
                window.record(ended, ended - started, ok, cluster)
                # A fixed rate, not fixed gaps: a slow call does not slow the calls after it
                # beyond the one in flight.
                next_at = max(next_at + interval, ended)
                await asyncio.sleep(next_at - ended)

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.report_every)
            for upstream in self.settings.upstreams:
                line = self.calls(upstream.name).line(upstream.name)
                print(f"{self.settings.name}@{self.settings.cluster} → {line}", file=self._out)
            self._out.flush()

    async def close(self) -> None:
        """Stop calling and serving."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._grpc is not None:
            await self._grpc.stop(grace=0.5)
            self._grpc = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _cluster_of(body: bytes) -> str | None:
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    cluster = answer.get("cluster") if isinstance(answer, dict) else None
    return cluster if isinstance(cluster, str) else None


_DEMO: web.AppKey[DemoApp] = web.AppKey("demo", DemoApp)


async def serve_demo_app(settings: DemoSettings, *, out: TextIO | None = None) -> None:
    """Run a demo replica until cancelled."""
    app = await DemoApp(settings, out=out).start()
    try:
        await asyncio.Event().wait()
    finally:
        await app.close()


async def _echo(request: web.Request) -> web.Response:
    demo = request.app[_DEMO]
    await request.read()
    fail = await demo.misbehave()
    answer = demo.answer(request)
    if fail:
        answer["error"] = "failed on purpose (the demo app's error rate)"
        return web.json_response(answer, status=503)
    return web.json_response(answer)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _local_only(request: web.Request) -> web.Response | None:
    try:
        loopback = ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        loopback = False
    if not loopback or PEER_ID_HEADER in request.headers:
        return web.json_response(
            {"error": "the demo's own endpoints are local only (not through the mesh)"},
            status=403,
        )
    return None


async def _get_knobs(request: web.Request) -> web.Response:
    refused = _local_only(request)
    if refused is not None:
        return refused
    return web.json_response(request.app[_DEMO].knobs.to_json())


async def _set_knobs(request: web.Request) -> web.Response:
    refused = _local_only(request)
    if refused is not None:
        return refused
    demo = request.app[_DEMO]
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": "the body must be a JSON object"}, status=400)
    try:
        demo.knobs = KnobsUpdate.model_validate(body).apply(demo.knobs, demo.settings.knobs)
    except ValidationError as error:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()
        )
        return web.json_response({"error": reasons}, status=400)
    except ValueError as error:
        return web.json_response({"error": str(error)}, status=400)
    return web.json_response(demo.knobs.to_json())


async def _calls(request: web.Request) -> web.Response:
    refused = _local_only(request)
    if refused is not None:
        return refused
    demo = request.app[_DEMO]
    return web.json_response(
        {u.name: demo.calls(u.name).to_json() for u in demo.settings.upstreams}
    )


class _EchoServicer(echo_pb2_grpc.EchoServicer):
    def __init__(self, demo: DemoApp) -> None:
        self._demo = demo

    async def Echo(
        self,
        request: echo_pb2.EchoRequest,
        context: grpc.aio.ServicerContext[echo_pb2.EchoRequest, echo_pb2.EchoReply],
    ) -> echo_pb2.EchoReply:
        demo = self._demo
        if await demo.misbehave():
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "failed on purpose (the demo app's error rate)"
            )
        peer_id = ""
        for key, value in context.invocation_metadata() or ():
            if key == PEER_ID_HEADER and isinstance(value, str):
                peer_id = value
        settings = demo.settings
        return echo_pb2.EchoReply(
            message=request.message,
            service=settings.name,
            cluster=settings.cluster,
            replica=settings.replica,
            peer_id=peer_id,
        )
