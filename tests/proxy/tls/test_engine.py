"""The TLS engine over real sockets on 127.0.0.1: handshakes, refusals, records, closes.

Certificates are real (tests/proxy/identity/forge.py) and made around the wall clock's now,
since OpenSSL checks validity against the real clock. Every wait is on an event the engine
causes, bounded by a timeout; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.bindings.openssl.binding import Binding
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL

from proxy.identity.bundle import TrustBundleSet
from proxy.identity.model import SpiffeId
from proxy.identity.svid import Purpose, Rejection, SvidError, X509Svid
from proxy.tls.context import client_context as stdlib_client_context
from proxy.tls.context import server_context as stdlib_server_context
from proxy.tls.engine import TlsContext, TlsError, TlsTransport, connect, server_factory
from proxy.tls.peer import PeerCheck
from tests.proxy.identity.forge import forge_domain, forge_leaf

NOW = datetime.now(UTC)
A = forge_domain("a.mesh", NOW)
B = forge_domain("b.mesh", NOW, intermediate=True)
STRANGER = forge_domain("x.mesh", NOW)
SERVER = forge_leaf(A, NOW)  # spiffe://a.mesh/ns/default/sa/api
CLIENT = forge_leaf(B, NOW)  # spiffe://b.mesh/ns/default/sa/api, under B's intermediate
BUNDLES = TrustBundleSet([A.bundle(), B.bundle()])
ALPN = ("http/1.1", "snapbright-tcp")
SERVER_CONTEXT = TlsContext.server(SERVER, BUNDLES, ALPN)
CLIENT_CONTEXT = TlsContext.client(CLIENT, A.bundle(), ("http/1.1",))
WAIT = 5.0
_lib: Any = Binding.lib


class App(asyncio.Protocol):
    """An application protocol that records what the engine tells it (optionally echoing)."""

    def __init__(self, *, echo: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.echo = echo
        self.transport: TlsTransport | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.eofs = 0
        self.writing_paused = asyncio.Event()
        self.writing_resumed = asyncio.Event()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()
        self._grew = asyncio.Event()

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TlsTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert type(data) is bytes
        self.chunks.append(data)
        self.size += len(data)
        self._grew.set()
        if self.echo:
            assert self.transport is not None
            self.transport.write(data)

    def eof_received(self) -> bool | None:
        self.eofs += 1
        return None

    def pause_writing(self) -> None:
        self.writing_paused.set()

    def resume_writing(self) -> None:
        self.writing_resumed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        assert not self.lost.done(), "connection_lost twice"
        self.lost.set_result(exc)

    async def received(self, size: int) -> bytes:
        """Wait until at least ``size`` bytes arrived; all of them."""
        async with asyncio.timeout(WAIT):
            while self.size < size:
                self._grew.clear()
                await self._grew.wait()
        return self.data


class Server:
    """An engine server: the apps it made, the peers it accepted, the failures it counted."""

    def __init__(self, make_app: Callable[[TlsTransport], asyncio.Protocol | None]) -> None:
        self.make_app = make_app
        self.apps: asyncio.Queue[App] = asyncio.Queue()
        self.failures: asyncio.Queue[str] = asyncio.Queue()
        self.refused: asyncio.Queue[Rejection] = asyncio.Queue()
        self.peers: list[SpiffeId] = []
        self.alpns: list[str | None] = []
        self.chains: list[tuple[bytes, ...]] = []
        self.check = PeerCheck()
        self.port = 0

    def on_handshake(self, transport: TlsTransport) -> asyncio.BaseProtocol | None:
        chain = transport.peer_chain()
        self.chains.append(chain)
        try:
            peer = self.check.verify(chain, BUNDLES, datetime.now(UTC), Purpose.CLIENT)
        except SvidError as error:
            self.refused.put_nowait(error.reason)
            return None
        self.peers.append(peer)
        self.alpns.append(transport.alpn)
        app = self.make_app(transport)
        if isinstance(app, App):
            self.apps.put_nowait(app)
        return app

    async def app(self) -> App:
        return await asyncio.wait_for(self.apps.get(), WAIT)

    async def failure(self) -> str:
        return await asyncio.wait_for(self.failures.get(), WAIT)


@asynccontextmanager
async def engine_server(
    make_app: Callable[[TlsTransport], asyncio.Protocol | None] = lambda _: App(echo=True),
    *,
    timeout: float = WAIT,  # noqa: ASYNC109 - the server's handshake timeout
    wrap: Callable[[asyncio.Protocol], asyncio.Protocol] | None = None,
    context: TlsContext = SERVER_CONTEXT,
) -> AsyncIterator[Server]:
    """An engine server on 127.0.0.1 (``wrap`` puts an adapter in front of each connection)."""
    server = Server(make_app)
    factory = server_factory(
        lambda: context, server.on_handshake, server.failures.put_nowait, timeout
    )
    made: list[TlsTransport] = []

    def protocol() -> asyncio.Protocol:
        made.append(factory())
        return made[-1] if wrap is None else wrap(made[-1])

    listener = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        for transport in made:
            transport.abort()
        await _settle()


async def dial(
    port: int, context: TlsContext = CLIENT_CONTEXT, **kwargs: Any
) -> tuple[TlsTransport, App]:
    return await connect(
        asyncio.get_running_loop(), App, "127.0.0.1", port, context, "api.a.mesh", WAIT, **kwargs
    )


async def closed(app: App) -> Exception | None:
    return await asyncio.wait_for(asyncio.shield(app.lost), WAIT)


def der(svid: X509Svid) -> list[bytes]:
    return [cert.public_bytes(serialization.Encoding.DER) for cert in svid.chain]


async def _settle() -> None:
    """Let the loop run the callbacks that aborts and closes scheduled (connection_lost)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await asyncio.wait_for(writer.wait_closed(), WAIT)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def stream_server(handler: Handler, **kwargs: Any) -> AsyncIterator[int]:
    """A stdlib asyncio server on 127.0.0.1 whose handlers all finish before it is gone."""
    running: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        running.add(task)
        try:
            await handler(reader, writer)
        except OSError:
            pass
        finally:
            await _close(writer)

    listener = await asyncio.start_server(serve, "127.0.0.1", 0, **kwargs)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        if running:
            await asyncio.wait(running, timeout=WAIT)


# -- handshakes -------------------------------------------------------------------------------


async def test_client_and_server_prove_their_svids_and_exchange_bytes() -> None:
    seen: list[SpiffeId] = []
    check = PeerCheck()

    def verify(transport: TlsTransport) -> None:
        chain = transport.peer_chain()
        seen.append(check.verify(chain, BUNDLES, datetime.now(UTC), Purpose.SERVER, A.trust_domain))

    async with engine_server() as server:
        transport, client = await dial(server.port, verify=verify)
        transport.write(b"ping")
        assert await client.received(4) == b"ping"
        assert seen == [SERVER.spiffe_id]
        assert server.peers == [CLIENT.spiffe_id]
        # The chain OpenSSL verified: B's leaf, B's intermediate, and B's root as the anchor.
        root = B.root.public_bytes(serialization.Encoding.DER)
        assert list(server.chains[0]) == [*der(CLIENT), root]
        assert server.alpns == ["http/1.1"]
        assert transport.alpn == "http/1.1"
        assert transport.get_extra_info("peername") == ("127.0.0.1", server.port)
        transport.close()
        assert await closed(client) is None


async def test_the_acceptor_drops_only_the_connections_still_in_their_handshake() -> None:
    # What a closing inbound listener does (Inbound.aclose); established ones stay.
    server = Server(lambda _: App(echo=True))
    acceptor = server_factory(
        lambda: SERVER_CONTEXT, server.on_handshake, server.failures.put_nowait, WAIT
    )
    listener = await asyncio.get_running_loop().create_server(acceptor, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    silent_reader, silent = await asyncio.open_connection("127.0.0.1", port)
    try:
        transport, app = await dial(port)
        await server.app()  # the server's side of it is established too
        assert len(acceptor.handshaking) == 1
        acceptor.abort_handshakes()
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(silent_reader.read(), WAIT) == b""
        assert acceptor.handshaking == set()
        transport.write(b"still here")
        assert await app.received(10) == b"still here"
        transport.close()
    finally:
        listener.close()
        await _close(silent)
        await _settle()


async def test_alpn_picks_the_protocol_the_client_offers_and_none_if_none_matches() -> None:
    async with engine_server() as server:
        tcp = TlsContext.client(CLIENT, A.bundle(), ("snapbright-tcp",))
        transport, _ = await dial(server.port, tcp)
        assert transport.alpn == "snapbright-tcp"
        transport.close()
        other = TlsContext.client(CLIENT, A.bundle(), ("h2",))
        transport, client = await dial(server.port, other)
        transport.write(b"still served")
        assert await client.received(12) == b"still served"
        assert transport.alpn is None
        assert server.alpns == ["snapbright-tcp", None]
        transport.close()


def _client(svid: X509Svid) -> Callable[[int], Any]:
    async def run(port: int) -> None:
        try:
            _transport, app = await dial(port, TlsContext.client(svid, A.bundle(), ()))
        except OSError:
            return  # refused during the handshake
        # TLS 1.3: the client is done before the server judged its certificate.
        await closed(app)

    return run


async def _plaintext(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: payments\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), WAIT) == b""  # closed, no TLS alert
    await _close(writer)


async def _no_certificate(port: int) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=anonymous)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.wait_for(reader.read(), WAIT)
    await _close(writer)


async def _silent(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), WAIT) == b""
    await _close(writer)


async def _half_a_hello(port: int) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    await writer.drain()
    await _close(writer)


FAILURES: list[tuple[str, Callable[[int], Any], str]] = [
    (
        "a client of a domain the server does not know",
        _client(forge_leaf(STRANGER, NOW)),
        "untrusted-chain",
    ),
    (
        "an expired client leaf",
        _client(
            forge_leaf(
                B, NOW, not_before=NOW - timedelta(days=2), not_after=NOW - timedelta(seconds=1)
            )
        ),
        "expired",
    ),
    (
        "a client leaf valid from tomorrow",
        _client(
            forge_leaf(
                B, NOW, not_before=NOW + timedelta(days=1), not_after=NOW + timedelta(days=2)
            )
        ),
        "not-yet-valid",
    ),
    (
        "a client leaf without clientAuth",
        _client(forge_leaf(B, NOW, ekus=[ExtendedKeyUsageOID.SERVER_AUTH])),
        "invalid-purpose",
    ),
    ("plaintext HTTP", _plaintext, "plaintext"),
    ("a client without a certificate", _no_certificate, "no-certificate"),
    ("a client that says nothing", _silent, "handshake-timeout"),
    ("a client that leaves mid-hello", _half_a_hello, "handshake-failed"),
]


@pytest.mark.parametrize(
    ("client", "reason"), [(c, r) for _, c, r in FAILURES], ids=[n for n, _, _ in FAILURES]
)
async def test_a_failed_handshake_is_reported_with_its_reason(
    client: Callable[[int], Any], reason: str
) -> None:
    async with engine_server(timeout=0.3) as server:
        await asyncio.wait_for(client(server.port), WAIT)
        assert await server.failure() == reason
        assert server.apps.empty()
        assert server.peers == []


async def test_a_client_refuses_a_server_of_another_domain() -> None:
    stranger = TlsContext.server(forge_leaf(STRANGER, NOW), BUNDLES, ALPN)
    made: list[App] = []

    def factory() -> App:
        made.append(App())
        return made[-1]

    async with engine_server(context=stranger) as server:
        with pytest.raises(TlsError) as refused:
            await connect(
                asyncio.get_running_loop(),
                factory,
                "127.0.0.1",
                server.port,
                CLIENT_CONTEXT,
                None,
                WAIT,
            )
        assert refused.value.reason == "untrusted-chain"
        assert refused.value.verify_code != 0
        assert made == []
        # The server hears why: the client's alert.
        assert await server.failure() == "untrusted-chain"


async def test_what_verify_raises_is_raised_by_connect_before_any_protocol_exists() -> None:
    class Refused(Exception):
        pass

    def verify(transport: TlsTransport) -> None:
        raise Refused

    async with engine_server() as server:
        with pytest.raises(Refused):
            await dial(server.port, verify=verify)
        assert (await server.app()).transport is not None


async def test_a_refusing_hook_aborts_the_connection_without_a_failure() -> None:
    async with engine_server(lambda _: None) as server:
        _transport, client = await dial(server.port)
        await closed(client)
        assert server.peers == [CLIENT.spiffe_id]
        assert server.failures.empty()


async def test_no_session_is_resumed() -> None:
    # The control: a context with a session cache (and an ID context) resumes the client's
    # session, and a resumed session shows no verified chain, which PeerCheck refuses.
    resumable = TlsContext.server(SERVER, BUNDLES, ALPN)
    native = resumable.native._context
    _lib.SSL_CTX_set_session_cache_mode(native, _lib.SSL_SESS_CACHE_SERVER)
    _lib.SSL_CTX_set_session_id_context(native, b"control", 7)
    for context, resumed in ((resumable, True), (SERVER_CONTEXT, False)):
        async with engine_server(context=context) as server:
            first = await _MemoryClient.open(server.port)
            await first.exchange(b"one")
            session = first.conn.get_session()
            await first.close()
            second = await _MemoryClient.open(server.port, session)
            assert bool(_lib.SSL_session_reused(second.conn._ssl)) is resumed
            if resumed:
                assert await asyncio.wait_for(server.refused.get(), WAIT) is Rejection.MALFORMED
            else:
                await second.exchange(b"two")
            await second.close()


# -- records ----------------------------------------------------------------------------------


class _OneByteAtATime(asyncio.Protocol):
    """Feeds the engine its TCP bytes one at a time."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        for index in range(len(data)):
            self.inner.data_received(data[index : index + 1])

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)


async def test_records_split_one_byte_at_a_time_still_handshake_and_stream() -> None:
    async with engine_server(wrap=_OneByteAtATime) as server:
        transport, client = await dial(server.port)
        message = bytes(range(256)) * 160  # 40 KiB: three records
        transport.write(message[:100])
        transport.write(message[100:])
        assert await client.received(len(message)) == message
        assert (await server.app()).data == message
        transport.close()


async def test_application_data_in_the_handshakes_last_flight_reaches_the_app() -> None:
    async with engine_server() as server:
        client = await _MemoryClient.open(server.port, early=b"early")
        assert await client.read(5) == b"early"  # echoed
        assert (await server.app()).chunks[0] == b"early"
        await client.close()


async def test_large_bodies_pass_both_ways_intact() -> None:
    body = hashlib.sha256(b"seed").digest() * (8 * 1024 * 1024 // 32)  # 8 MiB
    async with engine_server() as server:
        transport, client = await dial(server.port)
        transport.write(body)
        echoed = await asyncio.wait_for(client.received(len(body)), 30)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(body).digest()
        assert max(len(chunk) for chunk in client.chunks) <= 256 * 1024
        transport.close()


async def test_paused_reading_holds_records_and_backs_up_the_writer() -> None:
    async with engine_server(lambda _: App()) as server:
        transport, client = await dial(server.port)
        transport.set_write_buffer_limits(high=64 * 1024)
        transport.write(b"first")
        app = await server.app()
        await app.received(5)
        assert app.transport is not None
        app.transport.pause_reading()
        assert not app.transport.is_reading()
        body = b"x" * (8 * 1024 * 1024)
        transport.write(body)
        # The raw transport's pause_writing reaches the client's protocol.
        await asyncio.wait_for(client.writing_paused.wait(), WAIT)
        held = app.size
        assert held < 5 + len(body)
        app.transport.resume_reading()
        assert app.transport.is_reading()
        assert await asyncio.wait_for(app.received(5 + len(body)), 30) == b"first" + body
        await asyncio.wait_for(client.writing_resumed.wait(), WAIT)
        transport.close()


# -- ends -------------------------------------------------------------------------------------


async def test_close_sends_close_notify_after_the_data_and_the_peer_sees_eof_once() -> None:
    async with engine_server(lambda _: App()) as server:
        transport, client = await dial(server.port)
        transport.write(b"a" * 100_000)
        transport.close()
        assert transport.is_closing()
        transport.write(b"dropped")  # after close: dropped, like asyncio's transports
        app = await server.app()
        assert await closed(app) is None
        assert app.data == b"a" * 100_000
        assert app.eofs == 1
        assert await closed(client) is None


async def test_a_server_that_closes_after_writing_is_read_to_the_end() -> None:
    def answer_and_close(transport: TlsTransport) -> App:
        app = App()
        transport.write(b"bye")
        transport.close()
        return app

    async with engine_server(answer_and_close) as server:
        _, client = await dial(server.port)
        assert await closed(client) is None
        assert client.data == b"bye"
        assert client.eofs == 1
        await server.app()


async def test_abort_mid_stream_ends_both_sides_at_once() -> None:
    async with engine_server(lambda _: App()) as server:
        transport, client = await dial(server.port)
        transport.write(b"hello")
        app = await server.app()
        await app.received(5)
        assert app.transport is not None
        app.transport.abort()
        assert app.transport.is_closing()
        app.transport.write(b"dropped")
        assert await closed(app) is None
        await closed(client)
        assert client.data == b""


async def test_a_broken_record_mid_stream_aborts_and_the_app_learns_why() -> None:
    async with engine_server(lambda _: App()) as server:
        client = await _MemoryClient.open(server.port)
        await client.exchange(b"fine", echo=False)
        app = await server.app()
        await app.received(4)
        client.writer.write(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # application data, bad tag
        error = await closed(app)
        assert isinstance(error, TlsError)
        await client.close()


async def test_losing_the_connection_mid_handshake_fails_the_client() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)

    async with stream_server(hang_up) as port:
        with pytest.raises(TlsError) as failed:
            await dial(port)
        assert failed.value.reason == "handshake-failed"


async def test_a_client_gives_up_at_its_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with stream_server(silent) as port:
        with pytest.raises(TimeoutError):
            await connect(
                asyncio.get_running_loop(), App, "127.0.0.1", port, CLIENT_CONTEXT, None, 0.2
            )


# -- with the stdlib's TLS (the system OpenSSL) on the other side ---------------------------


async def test_a_stdlib_client_is_served() -> None:
    async with engine_server() as server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=stdlib_client_context(CLIENT, A.bundle())
        )
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"hello"
        assert server.peers == [CLIENT.spiffe_id]
        await _close(writer)


async def test_the_engine_client_talks_to_a_stdlib_server() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(5))
        await writer.drain()

    async with stream_server(echo, ssl=stdlib_server_context(SERVER, BUNDLES)) as port:
        transport, client = await dial(port)
        transport.write(b"hello")
        assert await client.received(5) == b"hello"
        assert await closed(client) is None


class _MemoryClient:
    """A TLS client driven by hand over a plain stream (pyOpenSSL memory BIOs), for the
    cases the engine never produces: data in the handshake's last flight, broken records."""

    def __init__(
        self, conn: SSL.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.conn = conn
        self.reader = reader
        self.writer = writer
        self.plain = b""

    @classmethod
    async def open(cls, port: int, session: Any = None, early: bytes = b"") -> _MemoryClient:
        conn = SSL.Connection(CLIENT_CONTEXT.native, None)
        conn.set_connect_state()
        if session is not None:
            conn.set_session(session)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(conn, reader, writer)
        async with asyncio.timeout(WAIT):
            while True:
                try:
                    conn.do_handshake()
                    break
                except SSL.WantReadError:
                    client._send()
                    conn.bio_write(await reader.read(65536))
        if early:
            conn.send(early)  # goes out in the same TCP write as the client's Finished
        client._send()
        return client

    def _send(self) -> None:
        out = b""
        while True:
            try:
                out += self.conn.bio_read(65536)
            except SSL.WantReadError:
                break
        if out:
            self.writer.write(out)

    async def read(self, size: int) -> bytes:
        async with asyncio.timeout(WAIT):
            while len(self.plain) < size:
                try:
                    self.plain += self.conn.recv(65536)
                except SSL.WantReadError:
                    self.conn.bio_write(await self.reader.read(65536))
        data, self.plain = self.plain[:size], self.plain[size:]
        return data

    async def exchange(self, data: bytes, echo: bool = True) -> None:
        self.conn.send(data)
        self._send()
        if echo:
            assert await self.read(len(data)) == data

    async def close(self) -> None:
        await _close(self.writer)
