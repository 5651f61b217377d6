"""The fast paths: a client's common request, and an upstream's common response, again.

A keep-alive client repeats its header fields and an upstream its response head; after one
full parse the sidecar recognises the same bytes and skips the parser (see
`_Downstream._fast_request` and `UpstreamConnection._fast_response`). These tests hold the
fast paths to the parser's answers: the request-line pattern accepts only what llhttp accepts
and reads it the same way, and a warmed connection answers every request, hostile ones
included, exactly as a fresh connection does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.http import OutboundServer, serve_outbound
from proxy.http.server import _FAST_LINE
from tests.proxy.http.backend import Backend, Handler, Received
from tests.proxy.http.client import Client
from tests.proxy.http.conftest import SHORT

BLOCK = b"\r\nHost: svc\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n"
WARM = b"GET /warm HTTP/1.1" + BLOCK


class _Parsed:
    def __init__(self) -> None:
        self.url = b""
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.done = True


def _llhttp(line: bytes) -> tuple[bytes, bytes, str] | None:
    """How llhttp reads ``line`` as a request line (method, target, version), or None."""
    parsed = _Parsed()
    parser = httptools.HttpRequestParser(parsed)
    try:
        parser.feed_data(line + BLOCK)
    except httptools.HttpParserError:
        return None
    if not parsed.done:
        return None
    return parser.get_method(), parsed.url, parser.get_http_version()


_LINE_BYTES = st.sampled_from(
    [
        *(b"G", b"E", b"T", b"P", b"O", b"S", b"H", b"A", b"D", b"/", b" ", b"\t", b"a", b"%"),
        *(b"?", b"#", b"\\", b"\r", b"\n", b"\x00", b"\x7f", b"\xff", b":", b"@", b"*", b"~"),
        *(b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http://svc", b"GET", b"DELETE", b"get"),
    ]
)


@settings(max_examples=3000, deadline=None)
@given(st.lists(_LINE_BYTES, max_size=12).map(b"".join))
def test_the_fast_request_line_is_accepted_and_read_alike_by_llhttp(line: bytes) -> None:
    match = _FAST_LINE.fullmatch(line)
    if match is None:
        return
    assert _llhttp(line) == (match.group(1), match.group(2), "1.1")


@pytest.fixture
async def warm() -> AsyncIterator[tuple[Backend, OutboundServer]]:
    backend = await Backend().start()
    server = await serve_outbound(
        "127.0.0.1", 0, {"svc": [("127.0.0.1", backend.port)]}, timeouts=SHORT
    )
    yield backend, server
    await server.aclose(grace=1.0)
    await backend.close()


async def _outcome(
    backend: Backend, client: Client, data: bytes
) -> tuple[int, tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None, bool]:
    """The status, what the backend got (method, target, headers), and whether it closed."""
    before = len(backend.requests)
    await client.send(data)
    answer = await client.read()
    got: Received | None = backend.requests[before] if len(backend.requests) > before else None
    closed = answer.header(b"connection") == b"close"
    return answer.status, (None if got is None else (got.method, got.target, got.headers)), closed


LINES = [
    b"GET /a HTTP/1.1",
    b"GET /a?b=c&d=%20e HTTP/1.1",
    b"HEAD /a HTTP/1.1",
    b"DELETE /items/7 HTTP/1.1",
    b"OPTIONS * HTTP/1.1",
    b"POST /a HTTP/1.1",
    b"GET /a HTTP/1.0",
    b"GET /a#frag HTTP/1.1",
    b"GET http://svc/a HTTP/1.1",
    b"GET http://other/a HTTP/1.1",
    b"GET  /a HTTP/1.1",
    b"GET /a  HTTP/1.1",
    b"GET\t/a HTTP/1.1",
    b"GET /a\tb HTTP/1.1",
    b"GET /a\x00 HTTP/1.1",
    b"GET /\xff HTTP/1.1",
    b"get /a HTTP/1.1",
    b"GET /a HTTP/2.0",
    b"CONNECT svc:443 HTTP/1.1",
    b"GET a HTTP/1.1",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1",
    b"GET /a HTTP/1.1\r\nContent-Length: 3",
    b"GET /a HTTP/1.1\r\nHost: evil",
    b"GET /a HTTP/1.1\r\nTransfer-Encoding: chunked",
    b"GET /a HTTP/1.1\nX: y",
]


@pytest.mark.parametrize("line", LINES, ids=[repr(line[:40]) for line in LINES])
async def test_a_warmed_connection_answers_like_a_fresh_one(
    warm: tuple[Backend, OutboundServer], line: bytes
) -> None:
    backend, server = warm
    request = line + BLOCK
    if line.startswith(b"GET /a HTTP/1.1\r\nContent-Length"):
        request += b"abc"
    fresh = await Client.open(server.port)
    expected = await _outcome(backend, fresh, request)
    await fresh.close()
    warmed = await Client.open(server.port)
    for _ in range(3):
        assert (await _outcome(backend, warmed, WARM))[0] == 200
    assert await _outcome(backend, warmed, request) == expected
    await warmed.close()


async def test_pipelined_requests_on_a_warmed_connection_are_answered_in_order(
    warm: tuple[Backend, OutboundServer],
) -> None:
    _, server = warm
    client = await Client.open(server.port)
    for _ in range(3):
        await client.send(WARM)
        assert (await client.read()).status == 200
    await client.send(b"GET /one HTTP/1.1" + BLOCK + b"GET /two HTTP/1.1" + BLOCK)
    assert (await client.read()).body.startswith(b"/one|")
    assert (await client.read()).body.startswith(b"/two|")
    await client.close()


class _Deny:
    """A gate refusing the path /deny and adding a header."""

    def headers(self, hdr: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return [*hdr, (b"x-gate", b"1")]

    def admit(self, method: bytes, path: bytes) -> str | None:
        return "forbidden: no" if path == b"/deny" else None


async def test_the_gate_admits_every_request_of_a_warmed_connection_afresh() -> None:
    backend = await Backend().start()
    server = await serve_outbound(
        "127.0.0.1",
        0,
        {"svc": [("127.0.0.1", backend.port)]},
        timeouts=SHORT,
        gates=lambda transport: _Deny(),
    )
    client = await Client.open(server.port)
    for _ in range(3):
        assert (await _outcome(backend, client, WARM))[0] == 200
    status, got, _ = await _outcome(backend, client, b"GET /deny HTTP/1.1" + BLOCK)
    assert (status, got) == (403, None)
    status, got, _ = await _outcome(backend, client, b"GET /ok HTTP/1.1" + BLOCK)
    assert status == 200
    assert got is not None
    assert (b"x-gate", b"1") in got[2]
    await client.close()
    await server.aclose(grace=1.0)
    await backend.close()


async def _serve(handler: Handler) -> tuple[Backend, OutboundServer]:
    backend = await Backend(handler).start()
    server = await serve_outbound(
        "127.0.0.1", 0, {"svc": [("127.0.0.1", backend.port)]}, timeouts=SHORT
    )
    return backend, server


def _fixed(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nX-Same: 1\r\nContent-Length: %d\r\n\r\n%s%s" % (
        len(body),
        body,
        extra,
    )


async def test_a_repeated_response_head_passes_each_new_body_and_no_stale_one() -> None:
    bodies = iter([b"aaaa", b"bbbb", b"cccc", b"dddd", b"eeeeee", b"ffff", b"gggg"])

    async def handler(
        request: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        body = next(bodies)
        # A HEAD answer: the same head, no body.
        writer.write(_fixed(body)[: -len(body)] if request.method == b"HEAD" else _fixed(body))
        await writer.drain()
        return True

    backend, server = await _serve(handler)
    client = await Client.open(server.port)
    seen = []
    for _ in range(6):
        await client.send(WARM)
        answer = await client.read()
        assert answer.status == 200
        assert answer.header(b"x-same") == b"1"
        seen.append(answer.body)
    assert seen == [b"aaaa", b"bbbb", b"cccc", b"dddd", b"eeeeee", b"ffff"]
    # A HEAD and a closing request after the warm-up still get their own framing.
    await client.send(b"HEAD /h HTTP/1.1" + BLOCK)
    head = await client.read(head=True)
    assert (head.status, head.body, head.header(b"content-length")) == (200, b"", b"4")
    assert backend.connections == 1
    await client.close()
    await server.aclose(grace=1.0)
    await backend.close()


async def test_an_extra_response_after_a_repeated_one_breaks_the_upstream_connection() -> None:
    count = 0

    async def handler(
        request: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        nonlocal count
        count += 1
        # The fourth answer carries a second, unsolicited response in the same write.
        writer.write(_fixed(b"okok", _fixed(b"evil") if count == 4 else b""))
        await writer.drain()
        return True

    backend, server = await _serve(handler)
    client = await Client.open(server.port)
    for _ in range(3):
        await client.send(WARM)
        answer = await client.read()
        assert (answer.status, answer.body) == (200, b"okok")
    # The read with two responses is not the repeated one: parsed, and refused whole.
    await client.send(WARM)
    assert (await client.read()).status == 502
    assert await client.closed()
    await client.close()
    # The connection that sent the unsolicited response was not reused.
    client = await Client.open(server.port)
    await client.send(WARM)
    assert (await client.read()).body == b"okok"
    assert backend.connections == 2
    await client.close()
    await server.aclose(grace=1.0)
    await backend.close()
