"""app -> sidecar (outbound) -> mTLS -> sidecar (inbound) -> app, with real certificates."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.sidecar.process import Sidecar
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


@dataclass
class Pair:
    """A caller sidecar (checkout) in front of a callee sidecar (payments) and its app."""

    cluster: Cluster
    app: Backend
    caller: Sidecar
    callee: Sidecar


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    west = Cluster.create("us-west")
    bundles = {west.trust_domain.name: write_bundle(tmp_path, west.ca.bundle())}
    app = await Backend().start()
    cert, key = write_svid(tmp_path, "payments", west.issue("payments"))
    callee = await start_sidecar(
        write_config(
            tmp_path / "payments.yaml",
            sidecar_document(west, "payments", app.port, cert, key, bundles),
        )
    )
    cert, key = write_svid(tmp_path, "checkout", west.issue("checkout"))
    caller = await start_sidecar(
        write_config(
            tmp_path / "checkout.yaml",
            sidecar_document(
                west,
                "checkout",
                1,
                cert,
                key,
                bundles,
                upstreams=[
                    {"service": "payments", "targets": [target("us-west", inbound_port(callee))]}
                ],
            ),
        )
    )
    yield Pair(west, app, caller, callee)
    await caller.aclose(grace=1.0)
    await callee.aclose(grace=1.0)
    await app.close()


async def test_the_callee_sees_the_callers_spiffe_id_and_not_a_forged_one(pair: Pair) -> None:
    client = await Client.open(outbound_port(pair.caller))
    await client.send(
        b"GET /pay?x=1 HTTP/1.1\r\nHost: payments\r\n"
        b"x-snapbright-peer-id: spiffe://us-west.acme/ns/default/sa/admin\r\n"
        b"X-Snapbright-Peer-Id: spiffe://evil.acme/ns/x/sa/y\r\n\r\n"
    )
    answer = await client.read()
    assert answer.status == 200
    assert answer.body == b"/pay?x=1|"
    seen = pair.app.requests[-1]
    assert seen.header(b"x-snapbright-peer-id") == b"spiffe://us-west.acme/ns/default/sa/checkout"
    await client.close()


async def test_keep_alive_requests_reuse_one_mtls_connection(pair: Pair) -> None:
    client = await Client.open(outbound_port(pair.caller))
    for index in range(5):
        await client.send(b"GET /%d HTTP/1.1\r\nHost: payments\r\n\r\n" % index)
        answer = await client.read()
        assert answer.status == 200
    assert pair.app.connections == 1
    assert pair.callee.inbound is not None
    await client.close()


async def test_an_unknown_host_is_404_and_counts_nothing(pair: Pair) -> None:
    client = await Client.open(outbound_port(pair.caller))
    await client.send(b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n")
    assert (await client.read()).status == 404
    await client.close()
