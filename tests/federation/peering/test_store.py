"""The peering state file: what a restarted control plane reconnects from."""

from __future__ import annotations

import json
import secrets
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from federation.peering.credentials import bootstrap_root
from federation.peering.model import (
    ExportedService,
    GatewayAddress,
    IssuedToken,
    ServiceKey,
    secret_digest,
)
from federation.peering.store import (
    PeeringState,
    PeeringStoreError,
    PeerRecord,
    TokenRecord,
    imports_file,
    load_imports,
    load_state,
    remove_imports,
    save_imports,
    save_state,
    state_file,
)
from proxy.identity.model import TrustDomain

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _state() -> PeeringState:
    secret = secrets.token_bytes(32)
    root = bootstrap_root(secret, "0123456789abcdef", NOW, NOW + timedelta(hours=1))
    return PeeringState(
        peers=(
            PeerRecord(
                name="a",
                mesh="acme",
                trust_domain=TrustDomain("a.acme"),
                dialer=True,
                gateways=(GatewayAddress("127.0.0.1", 8443), GatewayAddress("::1", 8443)),
                bundle_json='{"keys": []}',
                services_version_seen=7,
                bundle_sequence_seen=2,
                advertised=(GatewayAddress("10.0.0.1", 443),),
                establish_token="sbpt1.payload.check",
            ),
            PeerRecord(
                name="c",
                mesh="acme",
                trust_domain=TrustDomain("c.acme"),
                dialer=False,
                pending_token="0123456789abcdef",
            ),
        ),
        tokens=(
            TokenRecord(
                IssuedToken("0123456789abcdef", secret_digest(secret), 1.8e9, 1.7e9, "c"),
                root,
                (GatewayAddress("gw.example", 8443),),
            ),
        ),
    )


def test_state_round_trips_and_is_private(tmp_path: Path) -> None:
    state = _state()
    save_state(tmp_path, state)
    assert load_state(tmp_path) == state
    assert stat.S_IMODE(state_file(tmp_path).stat().st_mode) == 0o600


def test_a_state_file_from_before_per_peer_addresses_and_pending_establishes_loads(
    tmp_path: Path,
) -> None:
    state = _state()
    save_state(tmp_path, state)
    document = json.loads(state_file(tmp_path).read_text())
    for peer in document["peers"]:
        del peer["advertised"], peer["pendingToken"], peer["establishToken"]
    del document["tokens"][0]["gateways"]
    state_file(tmp_path).write_text(json.dumps(document))
    loaded = load_state(tmp_path)
    assert [(p.advertised, p.pending_token, p.establish_token) for p in loaded.peers] == [
        ((), None, None),
        ((), None, None),
    ]
    assert loaded.tokens[0].gateways == ()
    assert loaded.peers[0].gateways == state.peers[0].gateways


def test_only_a_peer_that_dials_us_can_be_pending() -> None:
    with pytest.raises(PeeringStoreError, match="only a peer that dials us"):
        PeerRecord(
            name="a",
            mesh="acme",
            trust_domain=TrustDomain("a.acme"),
            dialer=True,
            gateways=(GatewayAddress("127.0.0.1", 8443),),
            pending_token="0123456789abcdef",
        )


def test_only_a_peer_we_dial_keeps_its_token() -> None:
    with pytest.raises(PeeringStoreError, match="only a peer we dial"):
        PeerRecord(
            name="a",
            mesh="acme",
            trust_domain=TrustDomain("a.acme"),
            dialer=False,
            establish_token="sbpt1.payload.check",
        )


def test_no_state_file_is_an_empty_state(tmp_path: Path) -> None:
    assert load_state(tmp_path) == PeeringState()


@pytest.mark.parametrize(
    "content",
    ["{", '{"format": 2, "peers": [], "tokens": []}', '{"format": 1, "peers": [{}], "tokens": []}'],
    ids=["not json", "unknown format", "missing members"],
)
def test_a_damaged_state_file_is_refused_naming_the_file(tmp_path: Path, content: str) -> None:
    path = state_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(PeeringStoreError, match=r"peers\.json"):
        load_state(tmp_path)


def test_a_peer_we_dial_needs_gateway_addresses() -> None:
    with pytest.raises(PeeringStoreError, match="gateway"):
        PeerRecord(name="a", mesh="acme", trust_domain=TrustDomain("a.acme"), dialer=True)


def test_imports_round_trip_with_their_version_and_are_removed_with_the_peer(
    tmp_path: Path,
) -> None:
    pay = ExportedService(ServiceKey("shop", "pay"), "pay.shop.a.acme", 3)
    assert load_imports(tmp_path, "a") == (0, ())
    save_imports(tmp_path, "a", 1_800_000_000_042, [pay])
    assert load_imports(tmp_path, "a") == (1_800_000_000_042, (pay,))
    remove_imports(tmp_path, "a")
    assert load_imports(tmp_path, "a") == (0, ())


def test_damaged_imports_are_refused_naming_the_file(tmp_path: Path) -> None:
    path = imports_file(tmp_path, "a")
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "version": 3, "services": [{"name": "../x"}]}')
    with pytest.raises(PeeringStoreError, match=r"a\.json"):
        load_imports(tmp_path, "a")
