"""Benchmark: the sidecar's HTTP/1.1 forwarder against HAProxy's http mode (not a test).

    .venv/bin/python -m bench.http_forward [--seconds 5] [--rounds 3] [--connections 50]

One run starts, each as its own process on 127.0.0.1:

- a tiny backend (uvloop + httptools) answering every request with a small 200;
- the forwarder (`proxy.http.serve_outbound` on uvloop) routing ``Host: svc`` to it, through
  the sidecar's `MeshRouter` (P2C, breaker, retry budget, per-second stats and Prometheus
  metrics per request; its throwaway identity comes from the tests' certificate forge), or
  with ``--router static`` through plain round robin;
- Debian's haproxy, 1 thread (``nbthread 1``), http mode, keep-alive both sides, the same
  backend.

Throughput: wrk (1 thread, ``--connections`` persistent connections) against the forwarder
and haproxy, interleaved A B A B for ``--rounds`` rounds; medians are compared. Latency:
wrk with 1 connection against the backend directly, the forwarder and haproxy, interleaved;
the added p50 of each proxy is its p50 minus the direct p50. The last line printed is one
JSON object with ``l7_rps_ratio`` (target ≥ 0.75) and ``l7_added_p50_ratio`` (target ≤ 1.5).

On a shared machine wall-clock figures move with other load, so each throughput run also
reads the proxy process's CPU time (user + system, from /proc) and reports CPU microseconds
per request: ``l7_cpu_ratio`` is haproxy's over the sidecar's, the throughput ratio to expect
when the proxy has a core to itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench import harness
from proxy.http.core import Router


def _mesh_router(upstream: int) -> Router:
    """The sidecar's router (`MeshRouter` with its Prometheus metrics) for ``svc``."""
    from proxy.identity.bundle import TrustBundleSet
    from proxy.identity.model import SpiffeId, TrustDomain
    from proxy.sidecar.metrics import SidecarMetrics
    from proxy.sidecar.model import SidecarState, TargetState, UpstreamState
    from proxy.sidecar.router import MeshRouter
    from tests.proxy.identity.forge import forge_domain, forge_leaf

    # The router reads only upstreams and policies; the identity is a throwaway one.
    domain = forge_domain("bench.local")
    target = TargetState(
        name="svc",
        cluster="bench",
        weight=1.0,
        endpoints=(("127.0.0.1", upstream),),
        sni="svc.default.bench.local",
        trust_domain=TrustDomain("bench.local"),
    )
    state = SidecarState(
        local=SpiffeId.parse("spiffe://bench.local/ns/default/sa/bench"),
        service="bench",
        upstreams={"svc": UpstreamState("svc", "default", (target,))},
        traffic={},
        authorization=(),
        bundles=TrustBundleSet([domain.bundle()]),
        svid=forge_leaf(domain),
    )
    router = MeshRouter(metrics=SidecarMetrics("bench"))
    router.apply(state)
    return router


async def _run_sidecar(port: int, upstream: int, router: str) -> None:
    from proxy.http import serve_outbound

    routes: Router | dict[str, list[tuple[str, int]]]
    routes = _mesh_router(upstream) if router == "mesh" else {"svc": [("127.0.0.1", upstream)]}
    await serve_outbound("127.0.0.1", port, routes)
    await asyncio.Event().wait()


def _wrk(port: int, connections: int, seconds: float) -> tuple[float, float, int]:
    """Requests per second, p50 latency (seconds) and request count of one wrk run."""
    run = harness.wrk(f"http://127.0.0.1:{port}/", connections, seconds, host="svc")
    return run.rps, run.p50, run.requests


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--latency-seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--router",
        choices=["mesh", "static"],
        default="mesh",
        help="mesh: the sidecar's router with stats and metrics (default); static: round robin",
    )
    parser.add_argument("--role", choices=["backend", "sidecar"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.role is not None:
        import uvloop

        if args.role == "backend":
            uvloop.run(harness.run_backend(args.port))
        else:
            uvloop.run(_run_sidecar(args.port, args.upstream, args.router))
        return 0

    backend_port = harness.free_port()
    sidecar_port, haproxy_port = harness.free_port(), harness.free_port()
    me = [sys.executable, "-m", "bench.http_forward"]
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        scratch = Path(tmp)
        backend = [*me, "--role", "backend", "--port", str(backend_port)]
        stack.enter_context(harness.process(backend, scratch / "backend.log"))
        harness.wait_port(backend_port)
        sidecar = [*me, "--role", "sidecar", "--port", str(sidecar_port)]
        sidecar += ["--upstream", str(backend_port), "--router", args.router]
        procs = [stack.enter_context(harness.process(sidecar, scratch / "sidecar.log"))]
        config = harness.haproxy_config("http", port=haproxy_port, app=backend_port)
        procs.append(stack.enter_context(harness.haproxy(scratch, "haproxy", config)))
        harness.wait_port(sidecar_port)
        harness.wait_port(haproxy_port)
        # Warm up both (connections, pools, caches).
        _wrk(sidecar_port, args.connections, 1)
        _wrk(haproxy_port, args.connections, 1)

        rps: dict[str, list[float]] = {"sidecar": [], "haproxy": []}
        cpu: dict[str, list[float]] = {"sidecar": [], "haproxy": []}
        pids = {"sidecar": procs[0].pid, "haproxy": procs[1].pid}
        p50: dict[str, list[float]] = {"direct": [], "sidecar": [], "haproxy": []}
        ports = {"direct": backend_port, "sidecar": sidecar_port, "haproxy": haproxy_port}
        for round_ in range(args.rounds):
            for name in ("sidecar", "haproxy"):
                before = harness.cpu_seconds(pids[name])
                value, _, count = _wrk(ports[name], args.connections, args.seconds)
                per_request = (harness.cpu_seconds(pids[name]) - before) / count
                rps[name].append(value)
                cpu[name].append(per_request)
                print(
                    f"round {round_ + 1} c{args.connections} {name:8} {value:10.0f} req/s"
                    f"  {per_request * 1e6:6.1f} µs CPU/request"
                )
        for round_ in range(args.rounds):
            for name in ("direct", "sidecar", "haproxy"):
                _, value, _ = _wrk(ports[name], 1, args.latency_seconds)
                p50[name].append(value)
                print(f"round {round_ + 1} c1  {name:8} p50 {value * 1e6:8.1f} µs")

    med_rps = {name: statistics.median(values) for name, values in rps.items()}
    med_p50 = {name: statistics.median(values) for name, values in p50.items()}
    med_cpu = {name: statistics.median(values) for name, values in cpu.items()}
    cpu_ratio = med_cpu["haproxy"] / med_cpu["sidecar"]
    added = {name: med_p50[name] - med_p50["direct"] for name in ("sidecar", "haproxy")}
    rps_ratio = med_rps["sidecar"] / med_rps["haproxy"]
    p50_ratio = added["sidecar"] / added["haproxy"] if added["haproxy"] > 0 else float("inf")
    print()
    print(f"{'':10}{'req/s (median)':>16}{'p50 c1':>12}{'added p50':>12}{'CPU/req':>10}")
    print(f"{'direct':10}{'':>16}{med_p50['direct'] * 1e6:>10.1f}µs")
    for name in ("sidecar", "haproxy"):
        print(
            f"{name:10}{med_rps[name]:>16.0f}{med_p50[name] * 1e6:>10.1f}µs"
            f"{added[name] * 1e6:>10.1f}µs{med_cpu[name] * 1e6:>8.1f}µs"
        )
    print(f"l7_rps_ratio {rps_ratio:.3f} (target >= 0.75)")
    print(f"l7_added_p50_ratio {p50_ratio:.3f} (target <= 1.5)")
    print(f"l7_cpu_ratio {cpu_ratio:.3f} (haproxy CPU per request / sidecar's)")
    print(
        json.dumps(
            {
                "l7_rps_ratio": round(rps_ratio, 3),
                "l7_added_p50_ratio": round(p50_ratio, 3),
                "l7_cpu_ratio": round(cpu_ratio, 3),
                "sidecar_cpu_us_per_request": round(med_cpu["sidecar"] * 1e6, 2),
                "haproxy_cpu_us_per_request": round(med_cpu["haproxy"] * 1e6, 2),
                "sidecar_rps": round(med_rps["sidecar"]),
                "haproxy_rps": round(med_rps["haproxy"]),
                "direct_p50_us": round(med_p50["direct"] * 1e6, 1),
                "sidecar_added_p50_us": round(added["sidecar"] * 1e6, 1),
                "haproxy_added_p50_us": round(added["haproxy"] * 1e6, 1),
                "connections": args.connections,
                "router": args.router,
                "rounds": args.rounds,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
