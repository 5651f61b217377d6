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
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# Run as `python bench/gateway.py`, this directory comes first on sys.path and this file
# would shadow the `gateway` package.
if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

from gateway.config.model import GatewaySpec

SERVICE = "payments.default.east.acme"
DEFAULT_MODE = GatewaySpec.model_fields["forwarding"].default


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def _wait_ready(admin_port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{admin_port}/ready"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the gateway on admin port {admin_port} never became ready")


def _backend_pem(scratch: Path) -> Path:
    """A CA-signed leaf for the service, cert and key in one file (haproxy's ``crt``)."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVICE)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVICE)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    path = scratch / "backend.pem"
    path.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


_HAPROXY_GLOBAL = """\
global
    nbthread 1
    maxconn 8000
defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""


@contextmanager
def _haproxy(scratch: Path, name: str, body: str) -> Iterator[int]:
    config = scratch / f"{name}.cfg"
    config.write_text(_HAPROXY_GLOBAL + body)
    log = (scratch / f"{name}.log").open("wb")
    process = subprocess.Popen(
        ["haproxy", "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@contextmanager
def _gateway(scratch: Path, mode: str, listen: int, backend: int) -> Iterator[int]:
    admin = _free_port()
    config = scratch / f"gateway-{mode}.yaml"
    config.write_text(
        f"""\
apiVersion: snapbright.io/v1alpha1
kind: GatewayConfig
metadata: {{name: bench-{mode}}}
spec:
  cluster: east
  mesh: acme
  forwarding: {mode}
  listen: {{address: 127.0.0.1, port: {listen}}}
  admin: {{address: 127.0.0.1, port: {admin}}}
  drainTimeout: 1s
  services:
    - name: payments
      exported: true
      endpoints: [{{address: 127.0.0.1, port: {backend}}}]
"""
    )
    log = (scratch / f"gateway-{mode}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "snapbright", "gateway", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_ready(admin)
        yield process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_REQUESTS = re.compile(r"(\d+) requests in")
_P50 = re.compile(r"50%\s+([\d.]+)(us|ms|s)\b")


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Run(NamedTuple):
    """One wrk run through one proxy."""

    rps: float
    p50_us: float
    cpu_us_per_request: float  # the proxy's CPU time per request: robust to a shared machine


def _wrk(hosts: Path, port: int, pid: int, seconds: int, connections: int) -> Run:
    """One wrk run against ``port``, with the CPU that the proxy ``pid`` spent on it."""
    url = f"https://{SERVICE}:{port}/"
    script = (
        f"mount --bind {hosts} /etc/hosts && "
        f"exec wrk -t1 -c{connections} -d{seconds}s --latency {url}"
    )
    cpu_before = _cpu_seconds(pid)
    out = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    cpu = _cpu_seconds(pid) - cpu_before
    rps = _RPS.search(out)
    if rps is None or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk failed or saw errors:\n{out}")
    p50 = _P50.search(out)
    scale = {"us": 1.0, "ms": 1e3, "s": 1e6}
    p50_us = float(p50[1]) * scale[p50[2]] if p50 else float("nan")
    requests = _REQUESTS.search(out)
    count = int(requests[1]) if requests else 0
    return Run(float(rps[1]), p50_us, cpu * 1e6 / count if count else float("nan"))


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
        pem = _backend_pem(scratch)
        backend, router = _free_port(), _free_port()
        ports = {"splice": _free_port(), "protocol": _free_port(), "haproxy": router}
        stack.enter_context(
            _haproxy(
                scratch,
                "backend",
                f"""\
frontend tls_backend
    mode http
    bind 127.0.0.1:{backend} ssl crt {pem} alpn http/1.1
    http-request return status 200 content-type text/plain string ok
""",
            )
        )
        pids = {}
        pids["haproxy"] = stack.enter_context(
            _haproxy(
                scratch,
                "router",
                f"""\
frontend sni_router
    mode tcp
    bind 127.0.0.1:{router}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend payments if {{ req.ssl_sni -i {SERVICE} }}
backend payments
    mode tcp
    server backend 127.0.0.1:{backend}
""",
            )
        )
        _wait_port(backend)
        _wait_port(router)
        for mode in ("splice", "protocol"):
            pids[mode] = stack.enter_context(_gateway(scratch, mode, ports[mode], backend))

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
