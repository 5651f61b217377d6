"""Withdrawn trust closes open connections of that domain, both ways (issue 4, section 4).

us-west's payments sidecar trusts its own domain and ap-southeast. A caller of each domain
holds a keep-alive mTLS connection to its inbound port; then payments' config drops
ap-southeast's bundle, or its bundle becomes empty (revoked). The ap-southeast connection is
aborted within a second and counted, a new one is refused at the handshake, and the us-west
one is still served. Real sockets, real TLS, certificates of two real CAs.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.identity.bundle import TrustBundle
from proxy.identity.svid import X509Svid
from proxy.sidecar.process import Sidecar
from proxy.sidecar.tls import ALPN_HTTP, ALPN_TCP
from proxy.tls.context import client_context
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

WITHIN = 1.0


def _allow(service: str, *callers: Cluster) -> dict[str, Any]:
    """An AuthorizationPolicy letting checkout of each of ``callers`` call ``service``."""
    rules = [{"from": [{"id": str(c.workload("checkout"))}]} for c in callers]
    return {
        "apiVersion": "snapbright.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": f"{service}-callers"},
        "spec": {"service": service, "rules": rules},
    }


@dataclass
class Mesh:
    """payments (us-west) trusting us-west and ap-southeast; its config can be rewritten."""

    tmp: Path
    west: Cluster
    east: Cluster
    app: Backend
    payments: Sidecar
    document: dict[str, Any]

    def rewrite(self, bundles: dict[str, str]) -> None:
        self.document["spec"]["tls"]["bundles"] = [
            {"trustDomain": td, "path": path} for td, path in bundles.items()
        ]
        write_config(self.tmp / "payments.yaml", self.document)

    def withdrawn(self) -> float:
        return self.payments.metrics.inbound_rejections("trust-withdrawn")


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    west, east = Cluster.create("us-west"), Cluster.create("ap-southeast")
    bundles = {
        west.trust_domain.name: write_bundle(tmp_path, west.ca.bundle()),
        east.trust_domain.name: write_bundle(tmp_path, east.ca.bundle()),
    }
    app = await Backend().start()
    cert, key = write_svid(tmp_path, "payments", west.issue("payments"))
    policies = [_allow("payments", west, east)]
    document = sidecar_document(west, "payments", app.port, cert, key, bundles, policies=policies)
    payments = await start_sidecar(write_config(tmp_path / "payments.yaml", document))
    yield Mesh(tmp_path, west, east, app, payments, document)
    await payments.aclose(grace=1.0)
    await app.close()


class _Peer:
    """A caller's keep-alive mTLS connection straight to payments' inbound port."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, svid: X509Svid, server: Cluster, alpn: str = ALPN_HTTP) -> _Peer:
        context = client_context(svid, server.ca.bundle())
        context.set_alpn_protocols([alpn])
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="payments"),
            5.0,
        )
        return cls(reader, writer)

    async def get(self) -> int:
        self.writer.write(b"GET / HTTP/1.1\r\nHost: payments\r\n\r\n")
        await self.writer.drain()
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5.0)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await asyncio.wait_for(self.reader.readexactly(length), 5.0)
        return int(head.split()[1])

    async def closed_within(self, seconds: float) -> bool:
        """Whether the server ends the connection (EOF or reset) within ``seconds``."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), seconds)
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError):
            return True
        return data == b""

    def close(self) -> None:
        self.writer.close()


async def _refused(port: int, svid: X509Svid, server: Cluster) -> bool:
    """Whether a new connection fails at the handshake or is closed before any answer."""
    try:
        peer = await _Peer.open(port, svid, server)
    except (OSError, ssl.SSLError, TimeoutError):
        return True
    try:
        # TLS 1.3: the client may finish its handshake before the server refuses its cert.
        await peer.get()
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
        return True
    finally:
        peer.close()
    return False


def _drop_east(mesh: Mesh) -> None:
    mesh.rewrite({mesh.west.trust_domain.name: write_bundle(mesh.tmp, mesh.west.ca.bundle())})


def _revoke_east(mesh: Mesh) -> None:
    # Rewrites the file the config already names: an empty key set revokes the domain.
    write_bundle(mesh.tmp, TrustBundle(mesh.east.trust_domain, roots=()))


WITHDRAWALS: list[tuple[str, Callable[[Mesh], None]]] = [
    ("peering deleted: the bundle is gone", _drop_east),
    ("the bundle is revoked (no keys)", _revoke_east),
]


@pytest.mark.parametrize("withdraw", [w for _, w in WITHDRAWALS], ids=[n for n, _ in WITHDRAWALS])
async def test_withdrawn_trust_closes_the_peers_open_connection_and_refuses_new_ones(
    mesh: Mesh, withdraw: Callable[[Mesh], None]
) -> None:
    port = inbound_port(mesh.payments)
    east_svid = mesh.east.issue("checkout")
    east = await _Peer.open(port, east_svid, mesh.west)
    west = await _Peer.open(port, mesh.west.issue("checkout"), mesh.west)
    assert await east.get() == 200
    assert await west.get() == 200

    started = time.monotonic()
    withdraw(mesh)
    assert await east.closed_within(WITHIN)
    assert time.monotonic() - started < WITHIN
    assert mesh.withdrawn() == 1.0

    assert await _refused(port, east_svid, mesh.west)
    # The own domain's connection was not touched: it is still served, on the same socket.
    assert await west.get() == 200
    assert mesh.withdrawn() == 1.0
    east.close()
    west.close()


async def test_withdrawn_trust_closes_an_opaque_tcp_connection_too(mesh: Mesh) -> None:
    port = inbound_port(mesh.payments)
    # ALPN snapbright-tcp: bytes piped to the app as they are (here the app speaks HTTP).
    east = await _Peer.open(port, mesh.east.issue("checkout"), mesh.west, ALPN_TCP)
    assert await east.get() == 200
    _drop_east(mesh)
    assert await east.closed_within(WITHIN)
    assert mesh.withdrawn() == 1.0
    inbound = mesh.payments.inbound
    assert inbound is not None
    for _ in range(int(WITHIN / 0.02)):
        if not inbound.pipes:
            break
        await asyncio.sleep(0.02)
    assert inbound.pipes == set()
    east.close()


async def test_a_bundle_set_that_still_trusts_the_domain_closes_nothing(mesh: Mesh) -> None:
    port = inbound_port(mesh.payments)
    east = await _Peer.open(port, mesh.east.issue("checkout"), mesh.west)
    assert await east.get() == 200
    # A new ap-southeast root joins the old one: the bundle set changes, trust does not.
    newer = Cluster.create("ap-southeast").ca.bundle()
    roots = (*mesh.east.ca.bundle().roots, *newer.roots)
    write_bundle(mesh.tmp, TrustBundle(mesh.east.trust_domain, roots=roots))
    assert mesh.payments.tls is not None
    version = mesh.payments.tls.current.bundles.version
    for _ in range(100):
        if mesh.payments.tls.current.bundles.version != version:
            break
        await asyncio.sleep(0.02)
    assert mesh.payments.tls.current.bundles.version != version
    assert not await east.closed_within(0.2)
    assert await east.get() == 200
    assert mesh.withdrawn() == 0.0
    east.close()


async def test_withdrawn_trust_drops_pooled_outbound_connections_to_that_domain(
    tmp_path: Path,
) -> None:
    west, east = Cluster.create("us-west"), Cluster.create("ap-southeast")
    west_bundle = write_bundle(tmp_path, west.ca.bundle())
    both = {west.trust_domain.name: west_bundle}
    both[east.trust_domain.name] = write_bundle(tmp_path, east.ca.bundle())
    app = await Backend().start()
    cert, key = write_svid(tmp_path, "ledger", east.issue("ledger"))
    ledger = await start_sidecar(
        write_config(
            tmp_path / "ledger.yaml",
            sidecar_document(
                east, "ledger", app.port, cert, key, both, policies=[_allow("ledger", west)]
            ),
        )
    )
    cert, key = write_svid(tmp_path, "checkout", west.issue("checkout"))
    upstream = {"service": "ledger", "targets": [target("ap-southeast", inbound_port(ledger))]}
    document = sidecar_document(west, "checkout", 1, cert, key, both, upstreams=[upstream])
    checkout = await start_sidecar(write_config(tmp_path / "checkout.yaml", document))
    try:
        client = await Client.open(outbound_port(checkout))
        await client.send(b"GET / HTTP/1.1\r\nHost: ledger\r\n\r\n")
        assert (await client.read()).status == 200
        assert checkout.outbound is not None
        assert checkout.outbound.upstream_connection_count == 1

        document["spec"]["tls"]["bundles"] = [
            {"trustDomain": west.trust_domain.name, "path": west_bundle}
        ]
        write_config(tmp_path / "checkout.yaml", document)
        for _ in range(int(WITHIN / 0.02)):
            if checkout.outbound.upstream_connection_count == 0:
                break
            await asyncio.sleep(0.02)
        assert checkout.outbound.upstream_connection_count == 0
        registry = checkout.metrics.registry
        assert (
            registry.get_sample_value(
                "snapbright_outbound_rejected_total", {"reason": "trust-withdrawn"}
            )
            == 1.0
        )
        # And no new connection is made to a domain with no bundle.
        await client.send(b"GET / HTTP/1.1\r\nHost: ledger\r\n\r\n")
        assert (await client.read()).status >= 500
        assert app.connections == 1
        await client.close()
    finally:
        await checkout.aclose(grace=1.0)
        await ledger.aclose(grace=1.0)
        await app.close()
