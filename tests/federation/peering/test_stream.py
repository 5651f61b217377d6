"""The peering transport end to end: two (or three) PeeringManagers on 127.0.0.1, real
grpc.aio streams, real certificates from separate cluster CAs, bounded real-time waits."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from federation.api.v1 import peering_pb2 as pb
from federation.api.v1 import peering_pb2_grpc as pb_grpc
from federation.export.model import ExportPolicy
from federation.peering.core import SessionSettings
from federation.peering.credentials import (
    bootstrap_channel_credentials,
    control_plane_server_name,
    svid_channel_credentials,
)
from federation.peering.manager import (
    PeeringCallbacks,
    PeeringError,
    PeeringManager,
    format_status,
)
from federation.peering.model import (
    ExportedService,
    GatewayAddress,
    Heartbeat,
    Open,
    PeeringMessage,
    PeerState,
    ServiceHealth,
    ServiceKey,
    token_id_for,
)
from federation.peering.store import (
    PeeringState,
    PeerRecord,
    load_state,
    save_state,
    state_file,
)
from federation.peering.token import decode_token, encode_token
from federation.peering.wire import to_proto
from federation.trust.ca import ClusterCA, create_ca
from proxy.identity.bundle import TrustBundle
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.identity.svid import X509Svid
from tests.proxy.identity.forge import ForgedDomain, forge_leaf

MESH = "acme"
PAY = ServiceKey("shop", "pay")
CART = ServiceKey("shop", "cart")
SETTINGS = SessionSettings(
    heartbeat_interval=0.2, missed_heartbeats=10, backoff_base=0.05, backoff_cap=0.3
)
POLICY = ExportPolicy.model_validate(
    {
        "apiVersion": "snapbright.io/v1alpha1",
        "kind": "ExportPolicy",
        "metadata": {"name": "a-exports"},
        "spec": {
            "exports": (
                {"service": "pay", "peers": ("b",)},
                {"service": "cart", "peers": ("b",)},
            )
        },
    }
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def control_plane_svid(ca: ClusterCA, cluster: str) -> X509Svid:
    spiffe_id = SpiffeId.workload(ca.trust_domain, "snapbright", "controlplane")
    key = ec.generate_private_key(ec.SECP256R1())
    chain = ca.sign_svid(
        spiffe_id,
        key.public_key(),
        utcnow(),
        dns_names=(control_plane_server_name(cluster, MESH),),
    )
    return X509Svid(spiffe_id, chain, key)


@dataclass
class Heard:
    """What a manager's callbacks were told."""

    imports: dict[str, Mapping[ServiceKey, ExportedService]] = field(default_factory=dict)
    bundles: list[tuple[str, TrustBundle | None]] = field(default_factory=list)
    withdrawn: list[str] = field(default_factory=list)
    health: list[tuple[str, tuple[ServiceHealth, ...]]] = field(default_factory=list)
    stale: list[tuple[str, bool]] = field(default_factory=list)
    gateways: list[tuple[str, tuple[GatewayAddress, ...]]] = field(default_factory=list)

    def callbacks(self) -> PeeringCallbacks:
        return PeeringCallbacks(
            imports_changed=lambda peer, _change, imports: self.imports.__setitem__(
                peer, dict(imports)
            ),
            trust_changed=lambda peer, bundle: self.bundles.append((peer, bundle)),
            withdrawn=lambda peer, _td: self.withdrawn.append(peer),
            health=lambda peer, services, _at: self.health.append((peer, services)),
            stale=lambda peer, since: self.stale.append((peer, since is not None)),
            gateways_changed=lambda peer, gateways: self.gateways.append((peer, gateways)),
        )


@dataclass
class Cluster:
    name: str
    ca: ClusterCA
    manager: PeeringManager
    heard: Heard
    port: int
    state_dir: Path


async def start_cluster(
    name: str,
    ca: ClusterCA,
    state_dir: Path,
    port: int = 0,
    *,
    exports_ready: bool = True,
    gateways: tuple[GatewayAddress, ...] = (),
) -> Cluster:
    heard = Heard()
    manager = PeeringManager(
        cluster=name,
        mesh=MESH,
        svid=control_plane_svid(ca, name),
        bundle=ca.bundle(),
        state_dir=state_dir,
        callbacks=heard.callbacks(),
        settings=SETTINGS,
        exports_ready=exports_ready,
    )
    # As the control plane does it: the port first, so the Opens of the dial loops that
    # start() begins name it as our gateway.
    bound = await manager.serve(f"127.0.0.1:{port}")
    manager.gateways = gateways or (GatewayAddress("127.0.0.1", bound),)
    await manager.start()
    return Cluster(name, ca, manager, heard, bound, state_dir)


async def eventually(check: Callable[[], bool], within: float = 3.0) -> None:
    """Wait (in real time, bounded) until ``check()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"not true within {within} s")
        await asyncio.sleep(0.02)


def state_of(cluster: Cluster, peer: str) -> PeerState | None:
    for status in cluster.manager.list():
        if status.peer == peer:
            return status.state
    return None


@pytest.fixture
async def clusters(tmp_path: Path) -> AsyncIterator[dict[str, Cluster]]:
    started: dict[str, Cluster] = {}
    for name in ("a", "b", "c"):
        ca = create_ca(TrustDomain.for_cluster(name, MESH), utcnow())
        started[name] = await start_cluster(name, ca, tmp_path / name)
    yield started
    for cluster in started.values():
        # Bounded: a close that hangs fails the test instead of the run.
        await asyncio.wait_for(cluster.manager.close(), 5)


async def peer_b_with_a(clusters: dict[str, Cluster]) -> tuple[Cluster, Cluster]:
    """a accepts, b establishes with a's token; a exports pay to b (ExportPolicy)."""
    a, b = clusters["a"], clusters["b"]
    a.manager.set_service(PAY, healthy_endpoints=2, exported_to=POLICY.peers_of("pay"))
    assert await b.manager.establish(a.manager.generate_token(), within=3) == "a"
    await eventually(lambda: state_of(a, "b") is PeerState.ACTIVE)
    await eventually(lambda: PAY in b.heard.imports.get("a", {}))
    return a, b


async def raw_exchange(
    port: int, credentials: grpc.ChannelCredentials, first: PeeringMessage, server: str = "a"
) -> tuple[list[pb.PeeringMessage], grpc.StatusCode]:
    """Dial the peering port by hand, send one message, read until the server ends the call."""
    options = [("grpc.ssl_target_name_override", control_plane_server_name(server, MESH))]
    received: list[pb.PeeringMessage] = []
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as ch:
        call = pb_grpc.PeeringStub(ch).Exchange()
        try:
            await call.write(to_proto(first))
            while True:
                message = await asyncio.wait_for(call.read(), 3)
                if not isinstance(message, pb.PeeringMessage):
                    break
                received.append(message)
            return received, await call.code()
        except grpc.aio.AioRpcError as error:
            return received, error.code()


def open_as(cluster: str, secret: bytes = b"") -> Open:
    return Open(cluster, MESH, TrustDomain.for_cluster(cluster, MESH), establish_secret=secret)


# --- establish, exports, imports ---


async def test_establish_makes_both_sides_active_and_exports_reach_the_importer(
    clusters: dict[str, Cluster],
) -> None:
    a, b = await peer_b_with_a(clusters)
    assert state_of(b, "a") is PeerState.ACTIVE
    assert b.heard.imports["a"][PAY] == ExportedService(PAY, "pay.shop.a.acme", 2)
    # A new service arrives as a delta, a removal too; nothing else is re-sent.
    a.manager.set_service(CART, healthy_endpoints=1, exported_to=POLICY.peers_of("cart"))
    await eventually(lambda: CART in b.heard.imports["a"])
    a.manager.remove_service(PAY)
    await eventually(lambda: PAY not in b.heard.imports["a"])
    assert set(b.heard.imports["a"]) == {CART}
    received = b.manager.messages_received("a")
    assert received["services_snapshot"] == 1
    assert received["services_delta"] == 2
    # b learned a's bundle from the stream, and a learned b's.
    assert ("a", a.ca.bundle()) in [(p, bundle) for p, bundle in b.heard.bundles]
    assert any(p == "b" and bundle == b.ca.bundle() for p, bundle in a.heard.bundles)


async def test_a_service_not_exported_to_the_peer_never_reaches_it(
    clusters: dict[str, Cluster],
) -> None:
    a, b = await peer_b_with_a(clusters)
    a.manager.set_service(ServiceKey("shop", "ledger"), healthy_endpoints=1, exported_to=())
    a.manager.set_service(CART, healthy_endpoints=1, exported_to=POLICY.peers_of("cart"))
    await eventually(lambda: CART in b.heard.imports["a"])
    assert ServiceKey("shop", "ledger") not in b.heard.imports["a"]


async def test_health_summaries_reach_the_peer_for_exported_services_only(
    clusters: dict[str, Cluster],
) -> None:
    a, b = await peer_b_with_a(clusters)
    pay = ServiceHealth(PAY, 0.01, 0.02, 0.03, 0.99, 50.0, 100.0, 2)
    secret = ServiceHealth(ServiceKey("shop", "ledger"), 0.01, 0.02, 0.03, 1.0, 1.0, None, 1)
    a.manager.publish_health([pay, secret], at_unix_ms=1)
    await eventually(lambda: bool(b.heard.health))
    assert b.heard.health == [("a", (pay,))]


# --- heartbeats and status ---


async def test_heartbeats_measure_rtt_and_list_shows_it(clusters: dict[str, Cluster]) -> None:
    a, b = await peer_b_with_a(clusters)

    def rtt_in_milliseconds() -> bool:
        # The echo is immediate: milliseconds on loopback (polled: a loaded machine may
        # delay one heartbeat, and the next one measures again).
        rtts = [s.rtt_seconds for c in (a, b) for s in c.manager.list()]
        return all(rtt is not None and 0 <= rtt < 0.1 for rtt in rtts)

    await eventually(rtt_in_milliseconds)
    (status,) = b.manager.list()
    lines = format_status(b.manager.list(), now=status.last_heard_at or 0.0)
    assert lines[0].split() == ["PEER", "STATE", "LAST-HEARTBEAT", "RTT", "IMPORTED", "EXPORTED"]
    assert lines[1].split()[:2] == ["a", "ACTIVE"]
    assert lines[1].split()[-2:] == ["1", "0"]


# --- secrets and tokens ---


async def test_a_token_with_a_wrong_secret_is_refused(clusters: dict[str, Cluster]) -> None:
    a, b = clusters["a"], clusters["b"]
    token = decode_token(a.manager.generate_token(), now=0)
    forged_secret = secrets.token_bytes(32)
    forged = replace(token, secret=forged_secret, token_id=token_id_for(forged_secret))
    with pytest.raises(PeeringError, match="establish with a failed"):
        await b.manager.establish(encode_token(forged), within=1.0)
    assert a.manager.list() == []
    assert b.manager.list() == []


async def test_the_secret_must_belong_to_the_token_that_opened_the_tls_session(
    clusters: dict[str, Cluster],
) -> None:
    a = clusters["a"]
    first = decode_token(a.manager.generate_token(), now=0)
    second = decode_token(a.manager.generate_token(), now=0)
    roots = a.ca.bundle().roots
    credentials = bootstrap_channel_credentials(first.secret, first.token_id, roots, utcnow())
    received, code = await raw_exchange(a.port, credentials, open_as("b", second.secret))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert received[0].WhichOneof("body") == "close"
    # Neither token was spent by the attempt: the honest holder of the second still peers.
    assert await clusters["b"].manager.establish(encode_token(second), within=3) == "a"


async def test_a_used_token_is_refused_at_the_handshake(clusters: dict[str, Cluster]) -> None:
    a, b, c = clusters["a"], clusters["b"], clusters["c"]
    text = a.manager.generate_token()
    assert await b.manager.establish(text, within=3) == "a"
    with pytest.raises(PeeringError):
        await c.manager.establish(text, within=1.0)
    token = decode_token(text, now=0)
    credentials = bootstrap_channel_credentials(
        token.secret, token.token_id, a.ca.bundle().roots, utcnow()
    )
    _, code = await raw_exchange(a.port, credentials, open_as("c", token.secret))
    assert code is grpc.StatusCode.UNAVAILABLE  # its bootstrap root left a's client roots
    assert [s.peer for s in a.manager.list()] == ["b"]


@pytest.mark.parametrize(
    ("opens_as", "words"),
    [
        (Open("b", MESH, TrustDomain("evil.acme")), "trust domain must be b.acme"),
        (open_as("a"), "already peered with a"),
    ],
    ids=["a trust domain that is not <cluster>.<mesh>", "the acceptor's own name"],
)
async def test_a_first_establish_must_name_a_new_cluster_in_its_own_trust_domain(
    clusters: dict[str, Cluster], opens_as: Open, words: str
) -> None:
    a = clusters["a"]
    token = decode_token(a.manager.generate_token(), now=0)
    credentials = bootstrap_channel_credentials(
        token.secret, token.token_id, a.ca.bundle().roots, utcnow()
    )
    received, code = await raw_exchange(
        a.port, credentials, replace(opens_as, establish_secret=token.secret)
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert words in received[0].close.reason
    assert a.manager.list() == []


async def test_an_expired_token_opens_nothing(clusters: dict[str, Cluster]) -> None:
    a, b = clusters["a"], clusters["b"]
    text = a.manager.generate_token(ttl_seconds=0.3)
    token = decode_token(text, now=0)
    await asyncio.sleep(0.4)
    with pytest.raises(PeeringError, match="expired"):
        await b.manager.establish(text)
    credentials = bootstrap_channel_credentials(
        token.secret, token.token_id, a.ca.bundle().roots, utcnow()
    )
    _, code = await raw_exchange(a.port, credentials, open_as("b", token.secret))
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED)
    assert a.manager.list() == []


async def test_the_dialer_trusts_only_the_acceptor_the_token_names(
    clusters: dict[str, Cluster],
) -> None:
    a, b, c = clusters["a"], clusters["b"], clusters["c"]
    token = decode_token(a.manager.generate_token(), now=0)
    # Someone sends a's token to c's address: c cannot prove it is a's control plane.
    redirected = replace(token, gateways=(GatewayAddress("127.0.0.1", c.port),))
    with pytest.raises(PeeringError, match="establish with a failed"):
        await b.manager.establish(encode_token(redirected), within=1.0)
    assert c.manager.list() == []
    # The token was never spent: it still works at the right address.
    assert await b.manager.establish(encode_token(token), within=3) == "a"


# --- who may reconnect ---


async def test_reconnects_are_verified_against_the_peers_own_bundle_only(
    clusters: dict[str, Cluster],
) -> None:
    a, _ = await peer_b_with_a(clusters)
    c = clusters["c"]
    # c is a peer too, so c's root is among a's client roots at the TLS layer.
    assert await c.manager.establish(a.manager.generate_token(), within=3) == "a"
    await eventually(lambda: any(p == "c" and bundle for p, bundle in a.heard.bundles))
    roots = a.ca.bundle().roots
    c_root = c.ca.authorities[0]
    assert c_root.root_key is not None
    c_domain = ForgedDomain(c.ca.trust_domain, c_root.root, c_root.root_key)
    claims_b_chained_to_c = forge_leaf(
        c_domain, utcnow(), uris=["spiffe://b.acme/ns/snapbright/sa/controlplane"]
    )
    stranger = create_ca(TrustDomain("d.acme"), utcnow())
    denied, unavailable = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE
    cases = [
        # (what the client presents, whom it opens as, expected status, words of the Close)
        (claims_b_chained_to_c, "b", denied, "chains to c.acme"),
        (control_plane_svid(c.ca, "c"), "b", denied, "may not open as b"),
        (control_plane_svid(a.ca, "a"), "b", denied, "no trust bundle is known"),
        (control_plane_svid(stranger, "d"), "d", unavailable, None),  # refused by TLS itself
    ]
    for svid, claimed, expected, words in cases:
        credentials = svid_channel_credentials(svid, roots)
        received, code = await raw_exchange(a.port, credentials, open_as(claimed))
        assert code is expected, svid.spiffe_id
        if words is not None:
            assert words in received[0].close.reason, received
    # None of them disturbed the real b.
    assert state_of(a, "b") is PeerState.ACTIVE
    assert state_of(a, "c") is PeerState.ACTIVE


async def test_an_accepted_stream_must_open_with_open(clusters: dict[str, Cluster]) -> None:
    a, b = await peer_b_with_a(clusters)
    await eventually(lambda: any(p == "b" for p, _ in a.heard.bundles))
    credentials = svid_channel_credentials(control_plane_svid(b.ca, "b"), a.ca.bundle().roots)
    received, code = await raw_exchange(a.port, credentials, Heartbeat(1, 1))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "must be Open" in received[0].close.reason


async def test_a_restarted_peering_port_resyncs_with_only_the_delta(
    clusters: dict[str, Cluster],
) -> None:
    a, b = await peer_b_with_a(clusters)
    await eventually(lambda: any(p == "b" for p, _ in a.heard.bundles))
    await a.manager.stop_serving()
    # b keeps redialing with the session's backoff; after five failures in a row it says so.
    await eventually(lambda: state_of(b, "a") is PeerState.FAILING)
    a.manager.set_service(CART, healthy_endpoints=1, exported_to=POLICY.peers_of("cart"))
    await a.manager.serve(f"127.0.0.1:{a.port}")
    await eventually(lambda: state_of(b, "a") is PeerState.ACTIVE)
    await eventually(lambda: CART in b.heard.imports["a"])
    received = b.manager.messages_received("a")
    assert received["services_snapshot"] == 1  # only the first establish sent one
    assert received["services_delta"] == 1
    assert received["open"] == 2
    # While a was away b kept its imports, marked stale, and then fresh again.
    assert b.heard.stale == [("a", True), ("a", False)]


async def test_a_restarted_dialer_reconnects_from_its_state_without_a_token(
    clusters: dict[str, Cluster],
) -> None:
    a, b = await peer_b_with_a(clusters)
    await eventually(lambda: any(p == "b" for p, _ in a.heard.bundles))
    await b.manager.close()
    restarted = await start_cluster("b", b.ca, b.state_dir)
    clusters["b"] = restarted
    # Its mirrors are back before any connection: the imports were saved with their version.
    assert set(restarted.heard.imports["a"]) == {PAY}
    await eventually(lambda: state_of(restarted, "a") is PeerState.ACTIVE)
    a.manager.set_service(CART, healthy_endpoints=1, exported_to=POLICY.peers_of("cart"))
    await eventually(lambda: CART in restarted.heard.imports["a"])
    received = restarted.manager.messages_received("a")
    assert received["services_delta"] == 1
    assert "services_snapshot" not in received  # it asked for what changed since the save


async def test_a_restarted_acceptor_takes_the_dialer_back_from_its_state(
    clusters: dict[str, Cluster],
) -> None:
    a, b = await peer_b_with_a(clusters)
    await eventually(lambda: any(p == "b" for p, _ in a.heard.bundles))
    await a.manager.close()
    restarted = await start_cluster("a", a.ca, a.state_dir, port=a.port)
    clusters["a"] = restarted
    # b's bundle came back from a's state: b's SVID passes the handshake again.
    await eventually(lambda: state_of(restarted, "b") is PeerState.ACTIVE)
    await eventually(lambda: state_of(b, "a") is PeerState.ACTIVE)
    # The new incarnation cannot know what b holds: a full snapshot, now empty.
    await eventually(lambda: b.manager.messages_received("a")["services_snapshot"] == 2)
    await eventually(lambda: b.heard.imports["a"] == {})


def recorded_gateways(cluster: Cluster, peer: str) -> tuple[GatewayAddress, ...] | None:
    """The gateways ``cluster`` keeps on record for ``peer`` in its state directory."""
    for record in load_state(cluster.state_dir).peers:
        if record.name == peer:
            return record.gateways
    return None


async def test_the_acceptor_records_the_gateways_the_dialer_names_in_its_open(
    clusters: dict[str, Cluster],
) -> None:
    a, b = await peer_b_with_a(clusters)
    assert recorded_gateways(a, "b") == (GatewayAddress("127.0.0.1", b.port),)
    assert a.heard.gateways == []  # a new peer: its record says it all


async def test_a_dialer_restarted_on_other_gateways_is_routed_to_there(
    clusters: dict[str, Cluster],
) -> None:
    a, b = await peer_b_with_a(clusters)
    await eventually(lambda: any(p == "b" for p, _ in a.heard.bundles))
    await b.manager.close()
    restarted = await start_cluster("b", b.ca, b.state_dir)  # a port of the OS's choosing
    clusters["b"] = restarted
    moved = (GatewayAddress("127.0.0.1", restarted.port),)
    await eventually(lambda: a.heard.gateways == [("b", moved)])
    assert recorded_gateways(a, "b") == moved
    assert recorded_gateways(restarted, "a") == (GatewayAddress("127.0.0.1", a.port),)


def record_of(cluster: Cluster, peer: str) -> PeerRecord:
    """``cluster``'s saved record of ``peer``."""
    (record,) = [r for r in load_state(cluster.state_dir).peers if r.name == peer]
    return record


async def restart(
    clusters: dict[str, Cluster], name: str, gateways: tuple[GatewayAddress, ...] = ()
) -> Cluster:
    """Stop a cluster's manager and start a new one on its state directory and port."""
    old = clusters[name]
    await old.manager.close()
    clusters[name] = await start_cluster(
        name, old.ca, old.state_dir, port=old.port, gateways=gateways
    )
    return clusters[name]


# --- per-peer gateway addresses ---


async def test_a_token_carries_the_addresses_given_for_that_peer_and_the_dialer_dials_them(
    clusters: dict[str, Cluster],
) -> None:
    a, b = clusters["a"], clusters["b"]
    a.manager.gateways = (GatewayAddress("127.0.0.1", 9),)  # the default: nobody listens
    for_b = (GatewayAddress("127.0.0.1", a.port), GatewayAddress("10.0.0.1", 8443))
    text = a.manager.generate_token(gateways=for_b)
    assert decode_token(text, now=0).gateways == for_b
    assert await b.manager.establish(text, within=3) == "a"
    assert record_of(b, "a").gateways == for_b
    assert record_of(a, "b").advertised == for_b  # a names them to b from now on
    assert b.heard.gateways == []  # a's Open named what its token did


async def test_each_side_names_its_own_addresses_for_each_peer_across_restarts(
    clusters: dict[str, Cluster],
) -> None:
    a, b, c = clusters["a"], clusters["b"], clusters["c"]
    for_b = (GatewayAddress("127.0.0.1", a.port), GatewayAddress("10.0.0.1", 8443))
    for_c = (GatewayAddress("127.0.0.1", a.port), GatewayAddress("10.0.0.2", 8443))
    b_for_a = (GatewayAddress("127.0.0.1", b.port), GatewayAddress("10.0.1.1", 8443))
    await b.manager.establish(a.manager.generate_token(gateways=for_b), gateways=b_for_a)
    await c.manager.establish(a.manager.generate_token(gateways=for_c))
    assert record_of(a, "b").gateways == b_for_a  # b named its address for a, not its default
    assert record_of(a, "c").gateways == (GatewayAddress("127.0.0.1", c.port),)
    assert record_of(b, "a").gateways == for_b
    assert record_of(c, "a").gateways == for_c

    a = await restart(clusters, "a")  # its default addresses are (127.0.0.1, a.port) now
    await eventually(lambda: b.manager.messages_received("a").get("open", 0) == 2)
    await eventually(lambda: c.manager.messages_received("a").get("open", 0) == 2)
    await eventually(lambda: state_of(a, "b") is PeerState.ACTIVE)
    assert (b.heard.gateways, c.heard.gateways) == ([], [])  # still named per peer
    assert (record_of(b, "a").gateways, record_of(c, "a").gateways) == (for_b, for_c)
    assert a.heard.gateways == []
    assert record_of(a, "b").gateways == b_for_a


async def test_the_dialer_follows_the_addresses_the_acceptor_names_in_its_open(
    clusters: dict[str, Cluster],
) -> None:
    a, b = await peer_b_with_a(clusters)
    await eventually(lambda: any(p == "b" for p, _ in a.heard.bundles))
    moved = (GatewayAddress("10.9.9.9", 443), GatewayAddress("127.0.0.1", a.port))
    await restart(clusters, "a", gateways=moved)
    await eventually(lambda: b.heard.gateways == [("a", moved)])
    assert record_of(b, "a").gateways == moved
    # Its dial loop dials the new list: the first address is unreachable, the second is a.
    await b.manager.close()
    b = clusters["b"] = await start_cluster("b", b.ca, b.state_dir)
    await eventually(lambda: state_of(b, "a") is PeerState.ACTIVE, within=5)


# --- an establish survives the acceptor's crash ---


async def first_half_of_an_establish(a: Cluster, token_text: str, cluster: str) -> grpc.aio.Channel:
    """Dial ``a`` as ``cluster`` with the token, as a dialer does, and read until a's Open: a
    has admitted the new peer, and never gets its trust bundle. The channel stays open."""
    token = decode_token(token_text, now=0)
    credentials = bootstrap_channel_credentials(
        token.secret, token.token_id, a.ca.bundle().roots, utcnow()
    )
    options = [("grpc.ssl_target_name_override", control_plane_server_name("a", MESH))]
    channel = grpc.aio.secure_channel(f"127.0.0.1:{a.port}", credentials, options=options)
    call = pb_grpc.PeeringStub(channel).Exchange()
    await call.write(to_proto(open_as(cluster, token.secret)))
    first = await asyncio.wait_for(call.read(), 3)
    assert isinstance(first, pb.PeeringMessage)
    assert first.WhichOneof("body") == "open"
    return channel


async def test_an_acceptor_killed_before_it_stored_the_bundle_takes_the_dialer_back(
    clusters: dict[str, Cluster],
) -> None:
    a, b = clusters["a"], clusters["b"]
    text = a.manager.generate_token()
    channel = await first_half_of_an_establish(a, text, "b")
    pending = record_of(a, "b")
    assert (pending.pending_token, pending.bundle_json) == (
        decode_token(text, now=0).token_id,
        None,
    )
    # Killed -9 there: what is on disk is what it saved when it admitted b.
    on_disk = state_file(a.state_dir).read_bytes()
    await a.manager.close()
    await channel.close()
    state_file(a.state_dir).write_bytes(on_disk)

    # The dialer retries with the same token while a is down, and once it is back.
    establish = asyncio.create_task(b.manager.establish(text, within=10))
    a = await restart(clusters, "a")
    assert await establish == "a"
    done = record_of(a, "b")
    assert done.pending_token is None
    assert done.bundle_json is not None
    assert state_of(a, "b") is PeerState.ACTIVE
    assert record_of(b, "a").name == "a"  # b recorded the peer only now
    # The token is spent at last: its bootstrap root left a's client roots.
    token = decode_token(text, now=0)
    credentials = bootstrap_channel_credentials(
        token.secret, token.token_id, a.ca.bundle().roots, utcnow()
    )
    _, code = await raw_exchange(a.port, credentials, open_as("b", token.secret))
    assert code is grpc.StatusCode.UNAVAILABLE
    # And a takes b back from its state by b's SVID, as any established peer.
    a = await restart(clusters, "a")
    await eventually(lambda: state_of(a, "b") is PeerState.ACTIVE)


async def test_a_dialer_restarted_with_its_establish_pending_finishes_it_with_the_token(
    clusters: dict[str, Cluster],
) -> None:
    a, b = clusters["a"], clusters["b"]
    text = a.manager.generate_token()
    channel = await first_half_of_an_establish(a, text, "b")
    await channel.close()
    await eventually(lambda: state_of(a, "b") is not PeerState.ACTIVE)
    # What b saved when it first saw a's Open: the peer, with the token (its ack never came).
    token = decode_token(text, now=0)
    await b.manager.close()
    pending = PeerRecord(
        name="a",
        mesh=MESH,
        trust_domain=token.trust_domain,
        dialer=True,
        gateways=token.gateways,
        bundle_json=token.trust_bundle_json,
        establish_token=text,
    )
    save_state(b.state_dir, PeeringState(peers=(pending,)))
    b = clusters["b"] = await start_cluster("b", b.ca, b.state_dir)
    await eventually(lambda: record_of(a, "b").pending_token is None)
    await eventually(lambda: record_of(b, "a").establish_token is None)
    assert state_of(b, "a") is PeerState.ACTIVE
    assert state_of(a, "b") is PeerState.ACTIVE


async def test_a_pending_dialer_whose_bundle_the_acceptor_stored_comes_back_by_its_svid(
    clusters: dict[str, Cluster],
) -> None:
    a, b = clusters["a"], clusters["b"]
    text = a.manager.generate_token()
    assert await b.manager.establish(text, within=3) == "a"
    # b crashed after a's Open and before a's Ack: a holds b's bundle, b still the token,
    # which a no longer admits. b alternates the token with its SVID, and the SVID passes.
    await b.manager.close()
    saved = record_of(b, "a")
    save_state(b.state_dir, PeeringState(peers=(replace(saved, establish_token=text),)))
    b = clusters["b"] = await start_cluster("b", b.ca, b.state_dir)
    await eventually(lambda: record_of(b, "a").establish_token is None)
    assert state_of(b, "a") is PeerState.ACTIVE
    assert record_of(a, "b").pending_token is None


async def test_establish_returns_once_the_acceptor_has_stored_our_bundle(
    clusters: dict[str, Cluster],
) -> None:
    a, b = clusters["a"], clusters["b"]
    assert await b.manager.establish(a.manager.generate_token(), within=3) == "a"
    stored = record_of(a, "b")  # read at once: a saves it before its Ack goes out
    assert stored.pending_token is None
    assert stored.bundle_json is not None
    assert b.manager.bundle_acked("a") == b.ca.sequence


async def test_a_pending_token_is_not_usable_by_another_cluster(
    clusters: dict[str, Cluster],
) -> None:
    a = clusters["a"]
    text = a.manager.generate_token()
    channel = await first_half_of_an_establish(a, text, "b")
    await channel.close()
    await eventually(lambda: state_of(a, "b") is not PeerState.ACTIVE)
    token = decode_token(text, now=0)
    credentials = bootstrap_channel_credentials(
        token.secret, token.token_id, a.ca.bundle().roots, utcnow()
    )
    received, code = await raw_exchange(a.port, credentials, open_as("c", token.secret))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "already used by b" in received[0].close.reason
    assert [s.peer for s in a.manager.list()] == ["b"]


async def test_deleting_a_pending_peer_spends_its_token(clusters: dict[str, Cluster]) -> None:
    a = clusters["a"]
    text = a.manager.generate_token()
    channel = await first_half_of_an_establish(a, text, "b")
    await channel.close()
    await a.manager.delete("b")
    token = decode_token(text, now=0)
    credentials = bootstrap_channel_credentials(
        token.secret, token.token_id, a.ca.bundle().roots, utcnow()
    )
    _, code = await raw_exchange(a.port, credentials, open_as("b", token.secret))
    assert code is grpc.StatusCode.UNAVAILABLE  # its bootstrap root left a's client roots
    assert a.manager.list() == []


async def test_a_pending_peer_is_replaced_by_its_establish_with_a_new_token(
    clusters: dict[str, Cluster],
) -> None:
    a, b = clusters["a"], clusters["b"]
    channel = await first_half_of_an_establish(a, a.manager.generate_token(), "b")
    await channel.close()
    await eventually(lambda: state_of(a, "b") is not PeerState.ACTIVE)
    assert await b.manager.establish(a.manager.generate_token(), within=3) == "a"
    assert record_of(a, "b").pending_token is None
    await eventually(lambda: state_of(a, "b") is PeerState.ACTIVE)


async def test_a_restarted_acceptor_withholds_its_exports_until_released(
    clusters: dict[str, Cluster],
) -> None:
    a, b = await peer_b_with_a(clusters)
    await eventually(lambda: any(p == "b" for p, _ in a.heard.bundles))
    await a.manager.close()
    restarted = await start_cluster("a", a.ca, a.state_dir, port=a.port, exports_ready=False)
    clusters["a"] = restarted
    await eventually(lambda: b.manager.messages_received("a")["open"] == 2)
    # A heartbeat after the new Open would have followed a snapshot sent on it (FIFO).
    beats = b.manager.messages_received("a")["heartbeat"]
    await eventually(lambda: b.manager.messages_received("a")["heartbeat"] >= beats + 2)
    assert b.manager.messages_received("a")["services_snapshot"] == 1
    assert set(b.heard.imports["a"]) == {PAY}

    restarted.manager.set_service(PAY, healthy_endpoints=2, exported_to=POLICY.peers_of("pay"))
    restarted.manager.release_exports()
    await eventually(lambda: b.manager.messages_received("a")["services_snapshot"] == 2)
    assert set(b.heard.imports["a"]) == {PAY}


async def test_a_peer_we_dial_may_not_dial_us(clusters: dict[str, Cluster]) -> None:
    a, b = await peer_b_with_a(clusters)
    credentials = svid_channel_credentials(control_plane_svid(a.ca, "a"), b.ca.bundle().roots)
    await eventually(lambda: any(p == "a" for p, _ in b.heard.bundles))
    _, code = await raw_exchange(b.port, credentials, open_as("a"), server="b")
    assert code is grpc.StatusCode.UNAVAILABLE  # a's roots are not among b's client roots


# --- delete ---


@pytest.mark.parametrize("deleter", ["a", "b"])
async def test_delete_withdraws_imports_and_trust_on_both_sides_within_5_s(
    clusters: dict[str, Cluster], deleter: str
) -> None:
    a, b = await peer_b_with_a(clusters)
    await eventually(lambda: any(p == "b" for p, _ in a.heard.bundles))
    here, there = (a, b) if deleter == "a" else (b, a)
    await here.manager.delete(there.name)
    assert here.heard.withdrawn == [there.name]
    assert here.manager.list() == []
    await eventually(lambda: there.heard.withdrawn == [here.name], within=5.0)
    assert there.manager.list() == []
    assert (here.name, None) in there.heard.bundles
    # b's trust is gone from a's port: its SVID no longer passes the handshake.
    svid = control_plane_svid(b.ca, "b")
    credentials = svid_channel_credentials(svid, a.ca.bundle().roots)
    _, code = await raw_exchange(a.port, credentials, open_as("b"))
    assert code is grpc.StatusCode.UNAVAILABLE


async def test_delete_while_the_peer_is_unreachable_withdraws_here_and_stops_redialing(
    clusters: dict[str, Cluster],
) -> None:
    a, b = await peer_b_with_a(clusters)
    await a.manager.stop_serving()
    await eventually(lambda: state_of(b, "a") is not PeerState.ACTIVE)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await b.manager.delete("a")
    assert loop.time() - started < 1.0  # the backoff sleep does not hold the delete up
    assert b.heard.withdrawn == ["a"]
    assert b.manager.list() == []
    # a never heard of it: it keeps b, disconnected with stale mirrors, until a deletes b too.
    assert state_of(a, "b") is PeerState.DISCONNECTED


# --- trust federation ---


async def test_a_rotated_bundle_reaches_the_peer_and_its_ack_comes_back(
    clusters: dict[str, Cluster],
) -> None:
    a, b = await peer_b_with_a(clusters)
    await eventually(lambda: a.manager.bundle_acked_by_all(1))
    rotated = a.ca.rotate(utcnow())
    a.manager.set_local_bundle(rotated.bundle())
    assert not a.manager.bundle_acked_by_all(2)
    await eventually(lambda: a.manager.bundle_acked_by_all(2))
    assert a.manager.bundle_acked("b") == 2
    assert a.manager.bundle_acked("nobody") is None
    peer, bundle = b.heard.bundles[-1]
    assert peer == "a"
    assert bundle is not None
    assert bundle.sequence == 2
    assert len(bundle.roots) == 2
    # Leaves under the new root are accepted by b on the next connection.
    a.manager.set_svid(control_plane_svid(rotated, "a"))
    await a.manager.stop_serving()
    await eventually(lambda: state_of(b, "a") is not PeerState.ACTIVE)
    await a.manager.serve(f"127.0.0.1:{a.port}")
    await eventually(lambda: state_of(b, "a") is PeerState.ACTIVE)
