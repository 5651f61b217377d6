"""A tiny real upstream for the forwarding tests, written on asyncio streams.

It parses what the sidecar sends with its own strict reader (so the re-framing is checked
by a second parser), records every request and connection, and answers through a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Received:
    """One request as the backend read it."""

    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunked: bool
    connection: int

    def header(self, name: bytes) -> bytes | None:
        """The value of the only header ``name`` (case-insensitive), or ``None``."""
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        assert len(values) <= 1, f"header {name!r} repeated"
        return values[0] if values else None

    def names(self) -> set[bytes]:
        """The lowercased header names."""
        return {n.lower() for n, _ in self.headers}


Handler = Callable[[Received, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class FramingError(Exception):
    """The backend read something that is not clean HTTP/1.1 framing."""


async def read_request(reader: asyncio.StreamReader, connection: int) -> Received | None:
    """Read one request strictly: CRLF lines, one framing, chunked parsed by hand."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise FramingError(f"incomplete head {exc.partial[:80]!r}") from None
        return None
    lines = head[:-4].split(b"\r\n")
    method, target, version = lines[0].split(b" ")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or name != name.strip() or b"\n" in line or b"\r" in line:
            raise FramingError(f"bad header line {line!r}")
        headers.append((name, value.strip()))
    names = [n.lower() for n, _ in headers]
    if names.count(b"content-length") > 1 or names.count(b"transfer-encoding") > 1:
        raise FramingError("repeated framing header")
    values = {n.lower(): v for n, v in headers}
    chunked = False
    if b"transfer-encoding" in values:
        if b"content-length" in values or values[b"transfer-encoding"] != b"chunked":
            raise FramingError("ambiguous framing")
        chunked = True
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line[:-2], 16)
            if size == 0:
                if await reader.readexactly(2) != b"\r\n":
                    raise FramingError("trailers or junk after last chunk")
                break
            body += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise FramingError("chunk not followed by CRLF")
        data = bytes(body)
    elif b"content-length" in values:
        data = await reader.readexactly(int(values[b"content-length"]))
    else:
        data = b""
    return Received(method, target, version, headers, data, chunked, connection)


def response(
    status: int = 200,
    body: bytes = b"ok",
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    length: bool = True,
) -> bytes:
    """A response with Content-Length (unless ``length`` is false) and ``headers``."""
    head = [b"HTTP/1.1 %d X" % status]
    head += [n + b": " + v for n, v in headers or []]
    if length:
        head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def echo(
    request: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """Answer with the request target and body, keeping the connection."""
    writer.write(
        response(
            200, request.target + b"|" + request.body, [(b"X-Conn", b"%d" % request.connection)]
        )
    )
    await writer.drain()
    return True


@dataclass
class Backend:
    """A running backend: what it received, and how it answers."""

    handler: Handler = echo
    requests: list[Received] = field(default_factory=list)
    connections: int = 0
    raw_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    server: asyncio.Server | None = None
    port: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> Backend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                try:
                    request = await read_request(reader, number)
                except FramingError as exc:
                    self.errors.append(str(exc))
                    break
                except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                    break
                if request is None:
                    break
                self.requests.append(request)
                if not await self.handler(request, reader, writer):
                    break
        finally:
            with contextlib.suppress(ConnectionError):
                writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 1)
