"""The inbound listener on the TLS engine: handshake timeouts, closing, peers judged once.

A real `Inbound` in front of a real backend on 127.0.0.1, callers dialling with the engine's
client (the outbound side's path) or with bare TCP.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from proxy.identity.bundle import TrustBundleSet
from proxy.sidecar.inbound import Inbound
from proxy.sidecar.tls import ALPN_HTTP, MeshTls, TlsHolder
from proxy.tls.engine import TlsContext, connect
from tests.proxy.http.backend import Backend
from tests.proxy.identity.forge import forge_domain, forge_leaf

NOW = datetime.now(UTC)
WEST = forge_domain("us-west.acme", NOW)
CALLEE = forge_leaf(WEST, NOW)
CALLER = forge_leaf(WEST, NOW)
BUNDLES = TrustBundleSet([WEST.bundle()])
WAIT = 5.0


class Caller(asyncio.Protocol):
    """One HTTP/1.1 exchange over an engine connection."""

    def __init__(self) -> None:
        self.answer = asyncio.get_running_loop().create_future()
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data
        if b"\r\n\r\n" in self.data and not self.answer.done():
            self.answer.set_result(self.data)


@asynccontextmanager
async def inbound(handshake_timeout: float = WAIT) -> AsyncIterator[tuple[Inbound, Counter[str]]]:
    backend = await Backend().start()
    rejected: Counter[str] = Counter()
    listener = Inbound(
        TlsHolder(MeshTls(CALLEE, BUNDLES)),
        ("127.0.0.1", backend.port),
        WEST.trust_domain,
        on_reject=lambda reason: rejected.update([reason]),
        handshake_timeout=handshake_timeout,
    )
    await listener.serve("127.0.0.1", 0)
    try:
        yield listener, rejected
    finally:
        await listener.aclose(grace=0.1)
        await backend.close()


async def _get(port: int) -> bytes:
    context = TlsContext.client(CALLER, WEST.bundle(), (ALPN_HTTP,))
    transport, caller = await connect(
        asyncio.get_running_loop(), Caller, "127.0.0.1", port, context, "payments", WAIT
    )
    try:
        transport.write(b"GET /x HTTP/1.1\r\nHost: payments\r\nContent-Length: 0\r\n\r\n")
        return await asyncio.wait_for(caller.answer, WAIT)
    finally:
        transport.close()


async def test_a_caller_that_never_speaks_is_dropped_at_the_handshake_timeout() -> None:
    async with inbound(handshake_timeout=0.2) as (listener, rejected):
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        writer.close()
        await writer.wait_closed()
        assert rejected == Counter({"handshake-timeout": 1})


async def test_closing_the_listener_ends_the_handshakes_in_flight() -> None:
    async with inbound() as (listener, rejected):
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        await listener.aclose(grace=0.1)
        # Well before the 5 s handshake timeout, and not counted as the caller's fault.
        assert await asyncio.wait_for(reader.read(), 1.0) == b""
        writer.close()
        await writer.wait_closed()
        assert rejected == Counter()


async def test_a_peers_repeated_connections_are_judged_once_and_all_served() -> None:
    async with inbound() as (listener, rejected):
        for _ in range(3):
            answer = await _get(listener.port)
            assert answer.startswith(b"HTTP/1.1 200")
        assert len(listener.peer_check) == 1
        assert rejected == Counter()
