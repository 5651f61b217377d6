"""Routing and resilience end to end: weighted split, retries within a budget, circuit
breaker, outlier ejection, and the outbound identity check, with backends that fail on
command. (The decisions themselves are tested as pure code in tests/proxy/resilience.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from proxy.identity.bundle import TrustBundleSet
from proxy.sidecar.process import Sidecar
from proxy.tls.context import server_context
from tests.proxy.http.backend import Backend, Received, response
from tests.proxy.http.client import Client
from tests.proxy.identity.forge import forge_leaf
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
class Commanded:
    """An app that answers with its name, a status set on command, after an optional hold
    and delay."""

    name: bytes
    status: int = 200
    hold: asyncio.Event | None = None
    delay: float = 0.0
    served: int = 0

    async def __call__(
        self, request: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if self.hold is not None:
            await self.hold.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        self.served += 1
        writer.write(response(self.status, self.name))
        await writer.drain()
        return True


@dataclass
class Mesh:
    """Clusters, their bundles on disk, and everything started (closed at the end)."""

    tmp: Path
    west: Cluster = field(default_factory=lambda: Cluster.create("us-west"))
    east: Cluster = field(default_factory=lambda: Cluster.create("ap-southeast"))
    sidecars: list[Sidecar] = field(default_factory=list)
    apps: list[Backend] = field(default_factory=list)

    @property
    def bundles(self) -> dict[str, str]:
        return {
            c.trust_domain.name: write_bundle(self.tmp, c.ca.bundle())
            for c in (self.west, self.east)
        }

    async def app(self, name: str, **kwargs: Any) -> tuple[Backend, Commanded]:
        handler = Commanded(name.encode(), **kwargs)
        backend = await Backend(handler=handler).start()
        self.apps.append(backend)
        return backend, handler

    async def sidecar(
        self,
        cluster: Cluster,
        service: str,
        app_port: int,
        *,
        upstreams: list[dict[str, Any]] | None = None,
        policies: list[dict[str, Any]] | None = None,
    ) -> Sidecar:
        name = f"{service}-{cluster.name}-{len(self.sidecars)}"
        cert, key = write_svid(self.tmp, name, cluster.issue(service))
        document = sidecar_document(
            cluster,
            service,
            app_port,
            cert,
            key,
            self.bundles,
            upstreams=upstreams,
            policies=policies,
        )
        sidecar = await start_sidecar(write_config(self.tmp / f"{name}.yaml", document))
        self.sidecars.append(sidecar)
        return sidecar

    async def close(self) -> None:
        for sidecar in reversed(self.sidecars):
            await sidecar.aclose(grace=1.0)
        for app in self.apps:
            await app.close()


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    mesh = Mesh(tmp_path)
    yield mesh
    await mesh.close()


def traffic_policy(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "snapbright.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": "payments"},
        "spec": {"service": "payments", **spec},
    }


def allow_all_of(*domains: str) -> dict[str, Any]:
    return {
        "apiVersion": "snapbright.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "payments"},
        "spec": {
            "service": "payments",
            "rules": [{"from": [{"trustDomain": d} for d in domains]}],
        },
    }


def dead_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def get(client: Client, path: bytes = b"/") -> tuple[int, bytes, bytes | None]:
    await client.send(b"GET " + path + b" HTTP/1.1\r\nHost: payments\r\n\r\n")
    answer = await client.read()
    return answer.status, answer.body, answer.header(b"x-snapbright-overload")


def sample(sidecar: Sidecar, name: str, **labels: str) -> float:
    value = sidecar.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def requests_of(sidecar: Sidecar, cluster: str, response_class: str) -> float:
    return sample(
        sidecar,
        "snapbright_requests_total",
        source_cluster="us-west",
        destination_service="payments",
        destination_cluster=cluster,
        response_class=response_class,
    )


async def test_weights_split_calls_across_two_target_clusters(mesh: Mesh) -> None:
    west_app, west = await mesh.app("west")
    east_app, east = await mesh.app("east")
    west_side = await mesh.sidecar(mesh.west, "payments", west_app.port)
    east_side = await mesh.sidecar(
        mesh.east, "payments", east_app.port, policies=[allow_all_of("us-west.acme")]
    )
    caller = await mesh.sidecar(
        mesh.west,
        "checkout",
        1,
        upstreams=[
            {
                "service": "payments",
                "targets": [
                    target("us-west", inbound_port(west_side), "70%"),
                    target("ap-southeast", inbound_port(east_side), "30%"),
                ],
            }
        ],
    )
    client = await Client.open(outbound_port(caller))
    answers = [await get(client) for _ in range(300)]
    await client.close()
    assert {status for status, _, _ in answers} == {200}
    share_east = east.served / 300
    assert west.served + east.served == 300
    assert 0.2 < share_east < 0.4, share_east
    assert requests_of(caller, "us-west", "2xx") == west.served
    assert requests_of(caller, "ap-southeast", "2xx") == east.served
    assert (
        sample(
            caller,
            "snapbright_request_duration_seconds_count",
            source_cluster="us-west",
            destination_service="payments",
            destination_cluster="ap-southeast",
        )
        == east.served
    )
    promtool = await asyncio.create_subprocess_exec(
        "promtool",
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await promtool.communicate(generate_latest(caller.metrics.registry))
    assert promtool.returncode == 0, output
    windows = caller.router.stats.drain(1e12)
    assert sum(w.requests for w in windows if w.target_cluster == "ap-southeast") == east.served


async def test_connect_failures_are_retried_on_another_endpoint_and_ejected(mesh: Mesh) -> None:
    # The live endpoint is slow, so P2C prefers the dead one until it is ejected.
    app, handler = await mesh.app("west", delay=0.05)
    callee = await mesh.sidecar(mesh.west, "payments", app.port)
    live = inbound_port(callee)
    dead = dead_port()
    caller = await mesh.sidecar(
        mesh.west,
        "checkout",
        1,
        upstreams=[
            {
                "service": "payments",
                "targets": [
                    {
                        "cluster": "us-west",
                        "endpoints": [
                            {"address": "127.0.0.1", "port": dead},
                            {"address": "127.0.0.1", "port": live},
                        ],
                    }
                ],
            }
        ],
        policies=[
            traffic_policy(
                retries={"attempts": 3},
                outlierDetection={"consecutiveFailures": 2, "maxEjectedShare": "50%"},
            )
        ],
    )
    statuses = []
    for _ in range(10):
        client = await Client.open(outbound_port(caller))
        statuses.append((await get(client))[0])
        await client.close()
    assert set(statuses) == {200}
    failures = requests_of(caller, "us-west", "connect-failure")
    # The failure was retried on the live endpoint, and that one failure ejected the dead one
    # (a connect failure is ejected at once, whatever consecutiveFailures says).
    assert failures == 1
    assert handler.served == 10


async def test_dead_local_endpoints_fail_over_to_a_weight_zero_remote_with_no_failed_call(
    mesh: Mesh,
) -> None:
    east_app, east = await mesh.app("east")
    east_side = await mesh.sidecar(
        mesh.east, "payments", east_app.port, policies=[allow_all_of("us-west.acme")]
    )
    dead = [dead_port(), dead_port()]
    caller = await mesh.sidecar(
        mesh.west,
        "checkout",
        1,
        upstreams=[
            {
                "service": "payments",
                "targets": [
                    {
                        "cluster": "us-west",
                        "endpoints": [{"address": "127.0.0.1", "port": p} for p in dead],
                    },
                    target("ap-southeast", inbound_port(east_side), "0%"),
                ],
            }
        ],
    )
    client = await Client.open(outbound_port(caller))
    statuses = [(await get(client))[0] for _ in range(20)]
    await client.close()
    assert statuses == [200] * 20
    assert east.served == 20
    # Each dead endpoint cost one connect failure (then it was out of rotation), no more.
    assert requests_of(caller, "us-west", "connect-failure") <= len(dead)


@pytest.mark.parametrize(
    ("budget", "attempts_per_request"),
    [({"ratio": "0%", "minRetriesPerSecond": 0}, 1), ({"ratio": "100%"}, 3)],
    ids=["empty budget: no retry", "ample budget: every attempt"],
)
async def test_retries_stay_within_the_budget(
    mesh: Mesh, budget: dict[str, Any], attempts_per_request: int
) -> None:
    caller = await mesh.sidecar(
        mesh.west,
        "checkout",
        1,
        upstreams=[{"service": "payments", "targets": [target("us-west", dead_port())]}],
        policies=[traffic_policy(retries={"attempts": 3, "budget": budget})],
    )
    for _ in range(5):
        client = await Client.open(outbound_port(caller))
        assert (await get(client))[0] == 502
        await client.close()
    assert requests_of(caller, "us-west", "connect-failure") == 5 * attempts_per_request


async def test_the_circuit_breaker_sheds_with_503_and_a_reason(mesh: Mesh) -> None:
    hold = asyncio.Event()
    app, _ = await mesh.app("west", hold=hold)
    callee = await mesh.sidecar(mesh.west, "payments", app.port)
    caller = await mesh.sidecar(
        mesh.west,
        "checkout",
        1,
        upstreams=[{"service": "payments", "targets": [target("us-west", inbound_port(callee))]}],
        policies=[traffic_policy(circuitBreaker={"maxRequests": 1})],
    )
    first = await Client.open(outbound_port(caller))
    await first.send(b"GET /slow HTTP/1.1\r\nHost: payments\r\n\r\n")
    for _ in range(200):
        if app.requests:
            break
        await asyncio.sleep(0.01)
    second = await Client.open(outbound_port(caller))
    status, _, overload = await get(second)
    assert (status, overload) == (503, b"max-requests")
    hold.set()
    assert (await first.read()).status == 200
    # The slot came back: the next request passes.
    assert (await get(second))[0] == 200
    await first.close()
    await second.close()


async def test_an_endpoint_answering_5xx_is_ejected(mesh: Mesh) -> None:
    # The failing endpoint answers fastest, so P2C keeps choosing it until it is ejected.
    good_app, good = await mesh.app("good", delay=0.05)
    bad_app, bad = await mesh.app("bad", status=500)
    good_side = await mesh.sidecar(mesh.west, "payments", good_app.port)
    bad_side = await mesh.sidecar(mesh.west, "payments", bad_app.port)
    caller = await mesh.sidecar(
        mesh.west,
        "checkout",
        1,
        upstreams=[
            {
                "service": "payments",
                "targets": [
                    {
                        "cluster": "us-west",
                        "endpoints": [
                            {"address": "127.0.0.1", "port": inbound_port(good_side)},
                            {"address": "127.0.0.1", "port": inbound_port(bad_side)},
                        ],
                    }
                ],
            }
        ],
        policies=[
            traffic_policy(outlierDetection={"consecutiveFailures": 3, "maxEjectedShare": "50%"})
        ],
    )

    async def calls(count: int) -> list[int]:
        client = await Client.open(outbound_port(caller))
        statuses = [(await get(client))[0] for _ in range(count)]
        await client.close()
        return statuses

    # Three callers at once: outstanding requests on the slow endpoint make P2C pick the
    # failing one whatever the handshakes cost.
    first = await asyncio.gather(calls(6), calls(6), calls(6))
    assert 3 <= bad.served <= 5, "three 5xx in a row eject it (give or take those in flight)"
    assert sum(statuses.count(500) for statuses in first) == bad.served
    # Ejected for the rest of the run.
    assert await calls(6) == [200] * 6
    assert good.served == 24 - bad.served


async def _refused_upstream(mesh: Mesh, uri: str, valid: tuple[datetime, datetime]) -> Sidecar:
    """A caller whose only upstream presents a leaf for ``uri`` valid over ``valid``, signed by
    us-west's root; one request through it is answered 502. The caller, for its metrics."""
    ca = mesh.west.ca.active
    assert ca.root_key is not None
    from tests.proxy.identity.forge import ForgedDomain

    leaf = forge_leaf(
        ForgedDomain(mesh.west.trust_domain, ca.root, ca.root_key),
        uris=[uri],
        not_before=valid[0],
        not_after=valid[1],
    )
    context = server_context(leaf, TrustBundleSet([mesh.west.ca.bundle()]))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    caller = await mesh.sidecar(
        mesh.west,
        "checkout",
        1,
        upstreams=[{"service": "payments", "targets": [target("us-west", port)]}],
        policies=[traffic_policy(retries={"attempts": 1})],
    )
    client = await Client.open(outbound_port(caller))
    assert (await get(client))[0] == 502
    await client.close()
    server.close()
    return caller


async def test_an_upstream_of_the_wrong_trust_domain_is_refused_and_counted(mesh: Mesh) -> None:
    # A server whose certificate chains to us-west's root but claims ap-southeast.
    root = mesh.west.ca.active.root
    caller = await _refused_upstream(
        mesh,
        "spiffe://ap-southeast.acme/ns/default/sa/payments",
        (root.not_valid_before_utc, root.not_valid_before_utc + timedelta(days=1)),
    )
    assert sample(caller, "snapbright_outbound_rejected_total", reason="foreign-root") == 1.0


async def test_an_upstream_presenting_an_expired_svid_is_refused_and_counted(mesh: Mesh) -> None:
    # OpenSSL refuses it in the handshake; the reason it gives is the one counted.
    now = datetime.now(UTC)  # OpenSSL checks against the real clock
    caller = await _refused_upstream(
        mesh,
        "spiffe://us-west.acme/ns/default/sa/payments",
        (now - timedelta(minutes=30), now - timedelta(minutes=1)),
    )
    assert sample(caller, "snapbright_outbound_rejected_total", reason="expired") == 1.0


async def test_a_delay_fault_holds_the_request_before_it_is_sent(mesh: Mesh) -> None:
    app, handler = await mesh.app("west")
    callee = await mesh.sidecar(mesh.west, "payments", app.port)
    caller = await mesh.sidecar(
        mesh.west,
        "checkout",
        1,
        upstreams=[{"service": "payments", "targets": [target("us-west", inbound_port(callee))]}],
        policies=[traffic_policy(faults={"delay": {"duration": "200ms", "percentage": "100%"}})],
    )
    client = await Client.open(outbound_port(caller))
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await get(client))[0] == 200
    assert loop.time() - started >= 0.2
    assert handler.served == 1
    await client.close()


async def test_an_abort_fault_applied_by_a_config_update_reaches_open_connections(
    mesh: Mesh,
) -> None:
    app, handler = await mesh.app("west")
    callee = await mesh.sidecar(mesh.west, "payments", app.port)
    upstreams = [{"service": "payments", "targets": [target("us-west", inbound_port(callee))]}]
    caller = await mesh.sidecar(mesh.west, "checkout", 1, upstreams=upstreams)
    client = await Client.open(outbound_port(caller))
    assert (await get(client))[0] == 200
    path = mesh.tmp / f"checkout-us-west-{len(mesh.sidecars) - 1}.yaml"
    text = path.read_text().replace(
        "policies: []",
        "policies:\n  - apiVersion: snapbright.io/v1alpha1\n    kind: TrafficPolicy\n"
        "    metadata: {name: payments}\n    spec:\n      service: payments\n"
        "      faults: {abort: {status: 418, percentage: 100%}}",
    )
    assert text != path.read_text()
    path.write_text(text)
    for _ in range(250):
        status, body, _ = await get(client)
        if status == 418:
            break
        await asyncio.sleep(0.02)
    assert (status, body) == (418, b"fault injected\n")
    served = handler.served
    assert (await get(client))[0] == 418
    assert handler.served == served
    assert requests_of(caller, "us-west", "4xx") >= 2
    await client.close()


async def test_the_connect_timeout_of_the_policy_bounds_a_silent_endpoint(mesh: Mesh) -> None:
    # A listener that accepts and never answers the TLS handshake.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    caller = await mesh.sidecar(
        mesh.west,
        "checkout",
        1,
        upstreams=[{"service": "payments", "targets": [target("us-west", port)]}],
        policies=[traffic_policy(timeouts={"connect": "150ms"}, retries={"attempts": 1})],
    )
    client = await Client.open(outbound_port(caller))
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await get(client))[0] == 502
    assert 0.1 <= loop.time() - started < 1.5
    assert requests_of(caller, "us-west", "connect-failure") == 1
    await client.close()
    server.close()
