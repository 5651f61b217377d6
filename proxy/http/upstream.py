"""The upstream side: keep-alive connections pooled per endpoint, and response re-framing.

An `UpstreamConnection` carries one exchange at a time for the downstream connection bound to
it (its owner). When the response is complete it goes back to the `UpstreamPool` at once
(LIFO per endpoint, so the most recently used connection is reused first): an idle client
connection holds no upstream connection, and a thousand sequential clients share one.

It parses the response with llhttp as strictly as requests are parsed, removes hop-by-hop
headers, re-frames the body for the client (chunked for HTTP/1.1 clients when the
length is unknown; raw and then close for HTTP/1.0 clients) and writes it straight to the
owner's transport, coalescing what one read produced into one write. A response that is
malformed or ambiguous is never passed on: before its head was written the client gets a 502,
after it both connections are closed.
"""

from __future__ import annotations

import asyncio
import http
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, cast

import httptools

from proxy.http.core import EndpointAddress
from proxy.http.model import Failure

if TYPE_CHECKING:
    from proxy.http.server import _Downstream

__all__ = [
    "BLOCK_CACHE_MAX",
    "CONNECTION_TOKENS_KEPT",
    "Connector",
    "UpstreamConnection",
    "UpstreamPool",
    "connection_tokens",
    "write_out",
]

Connector = Callable[
    [Callable[[], "UpstreamConnection"], EndpointAddress],
    Awaitable[tuple[asyncio.BaseTransport, "UpstreamConnection"]],
]
"""Opens a connection to an endpoint with the given protocol factory (raises OSError)."""

_STATUS_LINES: Final = {
    int(status): b"HTTP/1.1 %d %s\r\n" % (status, status.phrase.encode("ascii"))
    for status in http.HTTPStatus
}
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
_HOP_LENGTHS: Final = frozenset(len(name) for name in _HOP_BY_HOP)
# Connection tokens that name no header to remove: a head listing only these is sent on as is.
CONNECTION_TOKENS_KEPT: Final = frozenset({b"", b"close", b"keep-alive", b"upgrade"})

# An upstream response head (with any 1xx before it) larger than this is refused.
_MAX_RESPONSE_HEAD: Final = 256 * 1024

_JOIN_MAX: Final = 32 * 1024
# Header blocks up to this size are remembered per connection, both ways (see
# `on_headers_complete` here and `_Downstream._start` in server.py).
BLOCK_CACHE_MAX: Final = 4096

# Body modes of the response as written downstream.
_NONE: Final = 0  # no body (HEAD, 204, 304)
_LENGTH: Final = 1  # Content-Length, passed as is
_CHUNKED: Final = 2  # re-framed as chunked
_RAW: Final = 3  # HTTP/1.0 client: raw bytes, then close


class _BadResponse(Exception):
    """The upstream's response cannot be passed on safely."""


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d Unknown\r\n" % status
    return line


def write_out(transport: asyncio.Transport, out: list[bytes]) -> None:
    """Write and clear ``out``: small pieces joined into one buffer, large ones as they are.

    uvloop writes a single buffer with one ``write`` call at once, but several buffers
    through a write context it allocates each time; joining is cheaper until copying costs
    more than that (a few tens of KiB).
    """
    count = len(out)
    if count == 1:
        transport.write(out[0])
    elif count == 2 and len(out[0]) + len(out[1]) <= _JOIN_MAX:
        # A head and its body, the common response.
        transport.write(out[0] + out[1])
    elif sum(map(len, out)) <= _JOIN_MAX:
        transport.write(b"".join(out))
    else:
        transport.writelines(out)
    out.clear()


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """The lowercased header names a Connection header value lists (its tokens)."""
    return frozenset(token.strip() for token in value.lower().split(b","))


class UpstreamConnection(asyncio.Protocol):
    """One connection to an endpoint: idle in its pool, or carrying one exchange."""

    __slots__ = (
        "_broken",
        "_done",
        "_down",
        "_fast",
        "_fast_common",
        "_flushed",
        "_hdr",
        "_head_read",
        "_info",
        "_keep_alive",
        "_last_block",
        "_last_hdr",
        "_mode",
        "_out",
        "_parser",
        "_pipe",
        "_pool",
        "_read_paused",
        "_reset",
        "_responded",
        "_until_close",
        "_upgraded",
        "deadline",
        "endpoint",
        "owner",
        "reused",
        "transport",
    )

    def __init__(self, pool: UpstreamPool, endpoint: EndpointAddress) -> None:
        self._pool = pool
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self._parser: Any = httptools.HttpResponseParser(self)
        self.owner: _Downstream | None = None
        self._down: asyncio.Transport | None = None
        self._hdr: list[tuple[bytes, bytes]] = []
        self._last_hdr: list[tuple[bytes, bytes]] | None = None
        self._last_block: tuple[Any, ...] = ()
        # The last common response read whole in one piece: its raw head, its size with the
        # body, its status and the head written for it (see `_fast_response`).
        self._fast: tuple[bytes, int, int, bytes] | None = None
        self._fast_common = 0
        self._out: list[bytes] = []
        self._mode = _NONE
        self._keep_alive = False
        self._done = False
        self._info = False
        self._reset = False
        self._broken = False
        self._flushed = False
        self._responded = False
        self._pipe = False
        self._upgraded = False
        self._until_close = False
        self._head_read = 0
        self._read_paused = False
        self.reused = False
        self.deadline = math.inf

    # -- binding ---------------------------------------------------------------------------

    def bind(self, owner: _Downstream, down: asyncio.Transport) -> None:
        """Carry the next exchange for ``owner``, writing its response to ``down``."""
        self.owner = owner
        self._down = down
        self._done = False
        self._flushed = False
        self._responded = False
        self._head_read = 0
        # ``deadline`` stays: `expire` only acts on a connection that has no owner.
        if owner.write_paused:
            self.pause_reading()

    def pause_reading(self) -> None:
        """Stop reading: the downstream's write buffer is full."""
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read again: the downstream drained its write buffer."""
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    @property
    def responded(self) -> bool:
        """Whether the response head has been written downstream for this exchange."""
        return self._flushed

    def close(self) -> None:
        """Close the connection now (it is never returned to the pool)."""
        self._broken = True
        self.owner = None
        transport = self.transport
        if transport is not None:
            transport.abort()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def pause_writing(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.pause_for_upstream()

    def resume_writing(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.resume_for_upstream()

    def data_received(self, data: bytes) -> None:
        if self.owner is None:
            # Bytes on an idle connection: the endpoint is confused; never reuse it.
            self.close()
            self._pool.forget(self)
            return
        if self._pipe:
            down = self._down
            assert down is not None
            down.write(data)
            return
        if not self._responded:
            fast = self._fast
            if (
                fast is not None
                and not self._head_read
                and len(data) == fast[1]
                and data.startswith(fast[0])
                and self._fast_response(data, fast)
            ):
                return
            self._head_read += len(data)
            if self._head_read > _MAX_RESPONSE_HEAD:
                self._fail(Failure.PROTOCOL, "response head too large")
                return
        self._fast_common = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if not self._upgraded:
                self._fail(Failure.PROTOCOL, "upstream switched protocols unasked")
                return
            tail = data[upgrade.args[0] :]
            if tail:
                self._out.append(bytes(tail))
        except httptools.HttpParserError:
            self._fail(Failure.PROTOCOL, "bad response from upstream")
            return
        if self._fast_common and self._done and self._head_read == len(data):
            self._remember_fast(data)
        out = self._out
        if out:
            down = self._down
            assert down is not None
            write_out(down, out)
            self._flushed = self._responded
        if self._upgraded:
            self._pipe = True
            owner = self.owner
            assert owner is not None
            owner.start_pipe(self)
            return
        if self._done:
            self._complete()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        owner = self.owner
        if owner is None:
            self._pool.forget(self)
            return
        if self._pipe:
            owner.pipe_closed()
            return
        if self._until_close and not self._done:
            # A response without length ends with the connection: now it is complete.
            if self._mode == _CHUNKED:
                self._out.append(b"0\r\n\r\n")
            self._done = True
        if self._done:
            out = self._out
            down = self._down
            if out and down is not None:
                write_out(down, out)
            self._complete()
            return
        self._fail(Failure.RESET, "upstream closed the connection")

    # -- parser callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._hdr.append((name, value))

    def on_headers_complete(self) -> None:
        owner = self.owner
        assert owner is not None
        hdr = self._hdr
        self._hdr = []
        status: int = self._parser.get_status_code()
        if self._done:
            # A second response to one request: the rest of this connection cannot be trusted.
            self._broken = True
            raise _BadResponse("unsolicited response")
        if status < 200:
            self._informational(owner, status, hdr)
            return
        length: bytes | None = None
        coding: bytes | None = None
        listed: frozenset[bytes] | None = None
        if hdr == self._last_hdr:
            # The same header fields as this connection's previous response.
            block, length, coding, listed, common_status, common_head = self._last_block
            if (
                status == common_status
                and owner.http11
                and owner.request_done
                and not owner.close_after
                and not owner.head_request
            ):
                # The common response again (same status and fields, a Content-Length, no
                # Connection options): its whole head was built last time.
                self._keep_alive = self._parser.should_keep_alive()
                self._mode = _LENGTH
                owner.response_close = False
                self._out.append(common_head)
                self._responded = True
                if self._keep_alive:
                    self._fast_common = status
                owner.report_response(self, status)
                return
        else:
            block_parts: list[bytes] = []
            extend = block_parts.extend
            for name, value in hdr:
                # Most names cannot be hop-by-hop by their length alone: no lowercased copy.
                if len(name) in _HOP_LENGTHS and (lname := name.lower()) in _HOP_BY_HOP:
                    if lname == b"content-length":
                        if length is not None or not value.isdigit():
                            raise _BadResponse("bad Content-Length")
                        length = value
                    elif lname == b"transfer-encoding":
                        if coding is not None:
                            raise _BadResponse("repeated Transfer-Encoding")
                        coding = value
                    elif lname == b"connection":
                        tokens = connection_tokens(value)
                        listed = tokens if listed is None else listed | tokens
                    continue
                extend((name, b": ", value, b"\r\n"))
            block = b"".join(block_parts)
            if len(block) <= BLOCK_CACHE_MAX:
                # The whole head of the common response with these fields (see above).
                common_status = 0
                common_head = b""
                if (
                    length is not None
                    and coding is None
                    and (listed is None or listed <= CONNECTION_TOKENS_KEPT)
                    and status != 204
                    and status != 304
                ):
                    common_status = status
                    common_head = b"%s%sContent-Length: %s\r\n\r\n" % (
                        _STATUS_LINES.get(status) or _status_line(status),
                        block,
                        length,
                    )
                self._last_hdr = hdr
                self._last_block = (block, length, coding, listed, common_status, common_head)
        parts = [_STATUS_LINES.get(status) or _status_line(status), block]
        extend = parts.extend
        if listed is not None and not listed <= CONNECTION_TOKENS_KEPT:
            parts = _without(parts, hdr, listed)
            extend = parts.extend
        if coding is not None and (coding.lower() != b"chunked" or length is not None):
            raise _BadResponse("bad Transfer-Encoding")
        self._keep_alive = self._parser.should_keep_alive()
        http11 = owner.http11
        close = owner.close_after or not owner.request_done
        if (
            length is not None
            and coding is None
            and http11
            and not close
            and not owner.head_request
            and status != 204
            and status != 304
        ):
            # The common case, in one go.
            extend((b"Content-Length: ", length, b"\r\n\r\n"))
            self._mode = _LENGTH
            owner.response_close = False
            self._out.append(b"".join(parts))
            self._responded = True
            owner.report_response(self, status)
            return
        if owner.head_request or status == 204 or status == 304:
            mode = _NONE
            if length is not None and status != 204:
                extend((b"Content-Length: ", length, b"\r\n"))
            if owner.head_request:
                # llhttp would wait for the body a HEAD response announces: this message
                # ends with its head, so the parser is replaced once this read is done.
                self._reset = True
                self._done = True
        elif coding is not None or length is None:
            if coding is None:
                self._keep_alive = False
                self._until_close = True
            if http11:
                mode = _CHUNKED
                extend((b"Transfer-Encoding: chunked\r\n",))
            else:
                mode = _RAW
                close = True
        else:
            mode = _LENGTH
            extend((b"Content-Length: ", length, b"\r\n"))
        if close:
            extend((b"Connection: close\r\n\r\n",))
        elif not http11:
            extend((b"Connection: keep-alive\r\n\r\n",))
        else:
            extend((b"\r\n",))
        self._mode = mode
        owner.response_close = close
        self._out.append(b"".join(parts))
        self._responded = True
        owner.report_response(self, status)

    def _informational(
        self, owner: _Downstream, status: int, hdr: list[tuple[bytes, bytes]]
    ) -> None:
        if status == 101:
            if not owner.upgrading:
                raise _BadResponse("101 without an upgrade request")
            parts = [_status_line(101)]
            for name, value in hdr:
                lname = name.lower()
                if lname == b"upgrade":
                    parts.extend((b"Upgrade: ", value, b"\r\n"))
                elif lname not in _HOP_BY_HOP:
                    parts.extend((name, b": ", value, b"\r\n"))
            parts.append(b"Connection: upgrade\r\n\r\n")
            self._out.append(b"".join(parts))
            self._responded = True
            self._upgraded = True
            self._mode = _NONE
            owner.report_response(self, 101)
            return
        self._info = True
        if owner.http11:
            parts = [_status_line(status)]
            for name, value in hdr:
                if name.lower() not in _HOP_BY_HOP:
                    parts.extend((name, b": ", value, b"\r\n"))
            parts.append(b"\r\n")
            self._out.append(b"".join(parts))

    def _remember_fast(self, data: bytes) -> None:
        """After a common response read whole in one read: remember its raw head.

        Called when `on_headers_complete` took its cached common branch (fields checked
        before, keep-alive, a Content-Length) and the response ended in this read. The same
        head bytes with a body of the same size are the same response again.
        """
        status, self._fast_common = self._fast_common, 0
        end = data.find(b"\r\n\r\n") + 4
        # Exactly one head and its body (no interim response before it), and small.
        if end + int(self._last_block[1]) == len(data) <= _JOIN_MAX:
            self._fast = (data[:end], len(data), status, self._last_block[5])

    def _fast_response(self, data: bytes, fast: tuple[bytes, int, int, bytes]) -> bool:
        """Pass on ``data``, the connection's common response again, without the parser."""
        owner = self.owner
        assert owner is not None
        if not owner.http11 or not owner.request_done or owner.close_after or owner.head_request:
            return False
        head, _, status, written = fast
        self._keep_alive = True
        self._mode = _LENGTH
        owner.response_close = False
        self._responded = True
        owner.report_response(self, status)
        down = self._down
        assert down is not None
        down.write(written + data[len(head) :])
        self._flushed = True
        self._done = True
        self._complete()
        return True

    def on_body(self, body: bytes) -> None:
        mode = self._mode
        if mode in (_LENGTH, _RAW):
            self._out.append(body)
        elif mode == _CHUNKED:
            self._out.extend((b"%x\r\n" % len(body), body, b"\r\n"))
        else:
            raise _BadResponse("body where none may be")

    def on_message_complete(self) -> None:
        mode = self._mode
        if mode == _LENGTH and not self._info:
            self._done = True
            return
        if self._info:
            self._info = False
            return
        if self._upgraded:
            return
        if mode == _CHUNKED and not self._done:
            self._out.append(b"0\r\n\r\n")
        self._done = True

    # -- ends ------------------------------------------------------------------------------

    def _complete(self) -> None:
        owner = self.owner
        assert owner is not None
        self.owner = None
        self._down = None
        if self._reset:
            self._reset = False
            self._parser = httptools.HttpResponseParser(self)
        self._until_close = False
        if self._keep_alive and not self._broken and owner.request_done and self.transport:
            # Reusable: the owner puts it back in the pool.
            owner.response_done(self)
        else:
            self.close()
            owner.response_done(None)

    def _fail(self, failure: Failure, reason: str) -> None:
        owner = self.owner
        self._out.clear()
        self.close()
        if owner is not None:
            owner.upstream_failed(self, failure, reason)

    def expire(self, now: float) -> None:
        """Called by the timer sweep when ``deadline`` passed: an idle pooled connection."""
        if self.owner is None:
            self.close()
            self._pool.forget(self)


def _without(
    parts: list[bytes], hdr: list[tuple[bytes, bytes]], listed: frozenset[bytes]
) -> list[bytes]:
    """Rebuild a head's header lines without the headers that Connection lists."""
    rebuilt = parts[:1]
    for name, value in hdr:
        lname = name.lower()
        if lname in _HOP_BY_HOP or lname in listed:
            continue
        rebuilt.extend((name, b": ", value, b"\r\n"))
    return rebuilt


class UpstreamPool:
    """Idle keep-alive connections per endpoint, most recently used first."""

    __slots__ = ("_idle", "_loop", "_sweep", "_timeouts_idle", "connections", "connector")

    def __init__(self, loop: asyncio.AbstractEventLoop, upstream_idle: float, sweep: Any) -> None:
        self._loop = loop
        self._timeouts_idle = upstream_idle
        self._sweep = sweep
        self._idle: dict[EndpointAddress, list[UpstreamConnection]] = {}
        self.connections: set[UpstreamConnection] = set()
        # Opens connections instead of plain TCP (e.g. mTLS); raises OSError on failure.
        self.connector: Connector | None = None

    def take(self, endpoint: EndpointAddress) -> UpstreamConnection | None:
        """An idle, open connection to ``endpoint``, or ``None``."""
        stack = self._idle.get(endpoint)
        while stack:
            conn = stack.pop()
            transport = conn.transport
            if transport is not None and not transport.is_closing():
                conn.reused = True
                return conn
            self.connections.discard(conn)
            self._sweep.discard(conn)
        return None

    async def connect(self, endpoint: EndpointAddress) -> UpstreamConnection:
        """A new connection to ``endpoint`` (raises OSError when it cannot be made)."""
        connector = self.connector
        if connector is None:
            _, conn = await self._loop.create_connection(
                lambda: UpstreamConnection(self, endpoint), endpoint.host, endpoint.port
            )
        else:
            _, conn = await connector(lambda: UpstreamConnection(self, endpoint), endpoint)
        self.connections.add(conn)
        self._sweep.add(conn)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Put ``conn`` back as idle; it is closed after the upstream idle timeout."""
        conn.resume_reading()
        conn.deadline = self._sweep.now + self._timeouts_idle
        self._sweep.add(conn)
        stack = self._idle.get(conn.endpoint)
        if stack is None:
            self._idle[conn.endpoint] = [conn]
        else:
            stack.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """Drop a closed connection from the pool."""
        self.connections.discard(conn)
        self._sweep.discard(conn)
        stack = self._idle.get(conn.endpoint)
        if stack is not None and conn in stack:
            stack.remove(conn)
            if not stack:
                del self._idle[conn.endpoint]

    def idle_count(self, endpoint: EndpointAddress) -> int:
        """How many idle connections to ``endpoint`` the pool holds."""
        return len(self._idle.get(endpoint, ()))

    def close(self) -> None:
        """Close every connection the pool knows."""
        for conn in list(self.connections):
            conn.close()
        self.connections.clear()
        self._idle.clear()
