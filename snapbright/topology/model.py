"""LocalMesh: the topology `snapbright up` starts on this machine.

A mesh name; clusters (each in a region); which clusters peer; the emulated WAN link between
two clusters (one-way latency, jitter, loss, bandwidth); the demo services (where they run, how
many replicas, which services they call, how slow and how flaky they are); and the policy files
that apply (paths relative to the topology file). Names are checked against each other: a
peering or a link names known clusters, an upstream names a known service that runs in the
caller's cluster or in a cluster peered with it. See ``default.yaml`` next to this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BeforeValidator, Field, WithJsonSchema, model_validator

from proxy.config.model import Document, Duration, FieldError, Name, Share, Spec
from proxy.identity.model import TrustDomain

_BANDWIDTH = re.compile(r"^(?P<value>\d+(?:\.\d+)?)(?P<unit>kbps|Mbps|Gbps)$")
_BANDWIDTH_UNITS = {"kbps": 1e3, "Mbps": 1e6, "Gbps": 1e9}


def _parse_bandwidth(value: Any) -> int:
    if not isinstance(value, str):
        raise ValueError("must be a bandwidth such as 100Mbps, 1Gbps or 512kbps")
    match = _BANDWIDTH.match(value.strip())
    if match is None:
        raise ValueError(f"invalid bandwidth {value!r}: use a number and kbps, Mbps or Gbps")
    bits = int(float(match["value"]) * _BANDWIDTH_UNITS[match["unit"]])
    if bits <= 0:
        raise ValueError("must be above 0kbps")
    return bits


Bandwidth = Annotated[
    int,
    BeforeValidator(_parse_bandwidth),
    WithJsonSchema({"type": "string", "pattern": r"^\d+(\.\d+)?(kbps|Mbps|Gbps)$"}),
]
"""A link's bandwidth written as ``100Mbps``, held as bits per second."""

ClusterPair = tuple[Name, Name]


class Cluster(Spec):
    """One cluster: its own control plane, gateway and trust domain ``<name>.<mesh>``."""

    name: Name
    region: Name


class Peering(Spec):
    """Two clusters that peer (exchange exports, trust bundles and health)."""

    between: ClusterPair


class WanLink(Spec):
    """The emulated network between two clusters, the same in both directions."""

    between: ClusterPair
    # One way: a round trip costs twice this.
    latency: Duration = 0.0
    jitter: Duration = 0.0
    loss: Share = 0.0
    # None: as fast as loopback.
    bandwidth: Bandwidth | None = None

    @model_validator(mode="after")
    def _jitter_within_latency(self) -> Self:
        if self.jitter > self.latency:
            raise FieldError(("jitter",), "must not exceed latency (a delay is never negative)")
        return self


class MeshService(Spec):
    """A demo service: where it runs, how many replicas per cluster, what it calls, and how
    it behaves (added latency per request and share of requests that fail)."""

    name: Name
    clusters: tuple[Name, ...] = Field(min_length=1)
    replicas: int = Field(default=1, ge=1, le=16)
    upstreams: tuple[Name, ...] = ()
    latency: Duration = 0.005
    error_rate: Share = 0.0


class LocalMeshSpec(Spec):
    """The substance of a LocalMesh."""

    mesh: Name
    clusters: tuple[Cluster, ...] = Field(min_length=1)
    peerings: tuple[Peering, ...] = ()
    links: tuple[WanLink, ...] = ()
    services: tuple[MeshService, ...] = ()
    # Policy files, relative to the topology file.
    policies: tuple[Annotated[str, Field(min_length=1)], ...] = ()

    @model_validator(mode="after")
    def _names_agree(self) -> Self:
        clusters = [cluster.name for cluster in self.clusters]
        _unique(clusters, ("clusters",), "name", "cluster")
        peers = self._check_pairs("peerings", [p.between for p in self.peerings], clusters)
        self._check_pairs("links", [link.between for link in self.links], clusters)
        for index, link in enumerate(self.links):
            if frozenset(link.between) not in peers:
                raise FieldError(
                    ("links", index, "between"),
                    "links carry traffic between peered clusters: add a peering for this pair",
                )
        _unique([s.name for s in self.services], ("services",), "name", "service")
        self._check_services(clusters, peers)
        _unique(list(self.policies), ("policies",), None, "policy file")
        return self

    def _check_pairs(
        self, field: str, pairs: list[ClusterPair], clusters: list[str]
    ) -> set[frozenset[str]]:
        seen: set[frozenset[str]] = set()
        for index, pair in enumerate(pairs):
            loc = (field, index, "between")
            for side, name in enumerate(pair):
                if name not in clusters:
                    raise FieldError((*loc, side), f"unknown cluster {name!r}")
            if pair[0] == pair[1]:
                raise FieldError((*loc, 1), "a cluster does not pair with itself")
            if frozenset(pair) in seen:
                raise FieldError(loc, f"{pair[0]} and {pair[1]} are paired twice")
            seen.add(frozenset(pair))
        return seen

    def _check_services(self, clusters: list[str], peers: set[frozenset[str]]) -> None:
        placement = {service.name: set(service.clusters) for service in self.services}
        for index, service in enumerate(self.services):
            loc = ("services", index)
            for position, cluster in enumerate(service.clusters):
                if cluster not in clusters:
                    raise FieldError((*loc, "clusters", position), f"unknown cluster {cluster!r}")
            _unique(list(service.clusters), (*loc, "clusters"), None, "cluster")
            _unique(list(service.upstreams), (*loc, "upstreams"), None, "upstream")
            for position, upstream in enumerate(service.upstreams):
                where = (*loc, "upstreams", position)
                if upstream not in placement:
                    raise FieldError(where, f"unknown service {upstream!r}")
                if upstream == service.name:
                    raise FieldError(where, "a service does not call itself")
                for cluster in service.clusters:
                    reachable = {cluster} | {
                        c for c in clusters if frozenset((cluster, c)) in peers
                    }
                    if not placement[upstream] & reachable:
                        raise FieldError(
                            where,
                            f"{upstream} runs neither in {cluster} nor in a cluster peered "
                            f"with it, so {service.name} there cannot call it",
                        )


def _unique(values: list[str], loc: tuple[str | int, ...], key: str | None, what: str) -> None:
    for index, value in enumerate(values):
        if value in values[:index]:
            where = (*loc, index) if key is None else (*loc, index, key)
            raise FieldError(where, f"{what} {value!r} is listed twice")


class LocalMesh(Document):
    """A LocalMesh document: the topology of a mesh run on one machine."""

    KIND: ClassVar[str] = "LocalMesh"

    kind: Literal["LocalMesh"]
    spec: LocalMeshSpec

    def trust_domain(self, cluster: str) -> TrustDomain:
        """The trust domain of one of the mesh's clusters: ``<cluster>.<mesh>``."""
        if cluster not in {c.name for c in self.spec.clusters}:
            raise KeyError(f"{cluster!r} is not a cluster of mesh {self.spec.mesh!r}")
        return TrustDomain.for_cluster(cluster, self.spec.mesh)

    def peers_of(self, cluster: str) -> tuple[str, ...]:
        """The clusters ``cluster`` peers with, in the order the file lists the peerings."""
        return tuple(
            other
            for peering in self.spec.peerings
            if cluster in peering.between
            for other in peering.between
            if other != cluster
        )

    def link_between(self, a: str, b: str) -> WanLink | None:
        """The emulated link between two clusters, or ``None`` (no emulation: loopback)."""
        return next((link for link in self.spec.links if {a, b} == set(link.between)), None)

    def services_in(self, cluster: str) -> Iterator[MeshService]:
        """The services that run replicas in ``cluster``."""
        return (service for service in self.spec.services if cluster in service.clusters)
