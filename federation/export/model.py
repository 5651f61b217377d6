"""ExportPolicy: which of this cluster's services each peer may reach. Nothing by default.

A service is exported only to the peers listed for it; the gateway routes only exported names
for the calling peer, and mirroring sends a peer only what is exported to it::

    apiVersion: snapbright.io/v1alpha1
    kind: ExportPolicy
    metadata: {name: us-west-exports}
    spec:
      exports:
        - service: payments
          peers: [ap-southeast, eu-central]
"""

from __future__ import annotations

from typing import ClassVar, Literal, Self

from pydantic import Field, model_validator

from proxy.config.model import Document, FieldError, Name, Spec


class ServiceExport(Spec):
    """One service of this cluster, and the peer clusters it is exported to."""

    service: Name
    peers: tuple[Name, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _peers_unique(self) -> Self:
        for index, peer in enumerate(self.peers):
            if peer in self.peers[:index]:
                raise FieldError(("peers", index), f"peer {peer!r} is listed twice")
        return self


class ExportPolicySpec(Spec):
    """Every export of this cluster, one entry per service (none: nothing is exported)."""

    exports: tuple[ServiceExport, ...] = ()

    @model_validator(mode="after")
    def _services_unique(self) -> Self:
        services = [export.service for export in self.exports]
        for index, service in enumerate(services):
            if service in services[:index]:
                raise FieldError(
                    ("exports", index, "service"),
                    f"service {service!r} is listed twice: list all its peers in one entry",
                )
        return self


class ExportPolicy(Document):
    """An ExportPolicy document: this cluster's services, and the peers each is exported to."""

    KIND: ClassVar[str] = "ExportPolicy"

    kind: Literal["ExportPolicy"]
    spec: ExportPolicySpec

    def exported_to(self, peer: str) -> frozenset[str]:
        """The services that ``peer`` may reach (empty for a peer the policy does not name)."""
        return frozenset(e.service for e in self.spec.exports if peer in e.peers)

    def peers_of(self, service: str) -> frozenset[str]:
        """The peers ``service`` is exported to (empty for a service that is not exported)."""
        return frozenset(p for e in self.spec.exports if e.service == service for p in e.peers)
