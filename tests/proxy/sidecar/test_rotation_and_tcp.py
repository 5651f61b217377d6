"""Certificate rotation under load without a failed request, and gRPC through a TCP port."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from proxy.sidecar.process import Sidecar
from proxy.tls.engine import connect
from tests.proxy.http.backend import Backend
from tests.proxy.http.client import Client
from tests.proxy.sidecar.mesh import (
    Cluster,
    inbound_port,
    outbound_port,
    sidecar_document,
    start_sidecar,
    target,
    write_bundle,
    write_config,
    write_svid,
)
from tests.proxy.sidecar.test_resilience import dead_port


@dataclass
class Pair:
    """checkout's sidecar calling payments' sidecar; paths of what rotation rewrites."""

    tmp: Path
    cluster: Cluster
    app: Backend
    caller: Sidecar
    callee: Sidecar
    tcp_port: int


async def _pair(tmp: Path, app_port: int, app: Backend) -> Pair:
    west = Cluster.create("us-west")
    bundles = {west.trust_domain.name: write_bundle(tmp, west.ca.bundle())}
    cert, key = write_svid(tmp, "payments", west.issue("payments"))
    callee = await start_sidecar(
        write_config(
            tmp / "payments.yaml", sidecar_document(west, "payments", app_port, cert, key, bundles)
        )
    )
    tcp_port = dead_port()
    cert, key = write_svid(tmp, "checkout", west.issue("checkout"))
    upstream = {
        "service": "payments",
        "tcpPort": tcp_port,
        "targets": [target("us-west", inbound_port(callee))],
    }
    document = sidecar_document(west, "checkout", 1, cert, key, bundles, upstreams=[upstream])
    caller = await start_sidecar(write_config(tmp / "checkout.yaml", document))
    return Pair(tmp, west, app, caller, callee, tcp_port)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    app = await Backend().start()
    pair = await _pair(tmp_path, app.port, app)
    yield pair
    await pair.caller.aclose(grace=1.0)
    await pair.callee.aclose(grace=1.0)
    await app.close()


async def _until(condition: Any, within: float = 5.0) -> None:
    for _ in range(int(within / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


def _serial(sidecar: Sidecar) -> int:
    assert sidecar.tls is not None
    return sidecar.tls.current.svid.serial


def _bundle_version(sidecar: Sidecar) -> str:
    assert sidecar.tls is not None
    return sidecar.tls.current.bundles.version


async def test_rotation_under_load_fails_no_request(pair: Pair) -> None:
    failures: list[str] = []
    done = 0
    stop = asyncio.Event()

    async def load() -> None:
        nonlocal done
        client = await Client.open(outbound_port(pair.caller))
        try:
            while not stop.is_set():
                await client.send(b"GET /x HTTP/1.1\r\nHost: payments\r\n\r\n")
                answer = await client.read()
                if answer.status != 200:
                    failures.append(f"{answer.status} {answer.body!r}")
                done += 1
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as error:
            failures.append(repr(error))
        finally:
            await client.close()

    async def burst(size: int) -> None:
        # More callers at once than the pool holds: new mTLS connections are made.
        await asyncio.gather(*(one_request() for _ in range(size)))

    async def one_request() -> None:
        nonlocal done
        client = await Client.open(outbound_port(pair.caller))
        try:
            await client.send(b"GET /y HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n")
            answer = await client.read()
            if answer.status != 200:
                failures.append(f"{answer.status} {answer.body!r}")
            done += 1
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as error:
            failures.append(repr(error))
        finally:
            await client.close()

    tasks = [asyncio.create_task(load()) for _ in range(4)]
    await burst(8)
    old_serials = (_serial(pair.caller), _serial(pair.callee))
    old_bundle = _bundle_version(pair.callee)
    # Roots first: a new root joins the bundle everywhere before anything is signed by it.
    rotated = pair.cluster.ca.rotate(pair.cluster.ca.active.root.not_valid_before_utc)
    write_bundle(pair.tmp, rotated.bundle())
    await _until(
        lambda: (
            _bundle_version(pair.callee) != old_bundle
            and _bundle_version(pair.caller) != old_bundle
        )
    )
    await burst(12)
    pair.cluster.ca = rotated
    write_svid(pair.tmp, "payments", pair.cluster.issue("payments"))
    write_svid(pair.tmp, "checkout", pair.cluster.issue("checkout"))
    await _until(
        lambda: (
            (_serial(pair.caller), _serial(pair.callee)) != old_serials
            and _serial(pair.caller) != old_serials[0]
            and _serial(pair.callee) != old_serials[1]
        )
    )
    await burst(16)
    stop.set()
    await asyncio.gather(*tasks)
    assert failures == []
    assert done > 50
    # New connections now get the new SVID: the callee presents it to a fresh handshake.
    assert pair.caller.tls is not None
    context = pair.caller.tls.current.client(pair.cluster.trust_domain, "http/1.1")
    assert context is not None
    transport, _ = await connect(
        asyncio.get_running_loop(),
        asyncio.Protocol,
        "127.0.0.1",
        inbound_port(pair.callee),
        context,
        "payments",
        5.0,
    )
    leaf = x509.load_der_x509_certificate(transport.peer_chain()[0])
    assert leaf.serial_number == _serial(pair.callee) != old_serials[1]
    transport.close()


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    metadata = dict(context.invocation_metadata())
    return request + b"|" + str(metadata.get("x-caller", "")).encode()


@contextlib.contextmanager
def grpc_app() -> Iterator[int]:
    """A gRPC server with one unary method, /echo.Echo/Say, answering raw bytes."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "echo.Echo", {"Say": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None).wait(2)


def _call(port: int) -> bytes:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        say: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/echo.Echo/Say")
        answer: bytes = say(b"hello", timeout=5.0, metadata=(("x-caller", "checkout"),))
        return answer


async def test_a_grpc_call_passes_through_the_tcp_port_over_mtls(tmp_path: Path) -> None:
    with grpc_app() as grpc_port:
        idle_app = await Backend().start()
        pair = await _pair(tmp_path, grpc_port, idle_app)
        try:
            answer = await asyncio.to_thread(_call, pair.tcp_port)
            assert answer == b"hello|checkout"
            assert pair.callee.metrics.inbound_rejections("forbidden") == 0
        finally:
            await pair.caller.aclose(grace=1.0)
            await pair.callee.aclose(grace=1.0)
            await idle_app.close()


async def test_a_tcp_port_moved_by_a_config_update_follows(tmp_path: Path) -> None:
    with grpc_app() as grpc_port:
        idle_app = await Backend().start()
        pair = await _pair(tmp_path, grpc_port, idle_app)
        try:
            moved = dead_port()
            path = tmp_path / "checkout.yaml"
            path.write_text(path.read_text().replace(str(pair.tcp_port), str(moved)))
            await _until(
                lambda: (
                    "payments" in pair.caller.tcp
                    and pair.caller.tcp["payments"].requested_port == moved
                )
            )
            assert await asyncio.to_thread(_call, moved) == b"hello|checkout"
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", pair.tcp_port)
        finally:
            await pair.caller.aclose(grace=1.0)
            await pair.callee.aclose(grace=1.0)
            await idle_app.close()
