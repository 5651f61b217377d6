"""Benchmark: the gateway's SNI passthrough against HAProxy's, TLS end to end (not a test).

    .venv/bin/python -m bench.gateway [--seconds 3] [--rounds 5] [--connections 50]

One run starts:

- a TLS backend: Debian's haproxy (1 thread) terminating TLS for
  ``payments.default.east.acme`` and answering every request with a small 200;
- the gateway twice, ``snapbright gateway --config …`` with ``forwarding: splice`` and with
  ``forwarding: protocol``, both routing that name to the backend;
- haproxy (1 thread) in tcp mode routing on ``req.ssl_sni`` after ``tcp-request
  inspect-delay`` (the equivalent configuration).

The load is wrk (1 thread, persistent keep-alive TLS connections). wrk sends the URL's host as
SNI, so it runs in a private mount namespace where ``/etc/hosts`` (bind-mounted over, for that
process only) maps the service name to 127.0.0.1. The proxies never see plaintext.

Rounds are interleaved (splice, haproxy, protocol, then protocol, haproxy, splice, …) and
medians are compared. The last line is JSON: ``gateway_rps_ratio`` is the default forwarding
mode's median over haproxy's (target ≥ 0.9); both modes are reported. The machine is shared,
so the proxies' own CPU time per request (from /proc) is reported too: it barely moves when
other work competes for the cores, while req/s does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

# Run as `python bench/gateway.py`, this directory comes first on sys.path and this file
# would shadow the `gateway` package.
if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

from bench import harness
from gateway.config.model import GatewaySpec

SERVICE = "payments.default.east.acme"
DEFAULT_MODE = GatewaySpec.model_fields["forwarding"].default


class Run(NamedTuple):
    """One wrk run through one proxy."""

    rps: float
    p50_us: float
    cpu_us_per_request: float  # the proxy's CPU time per request: robust to a shared machine


def _wrk(hosts: Path, port: int, pid: int, seconds: int, connections: int) -> Run:
    """One wrk run against ``port``, with the CPU that the proxy ``pid`` spent on it."""
    cpu_before = harness.cpu_seconds(pid)
    try:
        run = harness.wrk(f"https://{SERVICE}:{port}/", connections, seconds, hosts_file=hosts)
    except ValueError as error:
        raise RuntimeError(str(error)) from None
    cpu = harness.cpu_seconds(pid) - cpu_before
    count = run.requests
    return Run(run.rps, run.p50 * 1e6, cpu * 1e6 / count if count else float("nan"))


def main() -> int:
    """Run the interleaved rounds; print a table, then one line of JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    for tool in ("haproxy", "wrk", "unshare"):
        if shutil.which(tool) is None:
            print(f"bench/gateway.py needs {tool}", file=sys.stderr)
            return 2

    with tempfile.TemporaryDirectory(prefix="gwbench-") as tmp, ExitStack() as stack:
        scratch = Path(tmp)
        hosts = scratch / "hosts"
        hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {SERVICE}\n")
        pem = harness.service_pem(scratch, SERVICE)
        backend, router = harness.free_port(), harness.free_port()
        ports = {"splice": harness.free_port(), "protocol": harness.free_port(), "haproxy": router}
        config = harness.haproxy_config("tls-backend", port=backend, crt=pem)
        stack.enter_context(harness.haproxy(scratch, "backend", config))
        config = harness.haproxy_config("sni-router", port=router, sni=SERVICE, backend=backend)
        pids = {"haproxy": stack.enter_context(harness.haproxy(scratch, "router", config)).pid}
        harness.wait_port(backend)
        harness.wait_port(router)
        for mode in ("splice", "protocol"):
            gateway = harness.gateway(scratch, mode, ports[mode], backend)
            pids[mode] = stack.enter_context(gateway).pid

        runs: dict[str, list[Run]] = {name: [] for name in ports}
        try:
            for name in ports:  # warm up each path once
                _wrk(hosts, ports[name], pids[name], 1, args.connections)
            for round_ in range(args.rounds):
                # haproxy always runs between the two gateways; their order alternates.
                order = ["splice", "haproxy", "protocol"]
                for name in order if round_ % 2 == 0 else reversed(order):
                    run = _wrk(hosts, ports[name], pids[name], args.seconds, args.connections)
                    runs[name].append(run)
        except RuntimeError:
            for log in sorted(scratch.glob("*.log")):
                print(f"--- {log.name}\n{log.read_text()[-2000:]}", file=sys.stderr)
            raise

    medians = {name: statistics.median(r.rps for r in results) for name, results in runs.items()}
    p50s = {name: statistics.median(r.p50_us for r in results) for name, results in runs.items()}
    cpus = {
        name: statistics.median(r.cpu_us_per_request for r in results)
        for name, results in runs.items()
    }
    print(f"{'path':<28}{'median req/s':>14}{'p50 µs':>10}{'CPU µs/req':>12}   runs (req/s)")
    labels = {
        "splice": "gateway (os.splice)",
        "protocol": "gateway (asyncio Protocol)",
        "haproxy": "haproxy tcp req.ssl_sni",
    }
    for name, results in runs.items():
        each = " ".join(f"{r.rps:,.0f}" for r in results)
        print(
            f"{labels[name]:<28}{medians[name]:>14,.0f}{p50s[name]:>10,.0f}"
            f"{cpus[name]:>12.2f}   {each}"
        )
    haproxy = medians["haproxy"]
    result = {
        "gateway_rps_ratio": round(medians[DEFAULT_MODE] / haproxy, 3),
        "gateway_forwarding": DEFAULT_MODE,
        "gateway_splice_rps_ratio": round(medians["splice"] / haproxy, 3),
        "gateway_protocol_rps_ratio": round(medians["protocol"] / haproxy, 3),
        "haproxy_tcp_rps": round(haproxy),
        # Contention-robust companion: the proxy's own CPU per request, haproxy's over ours.
        "gateway_cpu_ratio": round(cpus["haproxy"] / cpus[DEFAULT_MODE], 3),
        "gateway_cpu_us_per_request": round(cpus[DEFAULT_MODE], 2),
        "haproxy_cpu_us_per_request": round(cpus["haproxy"], 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
