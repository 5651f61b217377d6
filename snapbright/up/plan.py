"""From a LocalMesh topology to a Plan: every process of the local mesh, with nothing started.

A plan is values only: each step's argv, its config file (rendered text), its ports, how to
tell it is ready, and which steps it waits for. The runner (``snapbright.up.runner``) writes
the files and starts the steps; nothing here touches the disk, the network or the clock.

Per cluster, in start order:

1. ``<cluster>.ca-init``: ``snapbright ca init`` into the cluster's state directory, then one
   bootstrap SVID per gateway and sidecar (``snapbright ca issue --ttl 1h``, ``<cluster>.ca.*``).
   Every cluster's CA comes before any control plane: gateways trust their peers' bundles.
2. ``<cluster>.controlplane``: its state directory is the CA's, its policy directory holds the
   topology's policy files. When they hold no ExportPolicy, the plan adds one that exports
   every service of the cluster to every peer; when they hold no AuthorizationPolicy, one per
   service that lets the cluster and its peers call it (so the demo federates).
3. ``<cluster>.gateway``: SNI routes to the local sidecars' inbound ports and to the control
   plane's peering port; the probe endpoint trusts the peers' bundles.
4. ``wan``: one WAN emulator with a forward per directed pair of peered clusters, in front of
   the remote gateway. Cluster A reaches cluster B's gateway only at A's WAN listener for the
   link A → B (:meth:`Plan.gateway_view`), so peering and data both cross the emulated WAN.
5. ``<cluster>.<service>-<i>``: a demo app per replica, and ``….sidecar`` beside it.

Then, once both clusters' processes are ready, ``peering.<a>.<b>`` per peering, the way a
person does it: a token from the accepting cluster's admin API, established through the
dialing cluster's admin API. The first cluster of ``between`` dials the second (write the
calling cluster first: the dialer is the side that learns the other's gateways, so its callers
can reach the other's services).

The gateway addresses are per peering: the token is asked for with the dialer's view of the
acceptor's gateway (its WAN listener for that link), and establish is given the acceptor's
view of the dialer's, so each peer reaches each cluster over its own link. A control plane's
``gateways`` (its first peer's view) is only the default, for peerings made by hand.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from proxy.config.model import API_VERSION
from snapbright.topology.model import LocalMesh, MeshService

__all__ = [
    "AUTHORIZATION_FILE",
    "DEFAULT_BASE_PORT",
    "EXPORTS_FILE",
    "HOST",
    "HttpReady",
    "PeeringStep",
    "Plan",
    "PlanError",
    "PlannedFile",
    "PolicyFile",
    "PortAllocator",
    "ProcessStep",
    "Role",
    "SidecarPorts",
    "Step",
    "TcpReady",
    "build_plan",
    "sequential_ports",
]

HOST = "127.0.0.1"
"""Everything of the local mesh listens on loopback."""

DEFAULT_BASE_PORT = 17000
"""Below Linux's ephemeral range (32768+), so outgoing connections never hold our ports."""

EXPORTS_FILE = "snapbright-up-exports.yaml"
"""The ExportPolicy the plan adds to a cluster when the topology's policies hold none."""

AUTHORIZATION_FILE = "snapbright-up-authorization.yaml"
"""The AuthorizationPolicies the plan adds to a cluster when the topology's policies hold none:
each service there may be called from the cluster and from its peers."""

BOOTSTRAP_SVID_TTL = "1h"
"""Bootstrap SVIDs only carry a process to its first discovery snapshot, which renews them."""

PortAllocator = Callable[[str], int]
"""Gives the port for a key such as ``us-west.controlplane.admin``; called once per key."""


class PlanError(ValueError):
    """The topology cannot be planned as asked (a port out of range or given twice)."""


class Role(StrEnum):
    """What a step is, as the table and ``endpoints.json`` name it."""

    CA = "ca"
    CONTROLPLANE = "controlplane"
    GATEWAY = "gateway"
    WAN = "wan"
    DEMO = "demo-app"
    SIDECAR = "sidecar"
    PEERING = "peering"


@dataclass(frozen=True, slots=True)
class HttpReady:
    """Ready when a GET of ``url`` answers 200."""

    url: str


@dataclass(frozen=True, slots=True)
class TcpReady:
    """Ready when ``host:port`` accepts a connection."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class PlannedFile:
    """A file the runner writes before starting anything."""

    path: Path
    text: str


@dataclass(frozen=True, slots=True)
class PolicyFile:
    """A topology policy file as read and validated by the caller: its name, its text and the
    kinds of the documents in it."""

    name: str
    text: str
    kinds: frozenset[str]


@dataclass(frozen=True, slots=True)
class ProcessStep:
    """A process. ``oneshot`` ones must exit 0 (CA commands); the others are ready when their
    ``ready`` check passes and then run until the mesh stops."""

    name: str
    role: Role
    cluster: str | None
    argv: tuple[str, ...]
    config: PlannedFile | None = None
    ports: Mapping[str, int] = field(default_factory=dict)
    ready: HttpReady | TcpReady | None = None
    oneshot: bool = False
    after: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PeeringStep:
    """Establish one peering: a token from ``accepting``'s admin API, then ``establish`` on
    ``dialing``'s; ``dial_via`` is where the dialer reaches the acceptor's gateway (the token
    carries it), ``advertise`` where the acceptor reaches the dialer's (given to establish)."""

    name: str
    accepting: str
    dialing: str
    accepting_admin: str
    dialing_admin: str
    dial_via: tuple[str, ...]
    after: tuple[str, ...] = ()
    advertise: tuple[str, ...] = ()
    role: Role = Role.PEERING


Step = ProcessStep | PeeringStep


@dataclass(frozen=True, slots=True)
class SidecarPorts:
    """One replica of a service in a cluster: its demo app and its sidecar's listeners."""

    cluster: str
    service: str
    replica: int
    app: int
    grpc: int
    outbound: int
    inbound: int
    admin: int

    @property
    def name(self) -> str:
        """The replica's step name: ``<cluster>.<service>-<i>``."""
        return f"{self.cluster}.{self.service}-{self.replica}"


@dataclass(frozen=True, slots=True)
class Plan:
    """Every step of a local mesh, in start order, and where everything will listen."""

    mesh: str
    state_dir: Path
    steps: tuple[Step, ...]
    files: tuple[PlannedFile, ...]
    clusters: tuple[str, ...]
    replicas: tuple[SidecarPorts, ...]
    wan_admin: int
    wan_listeners: Mapping[tuple[str, str], int]

    def step(self, name: str) -> Step:
        """The step called ``name``."""
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    def ports(self) -> Iterator[tuple[str, str, int]]:
        """Every port the plan listens on: (step, port name, port)."""
        for step in self.steps:
            if isinstance(step, ProcessStep):
                for name, port in step.ports.items():
                    yield step.name, name, port

    def gateway_view(self, source: str, destination: str) -> str:
        """Where ``source`` reaches ``destination``'s gateway: its WAN listener for that link."""
        return f"{HOST}:{self.wan_listeners[(source, destination)]}"

    def state_of(self, cluster: str) -> Path:
        """A cluster's state directory (its CA and its control plane's state)."""
        return self.state_dir / "state" / cluster

    def policy_dir(self, cluster: str) -> Path:
        """A cluster's policy directory, watched by its control plane."""
        return self.state_dir / "policies" / cluster

    def log_path(self, step: str) -> Path:
        """Where a step's stdout and stderr go."""
        return self.state_dir / "logs" / f"{step}.log"

    def without(self, role: Role) -> Plan:
        """This plan without the steps of ``role`` (and without waiting for them): the mesh
        runs without sidecars until the sidecar exists, say."""
        dropped = {step.name for step in self.steps if step.role is role}
        kept = tuple(
            replace(step, after=tuple(a for a in step.after if a not in dropped))
            for step in self.steps
            if step.name not in dropped
        )
        return replace(self, steps=kept)


def sequential_ports(base: int) -> PortAllocator:
    """``base``, ``base + 1``, … in the order the plan asks (the same plan, the same ports)."""
    counter = itertools.count(base)

    def allocate(_key: str) -> int:
        return next(counter)

    return allocate


def build_plan(
    mesh: LocalMesh,
    *,
    state_dir: Path,
    command: Sequence[str],
    ports: PortAllocator,
    policies: Sequence[PolicyFile] = (),
) -> Plan:
    """The plan that runs ``mesh`` from ``state_dir`` (an absolute path). ``command`` is how
    to run the ``snapbright`` CLI, e.g. ``(sys.executable, "-m", "snapbright")``."""
    return _Planner(mesh, state_dir, tuple(command), ports, tuple(policies)).build()


class _Planner:
    def __init__(
        self,
        mesh: LocalMesh,
        state_dir: Path,
        command: tuple[str, ...],
        ports: PortAllocator,
        policies: tuple[PolicyFile, ...],
    ) -> None:
        self.mesh = mesh
        self.name = mesh.spec.mesh
        self.root = state_dir
        self.command = command
        self._allocate = ports
        self._given: dict[int, str] = {}
        self.policies = policies
        self.clusters = tuple(c.name for c in mesh.spec.clusters)
        self.steps: list[Step] = []
        self.files: list[PlannedFile] = []
        # Dialer first: (dialing, accepting) per peering, in the file's order.
        self.peerings = tuple((p.between[0], p.between[1]) for p in mesh.spec.peerings)

    # -- ports --

    def port(self, key: str) -> int:
        port = self._allocate(key)
        if not 1 <= port <= 65535:
            raise PlanError(f"port {port} for {key} is not between 1 and 65535")
        if port in self._given:
            raise PlanError(f"port {port} is given to both {self._given[port]} and {key}")
        self._given[port] = key
        return port

    # -- paths --

    def state(self, cluster: str) -> Path:
        return self.root / "state" / cluster

    def svid_dir(self, cluster: str, workload: str) -> Path:
        return self.state(cluster) / "svid" / workload

    def policy_dir(self, cluster: str) -> Path:
        return self.root / "policies" / cluster

    def config_path(self, step: str, suffix: str = "yaml") -> Path:
        return self.root / "config" / f"{step}.{suffix}"

    # -- the whole plan --

    def build(self) -> Plan:
        cp_ports = {c: self._control_plane_ports(c) for c in self.clusters}
        gw_ports = {c: self._gateway_ports(c) for c in self.clusters}
        replicas = tuple(self._replica_ports())
        wan_admin = self.port("wan.admin")
        listeners = {
            pair: self.port(f"wan.{pair[0]}.{pair[1]}")
            for dialing, accepting in self.peerings
            for pair in ((dialing, accepting), (accepting, dialing))
        }
        views = {pair: f"{HOST}:{port}" for pair, port in listeners.items()}
        # Every CA first: a gateway's probe trusts its peers' bundles, written by their CAs.
        for cluster in self.clusters:
            self._ca_steps(cluster, tuple(r for r in replicas if r.cluster == cluster))
        for cluster in self.clusters:
            local = tuple(r for r in replicas if r.cluster == cluster)
            self._policies(cluster)
            self._control_plane(cluster, cp_ports[cluster], views)
            self._gateway(cluster, gw_ports[cluster], cp_ports[cluster]["peering"], local)
        self._wan(wan_admin, listeners, gw_ports)
        for replica in replicas:
            self._demo_app(replica, replicas)
            self._sidecar(replica, cp_ports[replica.cluster])
        for dialing, accepting in self.peerings:
            self.steps.append(
                PeeringStep(
                    name=f"peering.{dialing}.{accepting}",
                    accepting=accepting,
                    dialing=dialing,
                    accepting_admin=_admin_url(cp_ports[accepting]["admin"]),
                    dialing_admin=_admin_url(cp_ports[dialing]["admin"]),
                    dial_via=(views[(dialing, accepting)],),
                    advertise=(views[(accepting, dialing)],),
                    # Last: a control plane that learns of remote targets before its own
                    # replicas have registered would send their callers away at once.
                    after=(
                        "wan",
                        *(
                            step.name
                            for step in self.steps
                            if isinstance(step, ProcessStep)
                            and not step.oneshot
                            and step.cluster in (dialing, accepting)
                        ),
                    ),
                )
            )
        return Plan(
            mesh=self.name,
            state_dir=self.root,
            steps=tuple(self.steps),
            files=tuple(self.files),
            clusters=self.clusters,
            replicas=replicas,
            wan_admin=wan_admin,
            wan_listeners=listeners,
        )

    def _control_plane_ports(self, cluster: str) -> dict[str, int]:
        return {
            n: self.port(f"{cluster}.controlplane.{n}") for n in ("admin", "discovery", "peering")
        }

    def _gateway_ports(self, cluster: str) -> dict[str, int]:
        return {n: self.port(f"{cluster}.gateway.{n}") for n in ("listen", "admin")}

    def _replica_ports(self) -> Iterator[SidecarPorts]:
        for cluster in self.clusters:
            for service in self.mesh.services_in(cluster):
                for replica in range(service.replicas):
                    key = f"{cluster}.{service.name}-{replica}"
                    yield SidecarPorts(
                        cluster=cluster,
                        service=service.name,
                        replica=replica,
                        app=self.port(f"{key}.http"),
                        grpc=self.port(f"{key}.grpc"),
                        outbound=self.port(f"{key}.sidecar.outbound"),
                        inbound=self.port(f"{key}.sidecar.inbound"),
                        admin=self.port(f"{key}.sidecar.admin"),
                    )

    # -- steps --

    def _ca_steps(self, cluster: str, local: tuple[SidecarPorts, ...]) -> None:
        state = str(self.state(cluster))
        init = f"{cluster}.ca-init"
        self.steps.append(
            ProcessStep(
                name=init,
                role=Role.CA,
                cluster=cluster,
                argv=(
                    *self.command,
                    "ca",
                    "init",
                    "--cluster",
                    cluster,
                    "--mesh",
                    self.name,
                    "--state-dir",
                    state,
                ),
                oneshot=True,
            )
        )
        workloads = [("gateway", _GATEWAY_NAMESPACE, "gateway")] + [
            (f"{r.service}-{r.replica}", "default", r.service) for r in local
        ]
        for workload, namespace, account in workloads:
            self.steps.append(
                ProcessStep(
                    name=f"{cluster}.ca.{workload}",
                    role=Role.CA,
                    cluster=cluster,
                    argv=(
                        *self.command,
                        "ca",
                        "issue",
                        "--namespace",
                        namespace,
                        "--service-account",
                        account,
                        "--ttl",
                        BOOTSTRAP_SVID_TTL,
                        "--out",
                        str(self.svid_dir(cluster, workload)),
                        "--state-dir",
                        state,
                    ),
                    oneshot=True,
                    after=(init,),
                )
            )

    def _policies(self, cluster: str) -> None:
        directory = self.policy_dir(cluster)
        for policy in self.policies:
            self.files.append(PlannedFile(directory / policy.name, policy.text))
        peers = self.mesh.peers_of(cluster)
        if not any("ExportPolicy" in p.kinds for p in self.policies):
            exports = [
                {"service": s.name, "peers": list(peers)} for s in self.mesh.services_in(cluster)
            ]
            document = _document(
                "ExportPolicy", f"{cluster}-exports", {"exports": exports if peers else []}
            )
            header = "# Written by `snapbright up`: every service here is exported to every peer.\n"
            self.files.append(PlannedFile(directory / EXPORTS_FILE, header + _yaml(document)))
        services = list(self.mesh.services_in(cluster))
        # A cluster with no service gets no file: one with no document is a bad policy file.
        if services and not any("AuthorizationPolicy" in p.kinds for p in self.policies):
            # Callers from other clusters are refused unless a policy allows them: let the
            # demo's own cluster and its peers call every service here.
            domains = [self.mesh.trust_domain(c).name for c in (cluster, *peers)]
            rules = [{"from": [{"trustDomain": domain} for domain in domains]}]
            documents = [
                _document(
                    "AuthorizationPolicy", f"{s.name}-callers", {"service": s.name, "rules": rules}
                )
                for s in self.mesh.services_in(cluster)
            ]
            header = (
                "# Written by `snapbright up`: this cluster and its peers may call every service"
                " here.\n"
            )
            text = header + "---\n".join(_yaml(document) for document in documents)
            self.files.append(PlannedFile(directory / AUTHORIZATION_FILE, text))

    def _control_plane(
        self, cluster: str, ports: dict[str, int], views: Mapping[tuple[str, str], str]
    ) -> None:
        name = f"{cluster}.controlplane"
        # What goes into our tokens (as acceptor) and our Opens (as dialer): where a peer
        # reaches our gateway, through the WAN emulator. One list per control plane, so the
        # first peer's view (see the module docstring for a cluster with several peerings).
        peers = [d for d, a in self.peerings if a == cluster]
        peers += [a for d, a in self.peerings if d == cluster]
        gateways = [views[(peers[0], cluster)]] if peers else []
        spec: dict[str, Any] = {
            "cluster": cluster,
            "mesh": self.name,
            "stateDir": str(self.state(cluster)),
            "listen": {
                "discovery": {"address": HOST, "port": ports["discovery"]},
                "peering": {"address": HOST, "port": ports["peering"]},
                "admin": {"address": HOST, "port": ports["admin"]},
            },
            "policyDirectory": str(self.policy_dir(cluster)),
            "gateways": gateways,
            # A replica killed -9 cannot deregister: its registration must lapse in seconds
            # for the mesh to stop sending it calls (sidecars heartbeat every third of it).
            "catalog": {"registrationTtl": "5s"},
            "admission": {"allowLoopback": True},
            "failover": {"interval": "1s"},
            "probeGateways": True,
        }
        config = PlannedFile(
            self.config_path(name), _yaml(_document("ControlPlaneConfig", cluster, spec))
        )
        self.files.append(config)
        self.steps.append(
            ProcessStep(
                name=name,
                role=Role.CONTROLPLANE,
                cluster=cluster,
                argv=(*self.command, "controlplane", "--config", str(config.path)),
                config=config,
                ports=ports,
                ready=HttpReady(f"{_admin_url(ports['admin'])}/ready"),
                after=(f"{cluster}.ca-init",),
            )
        )

    def _gateway(
        self,
        cluster: str,
        ports: dict[str, int],
        peering_port: int,
        local: tuple[SidecarPorts, ...],
    ) -> None:
        name = f"{cluster}.gateway"
        peers = self.mesh.peers_of(cluster)
        services = [
            {
                "name": service.name,
                "exported": self._exported(cluster, service),
                "endpoints": [
                    {"address": HOST, "port": r.inbound} for r in local if r.service == service.name
                ],
            }
            for service in self.mesh.services_in(cluster)
        ]
        svid = self.svid_dir(cluster, "gateway")
        spec: dict[str, Any] = {
            "cluster": cluster,
            "mesh": self.name,
            "listen": {"address": HOST, "port": ports["listen"]},
            "admin": {"address": HOST, "port": ports["admin"]},
            # `snapbright up` stops in seconds; long-lived test connections are not drained.
            "drainTimeout": "1s",
            "controlPlane": {"address": HOST, "port": peering_port},
            "services": services,
        }
        if peers:
            spec["probe"] = {
                "certificate": str(svid / "svid.pem"),
                "key": str(svid / "key.pem"),
                "bundles": [
                    {
                        "trustDomain": self.mesh.trust_domain(peer).name,
                        "path": str(self.svid_dir(peer, "gateway") / "bundle.json"),
                    }
                    for peer in peers
                ],
            }
        config = PlannedFile(
            self.config_path(name), _yaml(_document("GatewayConfig", f"{cluster}-gateway", spec))
        )
        self.files.append(config)
        self.steps.append(
            ProcessStep(
                name=name,
                role=Role.GATEWAY,
                cluster=cluster,
                argv=(*self.command, "gateway", "--config", str(config.path)),
                config=config,
                ports=ports,
                ready=HttpReady(f"http://{HOST}:{ports['admin']}/ready"),
                after=(
                    f"{cluster}.controlplane",
                    f"{cluster}.ca.gateway",
                    *(f"{peer}.ca.gateway" for peer in peers),
                ),
            )
        )

    def _exported(self, cluster: str, service: MeshService) -> bool:
        # With the topology's own ExportPolicy the control plane decides per peer; the
        # gateway only needs to know the name may be routed at all: it is exported to one of
        # this cluster's peers. A name no policy exports is closed at the gateway.
        if any("ExportPolicy" in p.kinds for p in self.policies):
            peers = set(self.mesh.peers_of(cluster))
            return any(
                export.get("service") == service.name and peers & set(export.get("peers") or ())
                for export in _topology_exports(self.policies)
            )
        return bool(self.mesh.peers_of(cluster))

    def _wan(
        self,
        admin: int,
        listeners: Mapping[tuple[str, str], int],
        gateways: Mapping[str, dict[str, int]],
    ) -> None:
        links = []
        for dialing, accepting in self.peerings:
            link = self.mesh.link_between(dialing, accepting)
            shape: dict[str, Any] = {"between": [dialing, accepting]}
            if link is not None:
                shape |= {
                    "latency": _duration(link.latency),
                    "jitter": _duration(link.jitter),
                    "loss": link.loss,
                }
                if link.bandwidth is not None:
                    shape["bandwidth"] = link.bandwidth
            links.append(shape)
        forwards = [
            {
                "link": [source, destination],
                "listenHost": HOST,
                "listenPort": port,
                "targetHost": HOST,
                "targetPort": gateways[destination]["listen"],
            }
            for (source, destination), port in listeners.items()
        ]
        document = {"adminHost": HOST, "adminPort": admin, "links": links, "forwards": forwards}
        config = PlannedFile(self.config_path("wan", "json"), json.dumps(document, indent=2) + "\n")
        self.files.append(config)
        ports = {"admin": admin} | {f"{s}->{d}": p for (s, d), p in listeners.items()}
        self.steps.append(
            ProcessStep(
                name="wan",
                role=Role.WAN,
                cluster=None,
                argv=(*self.command, "wan", "serve", str(config.path)),
                config=config,
                ports=ports,
                ready=HttpReady(f"http://{HOST}:{admin}/healthz"),
                after=tuple(f"{c}.gateway" for c in self.clusters),
            )
        )

    def _demo_app(self, replica: SidecarPorts, replicas: tuple[SidecarPorts, ...]) -> None:
        service = next(s for s in self.mesh.spec.services if s.name == replica.service)
        argv = [
            *self.command,
            "demo-app",
            "--service",
            replica.service,
            "--cluster",
            replica.cluster,
            "--replica",
            str(replica.replica),
            "--host",
            HOST,
            "--port",
            str(replica.app),
            "--grpc-port",
            str(replica.grpc),
            "--latency",
            _duration(service.latency),
            "--error-rate",
            f"{service.error_rate:g}",
        ]
        # Upstreams are called through this replica's own sidecar: the mesh picks the target.
        for upstream in service.upstreams:
            argv += ["--upstream", f"{upstream}=http://{HOST}:{replica.outbound}"]
        self.steps.append(
            ProcessStep(
                name=replica.name,
                role=Role.DEMO,
                cluster=replica.cluster,
                argv=tuple(argv),
                ports={"http": replica.app, "grpc": replica.grpc},
                ready=HttpReady(f"http://{HOST}:{replica.app}/healthz"),
                after=(f"{replica.cluster}.gateway",),
            )
        )

    def _sidecar(self, replica: SidecarPorts, control_plane: dict[str, int]) -> None:
        name = f"{replica.name}.sidecar"
        svid = self.svid_dir(replica.cluster, f"{replica.service}-{replica.replica}")
        spec: dict[str, Any] = {
            "identity": {
                "cluster": replica.cluster,
                "mesh": self.name,
                "namespace": "default",
                "serviceAccount": replica.service,
                "service": replica.service,
            },
            "app": {"address": HOST, "port": replica.app},
            "listeners": {
                "outbound": {"address": HOST, "port": replica.outbound},
                "inbound": {"address": HOST, "port": replica.inbound},
                "admin": {"address": HOST, "port": replica.admin},
            },
            # The bootstrap SVID and our own bundle; peers' bundles and renewed SVIDs come
            # from the control plane's discovery stream.
            "tls": {
                "certificate": str(svid / "svid.pem"),
                "key": str(svid / "key.pem"),
                "bundles": [
                    {
                        "trustDomain": self.mesh.trust_domain(replica.cluster).name,
                        "path": str(svid / "bundle.json"),
                    }
                ],
            },
            "controlPlane": {
                "address": HOST,
                "port": control_plane["discovery"],
                "adminUrl": _admin_url(control_plane["admin"]),
            },
            "drainTimeout": "1s",
        }
        config = PlannedFile(
            self.config_path(name),
            _yaml(_document("SidecarConfig", f"{replica.service}-{replica.replica}", spec)),
        )
        self.files.append(config)
        self.steps.append(
            ProcessStep(
                name=name,
                role=Role.SIDECAR,
                cluster=replica.cluster,
                argv=(*self.command, "sidecar", "--config", str(config.path)),
                config=config,
                ports={
                    "outbound": replica.outbound,
                    "inbound": replica.inbound,
                    "admin": replica.admin,
                },
                ready=HttpReady(f"http://{HOST}:{replica.admin}/ready"),
                after=(
                    replica.name,
                    f"{replica.cluster}.controlplane",
                    f"{replica.cluster}.ca.{replica.service}-{replica.replica}",
                ),
            )
        )


_GATEWAY_NAMESPACE = "snapbright"


def _topology_exports(policies: Sequence[PolicyFile]) -> Iterator[dict[str, Any]]:
    """Every ``spec.exports`` entry of the topology's ExportPolicy documents (the files were
    validated by the caller, so only their shape is assumed here)."""
    for policy in policies:
        if "ExportPolicy" not in policy.kinds:
            continue
        for document in yaml.safe_load_all(policy.text):
            if isinstance(document, dict) and document.get("kind") == "ExportPolicy":
                yield from (document.get("spec") or {}).get("exports") or ()


def _admin_url(port: int) -> str:
    return f"http://{HOST}:{port}"


def _document(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def _yaml(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


def _duration(seconds: float) -> str:
    return f"{round(seconds * 1000, 3):g}ms"
