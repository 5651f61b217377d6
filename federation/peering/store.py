"""The peering state directory: peer records and issued tokens, in one file written atomically.

``<state-dir>/peering/peers.json`` holds, per peer, what a restarted control plane needs to
reconnect without a new token: the peer's name, mesh and trust domain, which side dials, the
peer's gateway addresses (from its token when we dial it, from its Open when it dials us, and
from its Open again whenever they change), our own gateway addresses as this peer reaches them
when they differ from the control plane's default, its trust bundle as last applied, the last
versions exchanged, and, for an establish that has not completed yet, the token (the accepting
side keeps its id, the dialing side the token itself: the file is private).
Issued tokens are kept as their records (the secret's SHA-256, never the secret) with the
bootstrap root that the secret stands for (see :mod:`federation.peering.credentials`) and the
gateway addresses the token named, if they were given for that token. The file is written with
:func:`federation.trust.store.write_atomic`: a crash leaves the old file or the new one.

What each peer exports to us is kept beside it, one file per peer
(``<state-dir>/peering/imports/<peer>.json``: the version and the services at that version,
written together), so a restarted control plane still has its mirrors while the peer is
unreachable, and asks the peer for a delta from that version instead of a full snapshot.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from federation.peering.credentials import pem
from federation.peering.model import (
    ExportedService,
    GatewayAddress,
    IssuedToken,
    ServiceKey,
    check_label,
    check_mesh,
)
from federation.trust.store import KEY_MODE, write_atomic
from proxy.identity.model import TrustDomain

_FILE = "peers.json"
_FORMAT = 1


class PeeringStoreError(Exception):
    """The peering state file is unreadable or damaged; the message says which and why."""


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """What we keep about one peer across restarts."""

    name: str
    mesh: str
    trust_domain: TrustDomain
    dialer: bool
    """True when we dial this peer (we established with its token)."""
    gateways: tuple[GatewayAddress, ...] = ()
    bundle_json: str | None = None
    """The peer's SPIFFE bundle as last applied (None until it sent one)."""
    services_version_seen: int = 0
    bundle_sequence_seen: int = 0
    advertised: tuple[GatewayAddress, ...] = ()
    """Our gateway addresses as this peer reaches them (empty: the control plane's default)."""
    pending_token: str | None = None
    """Accepting side: the id of the token this peer established with, until its trust
    bundle is stored. Until then the peer may present that token again (see ``manager``)."""
    establish_token: str | None = None
    """Dialing side: the token itself (its text: it holds the secret), until the acceptor
    has acknowledged our trust bundle, so a restarted dialer can still present it."""

    def __post_init__(self) -> None:
        check_label(self.name, "peer")
        check_mesh(self.mesh)
        if self.dialer and not self.gateways:
            raise PeeringStoreError(f"peer {self.name}: a peer we dial needs gateway addresses")
        if self.dialer and self.pending_token is not None:
            raise PeeringStoreError(f"peer {self.name}: only a peer that dials us is pending")
        if not self.dialer and self.establish_token is not None:
            raise PeeringStoreError(f"peer {self.name}: only a peer we dial needs its token")


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A token we issued: its record, and the bootstrap root its secret stands for."""

    issued: IssuedToken
    bootstrap_root: x509.Certificate
    gateways: tuple[GatewayAddress, ...] = ()
    """The gateway addresses this token named, when given for it (empty: the default)."""


@dataclass(frozen=True, slots=True)
class PeeringState:
    """Everything in the peering state file."""

    peers: tuple[PeerRecord, ...] = ()
    tokens: tuple[TokenRecord, ...] = ()


def state_file(state_dir: Path) -> Path:
    """Where the peering state lives inside a state directory."""
    return state_dir / "peering" / _FILE


def save_state(state_dir: Path, state: PeeringState) -> None:
    """Persist ``state`` atomically (0600: it names every peer and token)."""
    document = {
        "format": _FORMAT,
        "peers": [
            {
                "name": p.name,
                "mesh": p.mesh,
                "trustDomain": p.trust_domain.name,
                "dialer": p.dialer,
                "gateways": [str(g) for g in p.gateways],
                "bundle": p.bundle_json,
                "servicesVersionSeen": p.services_version_seen,
                "bundleSequenceSeen": p.bundle_sequence_seen,
                "advertised": [str(g) for g in p.advertised],
                "pendingToken": p.pending_token,
                "establishToken": p.establish_token,
            }
            for p in state.peers
        ],
        "tokens": [
            {
                "id": t.issued.token_id,
                "secretSha256": base64.b64encode(t.issued.secret_sha256).decode(),
                "expiresAt": t.issued.expires_at,
                "usedAt": t.issued.used_at,
                "usedBy": t.issued.used_by,
                "bootstrapRoot": pem([t.bootstrap_root]).decode(),
                "gateways": [str(g) for g in t.gateways],
            }
            for t in state.tokens
        ],
    }
    write_atomic(state_file(state_dir), (json.dumps(document, indent=2) + "\n").encode(), KEY_MODE)


def load_state(state_dir: Path) -> PeeringState:
    """Read the peering state; an absent file is an empty state."""
    path = state_file(state_dir)
    try:
        document: Any = json.loads(path.read_text())
    except FileNotFoundError:
        return PeeringState()
    except (OSError, ValueError) as error:
        raise PeeringStoreError(f"cannot read {path}: {error}") from None
    try:
        if document["format"] != _FORMAT:
            raise PeeringStoreError(f"{path}: unknown format {document['format']!r}")
        peers = tuple(
            PeerRecord(
                name=p["name"],
                mesh=p["mesh"],
                trust_domain=TrustDomain(p["trustDomain"]),
                dialer=bool(p["dialer"]),
                gateways=tuple(GatewayAddress.parse(g) for g in p["gateways"]),
                bundle_json=p["bundle"],
                services_version_seen=int(p["servicesVersionSeen"]),
                bundle_sequence_seen=int(p["bundleSequenceSeen"]),
                # Absent in files written before per-peer addresses and pending establishes.
                advertised=tuple(GatewayAddress.parse(g) for g in p.get("advertised", ())),
                pending_token=p.get("pendingToken"),
                establish_token=p.get("establishToken"),
            )
            for p in document["peers"]
        )
        tokens = tuple(
            TokenRecord(
                IssuedToken(
                    token_id=t["id"],
                    secret_sha256=base64.b64decode(t["secretSha256"], validate=True),
                    expires_at=float(t["expiresAt"]),
                    used_at=None if t["usedAt"] is None else float(t["usedAt"]),
                    used_by=t["usedBy"],
                ),
                x509.load_pem_x509_certificate(t["bootstrapRoot"].encode()),
                tuple(GatewayAddress.parse(g) for g in t.get("gateways", ())),
            )
            for t in document["tokens"]
        )
    except PeeringStoreError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise PeeringStoreError(f"{path}: damaged peering state ({error})") from None
    return PeeringState(peers, tokens)


def imports_file(state_dir: Path, peer: str) -> Path:
    """Where the imports from ``peer`` are kept."""
    return state_dir / "peering" / "imports" / f"{check_label(peer, 'peer')}.json"


def save_imports(
    state_dir: Path, peer: str, version: int, services: Iterable[ExportedService]
) -> None:
    """Persist what ``peer`` exports to us at ``version``, atomically."""
    document = {
        "format": _FORMAT,
        "version": version,
        "services": [
            {
                "namespace": s.key.namespace,
                "name": s.key.name,
                "sni": s.sni,
                "healthyEndpoints": s.healthy_endpoints,
            }
            for s in services
        ],
    }
    write_atomic(imports_file(state_dir, peer), json.dumps(document).encode(), KEY_MODE)


def load_imports(state_dir: Path, peer: str) -> tuple[int, tuple[ExportedService, ...]]:
    """The version and services last saved for ``peer``; ``(0, ())`` when there are none."""
    path = imports_file(state_dir, peer)
    try:
        document: Any = json.loads(path.read_text())
    except FileNotFoundError:
        return 0, ()
    except (OSError, ValueError) as error:
        raise PeeringStoreError(f"cannot read {path}: {error}") from None
    try:
        if document["format"] != _FORMAT:
            raise PeeringStoreError(f"{path}: unknown format {document['format']!r}")
        services = tuple(
            ExportedService(
                ServiceKey(s["namespace"], s["name"]), s["sni"], int(s["healthyEndpoints"])
            )
            for s in document["services"]
        )
        return int(document["version"]), services
    except PeeringStoreError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise PeeringStoreError(f"{path}: damaged imports ({error})") from None


def remove_imports(state_dir: Path, peer: str) -> None:
    """Forget the imports of a deleted peer."""
    imports_file(state_dir, peer).unlink(missing_ok=True)
