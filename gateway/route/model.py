"""Routing values: where a name leads, or why it is refused."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.config.model import Balance

RefusalReason = Literal["unknown-name", "not-exported", "no-endpoints"]
"""Why a well-formed SNI name is not routed (a metric label: keep the set small)."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """An address the gateway connects to."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ServiceTarget:
    """An exported local service: one of its sidecars' inbound ports takes the connection."""

    name: str
    endpoints: tuple[Upstream, ...]
    balance: Balance


@dataclass(frozen=True, slots=True)
class ControlPlaneTarget:
    """The peering name: connections go to this cluster's control plane."""

    upstream: Upstream


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """The probe name: the gateway terminates mTLS itself and answers."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """The name is closed: ``reason`` is counted."""

    reason: RefusalReason


Target = ServiceTarget | ControlPlaneTarget | ProbeTarget
