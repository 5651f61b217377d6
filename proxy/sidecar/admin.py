"""The sidecar's admin listener on loopback: ``/metrics``, ``/ready`` and ``/live``.

A small HTTP/1.1 server on an asyncio protocol and httptools (which the data plane already
loads), rather than aiohttp's, which alone would add ~7 MiB to every sidecar. It answers GET
(and HEAD) of those three paths, 404 for any other path, 405 for any other method, 431 for a
request over 8 KiB, 400 for what does not parse; every answer closes its connection.
``/ready`` answers 200 once a configuration is in force and the listeners are up, 503 while
starting or draining.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import httptools
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.sidecar.metrics import SidecarMetrics

__all__ = ["AdminServer", "start_admin"]

_MAX_REQUEST = 8192
_IDLE_TIMEOUT = 5.0
_TEXT = "text/plain; charset=utf-8"

_Answer = tuple[int, str, bytes]
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class AdminServer:
    """The running admin listener; :meth:`aclose` stops it."""

    def __init__(self, server: asyncio.Server, connections: set[asyncio.Transport]) -> None:
        self._server = server
        self._connections = connections

    @property
    def port(self) -> int:
        """The port the listener got (useful when configured as 0)."""
        return int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        """Stop accepting and close the connections still open."""
        self._server.close()
        for transport in list(self._connections):
            transport.close()
        await self._server.wait_closed()


async def start_admin(
    address: str, port: int, metrics: SidecarMetrics, ready: Callable[[], bool]
) -> AdminServer:
    """Serve the admin endpoints on ``address:port``; ``await server.aclose()`` stops it."""

    def metrics_page() -> _Answer:
        return 200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry)

    def ready_page() -> _Answer:
        return (200, _TEXT, b"ready\n") if ready() else (503, _TEXT, b"not ready\n")

    def live_page() -> _Answer:
        return 200, _TEXT, b"live\n"

    pages = {b"/metrics": metrics_page, b"/ready": ready_page, b"/live": live_page}
    connections: set[asyncio.Transport] = set()
    server = await asyncio.get_running_loop().create_server(
        lambda: _AdminProtocol(pages, connections), address, port
    )
    return AdminServer(server, connections)


class _AdminProtocol(asyncio.Protocol):
    """One connection: one request head read, one answer written, then closed."""

    def __init__(
        self, pages: dict[bytes, Callable[[], _Answer]], connections: set[asyncio.Transport]
    ) -> None:
        self._pages = pages
        self._connections = connections
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._received = 0
        self._head_done = False
        self._answered = False
        self._transport: asyncio.Transport | None = None
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._connections.add(self._transport)
        # A client that never finishes its request does not keep its connection.
        self._idle = asyncio.get_running_loop().call_later(_IDLE_TIMEOUT, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
        if self._transport is not None:
            self._connections.discard(self._transport)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        self._received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            self._respond(400, _TEXT, b"bad request\n")
            return
        if self._received > _MAX_REQUEST:
            self._respond(431, _TEXT, b"request too large\n")
        elif self._head_done:
            self._dispatch()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_headers_complete(self) -> None:
        self._head_done = True

    def _dispatch(self) -> None:
        method = self._parser.get_method()
        try:
            page = self._pages.get(httptools.parse_url(self._url).path)
        except httptools.HttpParserInvalidURLError:
            page = None
        if page is None:
            self._respond(404, _TEXT, b"not found\n")
        elif method not in (b"GET", b"HEAD"):
            self._respond(405, _TEXT, b"method not allowed\n", b"Allow: GET, HEAD\r\n")
        else:
            status, content_type, body = page()
            self._respond(
                status, content_type, b"" if method == b"HEAD" else body, length=len(body)
            )

    def _respond(
        self,
        status: int,
        content_type: str,
        body: bytes,
        extra: bytes = b"",
        *,
        length: int | None = None,
    ) -> None:
        self._answered = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n"
        ).encode()
        transport.write(head + extra + b"\r\n" + body)
        transport.close()
