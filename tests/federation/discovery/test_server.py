"""The discovery server over real gRPC and mTLS on 127.0.0.1, with certificates from the CA.

"Nothing is sent" is observed as a read that does not complete within a short bound.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from datetime import UTC, datetime, timedelta

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.discovery.server import Discovery, serve
from federation.trust.ca import ClusterCA, create_ca
from proxy.api.v1 import discovery_pb2 as pb
from proxy.api.v1 import discovery_pb2_grpc as pb_grpc
from proxy.discovery.client import hello_request
from proxy.identity.bundle import TrustBundleSet
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.identity.svid import Purpose, validate_svid
from tests.federation.discovery.conftest import TD, WEB, ControlPlane, Sources, channel, identity

QUIET_S = 0.3
"""How long a stream must stay silent to count as "sent nothing"."""

Call = grpc.aio.StreamStreamCall[pb.SubscribeRequest, pb.Snapshot]


def _now() -> datetime:
    return datetime.now(UTC)


class _Stream:
    """A Subscribe call read by a background task, so waiting for silence never cancels it."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self._inbox: asyncio.Queue[pb.Snapshot | BaseException] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read_all())

    async def _read_all(self) -> None:
        try:
            async for message in self.call:
                self._inbox.put_nowait(message)
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as error:
            self._inbox.put_nowait(error)

    async def read(self) -> pb.Snapshot:
        async with asyncio.timeout(5):
            message = await self._inbox.get()
        if isinstance(message, BaseException):
            raise message
        return message

    async def silent(self) -> bool:
        await asyncio.sleep(QUIET_S)
        return self._inbox.empty()

    async def reply(self, request: pb.SubscribeRequest) -> None:
        await self.call.write(request)

    async def ack(self, version: str) -> None:
        await self.reply(pb.SubscribeRequest(ack=pb.Ack(version=version)))


async def _subscribe(
    channel_: grpc.aio.Channel, known_version: str = "", who: pb.ProxyIdentity | None = None
) -> tuple[_Stream, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    call: Call = pb_grpc.DiscoveryStub(channel_).Subscribe()
    await call.write(hello_request(who or identity(), known_version, key))
    return _Stream(call), key


def _services(snapshot: pb.Snapshot) -> list[str]:
    return [upstream.service for upstream in snapshot.upstreams]


async def test_a_subscriber_gets_the_current_snapshot(
    control_plane: ControlPlane, ca: ClusterCA
) -> None:
    async with channel(control_plane.target, ca.issue(WEB, _now()), ca.bundle()) as ch:
        call, _ = await _subscribe(ch)
        snapshot = await call.read()
    assert snapshot.version
    assert _services(snapshot) == ["pay"]
    assert [b.trust_domain for b in snapshot.trust_bundles] == [TD.name]
    # A fresh SVID is far from its renewal: none is pushed.
    assert not snapshot.HasField("svid")


async def test_after_an_ack_a_content_change_arrives_as_a_new_version(
    control_plane: ControlPlane, ca: ClusterCA
) -> None:
    async with channel(control_plane.target, ca.issue(WEB, _now()), ca.bundle()) as ch:
        call, _ = await _subscribe(ch)
        first = await call.read()
        await call.ack(first.version)
        control_plane.sources.services = ["pay", "ledger"]
        control_plane.discovery.refresh()
        second = await call.read()
    assert second.version != first.version
    assert _services(second) == ["pay", "ledger"]
    [status] = control_plane.discovery.subscribers()
    assert status.sent_version == second.version
    assert status.acked_version == first.version


async def test_an_unchanged_content_sends_nothing(
    control_plane: ControlPlane, ca: ClusterCA
) -> None:
    async with channel(control_plane.target, ca.issue(WEB, _now()), ca.bundle()) as ch:
        call, _ = await _subscribe(ch)
        first = await call.read()
        await call.ack(first.version)
        control_plane.discovery.refresh()  # a source woke up, but nothing changed
        assert await call.silent()
        # A reconnecting proxy that holds the current version is not sent it again either.
        again, _ = await _subscribe(ch, known_version=first.version)
        assert await again.silent()


async def test_refreshes_are_coalesced_and_built_once_per_proxy_class(
    control_plane: ControlPlane, ca: ClusterCA
) -> None:
    async with channel(control_plane.target, ca.issue(WEB, _now()), ca.bundle()) as ch:
        calls = [(await _subscribe(ch))[0] for _ in range(3)]
        for call in calls:
            await call.read()
        builds_before = len(control_plane.sources.builds)
        control_plane.sources.services = ["ledger"]
        for _ in range(5):
            control_plane.discovery.refresh()
        versions = {(await call.read()).version for call in calls}
    assert len(versions) == 1
    assert len(control_plane.sources.builds) - builds_before == 1


async def test_a_nack_is_recorded_and_the_version_never_resent(
    control_plane: ControlPlane, ca: ClusterCA
) -> None:
    async with channel(control_plane.target, ca.issue(WEB, _now()), ca.bundle()) as ch:
        call, _ = await _subscribe(ch)
        bad = await call.read()
        await call.reply(pb.SubscribeRequest(nack=pb.Nack(version=bad.version, reason="no")))
        assert await call.silent()
        [record] = control_plane.discovery.nacks()
        assert (record.proxy, record.version, record.reason) == (
            f"{WEB}#web-1",
            bad.version,
            "no",
        )
        control_plane.discovery.refresh()
        assert await call.silent()
        # Not on a new stream either: the control plane remembers the rejection.
        again, _ = await _subscribe(ch)
        assert await again.silent()
        # Only a new version is sent, and acking it clears the record.
        control_plane.sources.services = ["pay", "fixed"]
        control_plane.discovery.refresh()
        good = await again.read()
        assert good.version != bad.version
        await again.ack(good.version)
        assert await again.silent()
    assert control_plane.discovery.nacks() == []


async def test_while_sources_are_not_ready_subscribers_get_nothing(
    control_plane: ControlPlane, ca: ClusterCA
) -> None:
    control_plane.sources.ready = False
    async with channel(control_plane.target, ca.issue(WEB, _now()), ca.bundle()) as ch:
        call, _ = await _subscribe(ch)
        assert await call.silent()
        # A snapshot without trust bundles is incomplete, whatever the builder says.
        control_plane.sources.ready = True
        control_plane.sources.with_bundle = False
        control_plane.discovery.refresh()
        assert await call.silent()
        control_plane.sources.with_bundle = True
        control_plane.discovery.refresh()
        snapshot = await call.read()
        await call.ack(snapshot.version)
        # Sources lost again: the proxy keeps what it has; nothing empty is pushed.
        control_plane.sources.ready = False
        control_plane.discovery.refresh()
        assert await call.silent()
    assert _services(snapshot) == ["pay"]


async def test_a_proxy_with_one_workloads_svid_cannot_ask_for_anothers(
    control_plane: ControlPlane, ca: ClusterCA
) -> None:
    async with channel(control_plane.target, ca.issue(WEB, _now()), ca.bundle()) as ch:
        call, _ = await _subscribe(ch, who=identity("bank", "ledger"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "proves ns/shop/sa/web" in (refused.value.details() or "")
    assert control_plane.discovery.subscribers() == []


async def test_a_client_certificate_of_a_foreign_trust_domain_is_refused(
    control_plane: ControlPlane, ca: ClusterCA
) -> None:
    other = TrustDomain.for_cluster("ap-southeast", "acme")
    foreign = create_ca(other, _now() - timedelta(hours=1))
    svid = foreign.issue(SpiffeId.workload(other, "shop", "web"), _now())
    async with channel(control_plane.target, svid, ca.bundle()) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _subscribe(ch)
    # The handshake itself fails: only this cluster's roots are trusted for clients.
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert control_plane.discovery.subscribers() == []


async def test_a_due_svid_is_renewed_from_the_csr_for_the_proven_identity(
    control_plane: ControlPlane, ca: ClusterCA
) -> None:
    # Issued 50 minutes ago for an hour: past two thirds of its lifetime.
    old = ca.issue(WEB, _now() - timedelta(minutes=50), ttl=timedelta(hours=1))
    async with channel(control_plane.target, old, ca.bundle()) as ch:
        call, key = await _subscribe(ch)
        snapshot = await call.read()
    assert snapshot.HasField("svid")
    chain = x509.load_pem_x509_certificates(snapshot.svid.cert_chain_pem)
    leaf = chain[0]
    assert leaf.public_key() == key.public_key()
    assert (
        validate_svid(leaf, chain[1:], TrustBundleSet([ca.bundle()]), _now(), Purpose.CLIENT) == WEB
    )
    assert snapshot.svid.not_after_unix == int(leaf.not_valid_after_utc.timestamp())
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    renew = leaf.not_valid_before_utc + lifetime * 2 / 3
    assert snapshot.svid.renew_at_unix == int(renew.timestamp())


def test_the_hello_carries_a_csr_and_never_the_private_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    wire = hello_request(identity(), "", key).SerializeToString()
    secret = key.private_numbers().private_value.to_bytes(32, "big")
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert secret not in wire
    assert pkcs8 not in wire
    csr = x509.load_der_x509_csr(pb.SubscribeRequest.FromString(wire).hello.csr_der)
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()


async def test_stats_reports_are_kept_per_upstream_target_and_proxy(
    control_plane: ControlPlane, ca: ClusterCA
) -> None:
    window = pb.StatsWindow(
        start_unix_ms=1_000_000,
        duration_ms=1000,
        upstream="pay",
        target_cluster="ap-southeast",
        responses_2xx=9,
        responses_5xx=1,
        latency=pb.Histogram(layout=1, first_bucket=3, counts=[4, 6]),
    )
    bad = pb.StatsWindow(start_unix_ms=1_000_500, duration_ms=1000, upstream="pay")
    async with channel(control_plane.target, ca.issue(WEB, _now()), ca.bundle()) as ch:
        call = pb_grpc.DiscoveryStub(ch).ReportStats()
        await call.write(pb.StatsReport(identity=identity(), windows=[window, bad]))
        await call.write(pb.StatsReport(windows=[window]))
        await call.done_writing()
        assert isinstance(await asyncio.wait_for(call, 5), pb.StatsAck)
    kept = control_plane.discovery.stats.windows("pay", "ap-southeast")
    assert [(w.start, w.requests, w.histogram.count) for w in kept] == [(1000, 10, 10)] * 2
    assert {key.reporter for key in control_plane.discovery.stats.series()} == {f"{WEB}#web-1"}


async def test_stats_from_a_proxy_claiming_another_identity_are_refused(
    control_plane: ControlPlane, ca: ClusterCA
) -> None:
    async with channel(control_plane.target, ca.issue(WEB, _now()), ca.bundle()) as ch:
        call = pb_grpc.DiscoveryStub(ch).ReportStats()
        await call.write(pb.StatsReport(identity=identity("bank", "ledger")))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(call, 5)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert control_plane.discovery.stats.series() == []


async def test_the_server_presents_the_control_planes_svid(
    control_plane: ControlPlane, ca: ClusterCA
) -> None:
    # Reaching the server at all proves its certificate carries the checked host name;
    # the SVID itself must name the control plane in our trust domain.
    chain_pem = await asyncio.to_thread(_server_chain, control_plane.port)
    leaf = x509.load_pem_x509_certificate(chain_pem)
    assert validate_svid(leaf, [], TrustBundleSet([ca.bundle()]), _now(), Purpose.SERVER) == (
        SpiffeId.workload(TD, "snapbright-system", "controlplane")
    )


def _server_chain(port: int) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return ssl.DER_cert_to_PEM_cert(der).encode()


async def test_a_due_svid_waits_for_ready_sources_without_spinning(
    ca: ClusterCA, sources: Sources
) -> None:
    ticks = 0

    def clock() -> datetime:
        nonlocal ticks
        ticks += 1
        return _now()

    sources.ready = False
    discovery = Discovery(ca, sources.build, clock=clock, coalesce_s=0.01)
    server, port = await serve(discovery, "127.0.0.1:0")
    old = ca.issue(WEB, _now() - timedelta(minutes=50), ttl=timedelta(hours=1))
    try:
        async with channel(f"127.0.0.1:{port}", old, ca.bundle()) as ch:
            call, _ = await _subscribe(ch)
            ticks_before = ticks
            assert await call.silent()
            assert ticks - ticks_before < 20  # a loop re-checking a due SVID would tick on
            sources.ready = True
            discovery.refresh()
            snapshot = await call.read()
    finally:
        await server.stop(grace=None)
    assert snapshot.HasField("svid")


async def test_an_svid_reaching_renewal_mid_stream_is_pushed_with_the_held_version(
    control_plane: ControlPlane, ca: ClusterCA
) -> None:
    # Backdated 60 s and valid for an hour: two thirds of 3660 s is reached 2380 s after
    # issue. Certificates keep whole seconds, so issue on one: renewal comes in 1-2 s.
    issued = _now().replace(microsecond=0) - timedelta(seconds=2378)
    svid = ca.issue(WEB, issued, ttl=timedelta(hours=1))
    async with channel(control_plane.target, svid, ca.bundle()) as ch:
        call, key = await _subscribe(ch)
        first = await call.read()
        assert not first.HasField("svid")
        await call.ack(first.version)
        renewed = await call.read()
    assert renewed.version == first.version
    assert renewed.upstreams == first.upstreams
    leaf = x509.load_pem_x509_certificates(renewed.svid.cert_chain_pem)[0]
    assert leaf.public_key() == key.public_key()


async def test_after_a_rotation_reissued_svids_are_signed_under_the_new_root(
    control_plane: ControlPlane, ca: ClusterCA
) -> None:
    # Found by tests/integration/test_root_rotation.py: leaves stayed under the old root until
    # their own renewal, past a short overlap that retired it.
    async with channel(control_plane.target, ca.issue(WEB, _now()), ca.bundle()) as ch:
        call, key = await _subscribe(ch)
        first = await call.read()
        await call.ack(first.version)
        rotated = ca.rotate(_now())
        control_plane.discovery.set_ca(rotated)
        assert control_plane.discovery.reissue_svids() == 1
        reissued = await call.read()
    leaf = x509.load_pem_x509_certificates(reissued.svid.cert_chain_pem)[0]
    assert leaf.public_key() == key.public_key()
    issuer = rotated.active.intermediate or rotated.active.root
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest


@pytest.mark.parametrize(
    ("first", "details"),
    [
        (pb.SubscribeRequest(ack=pb.Ack(version="1.x")), "must be a Hello"),
        (pb.SubscribeRequest(hello=pb.Hello(identity=identity(), csr_der=b"\x30\x03")), "CSR"),
    ],
    ids=["ack-before-hello", "garbage-csr"],
)
async def test_a_malformed_subscription_is_refused_as_invalid(
    control_plane: ControlPlane, ca: ClusterCA, first: pb.SubscribeRequest, details: str
) -> None:
    async with channel(control_plane.target, ca.issue(WEB, _now()), ca.bundle()) as ch:
        call: Call = pb_grpc.DiscoveryStub(ch).Subscribe()
        await call.write(first)
        stream = _Stream(call)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stream.read()
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert details in (refused.value.details() or "")


async def test_a_stream_ends_when_the_svid_it_was_opened_with_expires(
    control_plane: ControlPlane, ca: ClusterCA
) -> None:
    short = ca.issue(WEB, _now(), ttl=timedelta(seconds=2))
    async with channel(control_plane.target, short, ca.bundle()) as ch:
        call, _ = await _subscribe(ch)
        first = await call.read()
        assert first.HasField("svid")  # long past two thirds of its 62 s: renewed at once
        await call.ack(first.version)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
    assert ended.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (ended.value.details() or "")
    assert control_plane.discovery.subscribers() == []
