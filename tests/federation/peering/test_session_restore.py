"""A session restored from what a previous run held: it asks for a delta, not a snapshot."""

from __future__ import annotations

import random

import pytest

from federation.peering.core import (
    ApplyImports,
    Connected,
    Disconnected,
    MarkStale,
    Opened,
    PeerExports,
    PeerIdentity,
    PeeringSession,
    Send,
    ServicesDeltaReceived,
)
from federation.peering.model import ExportedService, Open, ServiceKey, ServicesDelta
from proxy.identity.model import TrustDomain

T0 = 1_800_000_000.0
US = PeerIdentity("us-west", "acme", TrustDomain("us-west.acme"))
AP = PeerIdentity("ap-southeast", "acme", TrustDomain("ap-southeast.acme"))
PAY = ExportedService(ServiceKey("shop", "pay"), "pay.shop.ap-southeast.acme", 2)
CART = ExportedService(ServiceKey("shop", "cart"), "cart.shop.ap-southeast.acme", 1)


def restored(version: int = 41, imports: tuple[ExportedService, ...] = (PAY,)) -> PeeringSession:
    return PeeringSession(
        local=US,
        peer=AP,
        exports=PeerExports(),
        local_bundle=None,
        dialer=True,
        rng=random.Random(1),
        imports=imports,
        imported_version=version,
    )


def test_a_restored_session_opens_with_the_version_it_holds() -> None:
    session = restored()
    (send,) = session.handle(Connected(T0))
    assert isinstance(send, Send)
    assert isinstance(send.message, Open)
    assert send.message.services_version_seen == 41
    assert session.status().imported == 1
    assert session.imports == {PAY.key: PAY}


def test_a_delta_from_the_restored_version_applies_only_the_change() -> None:
    session = restored()
    session.handle(Connected(T0))
    session.handle(Opened(Open("ap-southeast", "acme", AP.trust_domain), T0))
    effects = session.handle(ServicesDeltaReceived(ServicesDelta(41, 42, (CART,), ()), T0))
    assert ApplyImports("ap-southeast", (CART,), (), 42) in effects
    assert session.imports == {PAY.key: PAY, CART.key: CART}


def test_restored_imports_are_marked_stale_when_the_first_dial_fails() -> None:
    session = restored()
    session.handle(Connected(T0))
    effects = session.handle(Disconnected(T0 + 1, "refused"))
    assert MarkStale("ap-southeast", T0 + 1) in effects


def test_restored_imports_need_the_version_they_were_held_at() -> None:
    with pytest.raises(ValueError, match="positive version"):
        restored(version=0)
    assert restored(version=0, imports=()).imported_version == 0
