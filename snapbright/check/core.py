"""`snapbright check`, pure: a cluster's status and ``now`` in, a list of verdicts out.

Each item looks at one part of the status and says ✓ (ok), ‼ (warn: works, but look) or
× (fail: something is broken for callers or will break), with a hint for every warning and
failure. Items, in the order they print:

- control plane: reachable, catalog read and a policy set accepted (else proxies get nothing);
- policies: the last reload went through (a rejected one shows ``file:line:col`` reasons);
- gateways: each peer's gateway alive by our probe, with its RTT;
- peering: each peer ACTIVE with a fresh heartbeat;
- trust bundles, both ways: our bundle's sequence as the peer acked it; the peer's bundle
  here, not expired, and not older than its refresh hint says it may get;
- certificates: our CA's roots and intermediates (‼ within 30 days, unless retiring), the
  control plane's SVID (‼ in the last third of its lifetime: renewal is overdue), × expired;
- mirrors: every imported service has a mirror with ≥ 1 gateway endpoint, not stale;
- exports: no mirrored service re-exported (daisy chain): no exported service's endpoints
  are a peer's gateway;
- proxies: no proxy rejected its config (nacks with their reason), every one acked the
  latest version.

With every cluster's status (``--all``), :func:`check_across` also compares what each cluster
holds of its peers' bundles with what those peers publish.

Nothing here reads a clock or the network: the shell (``gather.py``) fetches the status.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from snapbright.check.model import ClusterStatus, Mirror, Peer

ROOT_WARN_SECONDS = 30 * 24 * 3600.0
"""A CA certificate expiring within this is a warning (rotation takes an overlap)."""
HEARTBEAT_FRESH_SECONDS = 5.0
"""A peer heard from longer ago than this is silent (heartbeats come every second)."""


class Level(enum.StrEnum):
    """A verdict, from best to worst."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


SYMBOLS = {Level.OK: "✓", Level.WARN: "‼", Level.FAIL: "×"}
"""How each level prints."""


@dataclass(frozen=True, slots=True)
class Check:
    """One line of `snapbright check`: its group, verdict, what it saw, and what to do."""

    group: str
    level: Level
    message: str
    hint: str = ""
    see: str = ""
    details: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Unreachable:
    """The control plane could not be asked, or answered something unreadable."""

    api: str
    reason: str
    unreadable: bool = False


@dataclass(frozen=True, slots=True)
class ClusterReport:
    """Every check of one cluster."""

    cluster: str
    api: str
    checks: tuple[Check, ...]

    @property
    def failures(self) -> int:
        """How many checks failed."""
        return sum(1 for c in self.checks if c.level is Level.FAIL)

    @property
    def warnings(self) -> int:
        """How many checks warned."""
        return sum(1 for c in self.checks if c.level is Level.WARN)


def check_cluster(
    cluster: str, api: str, status: ClusterStatus | Unreachable, now: float
) -> ClusterReport:
    """Every check of one cluster at ``now`` (epoch seconds)."""
    if isinstance(status, Unreachable):
        return ClusterReport(cluster, api, (_unreachable(status),))
    checks = [_reached(status, api)]
    for item in _ITEMS:
        checks.extend(item(status, now))
    return ClusterReport(status.cluster, api, tuple(checks))


def summary(reports: Iterable[ClusterReport]) -> tuple[Level, str]:
    """The last line: whether all is well, in one sentence."""
    reports = list(reports)
    failures = sum(r.failures for r in reports)
    warnings = sum(r.warnings for r in reports)
    if failures:
        return Level.FAIL, (
            f"{failures} check(s) failed, {warnings} warning(s): "
            "something is broken, see the hints above"
        )
    if warnings:
        return Level.WARN, f"all checks passed, with {warnings} warning(s) worth a look"
    return Level.OK, "all checks passed: the mesh is healthy"


def check_across(statuses: Iterable[ClusterStatus]) -> ClusterReport:
    """With every cluster's status at hand (``--all``): does each cluster hold every peer's
    *current* bundle? A cluster that holds an older sequence than the peer now publishes has
    not heard of a rotation yet, and will refuse the peer's SVIDs under the new root."""
    by_cluster = {s.cluster: s for s in statuses}
    checks = []
    for holder in sorted(by_cluster):
        for peer in _live_peers(by_cluster[holder]):
            publisher = by_cluster.get(peer.peer)
            own = publisher.own_bundle if publisher is not None else None
            if own is None or peer.bundle is None:
                continue  # not checked here (the per-cluster checks say what is missing)
            if peer.bundle.sequence == own.sequence:
                checks.append(
                    Check(
                        "trust bundles match",
                        Level.OK,
                        f"{holder} holds {peer.peer}'s current bundle (sequence {own.sequence})",
                    )
                )
            else:
                checks.append(
                    Check(
                        "trust bundles match",
                        Level.WARN,
                        f"{holder} holds {peer.peer}'s bundle at sequence {peer.bundle.sequence}"
                        f", but {peer.peer} publishes sequence {own.sequence}",
                        hint=f"{holder} gets it over the peering stream; do not retire "
                        f"{peer.peer}'s old root until it has",
                        see=f"snapbright check --cluster {holder}",
                    )
                )
    return ClusterReport("across clusters", "", tuple(checks))


# --- Control plane ---

_CP = "control plane"


def _unreachable(status: Unreachable) -> Check:
    if status.unreadable:
        return Check(
            _CP,
            Level.FAIL,
            f"the control plane at {status.api} answered a status this CLI cannot read",
            hint="is it a Snapbright control plane of the same version as this CLI?",
            details=(status.reason,),
        )
    return Check(
        _CP,
        Level.FAIL,
        status.reason,
        hint="is it running? `snapbright up` starts a local mesh, "
        "`snapbright controlplane --config FILE` one control plane",
        see="--api URL, or --state-dir DIR where endpoints.json is",
    )


def _reached(status: ClusterStatus, api: str) -> Check:
    return Check(_CP, Level.OK, f"control plane of {status.cluster} answers at {api}")


def _ready(status: ClusterStatus, _now: float) -> list[Check]:
    checks = []
    if not status.ready.catalog:
        checks.append(
            Check(
                _CP,
                Level.FAIL,
                "the catalog has not been read yet: proxies are sent no configuration",
                hint="the embedded registry opens at start; with Consul, is Consul reachable?",
            )
        )
    if not status.ready.policies:
        checks.append(
            Check(
                _CP,
                Level.FAIL,
                "no policy set has been accepted yet: proxies are sent no configuration",
                hint="fix the policy files (see policies below); the first good set is used",
            )
        )
    if not checks:
        checks.append(Check(_CP, Level.OK, "ready: catalog read and policies loaded"))
    return checks


# --- Policies ---


def _policies(status: ClusterStatus, _now: float) -> list[Check]:
    policies = status.policies
    if policies.ok:
        files = len(policies.files)
        said = f"{files} policy file(s) loaded" if files else "no policy files (none in force)"
        return [Check("policies", Level.OK, f"{said}, last reload accepted")]
    if policies.last_success_at is None:
        message = "the policy files were rejected: no policy set has ever loaded"
    else:
        message = "the last policy reload was rejected: the last good set stays in force"
    return [
        Check(
            "policies",
            Level.FAIL,
            message,
            hint="fix the file where the error points; the control plane reloads it by itself",
            see="snapbright policy validate FILE…",
            details=policies.errors,
        )
    ]


# --- Gateways ---


def _gateways(status: ClusterStatus, _now: float) -> list[Check]:
    peers = _live_peers(status)
    if not peers:
        return [Check("gateways", Level.OK, "no peers: no gateway to probe")]
    if not status.probe_gateways:
        return [
            Check(
                "gateways",
                Level.WARN,
                "gateway probes are off: a dead peer's mirrors stay until staleGrace ends",
                hint="set spec.probeGateways: true in the ControlPlaneConfig",
            )
        ]
    probes = {g.peer: g for g in status.gateways}
    checks = []
    for peer in peers:
        probe = probes.get(peer.peer)
        if probe is None and peer.imported == 0:
            # Probes follow mirrors: a peer that exports nothing to us has no target to probe.
            checks.append(
                Check(
                    "gateways",
                    Level.OK,
                    f"{peer.peer}'s gateway is not probed: {peer.peer} exports nothing to us",
                )
            )
        elif probe is None and not peer.gateways:
            checks.append(
                Check(
                    "gateways",
                    Level.FAIL,
                    f"no gateway address is known for {peer.peer}: nothing it exports to us "
                    "can be reached",
                    hint=f"a peer's gateways come from its token (when we dialed) or from its "
                    f"Open (when it dialed): set spec.gateways on {peer.peer}'s control plane "
                    "and let it reconnect",
                    see="snapbright peering list",
                )
            )
        elif probe is None:
            checks.append(
                Check(
                    "gateways",
                    Level.WARN,
                    f"{peer.peer}'s gateway is not probed",
                    hint="a probe starts with the first service the peer exports to us",
                )
            )
        elif probe.alive:
            checks.append(
                Check(
                    "gateways",
                    Level.OK,
                    f"{peer.peer}'s gateway is alive (rtt {_ms(probe.rtt_seconds)})",
                )
            )
        elif probe.state == "down":
            checks.append(
                Check(
                    "gateways",
                    Level.FAIL,
                    f"{peer.peer}'s gateway is down: {probe.last_error or 'no answer'}",
                    hint=f"its mirrors are withdrawn while it is down; is {peer.peer}'s "
                    f"gateway ({', '.join(peer.gateways) or 'no address'}) up and reachable?",
                    see="snapbright status",
                )
            )
        else:
            checks.append(
                Check(
                    "gateways",
                    Level.WARN,
                    f"{peer.peer}'s gateway has not answered a probe yet"
                    + (f": {probe.last_error}" if probe.last_error else ""),
                    hint="it counts as alive after its first answer",
                )
            )
    return checks


# --- Peering ---


def _peering(status: ClusterStatus, now: float) -> list[Check]:
    peers = _live_peers(status)
    if not peers:
        return [Check("peering", Level.OK, "no peerings")]
    return [_peer(peer, now) for peer in peers]


def _peer(peer: Peer, now: float) -> Check:
    name = peer.peer
    if peer.state == "active":
        silent = None if peer.last_heard_at is None else max(0.0, now - peer.last_heard_at)
        if silent is not None and silent <= HEARTBEAT_FRESH_SECONDS:
            return Check(
                "peering",
                Level.OK,
                f"{name} connected (last heard {silent:.1f}s ago)",
            )
        return Check(
            "peering",
            Level.WARN,
            f"{name} is connected but silent for {_span(silent)}",
            hint="heartbeats come every second; the stream is dropped after a few missed",
            see="snapbright peering list",
        )
    if peer.state in ("pending", "establishing"):
        return Check(
            "peering",
            Level.WARN,
            f"{name} is {peer.state}: not connected yet",
            hint=f"it connects when {name}'s control plane answers through its gateway",
            see="snapbright peering list",
        )
    stale = "" if peer.stale_since is None else f" for {_span(now - peer.stale_since)}"
    return Check(
        "peering",
        Level.FAIL,
        f"{name} is {peer.state}{stale}: its mirrors are stale",
        hint=f"is {name}'s control plane up, and its gateway "
        f"({', '.join(peer.gateways) or 'no address'}) reachable from here?",
        see="snapbright peering list",
    )


# --- Trust bundles ---


def _trust(status: ClusterStatus, now: float) -> list[Check]:
    peers = _live_peers(status)
    own = status.own_bundle
    checks = []
    if own is None:
        checks.append(
            Check(
                "trust bundles",
                Level.FAIL,
                f"no bundle of our own trust domain {status.trust_domain}",
                hint="the CA in the state directory is missing or unreadable",
            )
        )
    if not peers:
        if own is not None:
            checks.append(
                Check(
                    "trust bundles",
                    Level.OK,
                    f"our bundle is at sequence {own.sequence} (no peers to share it with)",
                )
            )
        return checks
    ours = (own.sequence or 0) if own is not None else 0
    for peer in peers:
        checks.append(_ours_there(peer, ours))
        checks.append(_theirs_here(peer, now))
    return checks


def _ours_there(peer: Peer, ours: int) -> Check:
    acked = peer.bundle_acked or 0
    if acked >= ours and acked > 0:
        return Check("trust bundles", Level.OK, f"{peer.peer} holds our bundle (sequence {acked})")
    if acked > 0:
        return Check(
            "trust bundles",
            Level.WARN,
            f"{peer.peer} holds our bundle at sequence {acked}, ours is at {ours}",
            hint="it gets the new one over the peering stream; retire an old root only "
            "after every peer holds the new bundle",
            see="snapbright peering list",
        )
    return Check(
        "trust bundles",
        Level.FAIL,
        f"{peer.peer} has not acknowledged our bundle: it cannot verify our callers",
        hint="the bundle is sent once the peering is ACTIVE",
        see="snapbright peering list",
    )


def _theirs_here(peer: Peer, now: float) -> Check:
    name = peer.peer
    bundle = peer.bundle
    if bundle is None:
        return Check(
            "trust bundles",
            Level.FAIL,
            f"no trust bundle of {name} here: calls to its services fail the TLS handshake",
            hint="the peer sends it over the peering stream once it is ACTIVE",
            see="snapbright peering list",
        )
    if bundle.latest_not_after is None or bundle.latest_not_after <= now:
        return Check(
            "trust bundles",
            Level.FAIL,
            f"every root of {name}'s bundle has expired",
            hint=f"{name} must rotate its CA (`snapbright ca rotate` there)",
        )
    if bundle.not_after is not None and bundle.not_after <= now:
        return Check(
            "trust bundles",
            Level.WARN,
            f"{name}'s bundle still holds an expired root",
            hint=f"{name} prunes retired roots after the overlap; rotate there if it is stuck",
        )
    hint_s = bundle.refresh_hint_seconds
    if peer.state != "active" and hint_s is not None:
        since = peer.stale_since if peer.stale_since is not None else peer.last_heard_at
        if since is None or now - since > hint_s:
            silent = "never heard from" if since is None else f"silent for {_span(now - since)}"
            return Check(
                "trust bundles",
                Level.WARN,
                f"{name}'s bundle may be outdated: {name} is {silent}, "
                f"longer than its refresh hint ({_span(hint_s)})",
                hint="bundles are refreshed over the peering stream: bring the peering back",
                see="snapbright peering list",
            )
    return Check(
        "trust bundles",
        Level.OK,
        f"{name}'s bundle is here (sequence {bundle.sequence}, {bundle.roots} root(s), "
        f"valid for {_span(bundle.latest_not_after - now)})",
    )


# --- Certificates ---


def _certificates(status: ClusterStatus, now: float) -> list[Check]:
    checks = []
    for authority in status.certificates.authorities:
        what = f"{authority.kind} {authority.name}"
        left = authority.not_after - now
        if left <= 0:
            checks.append(
                Check(
                    "certificates",
                    Level.FAIL,
                    f"{what} expired {_span(-left)} ago",
                    hint="every SVID under it fails: rotate now (`snapbright ca rotate`)",
                )
            )
        elif authority.retire_at is not None and authority.retire_at <= authority.not_after:
            checks.append(
                Check(
                    "certificates",
                    Level.OK,
                    f"{what} is retiring: it leaves the bundle in "
                    f"{_span(max(0.0, authority.retire_at - now))}",
                )
            )
        elif left <= ROOT_WARN_SECONDS:
            checks.append(
                Check(
                    "certificates",
                    Level.WARN,
                    f"{what} expires in {_span(left)}",
                    hint="rotate before it expires (`snapbright ca rotate`): the old root "
                    "stays in the bundle for the overlap",
                )
            )
        else:
            checks.append(Check("certificates", Level.OK, f"{what} valid for {_span(left)}"))
    svid = status.certificates.control_plane
    left = svid.not_after - now
    if left <= 0:
        checks.append(
            Check(
                "certificates",
                Level.FAIL,
                f"the control plane's SVID expired {_span(-left)} ago: peers refuse it",
                hint="the control plane renews it by itself; look at its log for CA errors",
            )
        )
    elif (
        now >= svid.renew_at
        if svid.not_before is None
        else left < (svid.not_after - svid.not_before) / 3
    ):
        checks.append(
            Check(
                "certificates",
                Level.WARN,
                f"the control plane's SVID expires in {_span(left)}: its renewal is overdue",
                hint="it is renewed two thirds into its lifetime; look at the control "
                "plane's log for CA errors",
            )
        )
    else:
        checks.append(
            Check(
                "certificates",
                Level.OK,
                f"control plane SVID valid for {_span(left)} ({svid.spiffe_id})",
            )
        )
    return checks


# --- Mirrors and exports ---


def _mirrors(status: ClusterStatus, now: float) -> list[Check]:
    if not status.mirrors:
        return [Check("mirrors", Level.OK, "nothing imported from peers")]
    checks = []
    good = 0
    for mirror in status.mirrors:
        problem = _mirror_problem(mirror, status.stale_grace_seconds, now)
        if problem is None:
            good += 1
        else:
            checks.append(problem)
    if good:
        checks.insert(
            0, Check("mirrors", Level.OK, f"{good} mirror(s) have gateway endpoints, fresh")
        )
    return checks


def _mirror_problem(mirror: Mirror, grace: float, now: float) -> Check | None:
    target = f"{mirror.service}@{mirror.peer}"
    if not mirror.present:
        if not mirror.probe_alive:
            why = f"{mirror.peer}'s gateway probe says it is dead"
        elif mirror.stale_since is not None:
            why = f"{mirror.peer} has been unreachable for longer than staleGrace ({_span(grace)})"
        else:
            why = f"no gateway address is known for {mirror.peer}"
        return Check(
            "mirrors",
            Level.FAIL,
            f"{target} is withdrawn: callers of {mirror.service} do not reach {mirror.peer}",
            hint=why,
            see="snapbright peering list",
        )
    if mirror.endpoints == 0:
        return Check(
            "mirrors",
            Level.FAIL,
            f"{target} has no gateway endpoint",
            hint=f"{mirror.peer} named no gateway (in its token or its Open): set "
            f"spec.gateways on {mirror.peer}'s control plane",
        )
    if mirror.stale:
        age = "" if mirror.stale_since is None else f" for {_span(now - mirror.stale_since)}"
        return Check(
            "mirrors",
            Level.WARN,
            f"{target} is stale{age} (withdrawn after {_span(grace)})",
            hint=f"the peering with {mirror.peer} is down; its gateway still answers probes",
            see="snapbright peering list",
        )
    if mirror.healthy_endpoints == 0:
        return Check(
            "mirrors",
            Level.WARN,
            f"{target}: {mirror.peer} reports no healthy endpoint",
            hint="callers are sent there only when nothing healthier exists",
        )
    return None


def _exports(status: ClusterStatus, _now: float) -> list[Check]:
    gateways = {g: p.peer for p in _live_peers(status) for g in p.gateways}
    checks = []
    for export in status.exports:
        chained = sorted({gateways[e] for e in export.endpoints if e in gateways})
        if chained:
            via = ", ".join(chained)
            checks.append(
                Check(
                    "exports",
                    Level.FAIL,
                    f"{export.service} is exported to {', '.join(export.peers)}, but its "
                    f"endpoints are {via}'s gateway: a mirror re-exported (daisy chain)",
                    hint=f"export only services with endpoints of their own: remove the "
                    f"registration that points at {via}'s gateway, or stop exporting "
                    f"{export.service}",
                )
            )
    if not checks:
        count = len(status.exports)
        said = f"{count} service(s) exported" if count else "nothing exported"
        checks.append(Check("exports", Level.OK, f"no mirrored service is re-exported ({said})"))
    return checks


# --- Proxies ---


def _proxies(status: ClusterStatus, _now: float) -> list[Check]:
    checks = []
    nacked = set()
    for nack in status.nacks:
        nacked.add(nack.proxy)
        checks.append(
            Check(
                "proxies",
                Level.FAIL,
                f"{nack.proxy} rejected config {nack.version}: {nack.reason}",
                hint="it keeps serving its last good config; fix what it rejects",
            )
        )
    lagging = [
        s
        for s in status.subscribers
        if s.proxy not in nacked and s.sent_version and s.acked_version != s.sent_version
    ]
    for subscriber in lagging:
        checks.append(
            Check(
                "proxies",
                Level.WARN,
                f"{subscriber.proxy} has not acked the latest config "
                f"(sent {subscriber.sent_version}, acked {subscriber.acked_version or 'none'})",
                hint="a proxy acks within a second; one that does not may be stuck",
            )
        )
    acked = sum(1 for s in status.subscribers if s.proxy not in nacked and s not in lagging)
    if not status.subscribers:
        checks.insert(0, Check("proxies", Level.OK, "no proxies subscribed"))
    elif acked:
        checks.insert(0, Check("proxies", Level.OK, f"{acked} proxies acked the latest config"))
    return checks


# --- Small pieces ---


def _live_peers(status: ClusterStatus) -> list[Peer]:
    return sorted((p for p in status.peers if p.state != "deleted"), key=lambda p: p.peer)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}ms"


def _span(seconds: float | None) -> str:
    """A duration the way people say it: 4.2s, 12m, 5h, 364d."""
    if seconds is None:
        return "ever"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


_ITEMS: tuple[Callable[[ClusterStatus, float], list[Check]], ...] = (
    _ready,
    _policies,
    _gateways,
    _peering,
    _trust,
    _certificates,
    _mirrors,
    _exports,
    _proxies,
)
