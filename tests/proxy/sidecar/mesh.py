"""Test fixtures: clusters with real CAs, SVID and bundle files, sidecars from real configs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from federation.trust.ca import ClusterCA, create_ca
from proxy.identity.bundle import TrustBundle, format_bundle
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.identity.svid import X509Svid
from proxy.sidecar.process import Sidecar
from proxy.sidecar.source import SidecarFileSource

MESH = "acme"
NOW = datetime.now(UTC)


@dataclass
class Cluster:
    """A cluster of the test mesh: its name and CA."""

    name: str
    ca: ClusterCA

    @classmethod
    def create(cls, name: str) -> Cluster:
        return cls(name, create_ca(TrustDomain.for_cluster(name, MESH), NOW - timedelta(hours=1)))

    @property
    def trust_domain(self) -> TrustDomain:
        return self.ca.trust_domain

    def workload(self, service_account: str, namespace: str = "default") -> SpiffeId:
        return SpiffeId.workload(self.trust_domain, namespace, service_account)

    def issue(self, service_account: str, ttl: timedelta = timedelta(hours=2)) -> X509Svid:
        return self.ca.issue(self.workload(service_account), NOW - timedelta(minutes=1), ttl)


def write_svid(directory: Path, name: str, svid: X509Svid) -> tuple[str, str]:
    """Write an SVID's chain and key; their paths."""
    cert = directory / f"{name}.pem"
    key = directory / f"{name}.key"
    cert.write_bytes(svid.chain_pem())
    key.write_bytes(svid.key_pem())
    key.chmod(0o600)
    return str(cert), str(key)


def write_bundle(directory: Path, bundle: TrustBundle) -> str:
    """Write a trust bundle file; its path."""
    path = directory / f"{bundle.trust_domain.name}.bundle.json"
    path.write_bytes(format_bundle(bundle))
    return str(path)


def target(cluster: str, port: int, weight: str = "100%", **extra: Any) -> dict[str, Any]:
    """A static upstream target with one endpoint on loopback."""
    return {
        "cluster": cluster,
        "weight": weight,
        "endpoints": [{"address": "127.0.0.1", "port": port}],
        **extra,
    }


def sidecar_document(
    cluster: Cluster,
    service: str,
    app_port: int,
    cert: str,
    key: str,
    bundles: dict[str, str],
    *,
    upstreams: list[dict[str, Any]] | None = None,
    policies: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A SidecarConfig whose listeners all take free ports."""
    return {
        "apiVersion": "snapbright.io/v1alpha1",
        "kind": "SidecarConfig",
        "metadata": {"name": service},
        "spec": {
            "identity": {
                "cluster": cluster.name,
                "mesh": MESH,
                "serviceAccount": service,
                "service": service,
            },
            "app": {"address": "127.0.0.1", "port": app_port},
            "listeners": {
                "outbound": {"port": 0},
                "inbound": {"address": "127.0.0.1", "port": 0},
                "admin": {"port": 0},
            },
            "tls": {
                "certificate": cert,
                "key": key,
                "bundles": [{"trustDomain": td, "path": path} for td, path in bundles.items()],
            },
            "upstreams": upstreams or [],
            "policies": policies or [],
        },
    }


def write_config(path: Path, document: dict[str, Any]) -> Path:
    """Write a config document as YAML."""
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


async def start_sidecar(path: Path) -> Sidecar:
    """A started sidecar over the config file at ``path`` (re-read every 50 ms)."""
    source = SidecarFileSource(path, poll_interval=0.05)
    sidecar = Sidecar(source.config, source)
    await sidecar.start()
    return sidecar


def outbound_port(sidecar: Sidecar) -> int:
    assert sidecar.outbound is not None
    return sidecar.outbound.port


def inbound_port(sidecar: Sidecar) -> int:
    assert sidecar.inbound is not None
    return sidecar.inbound.port
