"""The peering state directory: peer records and issued tokens, in one file written atomically.

``<state-dir>/peering/peers.json`` holds, per peer, what a restarted control plane needs to
reconnect without a new token: the peer's name, mesh and trust domain, which side dials, the
gateway addresses to dial, the peer's trust bundle as last applied, and the last versions
exchanged. Issued tokens are kept as their records (the secret's SHA-256, never the secret)
with the bootstrap root that the secret stands for (see :mod:`federation.peering.credentials`).
The file is written with :func:`federation.trust.store.write_atomic`: a crash leaves the old
file or the new one.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from federation.peering.credentials import pem
from federation.peering.model import GatewayAddress, IssuedToken, check_label, check_mesh
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

    def __post_init__(self) -> None:
        check_label(self.name, "peer")
        check_mesh(self.mesh)
        if self.dialer and not self.gateways:
            raise PeeringStoreError(f"peer {self.name}: a peer we dial needs gateway addresses")


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A token we issued: its record, and the bootstrap root its secret stands for."""

    issued: IssuedToken
    bootstrap_root: x509.Certificate


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
            )
            for t in document["tokens"]
        )
    except PeeringStoreError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise PeeringStoreError(f"{path}: damaged peering state ({error})") from None
    return PeeringState(peers, tokens)
