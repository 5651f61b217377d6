"""The sidecar's configuration document, ``kind: SidecarConfig``, and the state it runs on.

```yaml
apiVersion: snapbright.io/v1alpha1
kind: SidecarConfig
metadata: {name: checkout}
spec:
  identity: {cluster: us-west, mesh: acme, namespace: shop, serviceAccount: checkout,
             service: checkout}
  app: {address: 127.0.0.1, port: 8080}
  listeners:
    outbound: {port: 15001}                   # always 127.0.0.1: only the app calls it
    inbound: {address: 0.0.0.0, port: 15006}  # mTLS from peers
    admin: {port: 15000}                      # always 127.0.0.1
  tls:
    certificate: /run/snapbright/svid.pem     # SVID chain, leaf first
    key: /run/snapbright/svid.key
    bundles: [{trustDomain: us-west.acme, path: /run/snapbright/us-west.bundle.json}]
  upstreams:                                  # the file source (or controlPlane, not both)
    - service: payments
      tcpPort: 15101                          # opaque bytes (gRPC) to payments over mTLS
      targets:
        - {cluster: us-west, weight: 90%, endpoints: [{address: 10.0.0.7, port: 15006}]}
        - {cluster: ap-southeast, weight: 10%, endpoints: [{address: 10.1.0.2, port: 15443}]}
  policies: []                                # TrafficPolicy / AuthorizationPolicy documents
```

Either the file names its ``upstreams`` and ``policies`` (the file source), or it names a
``controlPlane`` to take them from (the discovery source); both sources produce one
:class:`SidecarState`, which is all the data plane reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal, Self

from pydantic import Field, model_validator

from proxy.config.model import (
    Document,
    FieldError,
    IpAddress,
    ListenPort,
    LoopbackAddress,
    MeshName,
    Name,
    Share,
    Spec,
)
from proxy.identity.bundle import TrustBundleSet
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.identity.svid import X509Svid
from proxy.policy.model import AuthorizationPolicy, Port, PositiveDuration, TrafficPolicy

__all__ = [
    "SidecarConfig",
    "SidecarState",
    "TargetState",
    "UpstreamState",
    "sni_of",
    "target_name",
]


class Identity(Spec):
    """Who this workload is: its SPIFFE ID is ``spiffe://<cluster>.<mesh>/ns/<namespace>/sa/
    <serviceAccount>``; ``service`` names the service its inbound listener serves."""

    cluster: Name
    mesh: MeshName
    namespace: Name = "default"
    service_account: Name
    service: Name


class Address(Spec):
    """An IP address and port."""

    address: IpAddress
    port: Port


class LocalListener(Spec):
    """A listener only this host may reach (outbound, admin)."""

    address: LoopbackAddress = "127.0.0.1"
    port: ListenPort


class InboundListener(Spec):
    """The mTLS listener peers call."""

    address: IpAddress = "0.0.0.0"  # noqa: S104 - peers in the cluster must reach it
    port: ListenPort = 15006


class Listeners(Spec):
    """Where the sidecar listens."""

    outbound: LocalListener = LocalListener(port=15001)
    inbound: InboundListener = InboundListener()
    admin: LocalListener = LocalListener(port=15000)


class BundleFile(Spec):
    """A SPIFFE trust bundle file (JSON) of one trust domain."""

    trust_domain: str = Field(min_length=1, max_length=255)
    path: str = Field(min_length=1)


class TlsFiles(Spec):
    """The sidecar's SVID (chain, leaf first; EC key) and the bundles it trusts."""

    certificate: str = Field(min_length=1)
    key: str = Field(min_length=1)
    bundles: tuple[BundleFile, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_bundle_per_domain(self) -> Self:
        seen: set[str] = set()
        for index, bundle in enumerate(self.bundles):
            if bundle.trust_domain in seen:
                raise FieldError(
                    ("bundles", index, "trustDomain"), f"{bundle.trust_domain} is listed twice"
                )
            seen.add(bundle.trust_domain)
        return self


class Target(Spec):
    """One target cluster of an upstream: its share of calls and where its endpoints are.

    ``sni`` defaults to ``<service>.<namespace>.<cluster>.<mesh>`` and ``trustDomain`` to
    ``<cluster>.<mesh>``; a remote target's endpoints are usually its east-west gateway.
    """

    cluster: Name
    weight: Share = 1.0
    endpoints: tuple[Address, ...] = Field(min_length=1, max_length=1024)
    sni: str | None = Field(default=None, min_length=1, max_length=253)
    trust_domain: str | None = Field(default=None, min_length=1, max_length=255)


class Upstream(Spec):
    """A service this workload calls, by Host header (and optionally on its own TCP port)."""

    service: Name
    namespace: Name = "default"
    tcp_port: Port | None = None
    targets: tuple[Target, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_targets(self) -> Self:
        clusters = [target.cluster for target in self.targets]
        for index, cluster in enumerate(clusters):
            if cluster in clusters[:index]:
                raise FieldError(("targets", index, "cluster"), f"{cluster} is listed twice")
        if not any(target.weight > 0 for target in self.targets):
            raise FieldError(("targets",), "at least one target needs a weight above 0%")
        return self


class ControlPlane(Spec):
    """The control plane's discovery endpoint, and optionally its admin API (registration)."""

    address: IpAddress
    port: Port
    admin_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/.*)?$")


Policy = Annotated[TrafficPolicy | AuthorizationPolicy, Field(discriminator="kind")]


class SidecarSpec(Spec):
    """Everything one sidecar process needs."""

    identity: Identity
    app: Address
    listeners: Listeners = Listeners()
    tls: TlsFiles
    upstreams: tuple[Upstream, ...] | None = None
    policies: tuple[Policy, ...] | None = None
    control_plane: ControlPlane | None = None
    drain_timeout: PositiveDuration = 5.0

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        static = self.upstreams is not None or self.policies is not None
        if static and self.control_plane is not None:
            raise FieldError(
                ("controlPlane",),
                "give either upstreams/policies (a static config) or controlPlane, not both",
            )
        if not static and self.control_plane is None:
            raise FieldError((), "give upstreams/policies (a static config) or a controlPlane")
        seen: dict[str, int] = {}
        tcp_ports: set[int] = set()
        for index, upstream in enumerate(self.upstreams or ()):
            if upstream.service in seen:
                raise FieldError(("upstreams", index, "service"), "this service is listed twice")
            seen[upstream.service] = index
            port = upstream.tcp_port
            if port is not None:
                if port in tcp_ports:
                    raise FieldError(("upstreams", index, "tcpPort"), f"port {port} is taken")
                tcp_ports.add(port)
        return self


class SidecarConfig(Document):
    """``kind: SidecarConfig``: one sidecar next to one workload."""

    KIND: ClassVar[str] = "SidecarConfig"

    kind: Literal["SidecarConfig"]
    spec: SidecarSpec


def target_name(service: str, cluster: str, local_cluster: str) -> str:
    """``payments`` for the local target, ``payments@ap-southeast`` for a remote one."""
    return service if cluster == local_cluster else f"{service}@{cluster}"


def sni_of(service: str, namespace: str, cluster: str, mesh: str) -> str:
    """The SNI naming a service in a cluster: ``<service>.<namespace>.<cluster>.<mesh>``."""
    return f"{service}.{namespace}.{cluster}.{mesh}"


@dataclass(frozen=True, slots=True)
class TargetState:
    """One target cluster of an upstream, as the router uses it."""

    name: str
    cluster: str
    weight: float
    endpoints: tuple[tuple[str, int], ...]
    sni: str
    trust_domain: TrustDomain

    @classmethod
    def filled(
        cls,
        service: str,
        namespace: str,
        cluster: str,
        weight: float,
        endpoints: tuple[tuple[str, int], ...],
        local_cluster: str,
        mesh: str,
        *,
        name: str = "",
        sni: str = "",
        trust_domain: str = "",
    ) -> TargetState:
        """A target with what its source left empty filled in: its name, the SNI naming the
        service in that cluster, and that cluster's trust domain."""
        return cls(
            name=name or target_name(service, cluster, local_cluster),
            cluster=cluster,
            weight=weight,
            endpoints=endpoints,
            sni=sni or sni_of(service, namespace, cluster, mesh),
            trust_domain=TrustDomain.parse(trust_domain)
            if trust_domain
            else TrustDomain.for_cluster(cluster, mesh),
        )


@dataclass(frozen=True, slots=True)
class UpstreamState:
    """A called service: its targets, and the TCP port it has on this sidecar, if any."""

    service: str
    namespace: str
    targets: tuple[TargetState, ...]
    tcp_port: int | None = None


@dataclass(frozen=True, slots=True)
class SidecarState:
    """What the data plane runs on, whichever source produced it (file or control plane)."""

    local: SpiffeId
    service: str
    upstreams: Mapping[str, UpstreamState]
    traffic: Mapping[str, TrafficPolicy]
    authorization: tuple[AuthorizationPolicy, ...]
    bundles: TrustBundleSet
    svid: X509Svid
    version: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def trust_domain(self) -> TrustDomain:
        """This workload's own trust domain."""
        return self.local.trust_domain

    def authorization_for(self, service: str) -> tuple[AuthorizationPolicy, ...]:
        """The AuthorizationPolicies of ``service``."""
        return tuple(p for p in self.authorization if p.spec.service == service)


def upstreams_of(spec: SidecarSpec) -> dict[str, UpstreamState]:
    """The static upstreams of a config, with SNI and trust domain filled in."""
    identity = spec.identity
    result: dict[str, UpstreamState] = {}
    for upstream in spec.upstreams or ():
        targets = tuple(
            TargetState.filled(
                upstream.service,
                upstream.namespace,
                target.cluster,
                target.weight,
                tuple((e.address, e.port) for e in target.endpoints),
                identity.cluster,
                identity.mesh,
                sni=target.sni or "",
                trust_domain=target.trust_domain or "",
            )
            for target in upstream.targets
        )
        result[upstream.service] = UpstreamState(
            upstream.service, upstream.namespace, targets, upstream.tcp_port
        )
    return result
