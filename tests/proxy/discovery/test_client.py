"""The discovery client's wire mapping, its stats outbox, and its reconnect pacing.

Against a real control plane: tests/federation/discovery/test_client_end_to_end.py.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.trust.ca import create_ca
from proxy.api.v1 import discovery_pb2 as pb
from proxy.config.source import ConfigRejected
from proxy.discovery.client import (
    DiscoveryClient,
    NoConfigYet,
    StatsReporter,
    stats_window_from_wire,
    stats_window_to_wire,
)
from proxy.discovery.core import Backoff
from proxy.identity.bundle import format_bundle
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.identity.svid import X509Svid
from proxy.stats.core import Histogram, StatsWindow

NOW = datetime.now(UTC)
TD = TrustDomain.for_cluster("us-west", "acme")
WEB = SpiffeId.workload(TD, "shop", "web")


@pytest.mark.parametrize(
    "window",
    [
        StatsWindow(1_700_000_000, "pay", "us-west", (5, 1, 2, 3, 4, 6), Histogram.of([0.004])),
        StatsWindow(7, "pay", "pay@ap-southeast", (0, 0, 0, 0, 1, 0), Histogram()),
        StatsWindow(8, "a", "b", (2, 0, 0, 0, 0, 0), Histogram.of([0.00001, 120.0])),
    ],
    ids=["all-outcomes", "empty-histogram", "both-ends-of-the-layout"],
)
def test_stats_windows_round_trip_through_the_wire_form(window: StatsWindow) -> None:
    wire = pb.StatsWindow.FromString(stats_window_to_wire(window).SerializeToString())
    assert wire.start_unix_ms == window.start * 1000
    assert stats_window_from_wire(wire) == window


def _wire(**changes: object) -> pb.StatsWindow:
    message = stats_window_to_wire(
        StatsWindow(10, "pay", "us-west", (1, 0, 0, 0, 0, 0), Histogram.of([0.01]))
    )
    for name, value in changes.items():
        if name == "latency":
            message.latency.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(message, name, value)
    return message


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (_wire(duration_ms=500), "one whole second"),
        (_wire(start_unix_ms=10_500), "one whole second"),
        (_wire(upstream=""), "names its upstream"),
        (_wire(latency=pb.Histogram(layout=2, counts=[1])), "layout 2"),
        (_wire(latency=pb.Histogram(layout=1, first_bucket=10_000, counts=[1])), "does not fit"),
    ],
    ids=["short", "unaligned", "nameless", "unknown-layout", "histogram-overflow"],
)
def test_malformed_wire_windows_are_refused(wire: pb.StatsWindow, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stats_window_from_wire(wire)


def _identity() -> pb.ProxyIdentity:
    return pb.ProxyIdentity(
        role=pb.ProxyIdentity.ROLE_SIDECAR,
        cluster="us-west",
        namespace="shop",
        service_account="web",
        workload="web-1",
    )


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_the_reporter_keeps_at_most_its_capacity_and_counts_the_rest() -> None:
    starts = iter(range(100))

    def drain(now: float) -> list[StatsWindow]:
        return [
            StatsWindow(next(starts), "pay", "us-west", (1, 0, 0, 0, 0, 0), Histogram())
            for _ in range(2)
        ]

    reporter = StatsReporter(lambda: pytest.fail("no channel"), _identity(), drain, capacity=3)
    for second in range(5):
        reporter.collect(float(second))
    assert reporter.waiting == 3
    assert reporter.dropped == 7


async def test_reconnects_back_off_exponentially_with_jitter_in_virtual_time() -> None:
    ca = create_ca(TD, NOW)
    backoff = Backoff(base_s=1.0, cap_s=8.0, jitter=0.5)
    slept: list[float] = []
    clients: list[DiscoveryClient[pb.Snapshot]] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 6:
            clients[0].close()

    client = DiscoveryClient(
        f"127.0.0.1:{_unused_port()}",
        _identity(),
        ca.issue(WEB, NOW),
        ca.bundle(),
        lambda snapshot: snapshot,
        backoff=backoff,
        rng=random.Random(11),
        monotonic=lambda: 0.0,  # every stream "lived" no time at all
        sleep=sleep,
        connect_timeout_s=0.05,
    )
    clients.append(client)
    await client.run()
    expected_rng = random.Random(11)
    assert slept == [backoff.delay(n, expected_rng) for n in range(6)]
    assert 4.0 <= slept[-1] <= 8.0
    assert client.reconnects == 6
    assert client.last_error.startswith("cannot reach")


def test_a_client_needs_the_bundle_of_its_own_trust_domain() -> None:
    ca = create_ca(TD, NOW)
    other = create_ca(TrustDomain.for_cluster("ap-southeast", "acme"), NOW)
    with pytest.raises(ValueError, match="not the SVID's domain"):
        DiscoveryClient("127.0.0.1:1", _identity(), ca.issue(WEB, NOW), other.bundle(), str)


class _Snapshots:
    """Snapshots as a control plane would send them, for a client under test."""

    def __init__(self) -> None:
        self.ca = create_ca(TD, NOW - timedelta(hours=1))
        self.parsed: list[tuple[str, ...]] = []
        self.installed: list[X509Svid] = []
        self.client: DiscoveryClient[tuple[str, ...]] = DiscoveryClient(
            "127.0.0.1:1",
            _identity(),
            self.ca.issue(WEB, NOW),
            self.ca.bundle(),
            self._parse,
            on_svid=self.installed.append,
        )
        hello = self.client.hello().hello
        self.csr_key = x509.load_der_x509_csr(hello.csr_der).public_key()

    def _parse(self, snapshot: pb.Snapshot) -> tuple[str, ...]:
        names = tuple(upstream.service for upstream in snapshot.upstreams)
        if "broken" in names:
            raise ConfigRejected("upstreams: 'broken' is not allowed")
        self.parsed.append(names)
        return names

    def snapshot(
        self,
        version: str,
        *services: str,
        svid: tuple[x509.Certificate, ...] = (),
        bundle: bool = True,
    ) -> pb.Snapshot:
        message = pb.Snapshot(
            version=version, upstreams=[pb.Upstream(service=name) for name in services]
        )
        if bundle:
            message.trust_bundles.append(
                pb.TrustBundle(
                    trust_domain=TD.name, spiffe_bundle_json=format_bundle(self.ca.bundle())
                )
            )
        if svid:
            message.svid.cert_chain_pem = b"".join(
                cert.public_bytes(serialization.Encoding.PEM) for cert in svid
            )
        return message


def _answer(request: pb.SubscribeRequest) -> tuple[str, str, str]:
    kind = request.WhichOneof("kind")
    if kind == "ack":
        return ("ack", request.ack.version, "")
    return ("nack", request.nack.version, request.nack.reason)


def test_a_good_snapshot_is_applied_and_acked_and_its_repeat_only_renews_the_svid() -> None:
    given = _Snapshots()
    assert _answer(given.client.apply(given.snapshot("1.a", "pay"))) == ("ack", "1.a", "")
    assert given.client.current() == ("pay",)
    chain = given.ca.sign_svid(WEB, given.csr_key, NOW)
    repeat = given.snapshot("1.a", "pay", svid=chain)
    assert _answer(given.client.apply(repeat)) == ("ack", "1.a", "")
    assert given.parsed == [("pay",)]  # the repeat was not parsed again
    assert given.client.svid.leaf == chain[0]
    assert given.installed == [given.client.svid]
    # The certified key is not offered again.
    next_csr = x509.load_der_x509_csr(given.client.hello().hello.csr_der)
    assert next_csr.public_key() != given.csr_key


def test_a_rejected_snapshot_keeps_the_last_good_config_but_still_installs_its_svid() -> None:
    given = _Snapshots()
    given.client.apply(given.snapshot("1.a", "pay"))
    chain = given.ca.sign_svid(WEB, given.csr_key, NOW)
    answer = given.client.apply(given.snapshot("2.b", "pay", "broken", svid=chain))
    assert _answer(answer) == ("nack", "2.b", "upstreams: 'broken' is not allowed")
    assert given.client.current() == ("pay",)
    assert given.client.version == "1.a"
    assert given.client.svid.leaf == chain[0]
    # Seen again (carrying a renewal), it gets the same answer without being parsed.
    again = given.client.apply(given.snapshot("2.b", "pay", "broken"))
    assert _answer(again) == _answer(answer)


def _other_key_chain(given: _Snapshots) -> tuple[x509.Certificate, ...]:
    return given.ca.sign_svid(WEB, ec.generate_private_key(ec.SECP256R1()).public_key(), NOW)


def _other_identity_chain(given: _Snapshots) -> tuple[x509.Certificate, ...]:
    return given.ca.sign_svid(SpiffeId.workload(TD, "bank", "ledger"), given.csr_key, NOW)


def _foreign_chain(given: _Snapshots) -> tuple[x509.Certificate, ...]:
    impostor = create_ca(TD, NOW - timedelta(hours=1))  # same name, other keys
    return impostor.sign_svid(WEB, given.csr_key, NOW)


@pytest.mark.parametrize(
    ("chain", "reason"),
    [
        (_other_key_chain, "not issued for the key"),
        (_other_identity_chain, "names spiffe://us-west.acme/ns/bank/sa/ledger"),
        (_foreign_chain, "svid: "),
    ],
    ids=["other-key", "other-identity", "untrusted-root"],
)
def test_an_svid_the_proxy_cannot_use_rejects_the_whole_snapshot(
    chain: Callable[[_Snapshots], tuple[x509.Certificate, ...]], reason: str
) -> None:
    given = _Snapshots()
    before = given.client.svid
    kind, version, why = _answer(
        given.client.apply(given.snapshot("1.a", "pay", svid=chain(given)))
    )
    assert (kind, version) == ("nack", "1.a")
    assert reason in why
    assert given.client.svid is before
    assert given.parsed == []
    with pytest.raises(NoConfigYet):
        given.client.current()


def test_a_snapshot_without_the_own_trust_bundle_is_rejected() -> None:
    given = _Snapshots()
    kind, _, why = _answer(given.client.apply(given.snapshot("1.a", "pay", bundle=False)))
    assert kind == "nack"
    assert "no bundle for our trust domain" in why
