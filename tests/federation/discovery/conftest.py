"""A discovery server on 127.0.0.1 under a real cluster CA, with a scriptable snapshot builder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
import grpc.aio
import pytest

from federation.discovery.core import ProxyClass
from federation.discovery.server import Discovery, serve
from federation.trust.ca import ClusterCA, create_ca
from proxy.api.v1 import discovery_pb2 as pb
from proxy.discovery.core import control_plane_host
from proxy.identity.bundle import TrustBundle, format_bundle
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.identity.svid import X509Svid

TD = TrustDomain.for_cluster("us-west", "acme")
WEB = SpiffeId.workload(TD, "shop", "web")
STARTED = datetime.now(UTC)


@pytest.fixture(scope="session")
def ca() -> ClusterCA:
    # Valid since yesterday, so a proxy can hold an SVID issued in the past.
    return create_ca(TD, STARTED - timedelta(days=1))


@dataclass
class Sources:
    """What the builder reads: a list of services, a readiness switch, and how often it ran."""

    ca: ClusterCA
    services: list[str] = field(default_factory=lambda: ["pay"])
    ready: bool = True
    with_bundle: bool = True
    builds: list[ProxyClass] = field(default_factory=list)

    def build(self, proxy_class: ProxyClass) -> pb.Snapshot | None:
        self.builds.append(proxy_class)
        if not self.ready:
            return None
        snapshot = pb.Snapshot(
            upstreams=[pb.Upstream(service=name, namespace="shop") for name in self.services]
        )
        if self.with_bundle:
            bundle = self.ca.bundle()
            snapshot.trust_bundles.append(
                pb.TrustBundle(
                    trust_domain=TD.name,
                    sequence=self.ca.sequence,
                    spiffe_bundle_json=format_bundle(bundle),
                )
            )
        return snapshot


@dataclass
class ControlPlane:
    discovery: Discovery
    sources: Sources
    port: int
    server: grpc.aio.Server

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def restart(self) -> None:
        """Stop the gRPC server and start a new one for the same Discovery on the same port."""
        await self.server.stop(grace=None)
        self.server, port = await serve(self.discovery, self.target)
        assert port == self.port


@pytest.fixture
def sources(ca: ClusterCA) -> Sources:
    return Sources(ca)


@pytest.fixture
async def control_plane(ca: ClusterCA, sources: Sources) -> AsyncIterator[ControlPlane]:
    discovery = Discovery(ca, sources.build, coalesce_s=0.01)
    server, port = await serve(discovery, "127.0.0.1:0")
    plane = ControlPlane(discovery, sources, port, server)
    try:
        yield plane
    finally:
        await plane.server.stop(grace=None)


def identity(namespace: str = "shop", service_account: str = "web") -> pb.ProxyIdentity:
    return pb.ProxyIdentity(
        role=pb.ProxyIdentity.ROLE_SIDECAR,
        cluster="us-west",
        namespace=namespace,
        service_account=service_account,
        workload=f"{service_account}-1",
        service=service_account,
    )


def channel(target: str, svid: X509Svid, bundle: TrustBundle) -> grpc.aio.Channel:
    """A proxy's channel to the control plane, as the discovery client opens it."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=bundle.roots_pem(),
        private_key=svid.key_pem(),
        certificate_chain=svid.chain_pem(),
    )
    return grpc.aio.secure_channel(
        target, credentials, options=[("grpc.ssl_target_name_override", control_plane_host(TD))]
    )
