"""The sidecar's admin listener on loopback: ``/metrics``, ``/ready`` and ``/live``.

Not the hot path, so it is aiohttp. ``/ready`` answers 200 once a configuration is in force
and the listeners are up, 503 while starting or draining.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.sidecar.metrics import SidecarMetrics

__all__ = ["bound_port", "start_admin"]

_METRICS: Final = web.AppKey("metrics", SidecarMetrics)
_READY: Final[web.AppKey[Callable[[], bool]]] = web.AppKey("ready")


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[_METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _ready(request: web.Request) -> web.Response:
    if request.app[_READY]():
        return web.Response(text="ready\n")
    return web.Response(status=503, text="not ready\n")


async def _live(request: web.Request) -> web.Response:
    return web.Response(text="live\n")


async def start_admin(
    address: str, port: int, metrics: SidecarMetrics, ready: Callable[[], bool]
) -> web.AppRunner:
    """Serve the admin endpoints on ``address:port``; ``await runner.cleanup()`` stops it."""
    app = web.Application()
    app[_METRICS] = metrics
    app[_READY] = ready
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/live", _live)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, address, port).start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port the admin listener got (useful when configured as 0)."""
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("the admin listener is not bound")
