"""Catalog values and the admission of raw catalog entries, with no I/O.

Everything a source hands us (a workload's registration, a Consul health entry) is raw,
possibly hostile data. It enters the catalog only through :func:`admit_endpoint`,
:func:`admit_service` and :func:`admit_workload`, which return a frozen value or a
:class:`Rejection` naming the rule that failed. A rejected entry is dropped and counted; it
never fails the rest of a snapshot.

The rules, and why:

- names (service, namespace, workload, service account, zone) are DNS labels: lowercase
  ``a-z0-9-``, at most 63 characters, matched whole (no ``../``, CR/LF, control characters,
  uppercase look-alikes or trailing newline);
- ports are 1-65535;
- addresses are IP literals (a host name could resolve to anything later) and must not be
  unspecified, loopback, link-local, a cloud metadata address, multicast or broadcast; the
  loopback rule alone can be lifted, for the local ``snapbright up`` mesh where every process
  is on 127.0.0.1;
- an address and port on the deny list (the control plane's own admin and control ports) is
  refused even when loopback is allowed, also through another loopback address, an
  IPv4-mapped IPv6 form, or a wildcard-bound deny entry;
- tags and metadata keys cannot carry quotes, braces, ``=``, whitespace or control
  characters (they end up in Prometheus labels and headers), values no control characters,
  quotes, braces or backslashes, and metadata is capped in count and bytes.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

MAX_NAME_LENGTH = 63
MAX_TAGS = 32
MAX_TAG_LENGTH = 128
# Consul's own limits on service metadata, plus a byte budget for the whole map.
MAX_META_ENTRIES = 64
MAX_META_KEY_LENGTH = 128
MAX_META_VALUE_LENGTH = 512
MAX_META_BYTES = 4096
MAX_SUBJECT_LENGTH = 80

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*")
_META_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_UNSAFE_VALUE = re.compile(r"[\x00-\x1f\x7f\"'{}\\]")

_METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
_BROADCAST = ipaddress.ip_address("255.255.255.255")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")


class Health(StrEnum):
    """An endpoint's health, in Consul's words."""

    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"


class Protocol(StrEnum):
    """What a service speaks on its port."""

    HTTP = "http"
    GRPC = "grpc"
    TCP = "tcp"


class Reason(StrEnum):
    """Why a raw entry was refused. The values are stable: they label a counter."""

    MALFORMED = "malformed"
    NAME_NOT_DNS_LABEL = "name-not-dns-label"
    PORT_OUT_OF_RANGE = "port-out-of-range"
    ADDRESS_NOT_IP = "address-not-ip"
    ADDRESS_UNSPECIFIED = "address-unspecified"
    ADDRESS_LOOPBACK = "address-loopback"
    ADDRESS_LINK_LOCAL = "address-link-local"
    ADDRESS_METADATA = "address-metadata"
    ADDRESS_MULTICAST = "address-multicast"
    ADDRESS_BROADCAST = "address-broadcast"
    ADDRESS_DENIED = "address-denied"
    HEALTH_UNKNOWN = "health-unknown"
    PROTOCOL_UNKNOWN = "protocol-unknown"
    TAG_UNSAFE = "tag-unsafe"
    META_UNSAFE = "meta-unsafe"
    META_TOO_LARGE = "meta-too-large"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A refused entry: the rule that failed, what was refused (printable, truncated), detail."""

    reason: Reason
    subject: str
    detail: str


class CatalogEntryError(ValueError):
    """A catalog value was built from data that breaks a rule; ``rejection`` says which."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(f"{rejection.reason}: {rejection.subject}: {rejection.detail}")
        self.rejection = rejection


def _printable(value: object) -> str:
    """A bounded, escaped rendering of hostile input, safe for logs and errors."""
    text = ascii(value) if isinstance(value, str) else type(value).__name__
    if len(text) > MAX_SUBJECT_LENGTH:
        return text[: MAX_SUBJECT_LENGTH - 1] + "…"
    return text


def _fail(reason: Reason, value: object, detail: str) -> CatalogEntryError:
    return CatalogEntryError(Rejection(reason, _printable(value), detail))


def _check_label(what: str, value: object, *, optional: bool = False) -> str:
    if not isinstance(value, str):
        raise _fail(Reason.MALFORMED, value, f"{what} must be a string")
    if optional and value == "":
        return value
    if len(value) > MAX_NAME_LENGTH or _LABEL.fullmatch(value) is None:
        raise _fail(
            Reason.NAME_NOT_DNS_LABEL,
            value,
            f"{what} must be a DNS label: a-z, 0-9 and '-', at most {MAX_NAME_LENGTH} characters",
        )
    return value


def _check_port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(Reason.MALFORMED, value, "port must be an integer")
    if not 1 <= value <= 65535:
        raise CatalogEntryError(
            Rejection(Reason.PORT_OUT_OF_RANGE, str(value), "port must be between 1 and 65535")
        )
    return value


def _check_tags(tags: object) -> tuple[str, ...]:
    if not isinstance(tags, list | tuple):
        raise _fail(Reason.MALFORMED, tags, "tags must be a list of strings")
    if len(tags) > MAX_TAGS:
        raise _fail(Reason.META_TOO_LARGE, f"{len(tags)} tags", f"at most {MAX_TAGS} tags")
    for tag in tags:
        if not isinstance(tag, str):
            raise _fail(Reason.MALFORMED, tag, "tags must be strings")
        if len(tag) > MAX_TAG_LENGTH or _TAG.fullmatch(tag) is None:
            raise _fail(
                Reason.TAG_UNSAFE, tag, "a tag may hold only A-Z, a-z, 0-9 and . _ : / @ + -"
            )
    return tuple(sorted(set(tags)))


def _check_meta(meta: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(meta, Mapping):
        raise _fail(Reason.MALFORMED, meta, "meta must be a map of strings")
    if len(meta) > MAX_META_ENTRIES:
        raise _fail(
            Reason.META_TOO_LARGE, f"{len(meta)} entries", f"at most {MAX_META_ENTRIES} entries"
        )
    total = 0
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise _fail(Reason.MALFORMED, key, "meta keys and values must be strings")
        if len(key) > MAX_META_KEY_LENGTH or len(value) > MAX_META_VALUE_LENGTH:
            raise _fail(
                Reason.META_TOO_LARGE,
                key,
                f"keys at most {MAX_META_KEY_LENGTH}, values at most {MAX_META_VALUE_LENGTH}",
            )
        if _META_KEY.fullmatch(key) is None:
            raise _fail(Reason.META_UNSAFE, key, "a meta key may hold only A-Z, a-z, 0-9, _ and -")
        if _UNSAFE_VALUE.search(value) is not None:
            raise _fail(
                Reason.META_UNSAFE,
                value,
                "a meta value must not hold control characters, quotes, braces or backslashes",
            )
        total += len(key.encode()) + len(value.encode())
    if total > MAX_META_BYTES:
        raise _fail(Reason.META_TOO_LARGE, f"{total} bytes", f"at most {MAX_META_BYTES} bytes")
    return tuple(sorted(meta.items()))


def _parse_ip(value: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if not isinstance(value, str):
        raise _fail(Reason.MALFORMED, value, "address must be a string")
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise _fail(Reason.ADDRESS_NOT_IP, value, "address must be an IP literal") from None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            raise _fail(Reason.ADDRESS_NOT_IP, value, "address must not carry an IPv6 zone")
        if ip.ipv4_mapped is not None:
            # ::ffff:169.254.169.254 reaches the same host as 169.254.169.254.
            return ip.ipv4_mapped
    return ip


def _address_class(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Reason | None:
    """The refused class an address falls in, loopback included; None when routable."""
    if ip.is_unspecified or (isinstance(ip, ipaddress.IPv4Address) and ip in _THIS_NETWORK):
        return Reason.ADDRESS_UNSPECIFIED
    if ip in _METADATA_ADDRESSES:
        return Reason.ADDRESS_METADATA
    if ip.is_loopback:
        return Reason.ADDRESS_LOOPBACK
    if ip.is_link_local:
        return Reason.ADDRESS_LINK_LOCAL
    if ip.is_multicast:
        return Reason.ADDRESS_MULTICAST
    if ip == _BROADCAST:
        return Reason.ADDRESS_BROADCAST
    return None


@dataclass(frozen=True, slots=True)
class DeniedTarget:
    """An address and port that no endpoint may point at (our own admin/control listeners).

    A loopback address denies the port on every loopback address, and an unspecified one
    (``0.0.0.0``, ``::``) denies it on every address, as a listener bound there would accept.
    """

    address: str
    port: int

    def __post_init__(self) -> None:
        _parse_ip(self.address)
        _check_port(self.port)

    def covers(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        """Whether a connection to ``ip:port`` could reach this listener."""
        if port != self.port:
            return False
        denied = _parse_ip(self.address)
        if denied.is_unspecified:
            return True
        if denied.is_loopback:
            return ip.is_loopback
        return ip == denied


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    """What endpoint addresses this control plane accepts.

    ``allow_loopback`` is for the local ``snapbright up`` mesh only; ``denied`` applies always.
    """

    allow_loopback: bool = False
    denied: frozenset[DeniedTarget] = frozenset()

    def check_target(self, address: str, port: int) -> Rejection | None:
        """None when ``address:port`` may be routed to, else the rule it breaks."""
        try:
            ip = _parse_ip(address)
            _check_port(port)
        except CatalogEntryError as error:
            return error.rejection
        refused = _address_class(ip)
        if refused is not None and not (refused is Reason.ADDRESS_LOOPBACK and self.allow_loopback):
            return Rejection(refused, f"{address}:{port}", f"{refused.value.replace('-', ' ')}")
        for target in self.denied:
            if target.covers(ip, port):
                return Rejection(
                    Reason.ADDRESS_DENIED,
                    f"{address}:{port}",
                    "points at a control-plane admin or control port",
                )
        return None


@dataclass(frozen=True, slots=True)
class ServiceKey:
    """A service's identity in the catalog: namespace and name."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Service:
    """A named service; its endpoints are listed in the catalog separately."""

    name: str
    namespace: str = "default"
    protocol: Protocol = Protocol.HTTP
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _check_label("service name", self.name)
        _check_label("namespace", self.namespace)
        if not isinstance(self.protocol, Protocol):
            raise _fail(Reason.PROTOCOL_UNKNOWN, self.protocol, "protocol must be http, grpc, tcp")
        _check_tags(self.tags)
        _check_meta(dict(self.meta))

    @property
    def key(self) -> ServiceKey:
        """``namespace/name``."""
        return ServiceKey(self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance of a service: where to reach it, where it runs and how healthy it is.

    Constructing one checks its shape; whether its address may be routed to is the
    :class:`AdmissionPolicy`'s call, made by :func:`admit_endpoint`.
    """

    service: str
    address: str
    port: int
    namespace: str = "default"
    zone: str = ""
    health: Health = Health.PASSING
    workload: str = ""
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _check_label("service name", self.service)
        _check_label("namespace", self.namespace)
        _check_label("zone", self.zone, optional=True)
        _check_label("workload", self.workload, optional=True)
        _parse_ip(self.address)
        _check_port(self.port)
        if not isinstance(self.health, Health):
            raise _fail(Reason.HEALTH_UNKNOWN, self.health, "health must be a Health value")
        _check_tags(self.tags)
        _check_meta(dict(self.meta))

    @property
    def key(self) -> ServiceKey:
        """The service this endpoint belongs to."""
        return ServiceKey(self.namespace, self.service)


@dataclass(frozen=True, slots=True)
class Workload:
    """A running workload and the identity it is issued: ``/ns/<namespace>/sa/<account>``."""

    name: str
    namespace: str = "default"
    service_account: str = "default"

    def __post_init__(self) -> None:
        _check_label("workload name", self.name)
        _check_label("namespace", self.namespace)
        _check_label("service account", self.service_account)

    @property
    def spiffe_path(self) -> str:
        """The path of the workload's SPIFFE ID within its cluster's trust domain."""
        return f"/ns/{self.namespace}/sa/{self.service_account}"


@dataclass(frozen=True, slots=True)
class Catalog:
    """One consistent view of the catalog, versioned by a monotonic ``index``.

    Contents are kept sorted, so two catalogs with the same entries compare equal
    (:meth:`same_content`) whatever order a source listed them in.
    """

    index: int
    services: tuple[Service, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    workloads: tuple[Workload, ...] = ()
    _by_service: dict[ServiceKey, tuple[Endpoint, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise ValueError("catalog index must be a non-negative integer")
        grouped: dict[ServiceKey, list[Endpoint]] = {}
        for endpoint in self.endpoints:
            grouped.setdefault(endpoint.key, []).append(endpoint)
        self._by_service.update({key: tuple(group) for key, group in grouped.items()})

    @classmethod
    def of(
        cls,
        index: int,
        services: Iterable[Service] = (),
        endpoints: Iterable[Endpoint] = (),
        workloads: Iterable[Workload] = (),
    ) -> Catalog:
        """A catalog with its entries in canonical order, duplicates removed."""
        return cls(
            index,
            tuple(sorted(set(services), key=_service_order)),
            tuple(sorted(set(endpoints), key=_endpoint_order)),
            tuple(sorted(set(workloads), key=_workload_order)),
        )

    def same_content(self, other: Catalog) -> bool:
        """Whether both hold the same entries, whatever their index."""
        return (self.services, self.endpoints, self.workloads) == (
            other.services,
            other.endpoints,
            other.workloads,
        )

    def with_index(self, index: int) -> Catalog:
        """The same entries under another version."""
        return Catalog(index, self.services, self.endpoints, self.workloads)

    def endpoints_of(self, name: str, namespace: str = "default") -> tuple[Endpoint, ...]:
        """The endpoints of one service, empty when it has none."""
        return self._by_service.get(ServiceKey(namespace, name), ())

    def service(self, name: str, namespace: str = "default") -> Service | None:
        """The service named so, if present."""
        for service in self.services:
            if service.name == name and service.namespace == namespace:
                return service
        return None


def _service_order(service: Service) -> tuple[str, str]:
    return (service.namespace, service.name)


def _endpoint_order(endpoint: Endpoint) -> tuple[str, str, str, int, str]:
    e = endpoint
    return (e.namespace, e.service, e.address, e.port, e.workload)


def _workload_order(workload: Workload) -> tuple[str, str]:
    return (workload.namespace, workload.name)


def _field(raw: Mapping[str, object], key: str, default: object) -> object:
    return raw.get(key, default)


def admit_service(raw: Mapping[str, object]) -> Service | Rejection:
    """A raw service entry (``name``, ``namespace``, ``protocol``, ``tags``, ``meta``)."""
    try:
        protocol = _field(raw, "protocol", "http")
        if protocol not in {p.value for p in Protocol}:
            raise _fail(Reason.PROTOCOL_UNKNOWN, protocol, "protocol must be http, grpc or tcp")
        return Service(
            name=_check_label("service name", _field(raw, "name", None)),
            namespace=_check_label("namespace", _field(raw, "namespace", "default")),
            protocol=Protocol(str(protocol)),
            tags=_check_tags(_field(raw, "tags", ())),
            meta=_check_meta(_field(raw, "meta", {})),
        )
    except CatalogEntryError as error:
        return error.rejection


def admit_endpoint(raw: Mapping[str, object], policy: AdmissionPolicy) -> Endpoint | Rejection:
    """A raw endpoint entry (``service``, ``namespace``, ``address``, ``port``, ``zone``,
    ``health``, ``workload``, ``tags``, ``meta``), checked against ``policy``."""
    try:
        health = _field(raw, "health", "passing")
        if health not in {h.value for h in Health}:
            raise _fail(Reason.HEALTH_UNKNOWN, health, "health must be passing/warning/critical")
        endpoint = Endpoint(
            service=_check_label("service name", _field(raw, "service", None)),
            namespace=_check_label("namespace", _field(raw, "namespace", "default")),
            address=str(_parse_ip(_field(raw, "address", None))),
            port=_check_port(_field(raw, "port", None)),
            zone=_check_label("zone", _field(raw, "zone", ""), optional=True),
            health=Health(str(health)),
            workload=_check_label("workload", _field(raw, "workload", ""), optional=True),
            tags=_check_tags(_field(raw, "tags", ())),
            meta=_check_meta(_field(raw, "meta", {})),
        )
    except CatalogEntryError as error:
        return error.rejection
    refused = policy.check_target(endpoint.address, endpoint.port)
    return endpoint if refused is None else refused


def admit_workload(raw: Mapping[str, object]) -> Workload | Rejection:
    """A raw workload entry (``name``, ``namespace``, ``service_account``)."""
    try:
        return Workload(
            name=_check_label("workload name", _field(raw, "name", None)),
            namespace=_check_label("namespace", _field(raw, "namespace", "default")),
            service_account=_check_label(
                "service account", _field(raw, "service_account", "default")
            ),
        )
    except CatalogEntryError as error:
        return error.rejection


_REGISTRATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True, slots=True)
class Registration:
    """A workload's registration of one endpoint, under an id the registrant chooses.

    The id is 1-128 characters of ``A-Za-z0-9._-``; re-registering the same id replaces the
    entry, so a restarted sidecar can register again without a stale duplicate.
    """

    id: str
    workload: Workload
    endpoint: Endpoint

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or _REGISTRATION_ID.fullmatch(self.id) is None:
            raise _fail(Reason.MALFORMED, self.id, "registration id: 1-128 of A-Za-z0-9._-")
        if (self.endpoint.workload, self.endpoint.namespace) != (
            self.workload.name,
            self.workload.namespace,
        ):
            raise _fail(
                Reason.MALFORMED,
                self.endpoint.workload,
                "the endpoint must name the registering workload and its namespace",
            )
