"""The probe endpoint: peers reach it through the gateway by SNI and get 200 over mTLS."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.config.model import GatewayConfig, ProbeIdentity
from gateway.metrics import GatewayMetrics
from gateway.probe import ProbeIdentityError, ProbeServer, load_probe_identity
from gateway.route.core import probe_name
from gateway.server import Gateway
from proxy.identity.bundle import TrustBundleSet, format_bundle
from proxy.identity.svid import Purpose, X509Svid
from proxy.tls.context import client_context, verify_peer
from tests.proxy.identity.forge import ForgedDomain, forge_domain, forge_leaf

MESH = "acme"


def _write_identity(tmp_path: Path, svid: X509Svid, peers: list[ForgedDomain]) -> ProbeIdentity:
    (tmp_path / "gw.pem").write_bytes(svid.chain_pem())
    (tmp_path / "gw.key").write_bytes(svid.key_pem())
    bundles = []
    for peer in peers:
        path = tmp_path / f"{peer.trust_domain}.json"
        path.write_bytes(format_bundle(peer.bundle()))
        bundles.append({"trustDomain": str(peer.trust_domain), "path": str(path)})
    return ProbeIdentity.model_validate(
        {
            "certificate": str(tmp_path / "gw.pem"),
            "key": str(tmp_path / "gw.key"),
            "bundles": bundles,
        },
        strict=False,
    )


def _config(identity: ProbeIdentity) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "apiVersion": "snapbright.io/v1alpha1",
            "kind": "GatewayConfig",
            "metadata": {"name": "gw"},
            "spec": {
                "cluster": "east",
                "mesh": MESH,
                "listen": {"address": "127.0.0.1", "port": 0},
                "probe": identity.model_dump(by_alias=True),
            },
        },
        strict=False,
    )


async def _probe(
    gateway: Gateway, svid: X509Svid, gateway_domain: ForgedDomain
) -> tuple[bytes, str]:
    """GET / on the probe name; the status line and the server's SPIFFE ID."""
    host, port = gateway.address
    reader, writer = await asyncio.open_connection(
        host,
        port,
        ssl=client_context(svid, gateway_domain.bundle()),
        server_hostname=probe_name("east", MESH),
    )
    try:
        server_id = verify_peer(
            writer.get_extra_info("ssl_object"),
            TrustBundleSet([gateway_domain.bundle()]),
            datetime.now(UTC),
            Purpose.SERVER,
            gateway_domain.trust_domain,
        )
        writer.write(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(5):
            line = await reader.readline()
        return line, str(server_id)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def test_a_peer_probes_the_gateway_over_mtls_through_its_sni_name(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    east, west = forge_domain("east.acme", now), forge_domain("west.acme", now)
    gateway_svid = forge_leaf(east, now, uris=["spiffe://east.acme/ns/snapbright/sa/gateway"])
    identity = _write_identity(tmp_path, gateway_svid, [east, west])
    probe = ProbeServer(*load_probe_identity(identity))
    upstream = await probe.start()
    gateway = Gateway(_config(identity), GatewayMetrics(), probe_upstream=upstream)
    await gateway.start()
    try:
        line, server_id = await _probe(gateway, forge_leaf(west, now), east)
        assert line.startswith(b"HTTP/1.1 200")
        assert server_id == "spiffe://east.acme/ns/snapbright/sa/gateway"
    finally:
        await gateway.close()
        await probe.close()


async def test_a_client_of_an_unfederated_domain_is_refused(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    east, stranger = forge_domain("east.acme", now), forge_domain("stranger.acme", now)
    identity = _write_identity(tmp_path, forge_leaf(east, now), [east])
    probe = ProbeServer(*load_probe_identity(identity))
    upstream = await probe.start()
    gateway = Gateway(_config(identity), GatewayMetrics(), probe_upstream=upstream)
    await gateway.start()
    try:
        try:
            line, _ = await _probe(gateway, forge_leaf(stranger, now), east)
        except (ssl.SSLError, ConnectionError):
            line = b""
        assert line == b""  # no answer: the handshake or the first read failed
    finally:
        await gateway.close()
        await probe.close()


def test_an_unreadable_identity_names_the_file(tmp_path: Path) -> None:
    identity = ProbeIdentity.model_validate(
        {
            "certificate": str(tmp_path / "missing.pem"),
            "key": str(tmp_path / "k"),
            "bundles": [{"trustDomain": "east.acme", "path": str(tmp_path / "b")}],
        },
        strict=False,
    )
    with pytest.raises(ProbeIdentityError, match=r"missing\.pem"):
        load_probe_identity(identity)


async def test_a_rotated_svid_is_served_from_the_next_handshake(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    east, west = forge_domain("east.acme", now), forge_domain("west.acme", now)
    first = forge_leaf(east, now, uris=["spiffe://east.acme/ns/snapbright/sa/gateway"])
    identity = _write_identity(tmp_path, first, [east, west])
    probe = ProbeServer(*load_probe_identity(identity))
    upstream = await probe.start()
    gateway = Gateway(_config(identity), GatewayMetrics(), probe_upstream=upstream)
    await gateway.start()
    client = forge_leaf(west, now)
    try:
        _, before = await _probe(gateway, client, east)
        second = forge_leaf(east, now, uris=["spiffe://east.acme/ns/snapbright/sa/gateway-2"])
        probe.rotate(*load_probe_identity(_write_identity(tmp_path, second, [east, west])))
        line, after = await _probe(gateway, client, east)
        assert line.startswith(b"HTTP/1.1 200")
        assert (before, after) == (
            "spiffe://east.acme/ns/snapbright/sa/gateway",
            "spiffe://east.acme/ns/snapbright/sa/gateway-2",
        )
    finally:
        await gateway.close()
        await probe.close()
