"""The demo app on 127.0.0.1: HTTP echo, knobs at runtime, healthz, gRPC echo, the caller."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import aiohttp
import grpc
import pytest

from snapbright.demo.api.v1 import echo_pb2, echo_pb2_grpc
from snapbright.demo.core import Knobs
from snapbright.demo.server import DemoApp, Upstream
from tests.snapbright.demo.conftest import StartDemo

PEER = "spiffe://us-west.demo/ns/default/sa/checkout"


async def _get(
    app: DemoApp, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.port}{path}", headers=headers) as response,
    ):
        body: dict[str, Any] = await response.json()
        return response.status, body, time.monotonic() - started


async def _knobs(
    app: DemoApp, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{app.port}/_demo/knobs"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as response,
    ):
        answer: dict[str, Any] = await response.json()
        return response.status, answer


async def test_the_echo_names_service_cluster_replica_path_and_caller(
    start_demo: StartDemo,
) -> None:
    app = await start_demo(replica="1")
    status, body, _ = await _get(app, "/orders/42?x=1", {"x-snapbright-peer-id": PEER})
    assert status == 200
    assert body == {
        "service": "pay",
        "cluster": "us-west",
        "replica": "1",
        "method": "GET",
        "host": f"127.0.0.1:{app.port}",
        "path": "/orders/42",
        "peerId": PEER,
    }


async def test_the_echo_says_when_no_caller_identity_came_with_the_request(
    start_demo: StartDemo,
) -> None:
    app = await start_demo()
    _, body, _ = await _get(app, "/")
    assert body["peerId"] is None


async def test_latency_set_at_start_delays_every_request(start_demo: StartDemo) -> None:
    app = await start_demo(knobs=Knobs(latency=0.1))
    _, _, elapsed = await _get(app, "/")
    assert 0.1 <= elapsed < 0.1 + 0.1


async def test_knobs_change_latency_and_errors_at_runtime(start_demo: StartDemo) -> None:
    app = await start_demo()
    _, _, fast = await _get(app, "/")
    status, knobs = await _knobs(app, {"latency": "150ms"})
    _, _, slow = await _get(app, "/")
    assert status == 200
    assert knobs == {"latency": "150ms", "jitter": "0ms", "errorRate": 0.0}
    assert fast < 0.1
    assert 0.15 <= slow < 0.25

    await _knobs(app, {"latency": "0ms", "errorRate": "100%"})
    status, body, _ = await _get(app, "/")
    assert status == 503
    assert body["service"] == "pay"
    await _knobs(app, {"reset": True})
    status, _, _ = await _get(app, "/")
    assert status == 200


async def test_healthz_answers_whatever_the_knobs(start_demo: StartDemo) -> None:
    app = await start_demo(knobs=Knobs(latency=1.0, error_rate=1.0))
    status, body, elapsed = await _get(app, "/healthz")
    assert (status, body) == (200, {"status": "ok"})
    assert elapsed < 0.5


async def test_knobs_are_refused_to_requests_that_came_through_the_mesh(
    start_demo: StartDemo,
) -> None:
    app = await start_demo()
    status, answer = await _knobs(app, {"errorRate": 1.0}, {"x-snapbright-peer-id": PEER})
    assert status == 403
    assert "local only" in answer["error"]
    assert app.knobs == Knobs()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"latency": "slow"}, "invalid duration"),
        ({"errorRate": 2}, "between 0% and 100%"),
        ({"delay": "1ms"}, "Extra inputs"),
    ],
)
async def test_a_bad_knob_is_refused_with_a_reason(
    start_demo: StartDemo, body: dict[str, Any], reason: str
) -> None:
    app = await start_demo()
    status, answer = await _knobs(app, body)
    assert status == 400
    assert reason in answer["error"]
    assert app.knobs == Knobs()


async def test_grpc_echo_answers_with_who_answered_and_who_called(
    start_demo: StartDemo,
) -> None:
    app = await start_demo(cluster="ap-southeast", replica="2")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        reply = await stub.Echo(
            echo_pb2.EchoRequest(message="hi"),
            metadata=(("x-snapbright-peer-id", PEER),),
            timeout=5,
        )
    assert (reply.message, reply.service, reply.cluster, reply.replica) == (
        "hi",
        "pay",
        "ap-southeast",
        "2",
    )
    assert reply.peer_id == PEER


async def test_grpc_echo_fails_as_unavailable_at_the_error_rate(start_demo: StartDemo) -> None:
    app = await start_demo(knobs=Knobs(error_rate=1.0))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.Echo(echo_pb2.EchoRequest(message="hi"), timeout=5)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_caller_calls_its_upstream_at_its_rate_and_reports_its_latency(
    start_demo: StartDemo,
) -> None:
    callee = await start_demo(cluster="ap-southeast", knobs=Knobs(latency=0.03))
    out = io.StringIO()
    caller = await start_demo(
        name="checkout",
        grpc_port=None,
        upstreams=(Upstream("pay", f"http://127.0.0.1:{callee.port}/"),),
        rate=20.0,
        report_every=0.4,
        out=out,
    )
    await asyncio.sleep(0.5)
    summary = caller.calls("pay")
    assert 5 <= summary.calls <= 12
    assert summary.errors == 0
    assert summary.clusters == {"ap-southeast": summary.calls}
    assert summary.p50 is not None
    assert 0.03 <= summary.p50 < 0.1
    status, body, _ = await _get(caller, "/_demo/calls")
    assert status == 200
    assert body["pay"]["clusters"] == {"ap-southeast": body["pay"]["calls"]}
    assert out.getvalue().startswith("checkout@us-west → pay: ")
    assert "0 errors, p50 " in out.getvalue()


async def test_a_caller_names_its_upstream_in_the_host_header(start_demo: StartDemo) -> None:
    # The sidecar routes on Host: the caller must say which service it calls.
    heads: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        body = b'{"cluster": "us-west"}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        caller = await start_demo(
            name="checkout",
            grpc_port=None,
            upstreams=(Upstream("payments", f"http://127.0.0.1:{port}"),),
            rate=50.0,
        )
        for _ in range(100):
            if caller.calls("payments").calls:
                break
            await asyncio.sleep(0.01)
    finally:
        server.close()
    assert heads
    assert b"\r\nHost: payments\r\n" in heads[0]
    assert caller.calls("payments").clusters == {"us-west": caller.calls("payments").calls}
