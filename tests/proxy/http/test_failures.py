"""Timeouts, upstream failures and the sidecar's own answers (bounded real-time waits)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import pytest

from proxy.http import (
    EndpointAddress,
    Failure,
    OutboundServer,
    Overloaded,
    RoundRobinRoute,
    StaticEndpoint,
    StaticRouter,
    Timeouts,
    serve_outbound,
)
from tests.proxy.http.backend import Backend, Received, response
from tests.proxy.http.client import Client

FAST = Timeouts(connect=0.3, request=0.4, header=0.3, idle=0.4, upstream_idle=5.0)
GET = b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n"


class RecordingRoute:
    """Round robin that keeps what the forwarder reports, to check the seam's contract.

    It wraps RoundRobinRoute rather than subclassing it: the compiled hot path (mypyc)
    does not let interpreted classes inherit from its classes.
    """

    def __init__(self, endpoints: list[EndpointAddress]) -> None:
        self._turns = RoundRobinRoute(endpoints)
        self.request_timeout: float | None = None
        self.picks = 0
        self.responses: list[int] = []
        self.failures: list[Failure] = []

    def pick(self, now: float) -> EndpointAddress | None:
        self.picks += 1
        return self._turns.pick(now)

    def on_response(
        self, endpoint: EndpointAddress, status: int, latency: float, now: float
    ) -> None:
        assert latency >= 0
        self.responses.append(status)

    def on_failure(
        self, endpoint: EndpointAddress, failure: Failure, latency: float, now: float
    ) -> None:
        self.failures.append(failure)


async def start(route: RecordingRoute, timeouts: Timeouts = FAST) -> OutboundServer:
    return await serve_outbound("127.0.0.1", 0, StaticRouter({"svc": route}), timeouts=timeouts)


@pytest.fixture
async def route(backend: Backend) -> RecordingRoute:
    return RecordingRoute([StaticEndpoint("127.0.0.1", backend.port)])


@pytest.fixture
async def fast_sidecar(route: RecordingRoute) -> AsyncIterator[OutboundServer]:
    server = await start(route)
    yield server
    await server.aclose(grace=0.5)


async def test_slow_client_gets_408_and_a_close_within_the_header_timeout(
    backend: Backend, fast_sidecar: OutboundServer
) -> None:
    client = await Client.open(fast_sidecar.port)
    began = time.monotonic()
    await client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n")
    answer = await client.read(within=2)
    assert answer.status == 408
    assert await client.closed(within=3)
    assert time.monotonic() - began < 1.5
    assert backend.requests == []
    await client.close()


async def test_client_dripping_a_head_byte_by_byte_is_cut_off_at_the_header_timeout(
    backend: Backend, fast_sidecar: OutboundServer
) -> None:
    client = await Client.open(fast_sidecar.port)
    began = time.monotonic()
    reading = asyncio.create_task(client.read(within=3))
    for byte in b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 200:
        if reading.done():
            break
        client.writer.write(bytes([byte]))
        await asyncio.sleep(0.02)
    assert (await reading).status == 408
    assert time.monotonic() - began < 1.5
    await client.close()


async def test_silent_connection_is_closed_without_an_answer(fast_sidecar: OutboundServer) -> None:
    client = await Client.open(fast_sidecar.port)
    assert await client.reader.read() == b""
    await client.close()


async def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    backend: Backend, fast_sidecar: OutboundServer
) -> None:
    client = await Client.open(fast_sidecar.port)
    await client.send(GET)
    assert (await client.read()).status == 200
    began = time.monotonic()
    assert await client.reader.read() == b""
    assert 0.2 < time.monotonic() - began < 1.5
    await client.close()


async def test_refused_connection_is_502_and_reported_as_connect_failure() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    route = RecordingRoute([StaticEndpoint("127.0.0.1", port)])
    server = await start(route)
    client = await Client.open(server.port)
    await client.send(GET)
    answer = await client.read()
    assert answer.status == 502
    assert answer.body == b"upstream connect failure\n"
    assert route.failures == [Failure.CONNECT]
    await client.close()
    await server.aclose(grace=0.5)


async def test_connect_that_hangs_is_504_after_the_connect_timeout() -> None:
    # A listener that never accepts, with its backlog full, leaves new SYNs unanswered.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    route = RecordingRoute([StaticEndpoint("127.0.0.1", port)])
    server = await start(route)
    client = await Client.open(server.port)
    began = time.monotonic()
    await client.send(GET)
    answer = await client.read()
    elapsed = time.monotonic() - began
    try:
        assert answer.status == 504
        assert answer.body == b"upstream connect timeout\n"
        assert route.failures == [Failure.CONNECT]
        assert elapsed < 1.5
    finally:
        await client.close()
        await server.aclose(grace=0.5)
        for filler in fillers:
            filler.close()
        listener.close()


async def test_upstream_that_never_answers_is_504_after_the_request_timeout(
    backend: Backend, route: RecordingRoute, fast_sidecar: OutboundServer
) -> None:
    async def silent(request: Received, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(3)
        return False

    backend.handler = silent
    client = await Client.open(fast_sidecar.port)
    began = time.monotonic()
    await client.send(GET)
    answer = await client.read()
    assert answer.status == 504
    assert answer.body == b"upstream request timeout\n"
    assert time.monotonic() - began < 1.5
    assert route.failures == [Failure.TIMEOUT]
    assert await client.closed()
    await client.close()


async def test_the_routes_own_request_timeout_overrides_the_listeners(
    backend: Backend, route: RecordingRoute
) -> None:
    async def slow(request: Received, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(3)
        return False

    backend.handler = slow
    route.request_timeout = 0.2
    server = await start(route, Timeouts(connect=0.3, request=5.0, header=0.3, idle=5.0))
    client = await Client.open(server.port)
    began = time.monotonic()
    await client.send(GET)
    answer = await client.read()
    assert answer.status == 504
    assert time.monotonic() - began < 1.5  # the listener's 5 s would still be running
    assert route.failures == [Failure.TIMEOUT]
    await client.close()
    await server.aclose(grace=0.5)


async def test_a_later_request_that_needs_a_new_upstream_connection_gets_a_full_timeout(
    backend: Backend, route: RecordingRoute
) -> None:
    async def closing(request: Received, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(response(200, b"ok", [(b"Connection", b"close")]))
        await w.drain()
        return False

    backend.handler = closing
    server = await start(route, Timeouts(connect=0.3, request=0.3, header=0.3, idle=5.0))
    client = await Client.open(server.port)
    await client.send(GET)
    assert (await client.read()).status == 200
    # Longer than the request timeout: the next request's deadline is its own, not the
    # first one's (the upstream closed, so this one connects anew).
    await asyncio.sleep(0.5)
    await client.send(GET)
    assert (await client.read()).status == 200
    assert backend.connections == 2
    await client.close()
    await server.aclose(grace=0.5)


BAD_RESPONSES = [
    (
        "content-length with transfer-encoding",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "duplicate content-length",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    ),
    ("transfer-encoding not chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\nabc"),
    ("bare LF", b"HTTP/1.1 200 OK\nContent-Length: 3\n\nabc"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: 1\r\n b\r\nContent-Length: 3\r\n\r\nabc"),
    ("NUL in a value", b"HTTP/1.1 200 OK\r\nX-A: \x00\r\nContent-Length: 3\r\n\r\nabc"),
    ("not HTTP", b"SSH-2.0-OpenSSH\r\n\r\n"),
    (
        "101 nobody asked for",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n",
    ),
    (
        "smuggled second response",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil",
    ),
    (
        "bad chunk size",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    ),
]


@pytest.mark.parametrize(("case", "raw"), BAD_RESPONSES, ids=[c for c, _ in BAD_RESPONSES])
async def test_bad_upstream_response_is_502_and_never_reaches_the_client(
    backend: Backend, route: RecordingRoute, fast_sidecar: OutboundServer, case: str, raw: bytes
) -> None:
    async def bad(request: Received, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(raw)
        await w.drain()
        await asyncio.sleep(0.2)
        return False

    backend.handler = bad
    client = await Client.open(fast_sidecar.port)
    await client.send(GET)
    answer = await client.read()
    assert answer.status == 502, case
    assert answer.header(b"connection") == b"close"
    assert await client.closed()
    assert b"evil" not in answer.body
    await client.close()


async def test_upstream_closing_mid_body_closes_the_client_without_a_complete_response(
    backend: Backend, fast_sidecar: OutboundServer
) -> None:
    async def truncated(
        request: Received, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await w.drain()
        return False

    backend.handler = truncated
    client = await Client.open(fast_sidecar.port)
    await client.send(GET)
    head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 2)
    assert head.startswith(b"HTTP/1.1 200")
    rest = await asyncio.wait_for(client.reader.read(), 2)
    assert rest == b"only part"
    await client.close()


async def test_pooled_connection_closed_by_the_upstream_is_retried_once_for_a_get(
    backend: Backend, route: RecordingRoute, fast_sidecar: OutboundServer
) -> None:
    async def one_per_connection(
        request: Received, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> bool:
        # Answers as keep-alive, then closes: the sidecar's pooled connection is stale.
        w.write(response(200, b"x"))
        await w.drain()
        return False

    backend.handler = one_per_connection
    client = await Client.open(fast_sidecar.port)
    for _ in range(3):
        await client.send(GET)
        assert (await client.read()).status == 200
        await asyncio.sleep(0.02)
    assert route.responses == [200, 200, 200]
    assert route.failures == []
    await client.close()


async def test_every_pick_is_reported_exactly_once(
    backend: Backend, route: RecordingRoute, fast_sidecar: OutboundServer
) -> None:
    client = await Client.open(fast_sidecar.port)
    for _ in range(5):
        await client.send(GET)
        await client.read()
    await client.close()
    assert route.picks == 5
    assert route.responses == [200] * 5


async def test_route_without_endpoints_is_503() -> None:
    server = await start(RecordingRoute([]))
    client = await Client.open(server.port)
    await client.send(GET)
    answer = await client.read()
    assert answer.status == 503
    assert answer.body == b"no endpoints\n"
    # Nothing was left unread, so the connection stays usable.
    await client.send(GET)
    assert (await client.read()).status == 503
    await client.close()
    await server.aclose(grace=0.5)


async def test_overloaded_route_is_503_with_the_reason_header() -> None:
    class Shedding(RecordingRoute):
        def pick(self, now: float) -> EndpointAddress | None:
            raise Overloaded("max-pending")

    server = await start(Shedding([]))
    client = await Client.open(server.port)
    await client.send(GET)
    answer = await client.read()
    assert answer.status == 503
    assert answer.header(b"x-snapbright-overload") == b"max-pending"
    await client.close()
    await server.aclose(grace=0.5)


async def test_graceful_close_finishes_the_request_in_flight(
    backend: Backend, route: RecordingRoute
) -> None:
    async def slow(request: Received, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.1)
        w.write(response(200, b"done"))
        await w.drain()
        return True

    backend.handler = slow
    server = await start(route, Timeouts(request=2.0))
    client = await Client.open(server.port)
    await client.send(GET)
    await asyncio.sleep(0.02)
    closing = asyncio.create_task(server.aclose(grace=2.0))
    answer = await client.read()
    assert answer.body == b"done"
    assert answer.header(b"connection") == b"close"
    await closing
    assert server.connection_count == 0
    await client.close()
