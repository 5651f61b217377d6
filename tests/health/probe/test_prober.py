"""The prober against real listeners on 127.0.0.1: an HTTP health server and mTLS gateways.

Certificates come from the real cluster CA, made around the wall clock's now (OpenSSL checks
validity against it). Intervals are tens of milliseconds and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from aiohttp import web

from federation.trust.ca import create_ca
from health.probe.core import ProbeSettings, ProbeState, ProbeStatus
from health.probe.prober import GatewayTarget, HttpTarget, ProbeFailed, Prober
from proxy.identity.bundle import TrustBundleSet
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.identity.svid import X509Svid
from proxy.tls.context import server_context

NOW = datetime.now(UTC)
MESH = "demo"
US = TrustDomain.for_cluster("us-west", MESH)
EU = TrustDomain.for_cluster("eu-west", MESH)
ROGUE = TrustDomain.for_cluster("rogue", MESH)
US_CA, EU_CA, ROGUE_CA = (create_ca(td, NOW) for td in (US, EU, ROGUE))
CONTROL_PLANE = US_CA.issue(SpiffeId.workload(US, "snapbright", "control-plane"), NOW)
EU_GATEWAY = EU_CA.issue(SpiffeId.workload(EU, "snapbright", "gateway"), NOW)
ROGUE_GATEWAY = ROGUE_CA.issue(SpiffeId.workload(ROGUE, "snapbright", "gateway"), NOW)
BUNDLES = TrustBundleSet([US_CA.bundle(), EU_CA.bundle()])
FAST = ProbeSettings(interval=0.03, timeout=0.5, jitter=0.1, down_after=2, up_after=3)
WAIT = 5.0


def _identity() -> tuple[X509Svid, TrustBundleSet]:
    return CONTROL_PLANE, BUNDLES


# --- Listeners ---


@dataclass
class HealthServer:
    """An HTTP health endpoint that can be flipped to failing."""

    port: int = 0
    healthy: bool = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/healthz"


@asynccontextmanager
async def health_server() -> AsyncIterator[HealthServer]:
    server = HealthServer()

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(status=200 if server.healthy else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = runner.addresses[0][1]
    try:
        yield server
    finally:
        await runner.cleanup()


@dataclass
class Gateway:
    """An mTLS listener standing in for a peer gateway's probe endpoint."""

    port: int
    server_names: list[str | None] = field(default_factory=list)


@asynccontextmanager
async def mtls_gateway(svid: X509Svid, *, answer: bytes | None = None) -> AsyncIterator[Gateway]:
    """Completes mTLS handshakes; with ``answer``, replies to one request line with it."""
    context = server_context(svid, TrustBundleSet([US_CA.bundle(), EU_CA.bundle()]))
    names: list[str | None] = []

    def sni(_: ssl.SSLObject, name: str | None, __: ssl.SSLContext) -> None:
        names.append(name)

    context.sni_callback = sni

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if answer is not None:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
                await writer.drain()
            else:
                await reader.read(1)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield Gateway(server.sockets[0].getsockname()[1], names)
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def silent_listener() -> AsyncIterator[int]:
    """Accepts TCP and never says anything: every probe must time out."""
    held: list[asyncio.StreamWriter] = []

    async def handle(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def delaying_relay(upstream_port: int, one_way: float) -> AsyncIterator[int]:
    """A TCP relay that holds every chunk ``one_way`` seconds in each direction (a WAN)."""
    tasks: set[asyncio.Task[None]] = set()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await asyncio.sleep(one_way)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        for task in (
            asyncio.create_task(pump(reader, up_writer)),
            asyncio.create_task(pump(up_reader, writer)),
        ):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


@asynccontextmanager
async def running(prober: Prober) -> AsyncIterator[Prober]:
    task = asyncio.create_task(prober.run())
    try:
        yield prober
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def wait_for_status(
    prober: Prober, name: str, check: Callable[[ProbeStatus], bool], what: str
) -> ProbeStatus:
    """Poll the status (bounded) until ``check`` holds."""
    async with asyncio.timeout(WAIT):
        while True:
            status = prober.status(name)
            if status is not None and check(status):
                return status
            await asyncio.sleep(0.005)
    raise AssertionError(f"{name} never became {what}")


def _gateway(port: int, cluster: str = "eu-west", **kwargs: object) -> GatewayTarget:
    target = GatewayTarget.for_peer(cluster, MESH, "127.0.0.1", port)
    return GatewayTarget(**{**_fields(target), **kwargs})  # type: ignore[arg-type]


def _fields(target: GatewayTarget) -> dict[str, object]:
    return {name: getattr(target, name) for name in GatewayTarget.__dataclass_fields__}


# --- HTTP endpoints ---


async def test_http_probe_measures_a_round_trip() -> None:
    async with health_server() as server:
        rtt = await Prober(FAST).probe(HttpTarget("payments-1", server.url))
    assert 0 < rtt < FAST.timeout


async def test_http_probe_fails_on_a_non_2xx_status() -> None:
    async with health_server() as server:
        server.healthy = False
        with pytest.raises(ProbeFailed, match="status 503"):
            await Prober(FAST).probe(HttpTarget("payments-1", server.url))


async def test_http_probe_fails_on_a_closed_port() -> None:
    async with health_server() as server:
        url = server.url
    with pytest.raises(ProbeFailed, match=r"^http: |^connect: "):
        await Prober(FAST).probe(HttpTarget("payments-1", url))


async def test_a_probe_that_gets_no_answer_times_out() -> None:
    settings = ProbeSettings(interval=0.03, timeout=0.1)
    async with silent_listener() as port:
        with pytest.raises(ProbeFailed, match="timeout"):
            await Prober(settings).probe(HttpTarget("stuck", f"http://127.0.0.1:{port}/healthz"))


async def test_endpoint_goes_down_when_failing_and_up_again_when_healthy() -> None:
    async with health_server() as server:
        prober = Prober(FAST)
        prober.set_targets([HttpTarget("payments-1", server.url)])
        async with running(prober):
            up = await wait_for_status(prober, "payments-1", lambda s: s.alive, "up")
            assert up.rtt is not None
            server.healthy = False
            down = await wait_for_status(
                prober, "payments-1", lambda s: s.state is ProbeState.DOWN, "down"
            )
            assert down.failures >= FAST.down_after
            assert down.last_error == "status 503"
            server.healthy = True
            back = await wait_for_status(prober, "payments-1", lambda s: s.alive, "up again")
            # Recovery needed up_after successes in a row, not one.
            assert back.successes >= FAST.up_after
            assert back.since is not None
            assert down.since is not None
            assert back.since > down.since


async def test_a_silent_endpoint_goes_down_on_timeouts() -> None:
    settings = ProbeSettings(interval=0.03, timeout=0.05, down_after=2)
    async with silent_listener() as port:
        prober = Prober(settings)
        prober.set_targets([HttpTarget("stuck", f"http://127.0.0.1:{port}/healthz")])
        async with running(prober):
            status = await wait_for_status(
                prober, "stuck", lambda s: s.state is ProbeState.DOWN, "down"
            )
    assert status.last_error is not None
    assert status.last_error.startswith("timeout")


async def test_a_probe_slower_than_the_interval_skips_turns_without_spinning() -> None:
    calls = 0

    def clock() -> float:
        nonlocal calls
        calls += 1
        return time.monotonic()

    settings = ProbeSettings(interval=0.02, timeout=0.3, down_after=1)
    async with silent_listener() as port:
        prober = Prober(settings, clock=clock)
        prober.set_targets([HttpTarget("stuck", f"http://127.0.0.1:{port}/healthz")])
        async with running(prober):
            await wait_for_status(prober, "stuck", lambda s: s.failures >= 1, "failed")
    # About 15 wake-ups in 0.3 s; a loop spinning on the overdue probe would call the clock
    # tens of thousands of times.
    assert calls < 200


async def test_removed_targets_are_forgotten_and_new_ones_start_unknown() -> None:
    async with health_server() as server:
        prober = Prober(FAST)
        prober.set_targets([HttpTarget("a", server.url)])
        async with running(prober):
            await wait_for_status(prober, "a", lambda s: s.alive, "up")
            prober.set_targets([HttpTarget("b", server.url)])
            assert prober.status("a") is None
            assert prober.status("b") == ProbeStatus()
            await wait_for_status(prober, "b", lambda s: s.alive, "up")
    assert set(prober.statuses()) == {"b"}


def test_two_targets_with_one_name_are_refused() -> None:
    with pytest.raises(ValueError, match="named 'a'"):
        Prober(FAST).set_targets([HttpTarget("a", "http://x/"), HttpTarget("a", "http://y/")])


# --- Peer gateways over mTLS ---


def test_a_peer_gateway_target_is_its_address_sni_and_trust_domain() -> None:
    target = GatewayTarget.for_peer("eu-west", MESH, "10.0.0.7", 15443)
    assert (target.name, target.host, target.port) == ("eu-west", "10.0.0.7", 15443)
    assert target.sni == "probe.snapbright.eu-west.demo"
    assert target.trust_domain == EU


async def test_gateway_probe_completes_mtls_with_the_probe_sni() -> None:
    async with mtls_gateway(EU_GATEWAY) as gateway:
        rtt = await Prober(FAST, identity=_identity).probe(
            _gateway(gateway.port, exchange="handshake")
        )
    assert 0 < rtt < FAST.timeout
    assert gateway.server_names == ["probe.snapbright.eu-west.demo"]


@pytest.mark.parametrize("exchange", ["handshake", "http"])
async def test_gateway_rtt_is_one_round_trip_of_the_network(exchange: str) -> None:
    # 60 ms each way: connect + handshake + request would be 360 ms; one round trip is 120.
    answer = b"HTTP/1.1 200 OK\r\n\r\n" if exchange == "http" else None
    async with (
        mtls_gateway(EU_GATEWAY, answer=answer) as gateway,
        delaying_relay(gateway.port, 0.060) as port,
    ):
        rtt = await Prober(FAST, identity=_identity).probe(_gateway(port, exchange=exchange))
    assert 0.115 <= rtt < 0.230


async def test_gateway_probe_with_an_http_exchange_needs_a_2xx() -> None:
    async with mtls_gateway(EU_GATEWAY, answer=b"HTTP/1.1 200 OK\r\n\r\n") as gateway:
        await Prober(FAST, identity=_identity).probe(_gateway(gateway.port, exchange="http"))
    async with mtls_gateway(EU_GATEWAY, answer=b"HTTP/1.1 503 No\r\n\r\n") as gateway:
        with pytest.raises(ProbeFailed, match="status 503"):
            await Prober(FAST, identity=_identity).probe(_gateway(gateway.port, exchange="http"))


async def test_gateway_of_another_trust_domain_fails_the_probe() -> None:
    # The rogue gateway's chain ends at a root we do not trust for eu-west.
    async with mtls_gateway(ROGUE_GATEWAY) as gateway:
        with pytest.raises(ProbeFailed, match=r"^tls: "):
            await Prober(FAST, identity=_identity).probe(_gateway(gateway.port))


async def test_gateway_probe_without_a_bundle_for_the_peer_fails_clearly() -> None:
    only_us = TrustBundleSet([US_CA.bundle()])
    with pytest.raises(ProbeFailed, match=r"no trust bundle for eu-west\.demo"):
        await Prober(FAST, identity=lambda: (CONTROL_PLANE, only_us)).probe(_gateway(1))


async def test_gateway_goes_down_when_its_listener_stops_and_up_when_it_returns() -> None:
    prober = Prober(FAST, identity=_identity)
    async with running(prober):
        async with mtls_gateway(EU_GATEWAY) as gateway:
            port = gateway.port
            prober.set_targets([_gateway(port, exchange="handshake")])
            up = await wait_for_status(prober, "eu-west", lambda s: s.alive, "up")
            assert up.rtt is not None
            assert up.rtt > 0
        down = await wait_for_status(
            prober, "eu-west", lambda s: s.state is ProbeState.DOWN, "down"
        )
        assert down.last_error is not None
        assert down.last_error.startswith("connect: ")
