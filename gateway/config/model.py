"""The gateway's configuration document, ``kind: GatewayConfig``, validated into frozen values.

```yaml
apiVersion: snapbright.io/v1alpha1
kind: GatewayConfig
metadata: {name: east-west}
spec:
  cluster: ap-southeast
  mesh: acme
  listen: {address: 0.0.0.0, port: 15443}
  admin: {address: 127.0.0.1, port: 15021}
  limits: {maxConnections: 10000, peekTimeout: 5s, idleTimeout: 1h, connectTimeout: 2s}
  drainTimeout: 30s
  forwarding: protocol        # or splice (os.splice through a pipe, Linux)
  controlPlane: {address: 127.0.0.1, port: 15012}
  services:
    - name: payments
      namespace: default
      exported: true
      balance: least-connections
      endpoints: [{address: 10.0.0.7, port: 15006}]
  probe:
    certificate: /run/snapbright/gateway.pem   # SVID chain, leaf first
    key: /run/snapbright/gateway.key
    bundles: [{trustDomain: us-west.acme, path: /run/snapbright/us-west.bundle.json}]
```

The admin listener serves metrics and readiness and binds to loopback; any other address is
refused unless ``allowNonLoopback: true`` says it is meant.
"""

from __future__ import annotations

import ipaddress
from typing import ClassVar, Literal, Self

from pydantic import Field, model_validator

from proxy.config.model import Document, FieldError, IpAddress, MeshName, Name, Spec
from proxy.policy.model import Port, PositiveDuration

RESERVED_NAMESPACE = "snapbright"
"""Namespace of the names the gateway serves itself: ``controlplane`` and ``probe``."""


Balance = Literal["round-robin", "least-connections"]
"""How a connection picks one of a service's endpoints."""

Forwarding = Literal["splice", "protocol"]
"""How bytes pass through: ``os.splice`` through a pipe (Linux), or asyncio Protocols."""


class Endpoint(Spec):
    """An address and port: a local sidecar's inbound listener, or the control plane."""

    address: IpAddress
    port: Port


class Listener(Spec):
    """Where the gateway accepts cross-cluster connections."""

    address: IpAddress = "0.0.0.0"  # noqa: S104 - the gateway's job is to be reachable
    # 0 takes any free port (tests, `snapbright up`); the process logs the one it got.
    port: int = Field(default=15443, ge=0, le=65535)


class AdminListener(Spec):
    """Metrics, ``/ready`` and ``/live``: loopback only, unless explicitly allowed."""

    address: IpAddress = "127.0.0.1"
    port: int = Field(default=15021, ge=0, le=65535)
    allow_non_loopback: bool = False

    @model_validator(mode="after")
    def _loopback_unless_allowed(self) -> Self:
        if not self.allow_non_loopback and not ipaddress.ip_address(self.address).is_loopback:
            raise FieldError(
                ("address",),
                "the admin listener exposes metrics: bind it to loopback, or set "
                "allowNonLoopback: true if that is really meant",
            )
        return self


class Limits(Spec):
    """Bounds on what clients can make the gateway hold."""

    max_connections: int = Field(default=10_000, ge=1, le=1_000_000)
    # A ClientHello arrives in one round trip; 5 s covers slow links and stops slowloris.
    peek_timeout: PositiveDuration = 5.0
    idle_timeout: PositiveDuration = 3600.0
    connect_timeout: PositiveDuration = 2.0


class ServiceRoute(Spec):
    """A local service the gateway may route to: reachable only when ``exported``."""

    name: Name
    namespace: Name = "default"
    exported: bool = False
    balance: Balance = "round-robin"
    endpoints: tuple[Endpoint, ...] = Field(default=(), max_length=1024)


class BundleFile(Spec):
    """A SPIFFE trust bundle file (JSON) of one trust domain."""

    trust_domain: str = Field(min_length=1, max_length=255)
    path: str = Field(min_length=1)


class ProbeIdentity(Spec):
    """The gateway's own SVID and the bundles of the peers allowed to probe it."""

    certificate: str = Field(min_length=1)
    key: str = Field(min_length=1)
    bundles: tuple[BundleFile, ...] = Field(min_length=1)


class GatewaySpec(Spec):
    """Everything one gateway process needs."""

    cluster: Name
    mesh: MeshName
    listen: Listener = Listener()
    admin: AdminListener = AdminListener()
    limits: Limits = Limits()
    drain_timeout: PositiveDuration = 30.0
    # Measured by bench/gateway.py on small TLS requests: the Protocol copy on uvloop edges
    # out os.splice driven from Python (two Python-level splice calls per chunk); splice
    # saves copies only when chunks are large.
    forwarding: Forwarding = "protocol"
    control_plane: Endpoint | None = None
    services: tuple[ServiceRoute, ...] = ()
    probe: ProbeIdentity | None = None

    @model_validator(mode="after")
    def _services_are_distinct(self) -> Self:
        seen: set[tuple[str, str]] = set()
        for index, service in enumerate(self.services):
            key = (service.name, service.namespace)
            if service.namespace == RESERVED_NAMESPACE:
                raise FieldError(
                    ("services", index, "namespace"),
                    f"namespace {RESERVED_NAMESPACE!r} is reserved for the gateway's own names",
                )
            if key in seen:
                raise FieldError(
                    ("services", index), f"{service.name}.{service.namespace} is listed twice"
                )
            seen.add(key)
        return self


class GatewayConfig(Document):
    """``kind: GatewayConfig``: one east-west gateway."""

    KIND: ClassVar[str] = "GatewayConfig"

    kind: Literal["GatewayConfig"]
    spec: GatewaySpec
