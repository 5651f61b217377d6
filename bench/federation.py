"""Federation at scale: 10 peers exporting 10,000 services to one control plane (issue 4, §7).

What runs, all on 127.0.0.1:

- the control plane under test: the real ``snapbright controlplane`` process (cluster
  ``us-west``, embedded catalog, default failover interval: 1 s), started from a config in a
  temporary directory. Its failover loop decides only the services called from us-west or
  with a policy or with a local and a remote copy: none of these imports, which keep
  mirroring's default weights (``failover_pairs`` reports how many it decided);
- ten peers ``peer-0`` … ``peer-9`` in this process, each a real
  :class:`~federation.peering.manager.PeeringManager` (its own CA, its own SVID, the peering
  protocol over gRPC+mTLS through :mod:`federation.peering.stream`) exporting ``total / 10``
  services to ``us-west``; the control plane establishes each peering with the peer's token
  through its admin API, as ``snapbright peering establish`` does;
- one sidecar of ``us-west``: :class:`~proxy.discovery.client.DiscoveryClient` with an SVID
  from the control plane's CA, applying deltas (``parse_delta``) and noting when each
  upstream arrives.

Measured, for each size (1 k and 10 k services in total):

- propagation: a new service exported by a random peer, from ``set_service`` in the peer to
  its upstream in the sidecar's configuration; N changes spaced out; p50 and p99;
- update cost: 15 more changes, each with the control plane's own counters read from its
  ``/metrics`` before and after (kept apart from the timed changes: a scrape is itself
  O(services) of work for the control plane): upstreams recomputed
  (``snapbright_controlplane_upstreams_federated_total``, the work, free of clock noise)
  and the time to rebuild the discovery content (``snapbright_discovery_rebuild_seconds``);
  medians; ``update_cost_growth`` is the work at
  10 k over the work at 1 k, ``update_time_growth`` the same for time;
- at 10 k only: the control plane's RSS (VmRSS and VmHWM from /proc/<pid>/status), and the
  full resync: peer-0's peering port closes (its stream drops), peer-0 exports one more
  service meanwhile, then at t0 the port reopens and a new sidecar (no version held)
  subscribes; resync_s is the time until that sidecar holds every upstream including the
  new one, none stale. The control plane's redial backoff (0.5 s base, jittered) is part of
  it.

Prints a table, then one line of JSON. About two minutes on two cores:

    .venv/bin/python bench/federation.py [--sizes 1000,10000] [--changes 100]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, this file's folder comes first on the path, and this module's name
    # would hide the ``federation`` package: look from the repository root instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import contextlib
import functools
import json
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import contains
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from federation.peering.credentials import control_plane_server_name
from federation.peering.manager import PeeringError, PeeringManager
from federation.peering.model import GatewayAddress, ServiceKey
from federation.trust.ca import ClusterCA, create_ca
from federation.trust.store import load_ca
from proxy.api.v1 import discovery_pb2 as pb
from proxy.discovery.client import DiscoveryClient, NoConfigYet
from proxy.discovery.core import Backoff, control_plane_host, control_plane_id
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.identity.svid import X509Svid

CLUSTER = "us-west"
MESH = "acme"
PEERS = 10
NAMESPACE = "default"
FAILOVER_INTERVAL = ""
"""The failover loop's tick (``--failover-interval``, e.g. ``1h`` to keep it out of the way
for a diagnosis; the config's default, 1 s, otherwise)."""
COSTED = 15
"""Changes whose cost is read from the control plane's counters (after the timed ones)."""
WORKDIR: str | None = None
"""Where the control plane's log goes (``--workdir``; its temporary directory otherwise)."""

Upstreams = dict[str, pb.Upstream]


def _config(directory: Path) -> Path:
    (directory / "policies").mkdir(parents=True, exist_ok=True)
    path = directory / "controlplane.yaml"
    path.write_text(f"""\
apiVersion: snapbright.io/v1alpha1
kind: ControlPlaneConfig
metadata: {{name: {CLUSTER}}}
spec:
  cluster: {CLUSTER}
  mesh: {MESH}
  stateDir: state
  listen:
    discovery: {{address: 127.0.0.1, port: 0}}
    peering: {{address: 127.0.0.1, port: 0}}
    admin: {{address: 127.0.0.1, port: 0}}
  catalog: {{registrationTtl: 30s}}
  admission: {{allowLoopback: true}}
  probeGateways: false
  policyDirectory: policies
{f"  failover: {{interval: {FAILOVER_INTERVAL}}}" if FAILOVER_INTERVAL else ""}
""")
    return path


def _http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - loopback
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def _call(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
    return await asyncio.to_thread(_http, method, url, body)


_METRIC = re.compile(r"^([a-z_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", re.MULTILINE)


async def _metrics(admin: str) -> dict[str, float]:
    status, text = await _call("GET", f"{admin}/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return {name: float(value) for name, value in _METRIC.findall(text)}


def _rss_mib(pid: int) -> tuple[float, float]:
    """VmRSS and VmHWM of ``pid`` in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


async def _until(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def _control_plane(directory: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """The real ``snapbright controlplane`` process; yields it and its admin URL once ready."""
    config = _config(directory)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "snapbright",
        "controlplane",
        "--config",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=(Path(WORKDIR or directory) / f"controlplane-{directory.parent.name}.log").open(
            "wb"
        ),
    )
    try:
        endpoints = directory / "state" / "endpoints.json"
        await _until(endpoints.exists, 30, "endpoints.json")
        admin = json.loads(endpoints.read_text())["clusters"][CLUSTER]["admin"]
        deadline = time.monotonic() + 30
        while (await _call("GET", f"{admin}/ready"))[0] != 200:
            if time.monotonic() > deadline or process.returncode is not None:
                raise RuntimeError("the control plane did not become ready")
            await asyncio.sleep(0.05)
        yield process, admin
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


def _peer_svid(ca: ClusterCA, cluster: str) -> X509Svid:
    """A control plane's SVID, as the process makes its own (peering checks these names)."""
    key = ec.generate_private_key(ec.SECP256R1())
    spiffe_id = control_plane_id(ca.trust_domain)
    chain = ca.sign_svid(
        spiffe_id,
        key.public_key(),
        datetime.now(UTC),
        timedelta(hours=2),
        dns_names=(control_plane_server_name(cluster, MESH), control_plane_host(ca.trust_domain)),
    )
    return X509Svid(spiffe_id, chain, key)


@dataclass
class _Peer:
    manager: PeeringManager
    address: str
    exported: int = 0

    def export(self, name: str) -> None:
        self.manager.set_service(
            ServiceKey(NAMESPACE, name), healthy_endpoints=1, exported_to=[CLUSTER]
        )
        self.exported += 1


async def _peers(directory: Path, per_peer: int) -> list[_Peer]:
    peers = []
    now = datetime.now(UTC) - timedelta(minutes=1)
    for index in range(PEERS):
        cluster = f"peer-{index}"
        ca = create_ca(TrustDomain.for_cluster(cluster, MESH), now)
        manager = PeeringManager(
            cluster=cluster,
            mesh=MESH,
            svid=_peer_svid(ca, cluster),
            bundle=ca.bundle(),
            state_dir=directory / cluster,
        )
        await manager.start()
        port = await manager.serve("127.0.0.1:0")
        manager.gateways = (GatewayAddress("127.0.0.1", port),)
        peer = _Peer(manager, f"127.0.0.1:{port}")
        for service in range(per_peer):
            peer.export(f"svc-{index}-{service}")
        peers.append(peer)
    return peers


@dataclass
class _Sidecar:
    """The subscribed sidecar's view: upstreams by name, and when each one last arrived."""

    arrived: dict[str, float] = field(default_factory=dict)

    def parse(self, snapshot: pb.Snapshot) -> Upstreams:
        now = time.monotonic()
        upstreams = {u.service: u for u in snapshot.upstreams}
        for name in upstreams:
            self.arrived.setdefault(name, now)
        return upstreams

    def parse_delta(self, previous: Upstreams, delta: pb.Snapshot) -> Upstreams:
        now = time.monotonic()
        upstreams = dict(previous)
        for name in delta.removed_upstreams:
            upstreams.pop(name.service, None)
        for upstream in delta.upstreams:
            upstreams[upstream.service] = upstream
            self.arrived[upstream.service] = now
        return upstreams

    def client(self, ca: ClusterCA, target: str) -> DiscoveryClient[Upstreams]:
        trust_domain = TrustDomain.for_cluster(CLUSTER, MESH)
        svid = ca.issue(
            SpiffeId.workload(trust_domain, NAMESPACE, "web"),
            datetime.now(UTC),
            timedelta(hours=1),
        )
        identity = pb.ProxyIdentity(
            role=pb.ProxyIdentity.ROLE_SIDECAR,
            cluster=CLUSTER,
            namespace=NAMESPACE,
            service_account="web",
            workload="web-1",
            service="web",
        )
        return DiscoveryClient(
            target,
            identity,
            svid,
            ca.bundle(),
            self.parse,
            parse_delta=self.parse_delta,
            backoff=Backoff(base_s=0.05, cap_s=0.2, stable_s=1.0),
        )


async def _establish(admin: str, peer: _Peer, attempts: int = 3) -> None:
    """``snapbright peering establish`` with a fresh token from ``peer``; a 502 (the peer's
    handshake failed: seen on a loaded machine) is retried with a new token."""
    for attempt in range(attempts):
        token = peer.manager.generate_token()
        status, body = await _call("POST", f"{admin}/api/v1/peering/establish", {"token": token})
        if status == 200:
            return
        print(f"... establish answered {status}: {body}", file=sys.stderr, flush=True)
        if status != 502 or attempt == attempts - 1:
            raise RuntimeError(f"establish answered {status}: {body}")
        # The control plane gave up ("no answer") but the peer may have recorded the
        # peering: forget it there too, or the retry is refused as "already peered".
        with contextlib.suppress(PeeringError):
            await peer.manager.delete(CLUSTER)
        await asyncio.sleep(1.0)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _fresh(client: DiscoveryClient[Upstreams], name: str) -> bool:
    try:
        upstream = client.current().get(name)
    except NoConfigYet:
        return False
    return upstream is not None and not any(t.stale for t in upstream.targets)


async def _run_size(total: int, changes: int, full: bool, rng: random.Random) -> dict[str, float]:
    per_peer = total // PEERS
    with tempfile.TemporaryDirectory(prefix=f"bench-federation-{total}-") as tmp:
        root = Path(tmp)
        async with _control_plane(root / CLUSTER) as (process, admin):
            started = time.monotonic()
            peers = await _peers(root, per_peer)
            try:
                for peer in peers:
                    await _establish(admin, peer)
                ca = load_ca(root / CLUSTER / "state")
                endpoints = json.loads((root / CLUSTER / "state" / "endpoints.json").read_text())
                target = endpoints["clusters"][CLUSTER]["discovery"]
                sidecar = _Sidecar()
                client = sidecar.client(ca, target)
                task = asyncio.create_task(client.run())
                try:
                    await _until(lambda: len(sidecar.arrived) >= total, 120, f"{total} upstreams")
                    setup_s = time.monotonic() - started
                    # A few failover ticks run before anything is measured.
                    await asyncio.sleep(3.0)
                    result = await _changes(admin, peers, sidecar, client, changes, COSTED, rng)
                    result["setup_s"] = setup_s
                    if full:
                        rss, hwm = _rss_mib(process.pid)
                        result["rss_mib"] = rss
                        result["rss_peak_mib"] = hwm
                        result.update(await _resync(peers[0], sidecar, ca, target, total))
                finally:
                    client.close()
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            finally:
                for peer in peers:
                    await peer.manager.close()
    return result


async def _changes(
    admin: str,
    peers: list[_Peer],
    sidecar: _Sidecar,
    client: DiscoveryClient[Upstreams],
    changes: int,
    costed: int,
    rng: random.Random,
) -> dict[str, float]:
    """``changes`` new services timed from peer to sidecar, then ``costed`` more with the
    control plane's counters read around each (a scrape of /metrics is itself O(services) of
    work for the control plane, so it stays out of the propagation sample)."""
    latencies: list[float] = []
    work: list[float] = []
    rebuild: list[float] = []
    sync: list[float] = []
    after: dict[str, float] = {}
    missing = 0
    for n in range(changes + costed):
        peer = rng.choice(peers)
        name = f"new-{peer.manager.trust_domain.name.split('.')[0]}-{n}"
        costing = n >= changes
        before = await _metrics(admin) if costing else {}
        t0 = time.monotonic()
        peer.export(name)
        try:
            await _until(functools.partial(contains, sidecar.arrived, name), 60, name)
        except TimeoutError:
            missing += 1  # counted at the bound: a p99 with these in it is a lower bound
        if not costing:
            latencies.append(sidecar.arrived.get(name, t0 + 60) - t0)
        if (n + 1) % 20 == 0:
            print(f"... {n + 1} changes", file=sys.stderr, flush=True)
        # Spaced out, and the control plane has finished the push (the ack) before counters.
        await asyncio.sleep(0.02 + rng.random() * 0.03)
        if not costing:
            continue
        after = await _metrics(admin)
        work.append(
            after["snapbright_controlplane_upstreams_federated_total"]
            - before["snapbright_controlplane_upstreams_federated_total"]
        )
        rebuild.append(
            after["snapbright_discovery_rebuild_seconds_sum"]
            - before["snapbright_discovery_rebuild_seconds_sum"]
        )
        sync.append(
            after["snapbright_controlplane_upstream_sync_seconds_sum"]
            - before["snapbright_controlplane_upstream_sync_seconds_sum"]
        )
    return {
        "propagation_p50_ms": _percentile(latencies, 0.5) * 1000,
        "propagation_p99_ms": _percentile(latencies, 0.99) * 1000,
        "propagation_max_ms": max(latencies) * 1000,
        "update_work_median": statistics.median(work),
        "update_rebuild_ms_median": statistics.median(rebuild) * 1000,
        "update_sync_ms_median": statistics.median(sync) * 1000,
        "deltas_applied": float(client.deltas),
        "changes_not_arrived_in_60s": float(missing),
        # How many (service, caller) pairs the failover loop's last tick decided.
        "failover_pairs": after.get("snapbright_failover_pairs", float("nan")),
    }


async def _resync(
    peer: _Peer, sidecar: _Sidecar, ca: ClusterCA, target: str, total: int
) -> dict[str, float]:
    """Drop peer-0's stream and the sidecar's; re-establish both; time the full resync."""
    port = int(peer.address.rsplit(":", 1)[1])
    await peer.manager.stop_serving()
    peer.export("during-outage")
    await asyncio.sleep(0.2)  # the control plane notices the stream ended
    expected = total + 1
    fresh = _Sidecar()
    t0 = time.monotonic()
    await peer.manager.serve(f"127.0.0.1:{port}")
    client = fresh.client(ca, target)
    task = asyncio.create_task(client.run())
    try:
        await _until(lambda: client.version != "", 60, "a first configuration")
        first_config_s = time.monotonic() - t0
        await _until(
            lambda: len(client.current()) >= expected and _fresh(client, "during-outage"),
            60,
            "the resynced configuration",
        )
        resync_s = time.monotonic() - t0
        upstreams = client.current()
        stale = sum(1 for u in upstreams.values() if any(t.stale for t in u.targets))
        await _until(
            lambda: not any(any(t.stale for t in u.targets) for u in client.current().values()),
            30,
            "no stale target",
        )
        unstale_s = time.monotonic() - t0
    finally:
        client.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return {
        "resync_s": max(resync_s, unstale_s),
        "resync_first_config_s": first_config_s,
        "resync_stale_at_first_full": float(stale),
    }


async def _main(sizes: list[int], changes: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    by_size: dict[int, dict[str, float]] = {}
    for total in sizes:
        print(f"... {total} services: setting up", file=sys.stderr, flush=True)
        by_size[total] = await _run_size(total, changes, full=total == max(sizes), rng=rng)
        print(f"... {total} services: {json.dumps(by_size[total])}", file=sys.stderr, flush=True)
    small, large = by_size[min(sizes)], by_size[max(sizes)]
    print(
        f"{'services':>9} {'setup s':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'work':>5} {'rebuild ms':>10} {'sync ms':>8}"
    )
    for total, row in by_size.items():
        print(
            f"{total:>9} {row['setup_s']:>8.1f} {row['propagation_p50_ms']:>7.1f} "
            f"{row['propagation_p99_ms']:>7.1f} {row['propagation_max_ms']:>7.1f} "
            f"{row['update_work_median']:>5.0f} {row['update_rebuild_ms_median']:>10.2f} "
            f"{row['update_sync_ms_median']:>8.2f}"
        )
    print(
        f"control plane RSS at {max(sizes)}: {large['rss_mib']:.0f} MiB "
        f"(peak {large['rss_peak_mib']:.0f} MiB); resync {large['resync_s']:.2f} s "
        f"(first complete config {large['resync_first_config_s']:.2f} s)"
    )
    return {
        "propagation_p50_ms": round(large["propagation_p50_ms"], 2),
        "propagation_p99_ms": round(large["propagation_p99_ms"], 2),
        "resync_s": round(large["resync_s"], 3),
        "rss_mib": round(large["rss_mib"], 1),
        "update_cost_growth": round(
            large["update_work_median"] / max(small["update_work_median"], 1e-9), 3
        ),
        "update_time_growth": round(
            large["update_rebuild_ms_median"] / max(small["update_rebuild_ms_median"], 1e-9), 3
        ),
        "services": max(sizes),
        "peers": PEERS,
        "changes": changes,
        "failover_interval": FAILOVER_INTERVAL or "1s",
        "failover_pairs": large["failover_pairs"],
        "by_size": {str(k): {n: round(v, 3) for n, v in row.items()} for k, row in by_size.items()},
    }


def main() -> None:
    """Run the benchmark and print the table, then the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--workdir", default=None, help="keep logs here (default: a temp dir)")
    parser.add_argument("--failover-interval", default="", help="e.g. 1h (default: 1s)")
    args = parser.parse_args()
    global WORKDIR, FAILOVER_INTERVAL
    WORKDIR = args.workdir
    FAILOVER_INTERVAL = args.failover_interval
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) < 2 or any(s % PEERS or s < PEERS for s in sizes):
        parser.error(f"--sizes needs two or more multiples of {PEERS}")
    print(json.dumps(asyncio.run(_main(sizes, args.changes, args.seed))))


if __name__ == "__main__":
    main()
