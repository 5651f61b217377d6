"""Where a sidecar's `SidecarState` comes from: its config file, or the control plane.

Both are `proxy.config.source.ConfigSource[SidecarState]`:

- `SidecarFileSource`: the SidecarConfig file with its static ``upstreams`` and
  ``policies``, plus the SVID and bundle files it names. Any of them changing (checked every
  ``poll_interval``) re-reads them all; a bad set keeps the last good state
  (`ConfigRejected` says why, ``file:line:col`` for the config).
- `proxy.discovery.client.DiscoveryClient` with `state_from_snapshot` as its parser: the
  control plane's snapshots (upstreams with weighted targets, policies, trust bundles, the
  SVID it signed).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from proxy.config.loader import load_file
from proxy.config.source import ConfigRejected, FileConfigSource, ReloadResult
from proxy.identity.bundle import BundleError, TrustBundle, TrustBundleSet, parse_bundle
from proxy.identity.model import SpiffeId, SpiffeIdError, TrustDomain
from proxy.identity.svid import SvidError, X509Svid, spiffe_id_of
from proxy.policy.model import AuthorizationPolicy, TrafficPolicy
from proxy.sidecar.model import (
    SidecarConfig,
    SidecarState,
    TargetState,
    UpstreamState,
    upstreams_of,
)

if TYPE_CHECKING:
    # Only a type here: a sidecar with a static config never loads protobuf.
    from proxy.api.v1 import discovery_pb2 as pb

__all__ = [
    "SidecarFileSource",
    "load_own_bundle",
    "load_sidecar_config",
    "load_svid",
    "state_from_config",
    "state_from_snapshot",
]

_REGISTRY = {SidecarConfig.KIND: SidecarConfig}


def load_sidecar_config(path: str | Path) -> SidecarConfig:
    """The one SidecarConfig in ``path``; :class:`ConfigRejected` lists every error otherwise."""
    result = load_file(path, _REGISTRY)
    documents = result.raise_for_errors()
    if len(documents) != 1 or not isinstance(documents[0], SidecarConfig):
        raise ConfigRejected(f"{result.source}:1:1: a sidecar file holds one SidecarConfig")
    return documents[0]


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigRejected(f"{path}: {error.strerror or error}") from None


def load_svid(certificate: str, key: str) -> X509Svid:
    """The SVID in a PEM chain file (leaf first) and its EC key file."""
    try:
        chain = tuple(x509.load_pem_x509_certificates(_read(certificate)))
    except ValueError as error:
        raise ConfigRejected(f"{certificate}: {error}") from None
    try:
        private = serialization.load_pem_private_key(_read(key), password=None)
    except (ValueError, TypeError) as error:
        raise ConfigRejected(f"{key}: {error}") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise ConfigRejected(f"{key}: an SVID key must be an EC key")
    if private.public_key() != chain[0].public_key():
        raise ConfigRejected(f"{key}: this key does not belong to the certificate {certificate}")
    try:
        return X509Svid(spiffe_id_of(chain[0]), chain, private)
    except SvidError as error:
        raise ConfigRejected(f"{certificate}: {error}") from None


def load_own_bundle(config: SidecarConfig) -> TrustBundle:
    """The bundle file of the sidecar's own trust domain (the discovery client needs it)."""
    spec = config.spec
    own = TrustDomain.for_cluster(spec.identity.cluster, spec.identity.mesh)
    for entry in spec.tls.bundles:
        try:
            if TrustDomain.parse(entry.trust_domain) == own:
                return parse_bundle(own, _read(entry.path))
        except (BundleError, SpiffeIdError) as error:
            raise ConfigRejected(f"{entry.path}: {error}") from None
    raise ConfigRejected(f"spec.tls.bundles: no bundle of the sidecar's own domain {own}")


def state_from_config(config: SidecarConfig) -> SidecarState:
    """The state a static config describes, its SVID and bundles read from their files."""
    spec = config.spec
    identity = spec.identity
    local = SpiffeId.workload(
        TrustDomain.for_cluster(identity.cluster, identity.mesh),
        identity.namespace,
        identity.service_account,
    )
    svid = load_svid(spec.tls.certificate, spec.tls.key)
    if svid.spiffe_id != local:
        raise ConfigRejected(
            f"{spec.tls.certificate}: the SVID is {svid.spiffe_id}, but the identity is {local}"
        )
    bundles = []
    for entry in spec.tls.bundles:
        try:
            bundles.append(parse_bundle(TrustDomain.parse(entry.trust_domain), _read(entry.path)))
        except (BundleError, SpiffeIdError) as error:
            raise ConfigRejected(f"{entry.path}: {error}") from None
    traffic = {}
    authorization = []
    for policy in spec.policies or ():
        if isinstance(policy, TrafficPolicy):
            traffic[policy.spec.service] = policy
        else:
            authorization.append(policy)
    return SidecarState(
        local=local,
        service=identity.service,
        upstreams=upstreams_of(spec),
        traffic=traffic,
        authorization=tuple(a for a in authorization if a.spec.service == identity.service),
        bundles=TrustBundleSet(bundles),
        svid=svid,
    )


def state_from_snapshot(
    config: SidecarConfig, svid: Callable[[], X509Svid]
) -> Callable[[pb.Snapshot], SidecarState]:
    """A DiscoveryClient parser: snapshots into states (``svid`` is the client's current)."""
    identity = config.spec.identity
    local = SpiffeId.workload(
        TrustDomain.for_cluster(identity.cluster, identity.mesh),
        identity.namespace,
        identity.service_account,
    )

    def parse(snapshot: pb.Snapshot) -> SidecarState:
        try:
            bundles = TrustBundleSet(
                parse_bundle(TrustDomain.parse(b.trust_domain), b.spiffe_bundle_json)
                for b in snapshot.trust_bundles
            )
            upstreams = {}
            for upstream in snapshot.upstreams:
                targets = tuple(
                    TargetState.filled(
                        upstream.service,
                        upstream.namespace,
                        t.cluster,
                        t.weight / 10_000,
                        tuple((e.address, e.port) for e in t.endpoints),
                        identity.cluster,
                        identity.mesh,
                        name=t.name,
                        sni=t.sni,
                        trust_domain=t.trust_domain,
                    )
                    for t in upstream.targets
                )
                upstreams[upstream.service] = UpstreamState(
                    upstream.service, upstream.namespace or "default", targets
                )
            traffic = {}
            authorization = []
            for document in snapshot.policies:
                body = json.loads(document.json)
                if document.kind == TrafficPolicy.KIND:
                    policy = TrafficPolicy.model_validate(body, strict=False)
                    traffic[policy.spec.service] = policy
                elif document.kind == AuthorizationPolicy.KIND:
                    authz = AuthorizationPolicy.model_validate(body, strict=False)
                    if authz.spec.service == identity.service:
                        authorization.append(authz)
        except (BundleError, SpiffeIdError, ValueError, ValidationError) as error:
            raise ConfigRejected(f"snapshot {snapshot.version}: {error}") from None
        return SidecarState(
            local=local,
            service=identity.service,
            upstreams=upstreams,
            traffic=traffic,
            authorization=tuple(authorization),
            bundles=bundles,
            svid=svid(),
            version=snapshot.version,
        )

    return parse


class SidecarFileSource(FileConfigSource[SidecarState]):
    """A `ConfigSource[SidecarState]` over a SidecarConfig file and the files it names."""

    def __init__(
        self,
        path: Path,
        *,
        poll_interval: float = 1.0,
        on_reload: Callable[[ReloadResult], None] | None = None,
    ) -> None:
        super().__init__(
            path,
            self._load,
            poll_interval=poll_interval,
            on_reload=on_reload,
            also_watch=self._files,
        )

    def _load(self, path: Path) -> SidecarState:
        config = load_sidecar_config(path)
        state = state_from_config(config)
        # The config in force (its listeners, identity, files): only once all of it is good.
        self.config = config
        return state

    def _files(self) -> list[str]:
        tls = self.config.spec.tls
        return [tls.certificate, tls.key, *(bundle.path for bundle in tls.bundles)]
