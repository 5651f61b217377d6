"""The admin listener: ``/metrics`` (Prometheus), ``/ready`` and ``/live``.

Not the hot path, so it is aiohttp; it binds to loopback unless the config allows otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.config.model import AdminListener
from gateway.metrics import GatewayMetrics

_METRICS: Final = web.AppKey("metrics", GatewayMetrics)
_READY: Final[web.AppKey[Callable[[], bool]]] = web.AppKey("ready")


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[_METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _ready(request: web.Request) -> web.Response:
    if request.app[_READY]():
        return web.Response(text="ready\n")
    return web.Response(status=503, text="draining\n")


async def _live(request: web.Request) -> web.Response:
    return web.Response(text="live\n")


async def start_admin(
    listener: AdminListener, metrics: GatewayMetrics, ready: Callable[[], bool]
) -> web.AppRunner:
    """Serve the admin endpoints; ``ready`` says whether the gateway accepts connections.

    Returns the runner: ``await runner.cleanup()`` stops it.
    """
    app = web.Application()
    app[_METRICS] = metrics
    app[_READY] = ready
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/live", _live)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, listener.address, listener.port)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port the admin listener got (useful when configured as 0)."""
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("the admin listener is not bound")
