"""The Consul fake keeps the Consul semantics its docstring promises (tested over HTTP)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.federation.catalog.consul_fake import ConsulFake


@pytest.fixture
async def fake() -> AsyncIterator[ConsulFake]:
    consul = ConsulFake(session_ttl_min=0.05)
    consul.put_service("pay", "10.1.0.1", 8080, service_id="pay-1")
    await consul.start()
    yield consul
    await consul.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, body: object = None
) -> tuple[int, int | None, Any]:
    data = None if body is None else body if isinstance(body, str) else json.dumps(body)
    async with http.request(method, url, data=data) as response:
        text = await response.text()
        index = response.headers.get("X-Consul-Index")
        try:
            payload = json.loads(text) if text else None
        except ValueError:
            payload = text
        return response.status, None if index is None else int(index), payload


async def test_blocking_query_waits_for_wait_then_returns_the_same_index(
    fake: ConsulFake, http: aiohttp.ClientSession
) -> None:
    _, index, _ = await _call(http, "GET", f"{fake.url}/v1/health/service/pay")
    loop = asyncio.get_running_loop()
    started = loop.time()
    _, again, body = await _call(
        http, "GET", f"{fake.url}/v1/health/service/pay?index={index}&wait=150ms"
    )
    assert loop.time() - started >= 0.14
    assert again == index
    assert [e["Service"]["ID"] for e in body] == ["pay-1"]


async def test_blocking_query_returns_early_on_change_with_a_higher_index(
    fake: ConsulFake, http: aiohttp.ClientSession
) -> None:
    _, index, _ = await _call(http, "GET", f"{fake.url}/v1/catalog/services")
    query = asyncio.create_task(
        _call(http, "GET", f"{fake.url}/v1/catalog/services?index={index}&wait=5s")
    )
    await asyncio.sleep(0.05)
    assert not query.done()
    status, _, _ = await _call(
        http,
        "PUT",
        f"{fake.url}/v1/agent/service/register",
        {"name": "cart", "ID": "cart-1", "port": 9090, "TAGS": ["v2"]},
    )
    assert status == 200
    _, new_index, listing = await asyncio.wait_for(query, 1)
    assert index is not None
    assert new_index is not None
    assert new_index > index
    assert listing == {"pay": [], "cart": ["v2"]}


async def test_passing_filter_and_check_status(
    fake: ConsulFake, http: aiohttp.ClientSession
) -> None:
    fake.put_service("pay", "10.1.0.2", 8080, service_id="pay-2", status="critical")
    _, _, every = await _call(http, "GET", f"{fake.url}/v1/health/service/pay")
    _, _, passing = await _call(http, "GET", f"{fake.url}/v1/health/service/pay?passing")
    assert [e["Service"]["ID"] for e in every] == ["pay-1", "pay-2"]
    assert [e["Service"]["ID"] for e in passing] == ["pay-1"]
    assert every[1]["Checks"][1]["Status"] == "critical"


async def test_kv_lock_needs_a_live_session_and_honours_lock_delay(
    fake: ConsulFake, http: aiohttp.ClientSession
) -> None:
    url = fake.url
    _, _, first = await _call(http, "PUT", f"{url}/v1/session/create", {"LockDelay": "200ms"})
    _, _, second = await _call(http, "PUT", f"{url}/v1/session/create", {"LockDelay": "0s"})
    a, b = first["ID"], second["ID"]
    assert (await _call(http, "PUT", f"{url}/v1/kv/lead?acquire={a}", "a"))[2] is True
    assert (await _call(http, "PUT", f"{url}/v1/kv/lead?acquire={b}", "b"))[2] is False
    _, _, entry = await _call(http, "GET", f"{url}/v1/kv/lead")
    assert entry[0]["Session"] == a
    assert base64.b64decode(entry[0]["Value"]) == b"a"
    assert entry[0]["LockIndex"] == 1
    await _call(http, "PUT", f"{url}/v1/session/destroy/{a}")
    _, _, entry = await _call(http, "GET", f"{url}/v1/kv/lead")
    assert "Session" not in entry[0]
    # a was invalidated holding the lock: its 200 ms lock-delay keeps b out for a moment.
    assert (await _call(http, "PUT", f"{url}/v1/kv/lead?acquire={b}", "b"))[2] is False
    await asyncio.sleep(0.25)
    assert (await _call(http, "PUT", f"{url}/v1/kv/lead?acquire={b}", "b"))[2] is True
    assert (await _call(http, "PUT", f"{url}/v1/kv/lead?release={a}"))[2] is False
    assert (await _call(http, "PUT", f"{url}/v1/kv/lead?release={b}"))[2] is True
    status, _, _ = await _call(http, "PUT", f"{url}/v1/kv/lead?acquire=nope", "x")
    assert status == 500


async def test_session_ttl_expiry_releases_or_deletes_its_keys(
    fake: ConsulFake, http: aiohttp.ClientSession
) -> None:
    url = fake.url
    _, _, release = await _call(http, "PUT", f"{url}/v1/session/create", {"TTL": "100ms"})
    _, _, delete = await _call(
        http, "PUT", f"{url}/v1/session/create", {"TTL": "100ms", "Behavior": "delete"}
    )
    await _call(http, "PUT", f"{url}/v1/kv/r?acquire={release['ID']}", "1")
    await _call(http, "PUT", f"{url}/v1/kv/d?acquire={delete['ID']}", "1")
    status, _, _ = await _call(http, "PUT", f"{url}/v1/session/renew/{release['ID']}")
    assert status == 200
    await asyncio.sleep(0.2)
    status, _, _ = await _call(http, "PUT", f"{url}/v1/session/renew/{release['ID']}")
    assert status == 404
    _, _, kept = await _call(http, "GET", f"{url}/v1/kv/r")
    assert "Session" not in kept[0]
    status, index, _ = await _call(http, "GET", f"{url}/v1/kv/d")
    assert status == 404
    assert index is not None


async def test_missing_key_blocks_on_the_kv_table_index(
    fake: ConsulFake, http: aiohttp.ClientSession
) -> None:
    status, index, _ = await _call(http, "GET", f"{fake.url}/v1/kv/absent")
    assert status == 404
    query = asyncio.create_task(
        _call(http, "GET", f"{fake.url}/v1/kv/absent?index={index}&wait=5s")
    )
    await asyncio.sleep(0.05)
    await _call(http, "PUT", f"{fake.url}/v1/kv/absent", "now")
    status, _, entry = await asyncio.wait_for(query, 1)
    assert status == 200
    assert base64.b64decode(entry[0]["Value"]) == b"now"


async def test_outage_refuses_connections_and_restart_keeps_port_and_state(
    fake: ConsulFake, http: aiohttp.ClientSession
) -> None:
    port = fake.port
    await fake.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await _call(http, "GET", f"{fake.url}/v1/catalog/services")
    await fake.start()
    assert fake.port == port
    assert (await _call(http, "GET", f"{fake.url}/v1/catalog/services"))[2] == {"pay": []}
