"""The WAN emulator process: its forwarders, its links, and its admin API on 127.0.0.1.

Admin API (JSON; durations as ``120ms``, bandwidth as ``100Mbps``):

- ``GET /links``: every directed link, its shape and what it has carried.
- ``POST /links/{from}/{to}``: change a running link (a `LinkUpdate`: only the fields given
  change; both directions unless ``oneWay``); answers with the links changed. 404 for a pair
  the emulator does not know, 400 for a bad value.
- ``GET /healthz``.

`serve_wan` runs it until cancelled; `WanEmulator` is the same with a handle (ports bound,
links) for whoever embeds it (``snapbright up``, tests).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any, Self

from aiohttp import web
from pydantic import ValidationError

from snapbright.wan.core import LinkShape
from snapbright.wan.forwarder import Forwarder, Link
from snapbright.wan.model import LinkUpdate, WanConfig, format_bandwidth

__all__ = ["LinkStatus", "UnknownLink", "WanEmulator", "serve_wan"]


class UnknownLink(LookupError):
    """A change named a pair of clusters the emulator has no link between."""


@dataclass(frozen=True, slots=True)
class LinkStatus:
    """One directed link as the admin API shows it."""

    source: str
    destination: str
    shape: LinkShape
    connections: int
    delivered_bytes: int
    retransmits: int

    def to_json(self) -> dict[str, Any]:
        """The admin API's JSON for this link."""
        shape = self.shape
        return {
            "from": self.source,
            "to": self.destination,
            "latency": _ms(shape.latency),
            "jitter": _ms(shape.jitter),
            "loss": shape.loss,
            "bandwidth": format_bandwidth(shape.bandwidth),
            "partition": shape.partition,
            "reset": shape.reset,
            "connections": self.connections,
            "deliveredBytes": self.delivered_bytes,
            "retransmits": self.retransmits,
        }


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000, 3):g}ms"


class WanEmulator:
    """Forwarders over shaped links, and the admin API that reshapes them while they run."""

    def __init__(self, config: WanConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng if rng is not None else random.Random(config.seed)
        self._links: dict[tuple[str, str], Link] = {}
        self._forwarders: list[Forwarder] = []
        self._runner: web.AppRunner | None = None
        self._listen_ports: tuple[int, ...] = ()
        self._admin_port = 0

    async def start(self) -> Self:
        """Bind every forward and the admin API."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        self._links = {
            pair: Link(pair[0], pair[1], shape, now) for pair, shape in self.config.shapes().items()
        }
        try:
            for forward in self.config.forwards:
                a, b = forward.link
                self._forwarders.append(
                    Forwarder(forward, self._links[(a, b)], self._links[(b, a)], self._rng, loop)
                )
            self._listen_ports = tuple([await f.start() for f in self._forwarders])
            app = web.Application()
            emulator: WanEmulator = self
            app[_EMULATOR] = emulator
            app.router.add_get("/links", _list_links)
            app.router.add_post("/links/{source}/{destination}", _update_link)
            app.router.add_get("/healthz", _healthz)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.config.admin_host, self.config.admin_port)
            await site.start()
            self._admin_port = self._runner.addresses[0][1]
        except BaseException:
            await self.close()
            raise
        return self

    @property
    def admin_port(self) -> int:
        """The admin API's port on 127.0.0.1."""
        return self._admin_port

    @property
    def listen_ports(self) -> tuple[int, ...]:
        """The port each forward listens on, in the config's order."""
        return self._listen_ports

    def links(self) -> list[LinkStatus]:
        """Every directed link, sorted by (from, to)."""
        return [self._status(self._links[pair]) for pair in sorted(self._links)]

    def update(self, source: str, destination: str, change: LinkUpdate) -> list[LinkStatus]:
        """Reshape ``source`` → ``destination`` (and back, unless one way) now.

        `UnknownLink` for a pair with no link; `ValueError` if the result is not a valid link
        (then nothing changes).
        """
        pairs = [(source, destination)]
        if not change.one_way:
            pairs.append((destination, source))
        missing = [pair for pair in pairs if pair not in self._links]
        if missing:
            known = ", ".join(f"{a}→{b}" for a, b in sorted(self._links)) or "none"
            raise UnknownLink(f"no link {missing[0][0]}→{missing[0][1]}; links: {known}")
        shapes = [change.apply(self._links[pair].shape) for pair in pairs]
        now = time.monotonic()
        for pair, shape in zip(pairs, shapes, strict=True):
            self._links[pair].reshape(shape, now)
        for forwarder in self._forwarders:
            forwarder.healed()
        return [self._status(self._links[pair]) for pair in pairs]

    def _status(self, link: Link) -> LinkStatus:
        connections = sum(
            len(f.connections)
            for f in self._forwarders
            if (f.up.source, f.up.destination) == (link.source, link.destination)
        )
        return LinkStatus(
            link.source,
            link.destination,
            link.shape,
            connections,
            link.delivered,
            link.retransmits,
        )

    async def close(self) -> None:
        """Stop the admin API and every forwarder, dropping their connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await asyncio.gather(*(f.close() for f in self._forwarders))
        self._forwarders = []


_EMULATOR: web.AppKey[WanEmulator] = web.AppKey("emulator", WanEmulator)


async def serve_wan(config: WanConfig, *, rng: random.Random | None = None) -> None:
    """Run the emulator until cancelled."""
    emulator = await WanEmulator(config, rng=rng).start()
    try:
        await asyncio.Event().wait()
    finally:
        await emulator.close()


async def _list_links(request: web.Request) -> web.Response:
    emulator = request.app[_EMULATOR]
    return web.json_response({"links": [status.to_json() for status in emulator.links()]})


async def _update_link(request: web.Request) -> web.Response:
    emulator = request.app[_EMULATOR]
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "the body must be a JSON object")
    try:
        change = LinkUpdate.model_validate(body)
        statuses = emulator.update(
            request.match_info["source"], request.match_info["destination"], change
        )
    except ValidationError as error:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()
        )
        return _error(400, reasons)
    except UnknownLink as error:
        return _error(404, str(error))
    except ValueError as error:
        return _error(400, str(error))
    return web.json_response({"links": [status.to_json() for status in statuses]})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
