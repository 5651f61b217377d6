"""Decisions of the discovery server, free of I/O: who may ask for what, what to send when.

- :func:`authenticate_peer`: the client certificate must be a valid SVID of this cluster's
  own trust domain (not of a federated one).
- :func:`check_identity`: a proxy asks for the configuration of the identity its SVID proves,
  never another's: the namespace and service account it claims must be the ones in its
  SPIFFE ID, and the cluster the one this control plane serves.
- :class:`ContentVersions`: a version number per change of content. Proxies of one
  :class:`ProxyClass` get the same content, so it is built, digested and numbered once per
  class, not per proxy. A version reads ``<counter>.<digest>``: the counter orders versions
  within one control-plane incarnation; the digest names the content across restarts, so a
  proxy that reconnects to a restarted control plane holding the same content is not sent it
  again.
- :func:`plan_push`: whether a subscriber gets a snapshot now. Never while its class is not
  ready (a source unreachable or still syncing): the control plane never pushes an empty or
  partial configuration. Never a content the proxy holds or has rejected. A renewed SVID
  always travels with the full current content (a snapshot without upstreams would read as
  an empty configuration), under the current version; a proxy that sees a version again
  takes only the SVID from it.
- :class:`UpstreamLog`: which upstreams changed since a revision, for deltas. Every put or
  removal of one upstream is a new revision, logged in a bounded ring; a version remembers the
  revision it was built at, so the delta from a version the proxy holds costs O(changes), and
  a version older than the ring gets a complete snapshot. The log also keeps an
  order-independent digest of the whole set, updated per change, so a version's digest costs
  O(changes) too (while naming the content across restarts as before).
- :func:`plan_delta`: a delta or a complete snapshot for one subscriber.
- :func:`renewal_due`: an SVID is renewed two thirds into its lifetime.
- :class:`NackLog` and :class:`StatsStore`: what the control plane remembers, bounded.
"""

from __future__ import annotations

import enum
import hashlib
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from proxy.identity.bundle import TrustBundle, TrustBundleSet
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.identity.svid import Purpose, Rejection, SvidError, validate_svid
from proxy.stats.core import StatsWindow

RENEW_FRACTION = 2 / 3


class Role(enum.Enum):
    """What kind of proxy subscribes."""

    SIDECAR = "sidecar"
    GATEWAY = "gateway"


@dataclass(frozen=True, slots=True)
class ClaimedIdentity:
    """The identity a proxy says it has in its Hello, before any check."""

    role: Role | None
    cluster: str
    namespace: str
    service_account: str
    workload: str
    service: str


@dataclass(frozen=True, slots=True)
class ProxyClass:
    """What a proxy's configuration depends on: proxies of one class get the same content."""

    role: Role
    namespace: str
    service_account: str
    service: str


class IdentityRefused(Exception):
    """A proxy asked for an identity it did not prove; ``reason`` says how it differs."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def authenticate_peer(
    leaf_pem: bytes, own_bundle: TrustBundle, now: datetime
) -> tuple[SpiffeId, x509.Certificate]:
    """The SPIFFE ID a client's leaf proves against this cluster's roots only, and the leaf.

    The TLS handshake already checked the chain; this applies the SPIFFE rules and refuses
    any trust domain but our own (a federated peer's workloads never subscribe here).
    Raises :class:`SvidError`.
    """
    try:
        leaf = x509.load_pem_x509_certificate(leaf_pem)
    except ValueError as error:
        raise SvidError(Rejection.MALFORMED, str(error)) from None
    spiffe_id = validate_svid(leaf, (), TrustBundleSet([own_bundle]), now, Purpose.CLIENT)
    return spiffe_id, leaf


def check_identity(
    claimed: ClaimedIdentity, proven: SpiffeId, trust_domain: TrustDomain, cluster: str
) -> ProxyClass:
    """The class of a proxy whose SVID proved ``proven``, or :class:`IdentityRefused`."""
    if proven.trust_domain != trust_domain:
        raise IdentityRefused(f"{proven} is not in this cluster's trust domain {trust_domain}")
    segments = proven.path.split("/")
    if len(segments) != 5 or segments[1] != "ns" or segments[3] != "sa":
        raise IdentityRefused(f"{proven} is not a workload ID (/ns/<namespace>/sa/<account>)")
    namespace, service_account = segments[2], segments[4]
    if claimed.role is None:
        raise IdentityRefused("the Hello names no role (sidecar or gateway)")
    if claimed.cluster != cluster:
        raise IdentityRefused(f"asked for cluster {claimed.cluster!r}, this is {cluster!r}")
    if (claimed.namespace, claimed.service_account) != (namespace, service_account):
        raise IdentityRefused(
            f"asked for ns/{claimed.namespace}/sa/{claimed.service_account} "
            f"but the SVID proves ns/{namespace}/sa/{service_account}"
        )
    if not claimed.workload:
        raise IdentityRefused("the Hello names no workload")
    return ProxyClass(claimed.role, namespace, service_account, claimed.service)


def renew_at(not_before: datetime, not_after: datetime) -> datetime:
    """When an SVID valid from ``not_before`` to ``not_after`` should be replaced."""
    return not_before + (not_after - not_before) * RENEW_FRACTION


def renewal_due(not_before: datetime, not_after: datetime, now: datetime) -> bool:
    """True once ``now`` has reached two thirds of the SVID's lifetime."""
    return now >= renew_at(not_before, not_after)


def content_digest(serialized: bytes) -> str:
    """A digest naming a snapshot's content (deterministically serialized, no version/SVID)."""
    return hashlib.sha256(serialized).hexdigest()[:24]


def digest_of_version(version: str) -> str:
    """The content digest inside a version string (empty for a foreign or empty version)."""
    _, dot, digest = version.partition(".")
    return digest if dot else ""


@dataclass(frozen=True, slots=True)
class Content:
    """One class's current content: its version string and digest."""

    version: str
    digest: str


class ContentVersions:
    """The current content version of every proxy class; a new number only on change."""

    __slots__ = ("_by_class", "_counter")

    def __init__(self) -> None:
        self._counter = 0
        self._by_class: dict[ProxyClass, Content] = {}

    def update(self, proxy_class: ProxyClass, digest: str) -> tuple[Content, bool]:
        """Record ``digest`` as the class's content; return it and whether it changed."""
        known = self._by_class.get(proxy_class)
        if known is not None and known.digest == digest:
            return known, False
        self._counter += 1
        content = Content(f"{self._counter}.{digest}", digest)
        self._by_class[proxy_class] = content
        return content, True

    def get(self, proxy_class: ProxyClass) -> Content | None:
        """The class's current content, if it was ever built."""
        return self._by_class.get(proxy_class)


@dataclass(frozen=True, slots=True)
class Push:
    """Send the class content of ``version`` now, with a freshly signed SVID if ``svid``."""

    version: str
    svid: bool


def plan_push(
    current: Content | None,
    ready: bool,
    held_digest: str,
    rejected_digest: str,
    svid_due: bool,
) -> Push | None:
    """Whether a subscriber gets a snapshot now, and what it carries.

    ``held_digest`` is the content the proxy holds or was last sent; ``rejected_digest`` the
    content it last nacked; ``svid_due`` whether its SVID must be renewed (and it sent a CSR).
    """
    if current is None or not ready:
        return None
    fresh = current.digest not in (held_digest, rejected_digest)
    if fresh or svid_due:
        return Push(current.version, svid_due)
    return None


_DIGEST_MODULUS = 1 << 128


def item_digest(key: str, serialized: bytes) -> int:
    """The digest of one upstream (its key and deterministic serialization) as a number."""
    return int.from_bytes(hashlib.sha256(key.encode() + b"\0" + serialized).digest()[:16])


class UpstreamLog:
    """Per-upstream digests, a set digest, and a bounded log of which key changed when.

    Keys are opaque strings (``namespace/service``). A put of an unchanged digest is not a
    change. ``capacity`` bounds the log: a revision older than what it holds has no delta.
    """

    __slots__ = ("_digests", "_floor", "_log", "_sum", "revision", "touched")

    def __init__(self, capacity: int = 65_536) -> None:
        if capacity < 1:
            raise ValueError(f"the upstream log needs a capacity of at least 1, got {capacity}")
        self._digests: dict[str, int] = {}
        self._log: deque[tuple[int, str]] = deque(maxlen=capacity)
        self._floor = 0
        self._sum = 0
        self.revision = 0
        """Number of changes so far."""
        self.touched = 0
        """Puts and removals offered, changed or not: the work done on this log."""

    def put(self, key: str, digest: int) -> bool:
        """Record ``key``'s content digest; True if it was new or different."""
        self.touched += 1
        old = self._digests.get(key)
        if old == digest:
            return False
        self._sum = (self._sum - (old or 0) + digest) % _DIGEST_MODULUS
        self._digests[key] = digest
        self._append(key)
        return True

    def remove(self, key: str) -> bool:
        """Forget ``key``; True if it was there."""
        self.touched += 1
        old = self._digests.pop(key, None)
        if old is None:
            return False
        self._sum = (self._sum - old) % _DIGEST_MODULUS
        self._append(key)
        return True

    def _append(self, key: str) -> None:
        self.revision += 1
        if len(self._log) == self._log.maxlen:
            self._floor = self._log[0][0]
        self._log.append((self.revision, key))

    def changed_since(self, revision: int) -> set[str] | None:
        """The keys changed after ``revision``, or None when the log no longer reaches back
        that far (or ``revision`` is from the future)."""
        if revision < self._floor or revision > self.revision:
            return None
        changed: set[str] = set()
        for logged, key in reversed(self._log):
            if logged <= revision:
                break
            changed.add(key)
        return changed

    def __contains__(self, key: object) -> bool:
        return key in self._digests

    def __len__(self) -> int:
        return len(self._digests)

    @property
    def digest(self) -> str:
        """A digest of the whole set, whatever the order of its changes."""
        return f"{self._sum:032x}"


@dataclass(frozen=True, slots=True)
class DeltaPlan:
    """Send a delta: these keys are upserted (present now) or removed (gone)."""

    upserted: tuple[str, ...]
    removed: tuple[str, ...]


def plan_delta(
    log: UpstreamLog, held_revision: int | None, accepts_deltas: bool, full_next: bool
) -> DeltaPlan | None:
    """A delta from the revision the proxy holds to now, or None for a complete snapshot.

    A complete snapshot when the proxy does not take deltas, asked for one (it nacked a
    delta), holds a version we cannot place, or the log does not reach back to it; also when
    the delta would carry more than half of the upstreams (a snapshot is then no larger).
    """
    if not accepts_deltas or full_next or held_revision is None:
        return None
    changed = log.changed_since(held_revision)
    if changed is None or len(changed) > max(len(log), 1):
        return None
    keys = sorted(changed)
    return DeltaPlan(
        tuple(k for k in keys if k in log),
        tuple(k for k in keys if k not in log),
    )


class VersionRevisions:
    """The log revision each recent version of one class was built at (``capacity`` kept)."""

    __slots__ = ("_capacity", "_revisions")

    def __init__(self, capacity: int = 256) -> None:
        self._capacity = capacity
        self._revisions: OrderedDict[str, int] = OrderedDict()

    def record(self, version: str, revision: int) -> None:
        """``version`` holds the upstreams as they were at ``revision``."""
        self._revisions[version] = revision
        self._revisions.move_to_end(version)
        while len(self._revisions) > self._capacity:
            self._revisions.popitem(last=False)

    def get(self, version: str) -> int | None:
        """The revision of ``version``, if it is one we built recently."""
        return self._revisions.get(version)


@dataclass(frozen=True, slots=True)
class NackRecord:
    """A proxy rejected a version: who, which, why, when."""

    proxy: str
    version: str
    reason: str
    at: datetime


class NackLog:
    """The last rejection of each proxy (at most ``capacity`` proxies, the oldest forgotten)."""

    __slots__ = ("_capacity", "_records", "total")

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError(f"the nack log needs a capacity of at least 1, got {capacity}")
        self._capacity = capacity
        self._records: OrderedDict[str, NackRecord] = OrderedDict()
        self.total = 0

    def record(self, nack: NackRecord) -> None:
        """Remember ``nack`` as its proxy's last rejection."""
        self.total += 1
        self._records.pop(nack.proxy, None)
        self._records[nack.proxy] = nack
        while len(self._records) > self._capacity:
            self._records.popitem(last=False)

    def clear(self, proxy: str) -> None:
        """Forget a proxy's rejection (it acked a later version)."""
        self._records.pop(proxy, None)

    def last(self, proxy: str) -> NackRecord | None:
        """The proxy's last rejection that no later ack superseded."""
        return self._records.get(proxy)

    def __iter__(self) -> Iterator[NackRecord]:
        return iter(list(self._records.values()))

    def __len__(self) -> int:
        return len(self._records)


@dataclass(frozen=True, slots=True)
class SeriesKey:
    """Whose windows: one upstream's target cluster as one proxy saw it."""

    upstream: str
    target_cluster: str
    reporter: str


class StatsStore:
    """Stats windows in memory: a ring of ``ring`` windows per series, ``max_series`` series.

    A window for a series beyond the limit is dropped and counted: a proxy that invents
    upstreams cannot grow the control plane's memory without bound.
    """

    __slots__ = ("_max_series", "_ring", "_series", "dropped", "received")

    def __init__(self, ring: int = 60, max_series: int = 100_000) -> None:
        if ring < 1 or max_series < 1:
            raise ValueError(f"ring and max_series must be at least 1, got {ring}, {max_series}")
        self._ring = ring
        self._max_series = max_series
        self._series: dict[SeriesKey, deque[StatsWindow]] = {}
        self.received = 0
        self.dropped = 0

    def add(self, reporter: str, window: StatsWindow) -> bool:
        """Keep ``window`` from ``reporter``; False (and counted) if it was dropped."""
        key = SeriesKey(window.upstream, window.target_cluster, reporter)
        ring = self._series.get(key)
        if ring is None:
            if len(self._series) >= self._max_series:
                self.dropped += 1
                return False
            ring = self._series[key] = deque(maxlen=self._ring)
        ring.append(window)
        self.received += 1
        return True

    def windows(self, upstream: str, target_cluster: str) -> list[StatsWindow]:
        """Every kept window to one upstream's target cluster, all reporters, oldest first."""
        found = [
            window
            for key, ring in self._series.items()
            if key.upstream == upstream and key.target_cluster == target_cluster
            for window in ring
        ]
        found.sort(key=lambda window: window.start)
        return found

    def series(self) -> list[SeriesKey]:
        """The series held now."""
        return list(self._series)

    def prune(self, before: int) -> None:
        """Drop windows that start before second ``before``, and series left empty."""
        for key in list(self._series):
            ring = self._series[key]
            while ring and ring[0].start < before:
                ring.popleft()
            if not ring:
                del self._series[key]
