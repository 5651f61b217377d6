"""The outbound listener: the app's HTTP/1.1 requests in, routed on Host, forwarded upstream.

One `_Downstream` protocol per client connection parses requests with llhttp (lenient flags
off), adds the checks llhttp leaves out (exactly ``chunked`` as transfer coding, digits-only
Content-Length, one Host, HTTP/1.0 with Transfer-Encoding, upgrades with bodies, size limits),
and only then re-frames the request and writes it to a pooled `UpstreamConnection`. Anything
ambiguous is answered with a 4xx and a close, never forwarded.

A keep-alive client repeats its header fields: once a bodiless request was checked and read
whole in one piece, the same bytes after a plain request line (`_FAST_LINE`, a strict subset
of what llhttp accepts) are that request again, and are forwarded without the parser; the
upstream side does the same for a repeated response head (proxy/http/upstream.py).

Requests on one connection are served one at a time: a pipelined request read ahead is held
(reading pauses) until the response before it is complete, so responses never interleave.
Bodies stream both ways with flow control: a full write buffer on one side pauses reading on
the other. Timeouts cost no timer per request: each connection holds a ``deadline`` and one
sweep per server checks them a few times per shortest timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, cast

import httptools

from proxy.http.core import (
    EndpointAddress,
    InjectedFault,
    Overloaded,
    RequestGate,
    Route,
    Router,
    StaticRouter,
)
from proxy.http.model import Failure, Limits, Timeouts
from proxy.http.upstream import (
    BLOCK_CACHE_MAX,
    CONNECTION_TOKENS_KEPT,
    Connector,
    UpstreamConnection,
    UpstreamPool,
    connection_tokens,
    write_out,
)

__all__ = ["OutboundServer", "serve_outbound"]

# Connection states.
_IDLE: Final = 0  # between requests
_HEAD: Final = 1  # reading a request head
_CONNECTING: Final = 2  # head read, upstream connection being made
_WAITING: Final = 3  # request sent (or streaming), response not complete
_PIPE: Final = 4  # upgraded: bytes pass both ways
_DEAD: Final = 5  # answered with an error or closing: input ignored

# Reasons reading from the client is paused (bits).
_P_UPSTREAM: Final = 1  # upstream write buffer full
_P_CONNECTING: Final = 2  # no upstream connection yet to write to
_P_QUEUED: Final = 4  # a pipelined request waits for the response before it
_P_UPGRADE: Final = 8  # bytes after an upgrade request wait for the 101

_REQUEST_SPECIAL: Final = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
    }
)
_SPECIAL_LENGTHS: Final = frozenset(len(name) for name in _REQUEST_SPECIAL)
_CONNECTION_TOKENS_REFUSED: Final = frozenset({b"host", b"content-length", b"transfer-encoding"})
_RETRYABLE_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS"})
# A request line the fast path takes: a bodiless method, an origin-form target of RFC 3986
# path and query characters only (a strict subset of what llhttp accepts), HTTP/1.1.
_FAST_LINE: Final = re.compile(
    rb"(GET|HEAD|DELETE|OPTIONS) (/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*) HTTP/1\.1"
)
_REASONS: Final = {
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
_WRITE_HIGH: Final = 256 * 1024
_monotonic: Final = time.monotonic
# After an error reply, how long the rest of the client's bytes are read and dropped, so
# that its kernel does not answer our close with a reset that discards the reply.
_LINGER: Final = 2.0


class _Stop(Exception):
    """Raised from a parser callback to stop parsing: the connection has been answered."""


def _error_response(status: int, reason: str, *, close: bool, extra: bytes = b"") -> bytes:
    body = reason.encode("ascii", "replace") + b"\n"
    return b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n%s%s\r\n%s" % (
        status,
        _REASONS.get(status, b"Error"),
        len(body),
        extra,
        b"connection: close\r\n" if close else b"",
        body,
    )


class _Pending:
    """A pipelined request read ahead while the one before it is still being answered."""

    __slots__ = ("body", "complete", "error", "head", "upgrade_tail")

    def __init__(self) -> None:
        self.head: tuple[Any, ...] | None = None
        self.body: list[bytes] = []
        self.complete = False
        self.error: tuple[int, str] | None = None
        self.upgrade_tail: bytes | None = None


class _Sweep:
    """Checks every member's ``deadline`` a few times per shortest timeout."""

    __slots__ = ("_handle", "_interval", "_loop", "_members")

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self._loop = loop
        self._interval = interval
        self._members: set[Any] = set()
        self._handle = loop.call_later(interval, self._tick)

    @property
    def now(self) -> float:
        return self._loop.time()

    def add(self, member: Any) -> None:
        self._members.add(member)

    def discard(self, member: Any) -> None:
        self._members.discard(member)

    def _tick(self) -> None:
        now = self._loop.time()
        expired = [member for member in self._members if member.deadline <= now]
        for member in expired:
            member.expire(now)
        self._handle = self._loop.call_later(self._interval, self._tick)

    def close(self) -> None:
        self._handle.cancel()


class _Shared:
    """What every connection of one listener uses, looked up once per connection."""

    __slots__ = (
        "connections",
        "drained",
        "draining",
        "gates",
        "limits",
        "loop",
        "pool",
        "router",
        "sweep",
        "timeouts",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, router: Router, limits: Limits, timeouts: Timeouts
    ) -> None:
        self.loop = loop
        self.router = router
        self.limits = limits
        self.timeouts = timeouts
        self.sweep = _Sweep(loop, min(0.25, max(0.005, timeouts.shortest / 5)))
        self.pool = UpstreamPool(loop, timeouts.upstream_idle, self.sweep)
        self.connections: set[_Downstream] = set()
        self.draining = False
        self.drained: asyncio.Event | None = None
        # Makes each connection's RequestGate; None refuses the connection (inbound side).
        self.gates: Callable[[asyncio.BaseTransport], RequestGate | None] | None = None


class _Downstream(asyncio.Protocol):
    """One client connection: parses, checks and forwards its requests one at a time."""

    __slots__ = (
        "_attempts",
        "_blocked",
        "_body_seen",
        "_chunked_up",
        "_client_eof",
        "_closing",
        "_connect_task",
        "_endpoint",
        "_fast",
        "_fast_common",
        "_gate",
        "_hdr",
        "_last_block",
        "_last_hdr",
        "_local",
        "_loop",
        "_max_body",
        "_max_header_bytes",
        "_max_headers",
        "_max_line",
        "_max_stall",
        "_parse_dead",
        "_parser",
        "_paused",
        "_picked",
        "_pool",
        "_queue",
        "_quick_limit",
        "_rec",
        "_reported",
        "_req_head",
        "_request_deadline",
        "_resp_done",
        "_retryable",
        "_route",
        "_route_key",
        "_router",
        "_shared",
        "_stall",
        "_state",
        "_sweep",
        "_t0",
        "_t_connect",
        "_t_header",
        "_t_idle",
        "_t_request",
        "_time",
        "_transport",
        "_up",
        "_up_out",
        "_upgrade_buf",
        "_url",
        "close_after",
        "deadline",
        "head_request",
        "http11",
        "keep_alive",
        "request_done",
        "response_close",
        "upgrading",
        "write_paused",
    )

    def __init__(self, shared: _Shared) -> None:
        self._shared = shared
        self._loop = shared.loop
        self._time = shared.loop.time
        self._sweep = shared.sweep
        self._pool = shared.pool
        self._router = shared.router
        limits = shared.limits
        self._max_line = limits.max_request_line
        self._max_header_bytes = limits.max_header_bytes
        self._max_headers = limits.max_headers
        self._max_body = limits.max_body
        self._max_stall = limits.max_header_bytes + limits.max_request_line
        # A header line takes at least 4 bytes, so a head read in fewer bytes than this
        # cannot have too many fields nor too many bytes.
        self._quick_limit = min(limits.max_header_bytes, 4 * limits.max_headers)
        timeouts = shared.timeouts
        self._t_header = timeouts.header
        self._t_request = timeouts.request
        self._t_connect = min(timeouts.connect, timeouts.request)
        self._t_idle = timeouts.idle
        self._parser: Any = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._gate: RequestGate | None = None
        self._last_hdr: list[tuple[bytes, bytes]] | None = None
        self._last_block: tuple[Any, ...] = ()
        # The raw bytes after the request line of this client's last common request, with
        # its Host and re-framed tail (see `_fast_request`); None until one was seen.
        self._fast: tuple[bytes, bytes, bytes] | None = None
        self._fast_common = False
        self._state = _IDLE
        self.deadline = math.inf
        self._paused = 0
        self.write_paused = False
        self._stall = 0
        self._url = b""
        self._hdr: list[tuple[bytes, bytes]] = []
        self._rec: _Pending | None = None
        # Pipelined requests read ahead (rare and short: a list is smaller than a deque).
        self._queue: list[_Pending] = []
        self._route_key: bytes | None = None
        self._route: Route | None = None
        self._upgrade_buf: list[bytes] | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._client_eof = False
        # The client half-closed or the listener drains: no request after the current one.
        self._closing = False
        self._parse_dead = False
        self._blocked = False
        self._up: UpstreamConnection | None = None
        self._up_out: list[bytes] = []
        self._endpoint: EndpointAddress | None = None
        self._picked: Route | None = None
        self._reported = True
        self._t0 = 0.0
        self._attempts = 1
        self._request_deadline = math.inf
        self._req_head = b""
        self._retryable = False
        self._chunked_up = False
        self._body_seen = 0
        self._local = False
        self.request_done = False
        self._resp_done = False
        self.http11 = True
        self.keep_alive = True
        self.head_request = False
        self.upgrading = False
        self.response_close = False
        self.close_after = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        transport = cast(asyncio.Transport, transport)
        gates = self._shared.gates
        if gates is not None:
            gate = gates(transport)
            if gate is None:
                self._state = _DEAD
                transport.abort()
                return
            self._gate = gate
        self._transport = transport
        transport.set_write_buffer_limits(high=_WRITE_HIGH)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._shared.connections.add(self)
        self._sweep.add(self)
        # A new connection gets the header timeout to send its first request.
        self.deadline = self._time() + self._t_header

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == _PIPE:
            up = self._up
            if up is not None and up.transport is not None:
                up.transport.write(data)
            return
        if state == _DEAD:
            return
        if self._blocked:
            if self._upgrade_buf is not None:
                # Early data after an upgrade request (reading may not pause at once).
                self._upgrade_buf.append(data)
            return
        fast = self._fast
        if (
            fast is not None
            and state == _IDLE
            and not self._queue
            and data.endswith(fast[0])
            and self._fast_request(data, fast)
        ):
            self._flush_head()
            return
        self._fast_common = False
        self._stall += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self._state != _DEAD:
                self._upgrade_tail(bytes(data[upgrade.args[0] :]))
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _Stop) or self._state == _DEAD or self._parse_dead:
                return
            self._bad_input(400, "malformed request")
            return
        if self._stall > self._max_stall and self._state != _DEAD:
            # Bytes keep coming without completing a head, header or chunk line.
            self._bad_input(431 if self._state == _HEAD else 400, "header section too large")
            return
        if self._fast_common:
            self._remember_fast(data)
        self._flush_head()

    def _flush_head(self) -> None:
        out = self._up_out
        if out:
            up = self._up
            if up is not None:
                transport = up.transport
                if transport is None:
                    out.clear()
                elif len(out) == 1:
                    # A request head alone, the common case.
                    transport.write(out.pop())
                else:
                    write_out(transport, out)

    def eof_received(self) -> bool | None:
        state = self._state
        if state == _PIPE:
            up = self._up
            if up is not None and up.transport is not None and up.transport.can_write_eof():
                up.transport.write_eof()
                return True
            return None
        if state in (_CONNECTING, _WAITING) and self.request_done and self._rec is None:
            # The client may half-close after its request; answer it, then close.
            self._client_eof = self._closing = True
            self.close_after = True
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        shared = self._shared
        shared.connections.discard(self)
        if shared.drained is not None and not shared.connections:
            shared.drained.set()
        self._sweep.discard(self)
        state = self._state
        self._state = _DEAD
        self._transport = None
        task = self._connect_task
        if task is not None:
            self._connect_task = None
            task.cancel()
        up = self._up
        if up is not None:
            self._up = None
            if not self._resp_done:
                self._report_failure(Failure.CANCELLED)
                up.close()
            elif state == _PIPE:
                up.close()
        elif state == _CONNECTING:
            self._report_failure(Failure.CANCELLED)

    def pause_writing(self) -> None:
        self.write_paused = True
        up = self._up
        if up is not None:
            up.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        up = self._up
        if up is not None:
            up.resume_reading()

    # -- flow control ----------------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._paused and self._transport is not None:
            self._transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self._transport is not None and self._state != _DEAD:
            self._transport.resume_reading()

    def pause_for_upstream(self) -> None:
        """The upstream's write buffer is full: stop reading the client."""
        self._pause(_P_UPSTREAM)

    def resume_for_upstream(self) -> None:
        """The upstream drained its write buffer: read the client again."""
        self._resume(_P_UPSTREAM)

    # -- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._state == _DEAD:
            raise _Stop
        self._url = b""
        if self._state == _IDLE and not self._queue:
            self._state = _HEAD
            self.deadline = self._time() + self._t_header
        else:
            # Pipelined: hold this request until the one before it is answered.
            rec = _Pending()
            self._queue.append(rec)
            self._rec = rec
            self._pause(_P_QUEUED)

    def on_url(self, url: bytes) -> None:
        url = self._url + url if self._url else url
        self._url = url
        if len(url) > self._max_line:
            self._bad_input(414, "request line too long")
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        # Counted when the head is complete: until then the bytes are bounded by `_stall`.
        self._hdr.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        hdr = self._hdr
        self._hdr = []
        rec = self._rec
        if rec is not None:
            self._stall = 0
            rec.head = (
                parser.get_method(),
                self._url,
                hdr,
                parser.get_http_version(),
                parser.should_keep_alive(),
                parser.should_upgrade(),
                self._max_header_bytes + 1,
            )
            return
        stall = self._stall
        self._stall = 0
        if not self._start(
            parser.get_method(),
            self._url,
            hdr,
            None,
            parser.should_keep_alive(),
            parser.should_upgrade(),
            stall,
        ):
            raise _Stop

    def on_body(self, body: bytes) -> None:
        self._stall = 0
        rec = self._rec
        if rec is not None:
            rec.body.append(body)
            return
        self._forward_body(body)

    def on_message_complete(self) -> None:
        self._stall = 0
        rec = self._rec
        if rec is not None:
            rec.complete = True
            self._rec = None
            return
        if self._chunked_up:
            self._up_out.append(b"0\r\n\r\n")
        self.request_done = True
        if self._resp_done:
            self._cycle_end(self._time())

    # -- requests --------------------------------------------------------------------------

    def _remember_fast(self, data: bytes) -> None:
        """After a common request read whole in one piece: remember its raw header bytes.

        Called when `_start` took its cached common branch for a bodiless request (its
        header fields were checked before). If ``data`` was exactly that request, the same
        bytes after a request line that `_FAST_LINE` accepts are the same request again.
        """
        self._fast_common = False
        if data[-4:] != b"\r\n\r\n" or data.find(b"\r\n\r\n") != len(data) - 4:
            return
        line_end = data.find(b"\r\n")
        if not _FAST_LINE.fullmatch(data, 0, line_end):
            return
        host, tail = self._last_block[1], self._last_block[6]
        self._fast = (data[line_end:], host, tail)

    def _fast_request(self, data: bytes, fast: tuple[bytes, bytes, bytes]) -> bool:
        """Serve ``data`` without the parser if it is the client's common request again.

        ``data`` ends with the remembered header bytes; what comes before them must be a
        request line `_FAST_LINE` accepts. Then the request is the one whose fields were
        checked, with another method or target: no field is looked at again. ``False``
        (nothing done) sends the bytes through the parser.
        """
        block, host, tail = fast
        match = _FAST_LINE.fullmatch(data, 0, len(data) - len(block))
        if match is None or match.end(2) - match.start(2) > self._max_line:
            return False
        method, path = match.group(1, 2)
        self._stall = 0
        self._state = _HEAD
        if self._dispatch_common(method, path, host, False, tail):
            self.request_done = True
            if self._resp_done:
                self._cycle_end(self._time())
        return True

    def _start(
        self,
        method: bytes,
        url: bytes,
        hdr: list[tuple[bytes, bytes]],
        version: str | None,
        keep_alive: bool,
        upgrade: bool,
        read: int,
    ) -> bool:
        """Check one request head and send it upstream; ``False`` when it was refused.

        ``version`` is ``None`` for the request the parser has just read (asked only when
        needed). ``read`` bounds the head's size (the bytes read since the last message
        event): when it is within the limit, the exact size need not be summed.
        """
        if read > self._quick_limit:
            # Only a head this large can break a limit: count and size it exactly.
            if len(hdr) > self._max_headers:
                return self._bad_input(431, "too many header fields")
            if sum(len(name) + len(value) for name, value in hdr) > self._max_header_bytes:
                return self._bad_input(431, "header section too large")
        if method == b"CONNECT":
            return self._bad_input(405, "CONNECT is not supported")
        path = url
        authority: bytes | None = None
        if url[:1] != b"/":
            if url == b"*" and method == b"OPTIONS":
                pass
            elif url[:7].lower() == b"http://":
                rest = url[7:]
                slash = rest.find(b"/")
                authority = rest if slash < 0 else rest[:slash]
                path = b"/" if slash < 0 else rest[slash:]
                if not authority or b"@" in authority:
                    return self._bad_input(400, "bad request target")
            else:
                return self._bad_input(400, "bad request target")
        host: bytes | None = None
        length: bytes | None = None
        coding: bytes | None = None
        listed: frozenset[bytes] | None = None
        upgrade_to: bytes | None = None
        gate = self._gate
        if gate is not None:
            hdr = gate.headers(hdr)
        if hdr == self._last_hdr:
            # The same header fields as this client's previous request: same checks, same
            # result (clients tend to send one set of headers over and over).
            block, host, length, coding, listed, upgrade_to, tail, tail_body = self._last_block
            if (
                tail is not None
                and keep_alive
                and not upgrade
                and authority is None
                and (version is None or version == "1.1")
            ):
                self._fast_common = not tail_body
                return self._dispatch_common(method, path, host, tail_body, tail)
        else:
            block_parts: list[bytes] = []
            extend = block_parts.extend
            for name, value in hdr:
                # Most names cannot be special by their length alone: no lowercased copy.
                if len(name) in _SPECIAL_LENGTHS and (lname := name.lower()) in _REQUEST_SPECIAL:
                    if lname == b"host":
                        if host is not None:
                            return self._bad_input(400, "repeated Host")
                        host = value
                        extend((name, b": ", value, b"\r\n"))
                    elif lname == b"content-length":
                        if length is not None or not value.isdigit():
                            return self._bad_input(400, "bad Content-Length")
                        length = value
                    elif lname == b"transfer-encoding":
                        if coding is not None:
                            return self._bad_input(400, "repeated Transfer-Encoding")
                        coding = value
                    elif lname == b"connection":
                        tokens = connection_tokens(value)
                        listed = tokens if listed is None else listed | tokens
                    elif lname == b"upgrade":
                        upgrade_to = value
                    continue
                extend((name, b": ", value, b"\r\n"))
            block = b"".join(block_parts)
            if len(block) <= BLOCK_CACHE_MAX:
                # What the common request appends after its path (None: not the common one).
                tail = None
                tail_body = False
                if host is not None and listed is None and coding is None:
                    if length is None:
                        tail = b" HTTP/1.1\r\n%s\r\n" % block
                    elif self._max_body is None or int(length) <= self._max_body:
                        tail = b" HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n" % (block, int(length))
                        tail_body = int(length) > 0
                self._last_hdr = hdr
                self._last_block = (
                    block,
                    host,
                    length,
                    coding,
                    listed,
                    upgrade_to,
                    tail,
                    tail_body,
                )
        parts = [method, b" ", path, b" HTTP/1.1\r\n", block]
        extend = parts.extend
        if version is None:
            # llhttp accepts 0.9, 1.0, 1.1 and 2.0; only 1.1 keeps alive with no Connection.
            version = "1.1" if keep_alive and listed is None else self._parser.get_http_version()
        http11 = version == "1.1"
        if not http11 and version != "1.0":
            return self._bad_input(505 if version[:1] != "0" else 400, "unsupported version")
        self.http11 = http11
        if listed is not None and not listed <= CONNECTION_TOKENS_KEPT:
            if listed & _CONNECTION_TOKENS_REFUSED:
                return self._bad_input(400, "Connection names a framing header")
            parts = parts[:4]
            for name, value in hdr:
                lname = name.lower()
                if lname in listed or (lname in _REQUEST_SPECIAL and lname != b"host"):
                    continue
                parts.extend((name, b": ", value, b"\r\n"))
            extend = parts.extend
        if authority is not None:
            if host is None:
                extend((b"Host: ", authority, b"\r\n"))
            elif host.lower() != authority.lower():
                return self._bad_input(400, "Host differs from the request target")
            host = authority
        if host is None:
            return self._bad_input(400, "missing Host")
        has_body = chunked = False
        if coding is not None:
            if length is not None or coding.lower() != b"chunked" or not http11:
                return self._bad_input(400, "bad Transfer-Encoding")
            chunked = has_body = True
            extend((b"Transfer-Encoding: chunked\r\n",))
        elif length is not None:
            declared = int(length)
            if self._max_body is not None and declared > self._max_body:
                return self._bad_input(413, "request body too large")
            extend((b"Content-Length: %d\r\n" % declared,))
            has_body = declared > 0
        if upgrade:
            if has_body or upgrade_to is None or self._queue:
                return self._bad_input(400, "bad upgrade request")
            extend((b"Connection: upgrade\r\nUpgrade: ", upgrade_to, b"\r\n"))
        parts.append(b"\r\n")
        self._chunked_up = chunked
        self.upgrading = upgrade
        self.keep_alive = keep_alive
        self.close_after = not keep_alive or upgrade or self._closing
        return self._dispatch(method, path, host, has_body, b"".join(parts))

    def _dispatch_common(
        self, method: bytes, path: bytes, host: bytes, has_body: bool, tail: bytes
    ) -> bool:
        """The common request (HTTP/1.1, keep-alive, a Host, no Connection, no
        Transfer-Encoding) with fields already checked: its head in one join."""
        self.http11 = True
        self._chunked_up = False
        self.upgrading = False
        self.keep_alive = True
        self.close_after = self._closing
        return self._dispatch(method, path, host, has_body, b"".join((method, b" ", path, tail)))

    def _dispatch(
        self, method: bytes, path: bytes, host: bytes, has_body: bool, head: bytes
    ) -> bool:
        """Admit, route and pick for a checked request, and send ``head`` upstream."""
        self.head_request = method == b"HEAD"
        gate = self._gate
        if gate is not None:
            denied = gate.admit(method, path)
            if denied is not None:
                return self._local_reply(403, denied, has_body)

        if host == self._route_key:
            route = self._route
        else:
            route = self._router.route(host)
            self._route_key = host
            self._route = route
        if route is None:
            return self._local_reply(404, "no route for this host", has_body)
        now = _monotonic()
        delay = 0.0
        try:
            endpoint = route.pick(now)
        except InjectedFault as fault:
            if fault.status is not None:
                return self._local_reply(fault.status, "fault injected", has_body)
            endpoint, delay = fault.endpoint, fault.delay
        except Overloaded as overloaded:
            return self._local_reply(
                503,
                f"overloaded: {overloaded.reason}",
                has_body,
                extra=b"x-snapbright-overload: %s\r\n" % overloaded.reason.encode("ascii"),
            )
        if endpoint is None:
            return self._local_reply(503, "no endpoints", has_body)
        self._picked = route
        self._endpoint = endpoint
        self._reported = False
        self._t0 = now
        # Every request gets its deadline here (retries keep it): the upstream's own request
        # timeout if its TrafficPolicy sets one, else the listener's.
        timeout = route.request_timeout
        self._request_deadline = self._time() + (self._t_request if timeout is None else timeout)
        self._attempts = 1
        self._req_head = head
        self._retryable = not has_body and method in _RETRYABLE_METHODS and not self.upgrading
        self._up_out.append(head)
        if delay:
            self._connect(endpoint, delay)
            return True
        conn = self._pool.take(endpoint)
        if conn is not None:
            self._state = _WAITING
            self.deadline = self._request_deadline
            self._up = conn
            conn.bind(self, self._transport)  # type: ignore[arg-type]
        else:
            self._connect(endpoint)
        return True

    def _forward_body(self, body: bytes) -> None:
        if self._local or self._state == _DEAD:
            return
        size = len(body)
        if self._max_body is not None:
            self._body_seen += size
            if self._body_seen > self._max_body:
                self._abort_exchange(Failure.CANCELLED)
                self._bad_input(413, "request body too large")
                raise _Stop
        if self._chunked_up:
            self._up_out.extend((b"%x\r\n" % size, body, b"\r\n"))
        else:
            self._up_out.append(body)

    def _upgrade_tail(self, tail: bytes) -> None:
        """The request was an upgrade: what follows is for the upgraded protocol."""
        rec = self._rec
        if rec is not None or self._queue:
            # An upgrade read ahead behind another request: refuse it when its turn comes.
            target = rec if rec is not None else self._queue[-1]
            target.error = (400, "upgrade request pipelined")
            self._pause(_P_UPGRADE)
            self._upgrade_buf = []
            self._blocked = True
            return
        self._upgrade_buf = [tail] if tail else []
        self._blocked = True
        self._pause(_P_UPGRADE)

    # -- upstream --------------------------------------------------------------------------

    def _bind(self, conn: UpstreamConnection) -> None:
        transport = self._transport
        assert transport is not None
        self._up = conn
        conn.bind(self, transport)

    def _flush_up(self) -> None:
        up = self._up
        if up is None:
            return
        transport = up.transport
        out = self._up_out
        if transport is None:
            out.clear()
            return
        write_out(transport, out)

    def _connect(self, endpoint: EndpointAddress, delay: float = 0.0) -> None:
        self._state = _CONNECTING
        now = self._time()
        self.deadline = min(now + delay + self._t_connect, self._request_deadline)
        self._pause(_P_CONNECTING)
        self._connect_task = self._loop.create_task(self._connect_to(endpoint, delay))

    async def _connect_to(self, endpoint: EndpointAddress, delay: float = 0.0) -> None:
        try:
            if delay:
                # An injected delay: then a pooled connection if there is one.
                await asyncio.sleep(delay)
                conn = self._pool.take(endpoint) or await self._pool.connect(endpoint)
            else:
                conn = await self._pool.connect(endpoint)
        except OSError:
            self._connect_task = None
            if self._state == _CONNECTING:
                self._report_failure(Failure.CONNECT)
                if not self._retry_connect():
                    self._reply_error(502, "upstream connect failure")
            return
        self._connect_task = None
        if self._state != _CONNECTING or self._endpoint is not endpoint:
            # Nobody waits for it any more (timeout or client gone): keep it for the next.
            self._pool.release(conn)
            return
        self._state = _WAITING
        self.deadline = self._request_deadline
        self._bind(conn)
        self._flush_up()
        self._resume(_P_CONNECTING)

    def _retry_connect(self) -> bool:
        """After a connect failure (nothing was sent): try the endpoint the route offers.

        Only routes with a ``pick_retry(attempts, now)`` method retry; it returns ``None``
        when the request may not be tried again.
        """
        pick_retry = getattr(self._picked, "pick_retry", None)
        if pick_retry is None:
            return False
        self._attempts += 1
        now = _monotonic()
        endpoint: EndpointAddress | None = pick_retry(self._attempts, now)
        if endpoint is None:
            return False
        self._endpoint = endpoint
        self._reported = False
        self._t0 = now
        self._connect(endpoint)
        return True

    def report_response(self, conn: UpstreamConnection, status: int) -> None:
        """Response headers arrived: tell the route (once per pick)."""
        if self._reported:
            return
        self._reported = True
        now = _monotonic()
        self._picked.on_response(self._endpoint, status, now - self._t0, now)  # type: ignore[union-attr, arg-type]

    def _report_failure(self, failure: Failure) -> None:
        if self._reported:
            return
        self._reported = True
        now = time.monotonic()
        route = self._picked
        if route is not None and self._endpoint is not None:
            route.on_failure(self._endpoint, failure, now - self._t0, now)

    def response_done(self, conn: UpstreamConnection | None) -> None:
        """The upstream wrote the whole response; ``conn`` is kept if it can be reused."""
        self._up = None
        self._resp_done = True
        now = self._time()
        if conn is not None:
            # Back to the pool at once: an idle client holds no upstream connection, and the
            # next request of any client can take it.
            self._pool.release(conn)
        if self.request_done:
            if not (
                self._queue
                or self._paused
                or self.response_close
                or self.close_after
                or self._local
                or self._body_seen
            ):
                # The common end (nothing queued or paused, the connection stays): what
                # `_cycle_end` does for it, without the loop.
                self.request_done = False
                self._resp_done = False
                self._reported = True
                self._state = _IDLE
                self.deadline = now + self._t_idle
                return
            self._cycle_end(now)
        else:
            # Answered before the request body was read: the stream position is unknown.
            self._close()

    def upstream_failed(self, conn: UpstreamConnection, failure: Failure, reason: str) -> None:
        """The upstream connection broke or answered badly."""
        self._up = None
        if self._state not in (_WAITING, _CONNECTING, _PIPE):
            return
        if (
            failure is Failure.RESET
            and conn.reused
            and self._retryable
            and not conn.responded
            and self.request_done
        ):
            # A pooled connection the endpoint closed as we reused it: try a fresh one, once.
            self._retryable = False
            endpoint = self._endpoint
            assert endpoint is not None
            self._up_out = [self._req_head]
            self._connect(endpoint)
            return
        self._report_failure(failure)
        if conn.responded:
            self._abort()
        else:
            self._reply_error(502, reason)

    def start_pipe(self, conn: UpstreamConnection) -> None:
        """The upstream switched protocols: from now on bytes pass both ways unparsed."""
        self._state = _PIPE
        self.deadline = math.inf
        pending = self._upgrade_buf or []
        self._upgrade_buf = None
        self._blocked = False
        transport = conn.transport
        if pending and transport is not None:
            transport.writelines(pending)
        self._resume(_P_UPGRADE)

    def pipe_closed(self) -> None:
        """The upstream side of an upgraded connection closed."""
        self._up = None
        self._resp_done = True
        self._close()

    def _abort_exchange(self, failure: Failure) -> None:
        up = self._up
        self._up = None
        self._report_failure(failure)
        task = self._connect_task
        if task is not None:
            self._connect_task = None
            task.cancel()
        if up is not None:
            up.close()

    # -- ends of a request -----------------------------------------------------------------

    def _cycle_end(self, now: float) -> None:
        """Request and response are both complete: close, or serve the next request."""
        queue = self._queue
        while True:
            if self.response_close or self.close_after:
                self._close()
                return
            # Reset only what a request may leave set; `_start` assigns the rest.
            self.request_done = False
            self._resp_done = False
            self._reported = True
            if self._local or self._body_seen:
                self._local = False
                self._body_seen = 0
            self._state = _IDLE
            self.deadline = now + self._t_idle
            if self._paused:
                self._resume(_P_UPSTREAM)
            if not queue:
                if self._paused:
                    self._resume(_P_QUEUED)
                return
            rec = queue.pop(0)
            if rec.error is not None:
                status, reason = rec.error
                self._bad_input(status, reason)
                return
            live = rec is self._rec
            if live:
                self._rec = None
            if rec.head is None:
                # Only its first bytes are read: parse the rest as a live request.
                self._state = _HEAD
                self.deadline = self._time() + self._t_header
                self._resume(_P_QUEUED)
                return
            if not self._start(*rec.head):
                return
            try:
                for body in rec.body:
                    self._forward_body(body)
            except _Stop:
                return
            if rec.complete:
                if self._chunked_up:
                    self._up_out.append(b"0\r\n\r\n")
                self.request_done = True
            if self._up_out:
                self._flush_up()
            if not queue:
                self._resume(_P_QUEUED)
            if not (rec.complete and self._resp_done):
                return
            # Answered locally at once: go on with the next one.

    def _local_reply(self, status: int, reason: str, has_body: bool, extra: bytes = b"") -> bool:
        """Answer without going upstream; the connection stays if no body is left unread."""
        keep = self.keep_alive and not has_body and not self.upgrading
        transport = self._transport
        assert transport is not None
        transport.write(_error_response(status, reason, close=not keep, extra=extra))
        if not keep:
            self._close()
            return False
        self._local = True
        self._resp_done = True
        self._reported = True
        self.response_close = False
        return True

    def _reply_error(self, status: int, reason: str) -> None:
        """Answer with an error of the sidecar's own, then close (lingering)."""
        transport = self._transport
        self._state = _DEAD
        self.deadline = math.inf
        if transport is None or transport.is_closing():
            return
        transport.write(_error_response(status, reason, close=True))
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._paused = 0
        transport.resume_reading()
        self.deadline = self._time() + _LINGER

    def _bad_input(self, status: int, reason: str) -> bool:
        """The client sent something we refuse: answer ``status`` (if we still can), close.

        If it is a request read ahead behind one still being answered, the refusal waits
        for its turn so that responses stay in order.
        """
        if self._state == _DEAD:
            return False
        rec = self._rec
        if rec is not None or (self._state in (_CONNECTING, _WAITING) and self.request_done):
            if rec is None:
                rec = _Pending()
                self._queue.append(rec)
            rec.error = (status, reason)
            self._rec = None
            self._parse_dead = self._blocked = True
            self._pause(_P_QUEUED)
            return False
        if (self._up is not None or self._state in (_CONNECTING, _WAITING)) and not self._resp_done:
            up = self._up
            self._abort_exchange(Failure.CANCELLED)
            if up is not None and up.responded:
                # Part of a response is out: the client can only be told by a close.
                self._abort()
                return False
        self._up_out.clear()
        self._reply_error(status, reason)
        return False

    def _close(self) -> None:
        self._state = _DEAD
        self.deadline = math.inf
        transport = self._transport
        if transport is not None:
            transport.close()

    def _abort(self) -> None:
        self._state = _DEAD
        self.deadline = math.inf
        transport = self._transport
        if transport is not None:
            transport.abort()

    def expire(self, now: float) -> None:
        """Called by the sweep when ``deadline`` passed."""
        state = self._state
        self.deadline = math.inf
        if state == _IDLE:
            self._close()
        elif state == _DEAD:
            self._abort()
        elif state == _HEAD:
            self._reply_error(408, "request head not received in time")
        elif state == _CONNECTING:
            self._abort_exchange(Failure.CONNECT)
            self._reply_error(504, "upstream connect timeout")
        elif state == _WAITING:
            up = self._up
            responded = up is not None and up.responded
            self._abort_exchange(Failure.TIMEOUT)
            if responded:
                self._abort()
            else:
                self._reply_error(504, "upstream request timeout")

    def drain(self) -> None:
        """The listener is closing: close now if idle, else after the current response."""
        self.close_after = self._closing = True
        if self._state == _IDLE and not self._queue:
            self._close()

    def buffered(self) -> int:
        """Bytes this connection holds: its write buffers and read-ahead."""
        total = sum(len(part) for part in self._up_out)
        transport = self._transport
        if transport is not None:
            total += transport.get_write_buffer_size()
        up = self._up
        if up is not None and up.transport is not None:
            total += up.transport.get_write_buffer_size()
        for rec in self._queue:
            total += sum(len(part) for part in rec.body)
        return total


class OutboundServer:
    """A running outbound listener."""

    def __init__(self, server: asyncio.Server, shared: _Shared) -> None:
        self._server = server
        self._shared = shared
        self._closed = False

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets."""
        # uvloop's Server.sockets is a list where typeshed says tuple; compiled code (mypyc)
        # checks the declared type, so it is read untyped.
        server: Any = self._server
        return tuple(server.sockets)

    @property
    def port(self) -> int:
        """The port the listener is bound to (useful when it was started on port 0)."""
        port: int = self.sockets[0].getsockname()[1]
        return port

    @property
    def connection_count(self) -> int:
        """Open client connections."""
        return len(self._shared.connections)

    @property
    def upstream_connection_count(self) -> int:
        """Open upstream connections, idle or busy."""
        return len(self._shared.pool.connections)

    def buffered_bytes(self) -> int:
        """Bytes held in write buffers and read-ahead over all connections (diagnostics)."""
        return sum(conn.buffered() for conn in self._shared.connections)

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop accepting, let requests in flight finish for up to ``grace`` seconds, close."""
        if self._closed:
            return
        self._closed = True
        shared = self._shared
        shared.draining = True
        self._server.close()
        for conn in list(shared.connections):
            conn.drain()
        if shared.connections:
            shared.drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(shared.drained.wait(), grace)
        for conn in list(shared.connections):
            conn._abort()
        shared.pool.close()
        shared.sweep.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)


async def serve_outbound(
    host: str,
    port: int,
    routes: Router | Mapping[str, Sequence[tuple[str, int]]],
    *,
    limits: Limits | None = None,
    timeouts: Timeouts | None = None,
    backlog: int = 1024,
    gates: Callable[[asyncio.BaseTransport], RequestGate | None] | None = None,
    connector: Connector | None = None,
    wrap_protocol: Callable[[Callable[[], asyncio.Protocol]], Callable[[], asyncio.Protocol]]
    | None = None,
) -> OutboundServer:
    """Start the outbound HTTP/1.1 listener on ``host:port`` in the running loop.

    ``routes`` is a `Router`, or a mapping of service name to ``(host, port)`` endpoints
    served round robin. Close it with `OutboundServer.aclose`.

    Hooks for the inbound side and for mTLS upstreams: ``gates`` makes a `RequestGate` per
    accepted connection (``None`` refuses it); ``connector`` opens upstream connections in
    place of plain TCP; ``wrap_protocol`` wraps the connection protocol factory (e.g. to run
    a TLS handshake before the HTTP protocol sees the connection).
    """
    loop = asyncio.get_running_loop()
    router: Router = StaticRouter.from_endpoints(routes) if isinstance(routes, Mapping) else routes
    shared = _Shared(loop, router, limits or Limits(), timeouts or Timeouts())
    shared.gates = gates
    shared.pool.connector = connector
    factory: Callable[[], asyncio.Protocol] = lambda: _Downstream(shared)  # noqa: E731
    if wrap_protocol is not None:
        factory = wrap_protocol(factory)
    server = await loop.create_server(factory, host, port, backlog=backlog, reuse_address=True)
    return OutboundServer(server, shared)
