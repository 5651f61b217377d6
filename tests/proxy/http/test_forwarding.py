"""HTTP/1.1 semantics through the outbound listener, on real sockets."""

from __future__ import annotations

import asyncio

from proxy.http import OutboundServer, serve_outbound
from tests.proxy.http.backend import Backend, Received, echo, response
from tests.proxy.http.client import Client

GET = b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n"


async def test_keep_alive_serves_many_requests_over_one_upstream_connection(
    backend: Backend, sidecar: OutboundServer
) -> None:
    client = await Client.open(sidecar.port)
    for index in range(20):
        await client.send(b"GET /%d HTTP/1.1\r\nHost: svc\r\n\r\n" % index)
        answer = await client.read()
        assert answer.status == 200
        assert answer.body == b"/%d|" % index
    assert backend.connections == 1
    assert len(backend.requests) == 20
    await client.close()


async def test_requests_from_separate_clients_reuse_pooled_connections(
    backend: Backend, sidecar: OutboundServer
) -> None:
    for _ in range(5):
        client = await Client.open(sidecar.port)
        await client.send(GET)
        assert (await client.read()).status == 200
        await client.close()
    assert backend.connections == 1


async def test_idle_clients_that_stay_connected_share_one_upstream_connection(
    backend: Backend, sidecar: OutboundServer
) -> None:
    # Each client makes one request and stays open: none keeps an upstream connection.
    clients = []
    for _ in range(10):
        client = await Client.open(sidecar.port)
        await client.send(GET)
        assert (await client.read()).status == 200
        clients.append(client)
    assert backend.connections == 1
    for client in clients:
        await client.close()


async def test_chunked_request_is_reframed_and_delivered_whole(
    backend: Backend, sidecar: OutboundServer
) -> None:
    client = await Client.open(sidecar.port)
    await client.send(
        b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    answer = await client.read()
    assert answer.body == b"/up|hello world"
    received = backend.requests[0]
    assert received.chunked
    assert received.header(b"x-trailer") is None
    await client.close()


async def test_chunked_response_is_reframed_for_the_client(
    backend: Backend, sidecar: OutboundServer
) -> None:
    async def chunked(request: Received, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;x=y\r\nabc\r\n4\r\ndefg\r\n0\r\nX-Trailer: 1\r\n\r\n"
        )
        await w.drain()
        return True

    backend.handler = chunked
    client = await Client.open(sidecar.port)
    for _ in range(2):
        await client.send(GET)
        answer = await client.read()
        assert answer.chunked
        assert answer.body == b"abcdefg"
    assert backend.connections == 1
    await client.close()


async def test_response_without_length_is_read_until_close_and_chunked_for_http11(
    backend: Backend, sidecar: OutboundServer
) -> None:
    async def until_close(
        request: Received, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\n\r\npart one, ")
        await w.drain()
        await asyncio.sleep(0.01)
        w.write(b"part two")
        await w.drain()
        return False

    backend.handler = until_close
    client = await Client.open(sidecar.port)
    await client.send(GET)
    answer = await client.read()
    assert answer.chunked
    assert answer.body == b"part one, part two"
    # The client connection survives the upstream's close.
    backend.handler = until_close
    await client.send(GET)
    assert (await client.read()).body == b"part one, part two"
    assert backend.connections == 2
    await client.close()


async def test_http10_client_gets_raw_body_then_close_when_length_is_unknown(
    backend: Backend, sidecar: OutboundServer
) -> None:
    async def chunked(request: Received, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        await w.drain()
        return True

    backend.handler = chunked
    client = await Client.open(sidecar.port)
    await client.send(b"GET / HTTP/1.0\r\nHost: svc\r\n\r\n")
    answer = await client.read()
    assert not answer.chunked
    assert answer.header(b"connection") == b"close"
    assert answer.body == b"abc"
    assert backend.requests[0].version == b"HTTP/1.1"
    await client.close()


async def test_http10_client_without_keep_alive_is_closed_after_the_response(
    backend: Backend, sidecar: OutboundServer
) -> None:
    client = await Client.open(sidecar.port)
    await client.send(b"GET /x HTTP/1.0\r\nHost: svc\r\n\r\n")
    answer = await client.read()
    assert answer.body == b"/x|"
    assert answer.header(b"connection") == b"close"
    assert await client.closed()
    await client.close()


async def test_http10_keep_alive_client_keeps_its_connection(
    backend: Backend, sidecar: OutboundServer
) -> None:
    client = await Client.open(sidecar.port)
    for _ in range(2):
        await client.send(b"GET /x HTTP/1.0\r\nHost: svc\r\nConnection: keep-alive\r\n\r\n")
        answer = await client.read()
        assert answer.header(b"connection") == b"keep-alive"
        assert answer.body == b"/x|"
    await client.close()


async def test_connection_close_from_client_is_honoured_and_not_forwarded(
    backend: Backend, sidecar: OutboundServer
) -> None:
    client = await Client.open(sidecar.port)
    await client.send(b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
    answer = await client.read()
    assert answer.header(b"connection") == b"close"
    assert await client.closed()
    await client.close()
    assert b"connection" not in backend.requests[0].names()


async def test_connection_close_from_upstream_keeps_the_client_connection(
    backend: Backend, sidecar: OutboundServer
) -> None:
    async def closing(request: Received, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(response(200, b"bye", [(b"Connection", b"close")]))
        await w.drain()
        return False

    backend.handler = closing
    client = await Client.open(sidecar.port)
    for _ in range(3):
        await client.send(GET)
        answer = await client.read()
        assert answer.body == b"bye"
        assert answer.header(b"connection") is None
    assert backend.connections == 3
    await client.close()


async def test_hop_by_hop_headers_are_removed_both_ways(
    backend: Backend, sidecar: OutboundServer
) -> None:
    async def hoppy(request: Received, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(
            response(
                200,
                b"x",
                [
                    (b"Connection", b"X-Private, keep-alive"),
                    (b"X-Private", b"secret"),
                    (b"Keep-Alive", b"timeout=5"),
                    (b"Proxy-Connection", b"keep-alive"),
                    (b"Trailer", b"X-T"),
                    (b"Upgrade", b"h2c"),
                    (b"X-End", b"kept"),
                ],
            )
        )
        await w.drain()
        return True

    backend.handler = hoppy
    client = await Client.open(sidecar.port)
    await client.send(
        b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n"
        b"Keep-Alive: 300\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X\r\n"
        b"Upgrade: h2c\r\nX-Kept: yes\r\n\r\n"
    )
    answer = await client.read()
    assert answer.names() == {b"x-end", b"content-length"}
    sent = backend.requests[0]
    assert sent.names() == {b"host", b"x-kept"}
    await client.close()


async def test_expect_100_continue_passes_the_interim_response(
    backend: Backend, sidecar: OutboundServer
) -> None:
    # The backend answers 100 before reading the body; read_request would wait for the body.
    served: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        served.append(head)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        body = await reader.readexactly(5)
        writer.write(response(200, body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    sidecar2 = await serve_outbound(
        "127.0.0.1", 0, {"svc": [("127.0.0.1", server.sockets[0].getsockname()[1])]}
    )
    client = await Client.open(sidecar2.port)
    await client.send(
        b"POST / HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    )
    interim = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 ")
    await client.send(b"hello")
    answer = await client.read()
    assert answer.body == b"hello"
    assert b"expect: 100-continue" in served[0].lower()
    await client.close()
    await sidecar2.aclose(grace=0.5)
    server.close()


async def test_pipelined_requests_are_answered_in_order(
    backend: Backend, sidecar: OutboundServer
) -> None:
    async def slow_first(
        request: Received, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> bool:
        if request.target == b"/1":
            await asyncio.sleep(0.05)
        w.write(response(200, request.target + b"|" + request.body))
        await w.drain()
        return True

    backend.handler = slow_first
    client = await Client.open(sidecar.port)
    await client.send(
        b"GET /1 HTTP/1.1\r\nHost: svc\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /3 HTTP/1.1\r\nHost: nowhere\r\n\r\n"
        b"POST /4 HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n"
    )
    bodies = [(await client.read()) for _ in range(4)]
    assert [a.status for a in bodies] == [200, 200, 404, 200]
    assert bodies[0].body == b"/1|"
    assert bodies[1].body == b"/2|abc"
    assert bodies[3].body == b"/4|xy"
    await client.close()


async def test_head_and_bodiless_statuses_carry_no_body(
    backend: Backend, sidecar: OutboundServer
) -> None:
    async def bodiless(request: Received, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        if request.method == b"HEAD":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        elif request.target == b"/204":
            w.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        else:
            w.write(b'HTTP/1.1 304 Not Modified\r\nETag: "e"\r\n\r\n')
        await w.drain()
        return True

    backend.handler = bodiless
    client = await Client.open(sidecar.port)
    await client.send(b"HEAD / HTTP/1.1\r\nHost: svc\r\n\r\n")
    head = await client.read(head=True)
    assert head.header(b"content-length") == b"1234"
    await client.send(b"GET /204 HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert (await client.read()).status == 204
    await client.send(b"GET /304 HTTP/1.1\r\nHost: svc\r\n\r\n")
    answer = await client.read()
    assert answer.status == 304
    assert answer.header(b"etag") == b'"e"'
    # Nothing stray arrived: the next response is the next request's.
    backend.handler = echo
    await client.send(GET)
    assert (await client.read()).body == b"/a|"
    assert backend.connections == 1
    await client.close()


async def test_upgrade_becomes_a_byte_pipe_both_ways(
    backend: Backend, sidecar: OutboundServer
) -> None:
    async def websocket(
        request: Received, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> bool:
        assert request.header(b"upgrade") == b"websocket"
        assert request.header(b"connection") == b"upgrade"
        w.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            b"hello from upstream;"
        )
        await w.drain()
        while data := await r.read(65536):
            w.write(data.upper())
            await w.drain()
        return False

    backend.handler = websocket
    client = await Client.open(sidecar.port)
    await client.send(
        b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nearly;"
    )
    head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"Upgrade: websocket" in head
    expected = b"hello from upstream;EARLY;"
    got = await asyncio.wait_for(client.reader.readexactly(len(expected)), 5)
    assert got == expected
    await client.send(b"ping")
    assert await asyncio.wait_for(client.reader.readexactly(4), 5) == b"PING"
    await client.close()


async def test_unknown_host_is_404_and_the_connection_stays(
    backend: Backend, sidecar: OutboundServer
) -> None:
    client = await Client.open(sidecar.port)
    await client.send(b"GET / HTTP/1.1\r\nHost: other\r\n\r\n")
    answer = await client.read()
    assert answer.status == 404
    assert answer.body == b"no route for this host\n"
    await client.send(b"GET /ok HTTP/1.1\r\nHost: SVC:8080\r\n\r\n")
    assert (await client.read()).body == b"/ok|"
    assert backend.requests[0].header(b"host") == b"SVC:8080"
    await client.close()


async def test_absolute_form_target_is_sent_in_origin_form(
    backend: Backend, sidecar: OutboundServer
) -> None:
    client = await Client.open(sidecar.port)
    await client.send(b"GET http://svc/p?q=1 HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert (await client.read()).status == 200
    assert backend.requests[0].target == b"/p?q=1"
    await client.close()


async def test_alternating_endpoints_each_keep_one_pooled_connection() -> None:
    first, second = await Backend().start(), await Backend().start()
    server = await serve_outbound(
        "127.0.0.1", 0, {"svc": [("127.0.0.1", first.port), ("127.0.0.1", second.port)]}
    )
    client = await Client.open(server.port)
    for index in range(6):
        await client.send(b"GET /%d HTTP/1.1\r\nHost: svc\r\n\r\n" % index)
        assert (await client.read()).body == b"/%d|" % index
    assert [r.target for r in first.requests] == [b"/0", b"/2", b"/4"]
    assert [r.target for r in second.requests] == [b"/1", b"/3", b"/5"]
    assert (first.connections, second.connections) == (1, 1)
    assert server.upstream_connection_count == 2
    await client.close()
    await server.aclose(grace=0.5)
    await first.close()
    await second.close()


async def test_pipelined_request_whose_body_arrives_later_is_completed(
    backend: Backend, sidecar: OutboundServer
) -> None:
    async def slow_first(
        request: Received, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> bool:
        if request.target == b"/1":
            await asyncio.sleep(0.05)
        w.write(response(200, request.target + b"|" + request.body))
        await w.drain()
        return True

    backend.handler = slow_first
    client = await Client.open(sidecar.port)
    await client.send(
        b"GET /1 HTTP/1.1\r\nHost: svc\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\nhello"
    )
    assert (await client.read()).body == b"/1|"
    await asyncio.sleep(0.02)
    await client.send(b"world")
    assert (await client.read()).body == b"/2|helloworld"
    await client.close()


async def test_client_half_closing_after_its_request_still_gets_the_response(
    backend: Backend, sidecar: OutboundServer
) -> None:
    client = await Client.open(sidecar.port)
    await client.send(GET)
    client.writer.write_eof()
    answer = await client.read()
    assert answer.body == b"/a|"
    assert answer.header(b"connection") == b"close"
    assert await client.closed()
    await client.close()


async def test_upgrade_refused_by_the_upstream_is_answered_then_closed(
    backend: Backend, sidecar: OutboundServer
) -> None:
    client = await Client.open(sidecar.port)
    await client.send(
        b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    answer = await client.read()
    assert answer.status == 200
    assert answer.body == b"/ws|"
    assert answer.header(b"connection") == b"close"
    assert await client.closed()
    await client.close()


async def test_changing_headers_on_one_connection_are_each_checked_afresh(
    backend: Backend, sidecar: OutboundServer
) -> None:
    client = await Client.open(sidecar.port)
    plain = b"POST /p HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nab"
    for _ in range(2):
        await client.send(plain)
        assert (await client.read()).body == b"/p|ab"
    await client.send(b"POST /p HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\nContent-Length: 3\r\n\r\nabc")
    assert (await client.read()).body == b"/p|abc"
    await client.send(plain)
    assert (await client.read()).body == b"/p|ab"
    await client.send(b"POST /p HTTP/1.1\r\nHost: svc\r\nHost: svc\r\nContent-Length: 2\r\n\r\nab")
    assert (await client.read()).status == 400
    assert await client.closed()
    assert [r.body for r in backend.requests] == [b"ab", b"ab", b"abc", b"ab"]
    await client.close()
