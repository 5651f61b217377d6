"""Federated upstreams in the form proxies receive them (``proxy/api/v1/discovery.proto``)."""

from __future__ import annotations

from federation.mirror.core import TOTAL_WEIGHT, FederatedUpstream
from proxy.api.v1 import discovery_pb2 as pb


def upstream_to_proto(upstream: FederatedUpstream) -> pb.Upstream:
    """The discovery ``Upstream`` of ``upstream``: its targets, weights in basis points."""
    if sum(target.weight for target in upstream.targets) != TOTAL_WEIGHT:
        # The core guarantees this; a proxy must never be handed weights that do not add up.
        raise ValueError(f"weights of {upstream.key} do not sum to {TOTAL_WEIGHT}")
    return pb.Upstream(
        service=upstream.key.name,
        namespace=upstream.key.namespace,
        targets=[
            pb.Target(
                name=target.name,
                cluster=target.cluster,
                weight=target.weight,
                endpoints=[
                    pb.Endpoint(
                        address=endpoint.address,
                        port=endpoint.port,
                        zone=endpoint.zone,
                        healthy=endpoint.healthy,
                    )
                    for endpoint in target.endpoints
                ],
                sni=target.sni,
                trust_domain=target.trust_domain.name,
                stale=target.stale,
            )
            for target in upstream.targets
        ],
    )
