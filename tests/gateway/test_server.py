"""The gateway listener, live on 127.0.0.1: real sockets, real TLS end to end."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gateway.config.model import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.server import Gateway
from tests.gateway.hello import client_hello, hello_for, real_hello, records, sni_extension
from tests.gateway.pki import ThrowawayCA

MESH = "acme"
CLUSTER = "east"
PAYMENTS = f"payments.default.{CLUSTER}.{MESH}"
LEDGER = f"ledger.default.{CLUSTER}.{MESH}"
HIDDEN = f"hidden.default.{CLUSTER}.{MESH}"
BULK = f"bulk.default.{CLUSTER}.{MESH}"
FORWARDING = pytest.mark.parametrize("forwarding", ["splice", "protocol"])


@pytest.fixture(scope="module")
def ca() -> ThrowawayCA:
    return ThrowawayCA.create()


async def _tls_echo(ca: ThrowawayCA, name: str) -> asyncio.Server:
    """A TLS server for ``name`` that answers each read with ``<service>:<bytes>``."""
    label = name.split(".")[0].encode()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(label + b":" + data if len(data) < 1024 else data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ca.server_context([name]))


async def _tcp_backend(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except OSError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def _port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


def _config(
    services: dict[str, int], *, exported: bool = True, forwarding: str = "splice", **limits: Any
) -> GatewayConfig:
    entries = [
        {
            "name": name,
            "exported": exported,
            "endpoints": [{"address": "127.0.0.1", "port": port}],
        }
        for name, port in services.items()
    ]
    entries.append({"name": "hidden", "exported": False})
    return GatewayConfig.model_validate(
        {
            "apiVersion": "snapbright.io/v1alpha1",
            "kind": "GatewayConfig",
            "metadata": {"name": "gw"},
            "spec": {
                "cluster": CLUSTER,
                "mesh": MESH,
                "listen": {"address": "127.0.0.1", "port": 0},
                "forwarding": forwarding,
                "limits": limits,
                "services": entries,
            },
        },
        strict=False,
    )


@contextlib.asynccontextmanager
async def _running(config: GatewayConfig) -> AsyncIterator[tuple[Gateway, GatewayMetrics]]:
    metrics = GatewayMetrics()
    gateway = Gateway(config, metrics)
    await gateway.start()
    try:
        yield gateway, metrics
    finally:
        await gateway.close()


def _rejected(metrics: GatewayMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "snapbright_gateway_rejected_total", {"reason": reason}
    )
    return value or 0.0


async def _tls_round_trip(
    gateway: Gateway, ca: ThrowawayCA, name: str, payload: bytes = b"ping"
) -> bytes:
    host, port = gateway.address
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ca.client_context(), server_hostname=name
    )
    try:
        writer.write(payload)
        await writer.drain()
        return await reader.read(65536)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def _closed_by_gateway(reader: asyncio.StreamReader) -> bool:
    """True when the gateway closes the connection without sending anything."""
    try:
        async with asyncio.timeout(5):
            return await reader.read(1) == b""
    except ConnectionResetError:
        return True


@FORWARDING
async def test_a_tls_client_reaches_the_service_its_sni_names(
    ca: ThrowawayCA, forwarding: str
) -> None:
    payments, ledger = await _tls_echo(ca, PAYMENTS), await _tls_echo(ca, LEDGER)
    config = _config({"payments": _port(payments), "ledger": _port(ledger)}, forwarding=forwarding)
    async with _running(config) as (gateway, metrics):
        assert await _tls_round_trip(gateway, ca, PAYMENTS) == b"payments:ping"
        assert await _tls_round_trip(gateway, ca, LEDGER) == b"ledger:ping"
        forwarded = metrics.registry.get_sample_value(
            "snapbright_gateway_connections_total", {"result": "forwarded"}
        )
        assert forwarded == 2
    payments.close()
    ledger.close()


@pytest.mark.parametrize(
    ("name", "reason"),
    [(HIDDEN, "not-exported"), (f"payments.default.west.{MESH}", "unknown-name")],
)
async def test_unexported_and_unknown_names_are_closed_and_counted(
    ca: ThrowawayCA, name: str, reason: str
) -> None:
    payments = await _tls_echo(ca, PAYMENTS)
    async with _running(_config({"payments": _port(payments)})) as (gateway, metrics):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _tls_round_trip(gateway, ca, name)
        assert _rejected(metrics, reason) == 1
        assert gateway.active_connections == 0
    payments.close()


@FORWARDING
async def test_megabytes_pass_intact_both_ways(ca: ThrowawayCA, forwarding: str) -> None:
    payments = await _tls_echo(ca, PAYMENTS)
    config = _config({"payments": _port(payments)}, forwarding=forwarding)
    payload = os.urandom(4 * 1024 * 1024)
    async with _running(config) as (gateway, metrics):
        host, port = gateway.address
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ca.client_context(), server_hostname=PAYMENTS
        )

        async def send() -> None:
            for offset in range(0, len(payload), 1 << 20):
                writer.write(payload[offset : offset + (1 << 20)])
                await writer.drain()

        sender = asyncio.create_task(send())
        received = await reader.readexactly(len(payload))
        await sender
        assert received == payload
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        await _until(lambda: gateway.active_connections == 0)
        up = metrics.registry.get_sample_value(
            "snapbright_gateway_bytes_total", {"direction": "upstream"}
        )
        assert up is not None
        assert up > len(payload)
    payments.close()


@FORWARDING
async def test_a_half_close_one_way_keeps_the_other_way_open(forwarding: str) -> None:
    async def count_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = await reader.read()  # until the client's FIN
        writer.write(str(len(received)).encode())
        await writer.drain()

    backend = await _tcp_backend(count_then_answer)
    hello = hello_for(BULK)
    async with _running(_config({"bulk": _port(backend)}, forwarding=forwarding)) as (gw, _):
        reader, writer = await asyncio.open_connection(*gw.address)
        writer.write(hello + b"x" * 100_000)
        writer.write_eof()
        async with asyncio.timeout(5):
            answer = await reader.read()
        assert answer == str(len(hello) + 100_000).encode()
        writer.close()
    backend.close()


async def test_bad_clients_never_stall_a_good_one(ca: ThrowawayCA) -> None:
    payments = await _tls_echo(ca, PAYMENTS)
    hello = real_hello(PAYMENTS)
    bad_first_bytes = [
        b"",  # connects and says nothing
        hello[:7],  # slowloris: a record header and two bytes, then nothing
        hello[:-1],  # the whole hello but its last byte
        hello[:5] + hello[5:60],  # split over two writes, never finished
        b"\x16\x03\x01\x00",  # not even a record header
    ]
    config = _config({"payments": _port(payments)}, peekTimeout="30s")
    async with _running(config) as (gateway, _):
        bad: list[asyncio.StreamWriter] = []
        for index in range(50):
            _, writer = await asyncio.open_connection(*gateway.address)
            first = bad_first_bytes[index % len(bad_first_bytes)]
            if index % len(bad_first_bytes) == 3:
                writer.write(first[:5])
                await writer.drain()
                first = first[5:]
            writer.write(first)
            await writer.drain()
            bad.append(writer)
        await _until(lambda: gateway.active_connections == 50)
        async with asyncio.timeout(2):
            assert await _tls_round_trip(gateway, ca, PAYMENTS) == b"payments:ping"
        assert gateway.active_connections == 50  # the bad ones are all still hanging
        for writer in bad:
            writer.close()
    payments.close()


async def test_garbage_and_plaintext_are_closed_at_once_and_counted() -> None:
    async with _running(_config({})) as (gateway, metrics):
        for first, reason in [
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "plain-http"),
            (b"\x00\xffgarbage", "not-tls"),
            (b"\x80\x2e\x01\x00\x02", "sslv2-hello"),
        ]:
            reader, writer = await asyncio.open_connection(*gateway.address)
            writer.write(first)
            assert await _closed_by_gateway(reader)
            assert _rejected(metrics, reason) == 1
            writer.close()


async def test_a_silent_or_trickling_client_is_closed_after_the_peek_timeout() -> None:
    hello = real_hello(PAYMENTS)
    async with _running(_config({}, peekTimeout="200ms")) as (gateway, metrics):
        silent_reader, silent = await asyncio.open_connection(*gateway.address)
        trickle_reader, trickle = await asyncio.open_connection(*gateway.address)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for index in range(3):
            trickle.write(hello[index : index + 1])
            await asyncio.sleep(0.05)
        assert await _closed_by_gateway(silent_reader)
        assert await _closed_by_gateway(trickle_reader)
        assert 0.15 < loop.time() - started < 2.0
        assert _rejected(metrics, "peek-timeout") == 2
        silent.close()
        trickle.close()


async def test_connections_over_the_limit_are_closed_and_counted(ca: ThrowawayCA) -> None:
    payments = await _tls_echo(ca, PAYMENTS)
    config = _config({"payments": _port(payments)}, maxConnections=2)
    async with _running(config) as (gateway, metrics):
        _, first = await asyncio.open_connection(*gateway.address)
        _, second = await asyncio.open_connection(*gateway.address)
        await _until(lambda: gateway.active_connections == 2)
        third_reader, third = await asyncio.open_connection(*gateway.address)
        assert await _closed_by_gateway(third_reader)
        assert _rejected(metrics, "over-limit") == 1
        first.close()
        await _until(lambda: gateway.active_connections == 1)
        assert await _tls_round_trip(gateway, ca, PAYMENTS) == b"payments:ping"
        second.close()
        third.close()
    payments.close()


async def _hold_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()


@FORWARDING
async def test_an_idle_connection_is_closed_after_the_idle_timeout(forwarding: str) -> None:
    backend = await _tcp_backend(_hold_open)
    config = _config({"bulk": _port(backend)}, forwarding=forwarding, idleTimeout="200ms")
    async with _running(config) as (gateway, _):
        reader, writer = await asyncio.open_connection(*gateway.address)
        writer.write(hello_for(BULK))
        started = asyncio.get_running_loop().time()
        assert await _closed_by_gateway(reader)
        assert asyncio.get_running_loop().time() - started >= 0.15
        writer.close()
    backend.close()


async def _echo_plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


@FORWARDING
async def test_drain_stops_accepting_and_lets_open_connections_finish(forwarding: str) -> None:
    backend = await _tcp_backend(_echo_plain)
    hello = hello_for(BULK)
    async with _running(_config({"bulk": _port(backend)}, forwarding=forwarding)) as (gw, _):
        address = gw.address
        reader, writer = await asyncio.open_connection(*address)
        writer.write(hello)
        assert await reader.readexactly(len(hello)) == hello
        drain = asyncio.create_task(gw.drain(5.0))
        await _until(lambda: not gw.accepting)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*address)
        writer.write(b"still here")
        assert await reader.readexactly(10) == b"still here"
        assert not drain.done()
        writer.close()
        async with asyncio.timeout(2):
            assert await drain == 0
    backend.close()


async def test_drain_closes_what_is_left_at_the_deadline() -> None:
    backend = await _tcp_backend(_hold_open)
    async with _running(_config({"bulk": _port(backend)})) as (gateway, _):
        reader, writer = await asyncio.open_connection(*gateway.address)
        writer.write(hello_for(BULK))
        await _until(lambda: gateway.active_connections == 1)
        await asyncio.sleep(0.05)  # let the setup finish: the link, not the peek, must be cut
        assert await gateway.drain(0.2) == 1
        assert await _closed_by_gateway(reader)
        writer.close()
    backend.close()


async def test_an_unreachable_upstream_is_counted_and_the_client_closed() -> None:
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))
    dead_port = spare.getsockname()[1]
    spare.close()  # nothing listens there now
    async with _running(_config({"bulk": dead_port})) as (gateway, metrics):
        reader, writer = await asyncio.open_connection(*gateway.address)
        writer.write(hello_for(BULK))
        assert await _closed_by_gateway(reader)
        failed = metrics.registry.get_sample_value(
            "snapbright_gateway_connections_total", {"result": "upstream-failed"}
        )
        assert failed == 1
        writer.close()


async def _until(condition: Callable[[], bool]) -> None:
    """Poll (bounded) until ``condition`` holds: gateway state changes on the loop."""
    async with asyncio.timeout(5.0):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


async def test_a_new_config_changes_routes_for_new_connections(ca: ThrowawayCA) -> None:
    payments = await _tls_echo(ca, PAYMENTS)
    async with _running(_config({"payments": _port(payments)})) as (gateway, metrics):
        assert await _tls_round_trip(gateway, ca, PAYMENTS) == b"payments:ping"
        gateway.apply(_config({"payments": _port(payments)}, exported=False))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _tls_round_trip(gateway, ca, PAYMENTS)
        assert _rejected(metrics, "not-exported") == 1
    payments.close()


@FORWARDING
async def test_a_receiver_that_stops_reading_stops_the_sender(forwarding: str) -> None:
    total = 16 * 1024 * 1024
    release = asyncio.Event()
    received = asyncio.get_running_loop().create_future()

    async def read_later(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        received.set_result(len(await reader.read()))

    backend = await _tcp_backend(read_later)
    hello = hello_for(BULK)
    config = _config({"bulk": _port(backend)}, forwarding=forwarding, idleTimeout="1s")
    async with _running(config) as (gateway, metrics):
        _, writer = await asyncio.open_connection(*gateway.address)
        writer.write(hello + bytes(total))
        await asyncio.sleep(0.6)  # two sweeps: the byte counter shows what the gateway took
        taken = metrics.registry.get_sample_value(
            "snapbright_gateway_bytes_total", {"direction": "upstream"}
        )
        assert taken is not None
        # Kernel socket buffers hold some megabytes; the gateway itself holds at most ~64 KiB.
        assert taken < total / 2
        release.set()
        writer.write_eof()
        async with asyncio.timeout(10):
            assert await received == len(hello) + total
        writer.close()
    backend.close()


@FORWARDING
async def test_a_hello_fragmented_over_records_and_writes_reaches_upstream_byte_for_byte(
    forwarding: str,
) -> None:
    got = asyncio.get_running_loop().create_future()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.set_result(await reader.read())

    backend = await _tcp_backend(record)
    message = client_hello([sni_extension([(0, BULK.encode())])])
    stream = records(message, [3, 10, 40]) + b"\x17\x03\x03\x00\x02hi"
    config = _config({"bulk": _port(backend)}, forwarding=forwarding)
    async with _running(config) as (gateway, _):
        _, writer = await asyncio.open_connection(*gateway.address)
        for start in range(0, len(stream), 7):
            writer.write(stream[start : start + 7])
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.write_eof()
        async with asyncio.timeout(5):
            assert await got == stream
        writer.close()
    backend.close()
