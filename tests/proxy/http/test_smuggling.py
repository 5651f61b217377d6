"""Request-smuggling and limit corpus: each case is refused and nothing reaches the upstream.

Every case is sent whole and again one byte per TCP segment, so that no check depends on how
the bytes are split across reads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy.http import Limits, OutboundServer, serve_outbound
from tests.proxy.http.backend import Backend
from tests.proxy.http.client import Client
from tests.proxy.http.conftest import SHORT

H = b"POST / HTTP/1.1\r\nHost: svc\r\n"
CHUNKED = H + b"Transfer-Encoding: chunked\r\n\r\n"

# (case, bytes sent, status expected before the close)
CORPUS: list[tuple[str, bytes, int]] = [
    (
        "content-length with transfer-encoding",
        H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "transfer-encoding with content-length",
        H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "duplicate content-length, same value",
        H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        400,
    ),
    (
        "duplicate content-length, other value",
        H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
    ),
    ("content-length list", H + b"Content-Length: 5, 5\r\n\r\nhello", 400),
    ("content-length with plus sign", H + b"Content-Length: +5\r\n\r\nhello", 400),
    ("content-length in hex", H + b"Content-Length: 0x5\r\n\r\nhello", 400),
    ("negative content-length", H + b"Content-Length: -5\r\n\r\nhello", 400),
    ("content-length with trailing space", H + b"Content-Length: 5 \r\n\r\nhello", 400),
    ("empty content-length", H + b"Content-Length: \r\n\r\nhello", 400),
    ("content-length overflow", H + b"Content-Length: 99999999999999999999999\r\n\r\n", 400),
    (
        "transfer-encoding with trailing space",
        H + b"Transfer-Encoding: chunked \r\n\r\n0\r\n\r\n",
        400,
    ),
    ("transfer-encoding xchunked", H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    (
        "transfer-encoding chunked, identity",
        H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "transfer-encoding gzip, chunked",
        H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("transfer-encoding identity", H + b"Transfer-Encoding: identity\r\n\r\nhello", 400),
    (
        "transfer-encoding twice",
        H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "transfer-encoding split over two fields",
        H + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("space before colon", H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    (
        "transfer-encoding in http/1.0",
        b"POST / HTTP/1.0\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("bare LF line endings", b"POST / HTTP/1.1\nHost: svc\nContent-Length: 5\n\nhello", 400),
    ("bare LF after one header", H + b"X-A: 1\nContent-Length: 5\r\n\r\nhello", 400),
    ("bare CR in the head", H + b"X-A: 1\rContent-Length: 5\r\n\r\nhello", 400),
    ("obs-fold", H + b"X-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n", 400),
    ("obs-fold of transfer-encoding", H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    ("NUL in a value", H + b"X-A: a\x00b\r\nContent-Length: 0\r\n\r\n", 400),
    ("CR in a value", H + b"X-A: a\rb\r\nContent-Length: 0\r\n\r\n", 400),
    ("control character in a value", H + b"X-A: a\x01b\r\nContent-Length: 0\r\n\r\n", 400),
    ("invalid header name", H + b"X(A): 1\r\nContent-Length: 0\r\n\r\n", 400),
    ("empty header name", H + b": 1\r\nContent-Length: 0\r\n\r\n", 400),
    ("chunk size not hex", CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n", 400),
    ("negative chunk size", CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk size with 0x", CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", 400),
    ("space after chunk size", CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n", 400),
    ("chunk size overflow", CHUNKED + b"fffffffffffffffff\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk data longer than its size", CHUNKED + b"5\r\nhelloX\r\n0\r\n\r\n", 400),
    ("bare LF after chunk size", CHUNKED + b"5\nhello\r\n0\r\n\r\n", 400),
    ("request line too long", b"GET /" + b"a" * 400 + b" HTTP/1.1\r\nHost: svc\r\n\r\n", 414),
    ("header section too large", H + b"X-Big: " + b"b" * 1500 + b"\r\n\r\n", 431),
    ("too many header fields", H + b"".join(b"X-%d: 1\r\n" % i for i in range(25)) + b"\r\n", 431),
    ("body above the limit", H + b"Content-Length: 5000\r\n\r\n", 413),
    ("repeated Host", b"GET / HTTP/1.1\r\nHost: svc\r\nHost: other\r\n\r\n", 400),
    ("missing Host", b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n", 400),
    ("HTTP/0.9 request", b"GET /\r\n\r\n", 400),
    ("unknown HTTP version", b"GET / HTTP/1.2\r\nHost: svc\r\n\r\n", 400),
    ("HTTP/2.0 in an HTTP/1 request line", b"GET / HTTP/2.0\r\nHost: svc\r\n\r\n", 505),
    (
        "HTTP/1.0 asking keep-alive with Transfer-Encoding",
        b"POST / HTTP/1.0\r\nHost: svc\r\nConnection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "upgrade with a body",
        H + b"Connection: Upgrade\r\nUpgrade: ws\r\nContent-Length: 3\r\n\r\nabc",
        400,
    ),
    (
        "Connection naming Content-Length",
        H + b"Connection: content-length\r\nContent-Length: 5\r\n\r\nhello",
        400,
    ),
    ("Host differs from absolute target", b"GET http://svc/ HTTP/1.1\r\nHost: other\r\n\r\n", 400),
    ("CONNECT", b"CONNECT svc:80 HTTP/1.1\r\nHost: svc\r\n\r\n", 405),
    ("chunked body above the limit", CHUNKED + b"1000\r\n" + b"x" * 4096 + b"\r\n0\r\n\r\n", 413),
]


@pytest.fixture
async def strict_sidecar(backend: Backend) -> AsyncIterator[OutboundServer]:
    server = await serve_outbound(
        "127.0.0.1",
        0,
        {"svc": [("127.0.0.1", backend.port)]},
        limits=Limits(max_request_line=256, max_header_bytes=1024, max_headers=20, max_body=4000),
        timeouts=SHORT,
    )
    yield server
    await server.aclose(grace=0.5)


def test_corpus_has_enough_cases() -> None:
    assert len(CORPUS) >= 20
    assert len({name for name, _, _ in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("per_byte", [False, True], ids=["whole", "byte-per-segment"])
@pytest.mark.parametrize(("case", "raw", "status"), CORPUS, ids=[c[0] for c in CORPUS])
async def test_ambiguous_or_oversized_request_is_refused_and_never_forwarded(
    backend: Backend,
    strict_sidecar: OutboundServer,
    case: str,
    raw: bytes,
    status: int,
    per_byte: bool,
) -> None:
    client = await Client.open(strict_sidecar.port)
    await client.send(raw, per_byte=per_byte)
    answer = await client.read()
    assert answer.status == status, case
    assert answer.header(b"connection") == b"close"
    assert await client.closed()
    await client.close()
    assert backend.requests == [], f"{case}: a request reached the upstream"
    assert backend.errors == []


async def test_a_refused_request_does_not_poison_the_pooled_upstream_connection(
    backend: Backend, strict_sidecar: OutboundServer
) -> None:
    good = b"GET /ok HTTP/1.1\r\nHost: svc\r\n\r\n"
    client = await Client.open(strict_sidecar.port)
    await client.send(good)
    assert (await client.read()).status == 200
    await client.send(CHUNKED + b"5\r\nhelloX\r\n0\r\n\r\n")
    assert (await client.read()).status == 400
    await client.close()
    client = await Client.open(strict_sidecar.port)
    await client.send(good)
    answer = await client.read()
    assert answer.status == 200
    assert answer.body == b"/ok|"
    assert [r.target for r in backend.requests] == [b"/ok", b"/ok"]
    assert backend.errors == []
    await client.close()
