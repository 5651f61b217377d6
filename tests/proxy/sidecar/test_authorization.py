"""The inbound listener refuses every peer it must refuse, and says why in its metrics.

Peers call the inbound mTLS port directly with real certificates, honest or hostile
(tests/proxy/identity/forge.py): each refusal is checked at the wire (no answer from the
app, or 403) and by its counted reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.identity.svid import X509Svid
from proxy.sidecar.process import Sidecar
from proxy.tls.context import client_context
from tests.proxy.http.backend import Backend
from tests.proxy.identity.forge import ForgedDomain, forge_domain, forge_leaf, key_usage
from tests.proxy.sidecar.mesh import (
    Cluster,
    inbound_port,
    sidecar_document,
    start_sidecar,
    write_bundle,
    write_config,
    write_svid,
)

NOW = datetime.now(UTC)
WEST = forge_domain("us-west.acme", NOW)
EAST = forge_domain("ap-southeast.acme", NOW)
STRANGER = forge_domain("elsewhere.acme", NOW)
CALLEE_ID = "spiffe://us-west.acme/ns/default/sa/payments"
CALLER_ID = "spiffe://us-west.acme/ns/default/sa/checkout"
EAST_CALLER_ID = "spiffe://ap-southeast.acme/ns/default/sa/checkout"


@dataclass
class Callee:
    """The payments sidecar (trusting us-west and ap-southeast) and its app."""

    sidecar: Sidecar
    app: Backend

    @property
    def port(self) -> int:
        return inbound_port(self.sidecar)

    def rejected(self, reason: str) -> float:
        return self.sidecar.metrics.inbound_rejections(reason)

    async def wait_rejected(self, reason: str, count: float = 1.0) -> float:
        for _ in range(200):
            if self.rejected(reason) >= count:
                break
            await asyncio.sleep(0.01)
        return self.rejected(reason)


def _policy(rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "snapbright.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "payments-callers"},
        "spec": {"service": "payments", "rules": rules},
    }


async def _callee(tmp_path: Path, policies: list[dict[str, Any]]) -> Callee:
    app = await Backend().start()
    cert, key = write_svid(tmp_path, "payments", forge_leaf(WEST, NOW, uris=[CALLEE_ID]))
    bundles = {
        "us-west.acme": write_bundle(tmp_path, WEST.bundle()),
        "ap-southeast.acme": write_bundle(tmp_path, EAST.bundle()),
    }
    document = sidecar_document(
        Cluster.create("us-west"), "payments", app.port, cert, key, bundles, policies=policies
    )
    sidecar = await start_sidecar(write_config(tmp_path / "payments.yaml", document))
    return Callee(sidecar, app)


@pytest.fixture
async def callee(tmp_path: Path) -> AsyncIterator[Callee]:
    callee = await _callee(tmp_path, [])
    yield callee
    await callee.sidecar.aclose(grace=1.0)
    await callee.app.close()


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[Callee]:
    """A callee whose policy lets checkout of us-west GET under /public, and ap-southeast's
    checkout call anything."""
    rules: list[dict[str, Any]] = [
        {"from": [{"id": CALLER_ID}], "methods": ["GET"], "paths": ["/public"]},
        {"from": [{"id": EAST_CALLER_ID}]},
    ]
    callee = await _callee(tmp_path, [_policy(rules)])
    yield callee
    await callee.sidecar.aclose(grace=1.0)
    await callee.app.close()


async def call(
    port: int, svid: X509Svid, server: ForgedDomain, target: bytes = b"/", method: bytes = b"GET"
) -> int | None:
    """One request over mTLS as ``svid``; the status, or ``None`` if the connection failed."""
    context = client_context(svid, server.bundle())
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="payments"),
            5.0,
        )
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(method + b" " + target + b" HTTP/1.1\r\nHost: payments\r\n\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5.0)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return None
    finally:
        writer.close()
    return int(line.split()[1]) if line else None


def _west(**kwargs: Any) -> Callable[[], X509Svid]:
    return lambda: forge_leaf(WEST, NOW, **kwargs)


HOSTILE: list[tuple[str, Callable[[], X509Svid], str]] = [
    ("a foreign trust domain", lambda: forge_leaf(STRANGER, NOW), "untrusted-chain"),
    (
        "claims ap-southeast, signed by us-west's root",
        _west(uris=[EAST_CALLER_ID]),
        "foreign-root",
    ),
    (
        "expired leaf",
        _west(not_before=NOW - timedelta(days=2), not_after=NOW - timedelta(seconds=1)),
        "expired",
    ),
    ("no URI SAN", _west(uris=[]), "no-uri-san"),
    ("two URI SANs", _west(uris=[CALLER_ID, CALLEE_ID]), "many-uri-sans"),
    (
        "non-spiffe scheme",
        _west(uris=["https://us-west.acme/ns/default/sa/x"]),
        "not-spiffe-scheme",
    ),
    ("malformed SPIFFE ID", _west(uris=["spiffe://US-WEST.acme/x"]), "invalid-spiffe-id"),
    ("ID with no path", _west(uris=["spiffe://us-west.acme"]), "no-path"),
    ("CA leaf", _west(ca=True), "leaf-is-ca"),
    (
        "keyCertSign on the leaf",
        _west(usage=key_usage(digital_signature=True, key_cert_sign=True)),
        "leaf-signs-certificates",
    ),
    # (An empty keyUsage cannot even be loaded by an OpenSSL client, so none is sent.)
    ("no keyUsage at all", _west(usage=None), "no-digital-signature"),
    ("no clientAuth EKU", _west(ekus=[ExtendedKeyUsageOID.SERVER_AUTH]), "invalid-purpose"),
    ("self-signed leaf", _west(self_signed=True), "untrusted-chain"),
    ("bad signature", _west(signer_key=ec.generate_private_key(ec.SECP256R1())), "untrusted-chain"),
]


@pytest.mark.parametrize(
    ("leaf", "reason"),
    [(leaf, reason) for _, leaf, reason in HOSTILE],
    ids=[n for n, _, _ in HOSTILE],
)
async def test_a_hostile_peer_is_refused_with_its_reason(
    callee: Callee, leaf: Callable[[], X509Svid], reason: str
) -> None:
    assert await call(callee.port, leaf(), WEST) is None
    assert await callee.wait_rejected(reason) == 1.0
    assert callee.app.requests == []


async def test_an_honest_peer_of_the_same_domain_is_served_without_a_policy(callee: Callee) -> None:
    assert await call(callee.port, forge_leaf(WEST, NOW, uris=[CALLER_ID]), WEST) == 200
    assert callee.app.requests[-1].header(b"x-snapbright-peer-id") == CALLER_ID.encode()


async def test_plaintext_to_the_mtls_port_is_refused(callee: Callee) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", callee.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: payments\r\n\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5.0) == b""
    writer.close()
    assert await callee.wait_rejected("plaintext") == 1.0
    assert callee.app.requests == []


async def test_a_cross_cluster_caller_is_denied_without_a_policy(callee: Callee) -> None:
    east = forge_leaf(EAST, NOW, uris=[EAST_CALLER_ID])
    assert await call(callee.port, east, WEST) == 403
    assert await callee.wait_rejected("forbidden") == 1.0
    assert callee.app.requests == []


async def test_a_cross_cluster_caller_a_policy_names_is_served(guarded: Callee) -> None:
    east = forge_leaf(EAST, NOW, uris=[EAST_CALLER_ID])
    assert await call(guarded.port, east, WEST, b"/anything", b"POST") == 200


async def test_once_a_policy_exists_a_caller_it_does_not_name_is_denied(guarded: Callee) -> None:
    other = forge_leaf(WEST, NOW, uris=["spiffe://us-west.acme/ns/default/sa/cart"])
    assert await call(guarded.port, other, WEST, b"/public") == 403


BYPASSES = [
    b"/admin",
    b"/public/../admin",
    b"/public/./../admin",
    b"/public/%2e%2e/admin",
    b"/public/%2E%2E/admin",
    b"/public%2F..%2Fadmin",
    b"/public%2f..%2fadmin",
    b"/public/..%2Fadmin",
    b"/public%5C..%5Cadmin",
    b"//public/../admin",
    b"/publicx",
    b"/PUBLIC",
    b"/%70ublic/../admin",
    b"/public/..;/admin",
    b"/public;/../admin",
]


@pytest.mark.parametrize("target", BYPASSES, ids=[t.decode() for t in BYPASSES])
async def test_a_path_outside_the_allowed_prefix_is_refused(guarded: Callee, target: bytes) -> None:
    caller = forge_leaf(WEST, NOW, uris=[CALLER_ID])
    assert await call(guarded.port, caller, WEST, target) in (400, 403)
    assert guarded.app.requests == []


@pytest.mark.parametrize("target", [b"/public", b"/public/x", b"/public/./x", b"/%70ublic/x"])
async def test_a_path_inside_the_allowed_prefix_is_served(guarded: Callee, target: bytes) -> None:
    caller = forge_leaf(WEST, NOW, uris=[CALLER_ID])
    assert await call(guarded.port, caller, WEST, target) == 200


async def test_a_method_the_rule_does_not_list_is_refused(guarded: Callee) -> None:
    caller = forge_leaf(WEST, NOW, uris=[CALLER_ID])
    assert await call(guarded.port, caller, WEST, b"/public", b"DELETE") == 403


async def test_a_policy_update_applies_to_an_open_connection(
    callee: Callee, tmp_path: Path
) -> None:
    context = client_context(forge_leaf(WEST, NOW, uris=[CALLER_ID]), WEST.bundle())
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", callee.port, ssl=context, server_hostname="payments"
    )

    async def status() -> int:
        writer.write(b"GET /x HTTP/1.1\r\nHost: payments\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        return int(head.split()[1])

    assert await status() == 200
    path = tmp_path / "payments.yaml"
    deny_all = (
        "policies:\n  - apiVersion: snapbright.io/v1alpha1\n    kind: AuthorizationPolicy\n"
        "    metadata: {name: nobody}\n    spec: {service: payments, rules: []}\n"
    )
    path.write_text(path.read_text().replace("policies: []\n", deny_all))
    for _ in range(250):
        if await status() == 403:
            break
        await asyncio.sleep(0.02)
    assert await status() == 403
    writer.close()
