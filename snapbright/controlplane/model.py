"""The control plane's configuration document, ``kind: ControlPlaneConfig``, and the shape of
``endpoints.json``, validated into frozen values.

```yaml
apiVersion: snapbright.io/v1alpha1
kind: ControlPlaneConfig
metadata: {name: us-west}
spec:
  cluster: us-west
  mesh: acme
  stateDir: state/us-west            # relative paths are relative to this file
  listen:
    discovery: {address: 0.0.0.0, port: 15012}   # proxies subscribe here (mTLS gRPC)
    peering: {address: 0.0.0.0, port: 15013}     # peers' control planes, via the gateway
    admin: {address: 127.0.0.1, port: 15000}     # API, dashboard, /metrics, /ready, /live
  catalog:
    backend: embedded                # or consul
    consul: {address: "http://127.0.0.1:8500", leaderKey: snapbright/us-west/leader}
    registrationTtl: 30s
  policyDirectory: policies          # TrafficPolicy, AuthorizationPolicy, ExportPolicy, ...
  gateways: ["203.0.113.7:15443"]    # what peers dial: our east-west gateways
  admission: {allowLoopback: false}  # true only for the local `snapbright up` mesh
  staleGrace: 60s
  failover: {interval: 1s}
  probeGateways: true
```

The admin listener serves the operator API; it binds to loopback unless
``allowNonLoopback: true`` says that is really meant. The admission deny list (endpoints no
registration may point at) is not written here: the process fills it with its own listeners.

``endpoints.json`` (:class:`EndpointsFile`) tells the CLI where a control plane's admin API is.
``snapbright up`` writes one for every cluster it runs into its state directory, and every
control plane writes one for itself into its own state directory::

    {"version": 1,
     "clusters": {"us-west": {"admin": "http://127.0.0.1:15000",
                              "discovery": "127.0.0.1:15012",
                              "peering": "127.0.0.1:15013",
                              "dashboard": "http://127.0.0.1:15000/"}}}

Readers ignore fields they do not know, so a writer may add more (sidecar ports, say).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import ClassVar, Literal, Self

from pydantic import ConfigDict, Field, model_validator

from proxy.config.model import (
    Document,
    Duration,
    FieldError,
    Frozen,
    HostPort,
    IpAddress,
    ListenPort,
    MeshName,
    Name,
    Spec,
)

ENDPOINTS_FILE = "endpoints.json"
"""The name of the endpoints file in a state directory."""


class Listen(Spec):
    """An address and port to listen on."""

    address: IpAddress = "127.0.0.1"
    port: ListenPort = 0


class Listeners(Spec):
    """The control plane's three listeners."""

    discovery: Listen = Field(default_factory=lambda: Listen(port=15012))
    peering: Listen = Field(default_factory=lambda: Listen(port=15013))
    admin: Listen = Field(default_factory=lambda: Listen(port=15000))
    allow_non_loopback_admin: bool = False

    @model_validator(mode="after")
    def _admin_on_loopback(self) -> Self:
        if (
            not self.allow_non_loopback_admin
            and not ipaddress.ip_address(self.admin.address).is_loopback
        ):
            raise FieldError(
                ("admin", "address"),
                "the admin API can establish and delete peerings: bind it to loopback, or set "
                "allowNonLoopbackAdmin: true if that is really meant",
            )
        return self


class Consul(Spec):
    """Where Consul is, and the KV key control-plane replicas elect their leader with."""

    address: str = Field(default="http://127.0.0.1:8500", pattern=r"^https?://[^\s/]+/?$")
    leader_key: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9._/-]+$")
    token_file: str | None = None


class Catalog(Spec):
    """Where services and endpoints come from."""

    backend: Literal["embedded", "consul"] = "embedded"
    consul: Consul | None = None
    registration_ttl: Duration = 30.0

    @model_validator(mode="after")
    def _consul_needs_address(self) -> Self:
        if self.backend == "consul" and self.consul is None:
            raise FieldError(("consul",), "backend consul needs consul: {address, leaderKey}")
        if not self.registration_ttl > 0:
            raise FieldError(("registrationTtl",), "must be longer than 0s")
        return self


class Admission(Spec):
    """Which endpoint addresses registrations may use (see federation/catalog/model.py)."""

    allow_loopback: bool = False


class Failover(Spec):
    """The failover loop's tick."""

    interval: Duration = 1.0

    @model_validator(mode="after")
    def _positive(self) -> Self:
        if not self.interval > 0:
            raise FieldError(("interval",), "must be longer than 0s")
        return self


class ControlPlaneSpec(Spec):
    """Everything one cluster's control plane needs to start."""

    cluster: Name
    mesh: MeshName
    state_dir: str = Field(min_length=1)
    listen: Listeners = Field(default_factory=Listeners)
    catalog: Catalog = Field(default_factory=Catalog)
    policy_directory: str | None = None
    gateways: tuple[HostPort, ...] = Field(default=(), max_length=64)
    admission: Admission = Field(default_factory=Admission)
    stale_grace: Duration = 60.0
    failover: Failover = Field(default_factory=Failover)
    probe_gateways: bool = True


class ControlPlaneConfig(Document):
    """A ControlPlaneConfig document. Paths are as written; :meth:`state_dir` and
    :meth:`policy_directory` anchor relative ones at the file's directory."""

    KIND: ClassVar[str] = "ControlPlaneConfig"

    kind: Literal["ControlPlaneConfig"]
    spec: ControlPlaneSpec

    def state_dir(self, base: Path) -> Path:
        """The state directory, relative paths taken from ``base`` (the file's directory)."""
        return base / self.spec.state_dir

    def policy_directory(self, base: Path) -> Path | None:
        """The policy directory, if any, relative paths taken from ``base``."""
        directory = self.spec.policy_directory
        return None if directory is None else base / directory


class ClusterEndpoints(Frozen):
    """Where one cluster's control plane listens, as the CLI finds it."""

    model_config = ConfigDict(extra="ignore")

    admin: str = Field(pattern=r"^https?://")
    discovery: str = ""
    peering: str = ""
    dashboard: str = ""


class EndpointsFile(Frozen):
    """``endpoints.json``: the clusters running from a state directory, by name."""

    model_config = ConfigDict(extra="ignore")

    version: Literal[1] = 1
    clusters: dict[str, ClusterEndpoints] = Field(default_factory=dict)
