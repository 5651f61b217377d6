"""Real mTLS between asyncio endpoints of trust domains A and B, on 127.0.0.1.

The certificates are real (tests/proxy/identity/forge.py), made around the wall clock's now,
since OpenSSL checks validity against the real clock during the handshake.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.identity.bundle import TrustBundleSet
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.identity.svid import Purpose, Rejection, SvidError, X509Svid
from proxy.tls.context import ContextCache, client_context, server_context, verify_peer
from tests.proxy.identity.forge import forge_domain, forge_leaf

NOW = datetime.now(UTC)
A = forge_domain("a.mesh", NOW)
B = forge_domain("b.mesh", NOW, intermediate=True)
SERVER_SVID = forge_leaf(A, NOW)  # spiffe://a.mesh/ns/default/sa/api
CLIENT_SVID = forge_leaf(B, NOW)  # spiffe://b.mesh/ns/default/sa/api, under B's intermediate
TIMEOUT = 5.0


@dataclass
class Accepted:
    """What the server saw: peers it accepted and rejections it closed."""

    peers: list[SpiffeId] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)


@asynccontextmanager
async def mesh_server(
    svid: X509Svid, bundles: TrustBundleSet, context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[int, Accepted]]:
    """An echo server that verifies each client's SVID and closes on rejection."""
    accepted = Accepted()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = verify_peer(writer.get_extra_info("ssl_object"), bundles, NOW, Purpose.CLIENT)
        except SvidError as error:
            accepted.rejections.append(error.reason)
            writer.close()
            return
        accepted.peers.append(peer)
        try:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(
        handle, "127.0.0.1", 0, ssl=context or server_context(svid, bundles)
    )
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, accepted
    finally:
        server.close()
        await server.wait_closed()


async def _echo(port: int, context: ssl.SSLContext, expect: SpiffeId | TrustDomain) -> bytes:
    """Dial, verify the server's SVID, send a line, return what came back."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="api.a.mesh"
        )
        try:
            server_id = verify_peer(
                writer.get_extra_info("ssl_object"),
                TrustBundleSet([A.bundle()]),
                NOW,
                Purpose.SERVER,
                expect,
            )
            assert server_id == SERVER_SVID.spiffe_id
            writer.write(b"ping\n")
            await writer.drain()
            return await reader.read(1024)
        finally:
            writer.close()


async def _echo_or_closed(port: int, context: ssl.SSLContext) -> bytes:
    """Like :func:`_echo`, but a connection the server tears down reads as ``b""``."""
    try:
        return await _echo(port, context, A.trust_domain)
    except (ssl.SSLError, ConnectionError):
        return b""


async def test_mtls_between_domains_succeeds_when_each_holds_the_others_bundle() -> None:
    bundles = TrustBundleSet([A.bundle(), B.bundle()])
    async with mesh_server(SERVER_SVID, bundles) as (port, accepted):
        reply = await _echo(port, client_context(CLIENT_SVID, A.bundle()), A.trust_domain)
    assert reply == b"ping\n"
    assert accepted.peers == [CLIENT_SVID.spiffe_id]
    assert accepted.rejections == []


async def test_a_server_without_the_clients_bundle_refuses_the_handshake() -> None:
    async with mesh_server(SERVER_SVID, TrustBundleSet([A.bundle()])) as (port, accepted):
        reply = await _echo_or_closed(port, client_context(CLIENT_SVID, A.bundle()))
    assert reply == b"", "the server must close without answering"
    assert accepted.peers == []
    assert accepted.rejections == []  # OpenSSL refused it before our check ran


async def test_a_client_without_the_servers_bundle_refuses_the_handshake() -> None:
    bundles = TrustBundleSet([A.bundle(), B.bundle()])
    async with mesh_server(SERVER_SVID, bundles) as (port, accepted):
        with pytest.raises(ssl.SSLCertVerificationError):
            await _echo(port, client_context(CLIENT_SVID, B.bundle()), A.trust_domain)
    assert accepted.peers == []


async def test_a_client_claiming_b_but_chaining_to_a_is_closed_though_the_server_trusts_both() -> (
    None
):
    impostor = forge_leaf(A, NOW, uris=["spiffe://b.mesh/ns/default/sa/api"])
    bundles = TrustBundleSet([A.bundle(), B.bundle()])
    async with mesh_server(SERVER_SVID, bundles) as (port, accepted):
        # The handshake itself succeeds (A's root is loaded); our check after it must close.
        reply = await _echo_or_closed(port, client_context(impostor, A.bundle()))
    assert reply == b"", "the connection must be closed without a reply"
    assert accepted.peers == []
    assert accepted.rejections == [Rejection.FOREIGN_ROOT]


async def test_a_server_claiming_a_but_chaining_to_b_fails_the_clients_handshake() -> None:
    impostor = forge_leaf(B, NOW, uris=["spiffe://a.mesh/ns/default/sa/api"])
    bundles = TrustBundleSet([A.bundle(), B.bundle()])
    async with mesh_server(impostor, bundles) as (port, _):
        with pytest.raises(ssl.SSLCertVerificationError):
            await _echo(port, client_context(CLIENT_SVID, A.bundle()), A.trust_domain)


async def test_the_client_pins_the_servers_exact_identity() -> None:
    bundles = TrustBundleSet([A.bundle(), B.bundle()])
    other = SpiffeId.workload(A.trust_domain, "default", "billing")
    async with mesh_server(SERVER_SVID, bundles) as (port, _):
        with pytest.raises(SvidError) as caught:
            await _echo(port, client_context(CLIENT_SVID, A.bundle()), other)
    assert caught.value.reason is Rejection.UNEXPECTED_ID


async def test_a_server_svid_without_server_auth_is_rejected_by_the_client() -> None:
    client_only = forge_leaf(A, NOW, ekus=[ExtendedKeyUsageOID.CLIENT_AUTH])
    bundles = TrustBundleSet([A.bundle(), B.bundle()])
    async with mesh_server(client_only, bundles) as (port, _):
        # OpenSSL's own purpose check (sslserver) already refuses it.
        with pytest.raises(ssl.SSLCertVerificationError):
            await _echo(port, client_context(CLIENT_SVID, A.bundle()), A.trust_domain)


def _handshake_twice(port: int, context: ssl.SSLContext) -> tuple[bool, bool]:
    """Connect, exchange data, then reconnect offering the first session. Blocking."""
    first_session: ssl.SSLSession | None = None
    reused: list[bool] = []
    for attempt in range(2):
        with (
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
            context.wrap_socket(raw, session=first_session if attempt else None) as tls,
        ):
            tls.sendall(b"ping\n")
            assert tls.recv(1024) == b"ping\n"  # tickets, if any, have arrived by now
            reused.append(bool(tls.session_reused))
            first_session = tls.session
    return reused[0], reused[1]


async def test_sessions_cannot_be_resumed() -> None:
    bundles = TrustBundleSet([A.bundle(), B.bundle()])
    client = client_context(CLIENT_SVID, A.bundle())
    async with mesh_server(SERVER_SVID, bundles) as (port, accepted):
        first, second = await asyncio.to_thread(_handshake_twice, port, client)
    assert (first, second) == (False, False)
    assert accepted.peers == [CLIENT_SVID.spiffe_id] * 2  # both ran a full certificate check


async def test_resumption_would_happen_with_tickets_on_so_the_check_above_means_something() -> None:
    bundles = TrustBundleSet([A.bundle(), B.bundle()])
    permissive = server_context(SERVER_SVID, bundles)
    permissive.options &= ~ssl.OP_NO_TICKET
    permissive.num_tickets = 2
    client = client_context(CLIENT_SVID, A.bundle())
    client.options &= ~ssl.OP_NO_TICKET
    async with mesh_server(SERVER_SVID, bundles, permissive) as (port, _):
        first, second = await asyncio.to_thread(_handshake_twice, port, client)
    assert (first, second) == (False, True)


def test_contexts_are_tls13_only_with_verification_required_and_no_tickets() -> None:
    bundles = TrustBundleSet([A.bundle(), B.bundle()])
    for context in (server_context(SERVER_SVID, bundles), client_context(CLIENT_SVID, A.bundle())):
        assert context.minimum_version is ssl.TLSVersion.TLSv1_3
        assert context.maximum_version is ssl.TLSVersion.TLSv1_3
        assert context.verify_mode is ssl.CERT_REQUIRED
        assert not context.check_hostname
        assert context.options & ssl.OP_NO_TICKET
    assert server_context(SERVER_SVID, bundles).num_tickets == 0


def test_a_client_context_trusts_only_the_server_domains_roots() -> None:
    context = client_context(CLIENT_SVID, A.bundle())
    anchors = [x509.load_der_x509_certificate(d) for d in context.get_ca_certs(binary_form=True)]
    assert anchors == [A.root]
    server = server_context(SERVER_SVID, TrustBundleSet([A.bundle(), B.bundle()]))
    server_anchors = server.get_ca_certs(binary_form=True)
    assert {x509.load_der_x509_certificate(d) for d in server_anchors} == {A.root, B.root}


def test_the_cache_reuses_contexts_until_the_svid_or_the_trust_changes() -> None:
    cache = ContextCache(max_entries=3)
    bundles = TrustBundleSet([A.bundle(), B.bundle()])
    first = cache.server(SERVER_SVID, bundles)
    assert cache.server(SERVER_SVID, TrustBundleSet([B.bundle(), A.bundle()])) is first
    assert cache.server(SERVER_SVID, TrustBundleSet([A.bundle()])) is not first
    assert cache.server(forge_leaf(A, NOW), bundles) is not first
    assert cache.client(CLIENT_SVID, A.bundle()) is cache.client(CLIENT_SVID, A.bundle())
    assert cache.client(CLIENT_SVID, A.bundle(sequence=2)) is not cache.client(
        CLIENT_SVID, A.bundle()
    )
    assert len(cache) == 3


def test_verify_peer_works_on_uvloop_transports() -> None:
    uvloop = pytest.importorskip("uvloop")
    bundles = TrustBundleSet([A.bundle(), B.bundle()])

    async def exchange() -> tuple[bytes, Accepted]:
        async with mesh_server(SERVER_SVID, bundles) as (port, accepted):
            reply = await _echo(port, client_context(CLIENT_SVID, A.bundle()), A.trust_domain)
        return reply, accepted

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        reply, accepted = runner.run(exchange())
    assert reply == b"ping\n"
    assert accepted.peers == [CLIENT_SVID.spiffe_id]
