"""One gateway process: config source, listener, probe endpoint, admin, signals, drain.

SIGHUP re-reads the config file (it is also re-read when it changes); a bad file keeps the
last good config and counts ``snapbright_config_reload_total{result="rejected"}``. The probe's
SVID and bundle files are re-read when they change, so a rotated SVID is served without a
restart. SIGTERM
or SIGINT starts a graceful drain: ``/ready`` turns 503, the listener closes, established
connections may finish for up to ``drainTimeout``, and then the rest are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

from gateway.admin import bound_port, start_admin
from gateway.config.file import gateway_config_source
from gateway.config.model import GatewayConfig, ProbeIdentity
from gateway.metrics import GatewayMetrics
from gateway.probe import ProbeIdentityError, ProbeServer, load_probe_identity
from gateway.server import Gateway
from proxy.config.source import ConfigSource, ReloadResult

_log = structlog.get_logger("gateway")
_IDENTITY_POLL = 5.0  # seconds between checks of the probe's SVID files (they rotate in hours)


async def serve(config_path: Path) -> None:
    """Run the gateway from ``config_path`` until SIGTERM or SIGINT, then drain."""
    metrics = GatewayMetrics()

    def counted(result: ReloadResult) -> None:
        if result.ok:
            metrics.reload_ok.inc()
            _log.info("config reloaded", path=str(config_path))
        else:
            metrics.reload_rejected.inc()
            _log.warning("config rejected, keeping the last good", reason=result.reason)

    source = gateway_config_source(config_path, on_reload=counted)
    config = source.current()
    probe: ProbeServer | None = None
    probe_upstream = None
    if config.spec.probe is not None:
        probe = ProbeServer(*load_probe_identity(config.spec.probe))
        probe_upstream = await probe.start()
    gateway = Gateway(config, metrics, probe_upstream=probe_upstream)
    await gateway.start()
    admin = await start_admin(config.spec.admin, metrics, lambda: gateway.accepting)
    # What start-up made (modules, config models) lives for good: out of the collector's
    # sight, so that a full collection on the request path walks only what requests made.
    gc.collect()
    gc.freeze()
    host, port = gateway.address
    _log.info(
        "gateway listening",
        address=f"{host}:{port}",
        admin=f"{config.spec.admin.address}:{bound_port(admin)}",
        forwarding=config.spec.forwarding,
    )

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    source.watch_sighup()
    follower = loop.create_task(_follow(source.updates(), gateway))
    watcher = None if probe is None else loop.create_task(_watch_identity(source, probe))
    try:
        await stop.wait()
        latest = source.current()
        _log.info("draining", grace_seconds=latest.spec.drain_timeout)
        forced = await gateway.drain(latest.spec.drain_timeout)
        _log.info("drained", closed_at_deadline=forced)
    finally:
        source.close()
        for task in (follower, watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await gateway.close()
        if probe is not None:
            await probe.close()
        await admin.cleanup()


async def _watch_identity(source: ConfigSource[GatewayConfig], probe: ProbeServer) -> None:
    """Re-read the probe's SVID and bundles when their files change (SVIDs rotate)."""
    stamp = _identity_stamp(source.current().spec.probe)
    while True:
        await asyncio.sleep(_IDENTITY_POLL)
        identity = source.current().spec.probe
        now = _identity_stamp(identity)
        if now == stamp or identity is None:
            continue
        stamp = now
        try:
            probe.rotate(*load_probe_identity(identity))
        except ProbeIdentityError as error:
            _log.warning("probe identity not reloaded, keeping the current one", reason=str(error))
        else:
            _log.info("probe identity reloaded")


def _identity_stamp(identity: ProbeIdentity | None) -> tuple[tuple[int, int] | None, ...]:
    if identity is None:
        return ()
    paths = [identity.certificate, identity.key, *(b.path for b in identity.bundles)]
    return tuple(_file_stamp(path) for path in paths)


def _file_stamp(path: str) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size)


async def _follow(updates: AsyncIterator[GatewayConfig], gateway: Gateway) -> None:
    async for config in updates:
        gateway.apply(config)


def run(config_path: Path) -> int:
    """Run :func:`serve` on uvloop when installed; the process exit code."""
    try:
        import uvloop  # optional: the gateway runs on plain asyncio too
    except ImportError:
        asyncio.run(serve(config_path))
    else:
        uvloop.run(serve(config_path))
    return 0
