"""Peering values: tokens and their one-time secrets, service keys, and the stream's messages.

A peering starts from a token that the *accepting* cluster generates: its name, mesh and trust
domain, the addresses of its east-west gateways, its trust bundle, a one-time secret and an
expiry. The accepting side keeps only the SHA-256 of the secret (an :class:`IssuedToken`) and
redeems it once, on the first establish, comparing in constant time; until that establish has
completed, the cluster that redeemed it may present it again (:func:`reclaim`), and no other.

The messages mirror ``federation/api/v1/peering.proto`` as frozen values, so the session core
works on them without the generated code (``wire.py`` translates). They are validated when
built: names are DNS labels, versions and sequences are non-negative.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from proxy.identity.model import TrustDomain

SECRET_BYTES = 32
"""Length of a token's one-time secret (from ``secrets.token_bytes``)."""

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_MESH = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_TOKEN_ID = re.compile(r"[0-9a-f]{16}")
MAX_GATEWAYS = 16
"""Gateway addresses one cluster may name, in a token or in its Open."""
_MAX_UINT64 = 2**64 - 1


class PeeringValueError(ValueError):
    """A peering value was built from bad input; ``reason`` says which rule failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TokenError(PeeringValueError):
    """A peering token, or the secret presented with one, was refused."""


def check_label(value: str, what: str) -> str:
    """Return ``value`` if it is a DNS label (cluster, namespace, service); raise otherwise."""
    if not isinstance(value, str) or _LABEL.fullmatch(value) is None:
        raise PeeringValueError(f"{what} {value!r} is not a DNS label (a-z, 0-9 and '-')")
    return value


def check_mesh(value: str) -> str:
    """Return ``value`` if it is a mesh name (dot-separated DNS labels); raise otherwise."""
    if not isinstance(value, str) or len(value) > 253 or _MESH.fullmatch(value) is None:
        raise PeeringValueError(f"mesh {value!r} is not a dot-separated list of DNS labels")
    return value


def _check_count(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_UINT64:
        raise PeeringValueError(f"{what} must be an integer in [0, 2**64), not {value!r}")


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
    """A service's identity within a cluster: its namespace and name (``<ns>/<name>``)."""

    namespace: str
    name: str

    def __post_init__(self) -> None:
        check_label(self.namespace, "namespace")
        check_label(self.name, "service name")

    @classmethod
    def parse(cls, text: str) -> ServiceKey:
        """Parse ``<namespace>/<name>`` (the form the stream uses for removals)."""
        namespace, slash, name = text.partition("/")
        if not slash:
            raise PeeringValueError(f"service key {text!r} must be <namespace>/<name>")
        return cls(namespace, name)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def sni_name(key: ServiceKey, cluster: str, mesh: str) -> str:
    """The SNI a caller uses to reach ``key`` in ``cluster``: ``<svc>.<ns>.<cluster>.<mesh>``."""
    return f"{key.name}.{key.namespace}.{cluster}.{mesh}"


@dataclass(frozen=True, slots=True, order=True)
class GatewayAddress:
    """Where a cluster's east-west gateway listens: a host name or IP, and a port."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise PeeringValueError(f"gateway port must be an integer, not {self.port!r}")
        if not 1 <= self.port <= 65535:
            raise PeeringValueError(f"gateway port {self.port} is not in 1..65535")
        if not isinstance(self.host, str):
            raise PeeringValueError(f"gateway host must be a string, not {self.host!r}")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            if _HOSTNAME.fullmatch(self.host) is None:
                raise PeeringValueError(
                    f"gateway host {self.host!r} is neither an IP address nor a host name"
                ) from None

    @classmethod
    def parse(cls, text: str) -> GatewayAddress:
        """Parse ``host:port`` or ``[v6-address]:port``."""
        if not isinstance(text, str):
            raise PeeringValueError(f"gateway address must be a string, not {text!r}")
        if text.startswith("["):
            host, bracket, rest = text[1:].partition("]")
            if not bracket or not rest.startswith(":"):
                raise PeeringValueError(f"gateway address {text!r} must be [v6-address]:port")
            port_text = rest[1:]
            if not _is_ip(host) or ipaddress.ip_address(host).version != 6:
                raise PeeringValueError(f"gateway address {text!r}: brackets hold an IPv6 address")
        else:
            host, colon, port_text = text.rpartition(":")
            if not colon or ":" in host:
                raise PeeringValueError(f"gateway address {text!r} must be host:port")
        if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
            raise PeeringValueError(f"gateway address {text!r} has no valid port")
        return cls(host, int(port_text))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _check_gateways(
    gateways: tuple[GatewayAddress, ...], error: type[PeeringValueError] = PeeringValueError
) -> None:
    if not isinstance(gateways, tuple) or not all(isinstance(g, GatewayAddress) for g in gateways):
        raise error("gateways must be a tuple of GatewayAddress")
    if len(gateways) > MAX_GATEWAYS:
        raise error(f"at most {MAX_GATEWAYS} gateway addresses, not {len(gateways)}")
    if len(set(gateways)) != len(gateways):
        raise error("a gateway address is listed twice")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class PeeringToken:
    """What the accepting cluster hands to the dialing one, out of band.

    ``trust_bundle_json`` is the accepting cluster's SPIFFE bundle as published; the dialer
    parses it (``proxy.identity.bundle.parse_bundle``) before it trusts anything it says.
    ``expires_at`` is in seconds since the Unix epoch.
    """

    token_id: str
    cluster: str
    mesh: str
    trust_domain: TrustDomain
    gateways: tuple[GatewayAddress, ...]
    trust_bundle_json: str
    secret: bytes = field(repr=False)
    expires_at: float

    def __post_init__(self) -> None:
        if not isinstance(self.token_id, str) or _TOKEN_ID.fullmatch(self.token_id) is None:
            raise TokenError(f"token id {self.token_id!r} must be 16 lowercase hex digits")
        check_label(self.cluster, "cluster")
        check_mesh(self.mesh)
        if not isinstance(self.trust_domain, TrustDomain):
            raise TokenError("trust domain must be a TrustDomain")
        if not self.gateways:
            raise TokenError("a token must name at least one gateway address")
        _check_gateways(self.gateways, TokenError)
        if not isinstance(self.trust_bundle_json, str) or not self.trust_bundle_json:
            raise TokenError("a token must carry the accepting cluster's trust bundle")
        if not isinstance(self.secret, bytes) or len(self.secret) != SECRET_BYTES:
            raise TokenError(f"the secret must be exactly {SECRET_BYTES} bytes")
        if isinstance(self.expires_at, bool) or not isinstance(self.expires_at, int | float):
            raise TokenError("expiry must be a number of seconds since the epoch")

    def __repr__(self) -> str:
        return f"PeeringToken(id={self.token_id}, cluster={self.cluster}, mesh={self.mesh})"


def token_id_for(secret: bytes) -> str:
    """A token's public id, derived from its secret one way (so nothing else is random)."""
    return hashlib.sha256(b"snapbright peering token id\0" + secret).hexdigest()[:16]


def secret_digest(secret: bytes) -> bytes:
    """What the accepting side stores instead of a secret: its SHA-256."""
    return hashlib.sha256(secret).digest()


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """The accepting side's record of a token it generated: never the secret itself."""

    token_id: str
    secret_sha256: bytes = field(repr=False)
    expires_at: float
    used_at: float | None = None
    used_by: str | None = None


def issue_token(
    *,
    cluster: str,
    mesh: str,
    trust_domain: TrustDomain,
    gateways: Iterable[GatewayAddress],
    trust_bundle_json: str,
    secret: bytes,
    now: float,
    ttl_seconds: float,
) -> tuple[PeeringToken, IssuedToken]:
    """A new token to hand out, and the record to keep. ``secret`` comes from ``secrets``."""
    if not ttl_seconds > 0:
        raise TokenError(f"a token's lifetime must be positive, not {ttl_seconds}")
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        raise TokenError(f"the secret must be exactly {SECRET_BYTES} bytes")
    token = PeeringToken(
        token_id=token_id_for(secret),
        cluster=cluster,
        mesh=mesh,
        trust_domain=trust_domain,
        gateways=tuple(gateways),
        trust_bundle_json=trust_bundle_json,
        secret=secret,
        expires_at=now + ttl_seconds,
    )
    return token, IssuedToken(token.token_id, secret_digest(secret), token.expires_at)


def redeem(issued: Iterable[IssuedToken], secret: bytes, *, peer: str, now: float) -> IssuedToken:
    """Check a presented establish secret; return its record, now marked used by ``peer``.

    Every record is compared in constant time, so timing says nothing about which digest was
    close. The caller stores the returned record in place of the old one.
    """
    presented = secret_digest(secret) if isinstance(secret, bytes) else b""
    match: IssuedToken | None = None
    for record in issued:
        # No early exit: compare against every record.
        if hmac.compare_digest(record.secret_sha256, presented) and match is None:
            match = record
    if match is None:
        raise TokenError("the establish secret matches no token issued here")
    if match.used_at is not None:
        raise TokenError(f"token {match.token_id} was already used by {match.used_by}")
    if now >= match.expires_at:
        raise TokenError(f"token {match.token_id} has expired")
    return replace(match, used_at=now, used_by=check_label(peer, "peer cluster"))


def reclaim(issued: IssuedToken, secret: bytes, *, peer: str, now: float) -> None:
    """Check a token presented again by the cluster that redeemed it, while its establish is
    still pending (the accepting side never stored that cluster's trust bundle: it crashed, or
    the stream broke, in between). Raises :class:`TokenError` unless ``secret`` is the token's
    (compared in constant time), ``peer`` is the cluster that used it, and it has not expired.
    """
    presented = secret_digest(secret) if isinstance(secret, bytes) else b""
    if not hmac.compare_digest(issued.secret_sha256, presented):
        raise TokenError(f"the establish secret does not belong to token {issued.token_id}")
    if issued.used_at is None:
        raise TokenError(f"token {issued.token_id} was never used: redeem it instead")
    if issued.used_by != peer:
        raise TokenError(f"token {issued.token_id} was already used by {issued.used_by}")
    if now >= issued.expires_at:
        raise TokenError(f"token {issued.token_id} has expired: generate a new one")


class PeerState(enum.Enum):
    """Where a peering stands, as ``snapbright peering list`` shows it."""

    PENDING = "pending"
    """Known (token issued or received) but never connected."""
    ESTABLISHING = "establishing"
    """A stream is up and our Open is sent; the peer's Open has not arrived."""
    ACTIVE = "active"
    """Both sides opened; services, bundles, health and heartbeats flow."""
    DISCONNECTED = "disconnected"
    """The stream was lost or went silent; imports are kept and marked stale."""
    FAILING = "failing"
    """Several reconnects in a row failed, or the peer refused us; still retrying."""
    DELETED = "deleted"
    """Deleted here: its mirrors and trust are withdrawn. Terminal."""


# --- The stream's messages (peering.proto), as values. ---


@dataclass(frozen=True, slots=True)
class ExportedService:
    """A service as one cluster exports it to a peer."""

    key: ServiceKey
    sni: str
    healthy_endpoints: int

    def __post_init__(self) -> None:
        _check_count(self.healthy_endpoints, "healthy endpoint count")


@dataclass(frozen=True, slots=True)
class Open:
    """First message each side sends: who it is and what it already holds from the other.

    ``gateways`` are the sender's east-west gateway addresses: the dialer sends them so the
    accepting side can route to what the dialer exports (the acceptor's are in its token).
    """

    cluster: str
    mesh: str
    trust_domain: TrustDomain
    establish_secret: bytes = field(default=b"", repr=False)
    services_version_seen: int = 0
    bundle_sequence_seen: int = 0
    gateways: tuple[GatewayAddress, ...] = ()

    def __post_init__(self) -> None:
        check_label(self.cluster, "cluster")
        check_mesh(self.mesh)
        _check_gateways(self.gateways)
        _check_count(self.services_version_seen, "services version")
        _check_count(self.bundle_sequence_seen, "bundle sequence")


@dataclass(frozen=True, slots=True)
class ServicesSnapshot:
    """Everything exported to the receiver, as of ``version``."""

    version: int
    services: tuple[ExportedService, ...]

    def __post_init__(self) -> None:
        _check_count(self.version, "services version")
        keys = [service.key for service in self.services]
        if len(set(keys)) != len(keys):
            raise PeeringValueError("a snapshot lists a service twice")


@dataclass(frozen=True, slots=True)
class ServicesDelta:
    """What changed in the receiver's exports between ``from_version`` and ``version``."""

    from_version: int
    version: int
    upserted: tuple[ExportedService, ...]
    removed: tuple[ServiceKey, ...]

    def __post_init__(self) -> None:
        _check_count(self.from_version, "from version")
        _check_count(self.version, "services version")
        if self.version <= self.from_version:
            raise PeeringValueError("a delta must move its version forward")
        keys = [service.key for service in self.upserted] + list(self.removed)
        if len(set(keys)) != len(keys):
            raise PeeringValueError("a delta names a service twice")


@dataclass(frozen=True, slots=True)
class TrustBundleUpdate:
    """A trust domain's bundle (SPIFFE JSON) at a sequence number."""

    trust_domain: TrustDomain
    sequence: int
    spiffe_bundle_json: bytes
    intermediates_der: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        _check_count(self.sequence, "bundle sequence")


class HealthSource(enum.StrEnum):
    """What a summary's latencies rest on."""

    TRAFFIC = "traffic"
    """Requests from its callers."""
    PROBES = "probes"
    """Too few requests (an idle copy): its own cluster's health probes of its endpoints."""


@dataclass(frozen=True, slots=True)
class ServiceHealth:
    """Health of one exported service as its own cluster sees it."""

    key: ServiceKey
    latency_p50_seconds: float
    latency_p95_seconds: float
    latency_p99_seconds: float
    success_rate: float
    request_rate: float
    headroom_rps: float | None
    healthy_endpoints: int
    source: HealthSource = HealthSource.TRAFFIC
    probe_samples: int = 0
    """With ``source`` probes: how many probe round trips the latencies rest on."""

    def __post_init__(self) -> None:
        # These feed the failover controller: a NaN or a negative latency must stop here.
        for what, value in (
            ("latency p50", self.latency_p50_seconds),
            ("latency p95", self.latency_p95_seconds),
            ("latency p99", self.latency_p99_seconds),
            ("request rate", self.request_rate),
            ("headroom", 0.0 if self.headroom_rps is None else self.headroom_rps),
        ):
            if not _non_negative(value):
                raise PeeringValueError(f"{what} of {self.key} must be finite and >= 0")
        if not (_non_negative(self.success_rate) and self.success_rate <= 1.0):
            raise PeeringValueError(f"success rate of {self.key} must be between 0 and 1")
        _check_count(self.healthy_endpoints, "healthy endpoint count")
        _check_count(self.probe_samples, "probe sample count")
        if not isinstance(self.source, HealthSource):
            raise PeeringValueError(f"health source of {self.key} must be a HealthSource")


def _non_negative(value: float) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


@dataclass(frozen=True, slots=True)
class HealthSummaries:
    """Per-service health the sender publishes for what it exports to the receiver."""

    at_unix_ms: int
    services: tuple[ServiceHealth, ...]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Liveness; ``sequence`` 0 is an echo, sent at once, of the peer's heartbeat
    ``echo_sequence``, for RTT on the channel."""

    sequence: int
    sent_unix_ms: int
    echo_sequence: int = 0
    echo_sent_unix_ms: int = 0


@dataclass(frozen=True, slots=True)
class Ack:
    """What the sender has applied from the receiver."""

    services_version: int
    bundle_sequence: int


@dataclass(frozen=True, slots=True)
class Close:
    """The sender ends the stream, and why."""

    reason: str


PeeringMessage = (
    Open
    | ServicesSnapshot
    | ServicesDelta
    | TrustBundleUpdate
    | HealthSummaries
    | Heartbeat
    | Ack
    | Close
)
"""Any one message of the peering stream."""
