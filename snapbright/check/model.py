"""The control plane's status (``GET /api/v1/status``) as frozen values, validated once.

Field names are the API's camelCase; values are as the control plane sent them (epoch
seconds, basis points). Fields this CLI does not know are ignored, so a newer control plane
still checks; a missing or mistyped field is a :class:`pydantic.ValidationError` at the edge,
which the shell reports as a failed check, never a crash.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class _Value(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="ignore", alias_generator=to_camel, populate_by_name=True
    )


class Readiness(_Value):
    """Whether the catalog was read and a policy set accepted."""

    catalog: bool
    policies: bool


class BundleInfo(_Value):
    """A trust bundle as held here: sequence, roots and their validity, refresh hint."""

    trust_domain: str
    sequence: int | None = None
    roots: int = 0
    not_after: float | None = None
    """The earliest root's expiry."""
    latest_not_after: float | None = None
    """The latest root's expiry (every root has expired after it)."""
    refresh_hint_seconds: int | None = None


class Peer(_Value):
    """One peering, with its trust both ways."""

    peer: str
    state: str
    last_heard_at: float | None = None
    rtt_seconds: float | None = None
    imported: int = 0
    exported: int = 0
    stale_since: float | None = None
    trust_domain: str | None = None
    gateways: tuple[str, ...] = ()
    bundle_acked: int | None = None
    """Our bundle's sequence as the peer last acked it (0: never)."""
    bundle: BundleInfo | None = None
    """The peer's bundle as we hold it."""


class Gateway(_Value):
    """A peer's gateway as our probe sees it."""

    peer: str
    alive: bool
    state: str
    rtt_seconds: float | None = None
    last_error: str | None = None


class Svid(_Value):
    """An X.509-SVID's validity."""

    spiffe_id: str
    not_before: float | None = None
    not_after: float
    renew_at: float


class Authority(_Value):
    """A CA certificate of ours (root or intermediate) and when a retiring one leaves."""

    kind: str
    name: str
    not_before: float
    not_after: float
    retire_at: float | None = None


class Certificates(_Value):
    """The control plane's own SVID and its CA."""

    control_plane: Svid
    authorities: tuple[Authority, ...] = ()


class Subscriber(_Value):
    """A subscribed proxy and the config versions sent to it and acked by it."""

    proxy: str
    role: str
    service: str = ""
    sent_version: str = ""
    acked_version: str = ""


class Nack(_Value):
    """A proxy's rejection of a config version that no later ack superseded."""

    proxy: str
    version: str
    reason: str
    at: float


class Policies(_Value):
    """How the last policy reload went."""

    ok: bool
    errors: tuple[str, ...] = ()
    attempted_at: float | None = None
    last_success_at: float | None = None
    files: tuple[str, ...] = ()


class Mirror(_Value):
    """A service a peer exports to us, and the mirror target we route to."""

    service: str
    namespace: str = "default"
    peer: str
    present: bool
    stale: bool = False
    stale_since: float | None = None
    probe_alive: bool = True
    endpoints: int = 0
    healthy_endpoints: int = 0


class Export(_Value):
    """A service we export, to which peers, and its local endpoints (``host:port``)."""

    service: str
    namespace: str = "default"
    peers: tuple[str, ...] = ()
    endpoints: tuple[str, ...] = ()


class LastRecord(_Value):
    """The newest recorded decision of a service (a change, not a hold)."""

    rule: str
    mode: str
    unix_time: float
    explanation: str = ""


class FailoverState(_Value):
    """The live failover state of one service for one caller cluster."""

    service: str
    caller: str
    policy: str | None = None
    mode: str
    weights: dict[str, int]
    rule: str
    at: float
    last_record: LastRecord | None = None


class ClusterStatus(_Value):
    """One control plane's status."""

    cluster: str
    mesh: str
    trust_domain: str
    now: float
    ready: Readiness
    peers: tuple[Peer, ...] = ()
    gateways: tuple[Gateway, ...] = ()
    probe_gateways: bool = True
    stale_grace_seconds: float = 60.0
    bundles: tuple[BundleInfo, ...] = ()
    certificates: Certificates
    subscribers: tuple[Subscriber, ...] = ()
    nacks: tuple[Nack, ...] = ()
    policies: Policies
    mirrors: tuple[Mirror, ...] = ()
    exports: tuple[Export, ...] = ()
    failover: tuple[FailoverState, ...] = Field(default=())

    @property
    def own_bundle(self) -> BundleInfo | None:
        """Our own trust domain's bundle."""
        return next((b for b in self.bundles if b.trust_domain == self.trust_domain), None)
