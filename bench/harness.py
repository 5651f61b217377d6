"""What the data-plane benchmarks share: ports, processes, haproxy, the backend, wrk.

Used by bench/dataplane.py, bench/http_forward.py and bench/gateway.py. Nothing here
measures on its own; the benchmarks compose these pieces and print their own tables.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import string
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = [
    "RESPONSE",
    "WrkRun",
    "cpu_seconds",
    "cpu_split",
    "free_port",
    "gateway",
    "haproxy",
    "haproxy_config",
    "open_fds",
    "parse_wrk",
    "process",
    "rss_kib",
    "run_backend",
    "service_pem",
    "wait_http_ok",
    "wait_port",
    "wrk",
]

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
"""The backend's answer to every request: small, keep-alive."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Return once something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU time (seconds) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of stat (utime, stime), counted after the command's closing paren.
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    return sum(cpu_split(pid))


def open_fds(pid: int) -> int:
    """How many file descriptors a process has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    """Resident set size of a process now (VmRSS, KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def private_kib(pid: int) -> tuple[int, int]:
    """(USS, PSS) of a process now, KiB: its private pages, and its fair share of shared ones.

    RSS counts every shared-library page each process maps (libpython, OpenSSL inside
    cryptography, ...) in full; on a node running many sidecars those pages are resident once.
    """
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Pss"]


def rss_after_kib(code: str) -> int:
    """VmRSS (KiB) of a fresh interpreter (this one's executable) once it has run ``code``:
    the floor under any process that needs what ``code`` loads. Median of three starts."""
    report = (
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS:')))"
    )
    runs = [
        int(
            subprocess.run(
                [sys.executable, "-c", f"{code}\n{report}"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        for _ in range(3)
    ]
    return sorted(runs)[1]


@contextmanager
def process(command: Sequence[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child process with its output in ``log``; SIGTERM (then SIGKILL) on exit."""
    with log.open("wb") as out:
        child = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT)
        try:
            yield child
        finally:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


HAPROXY_GLOBAL = """\
global
    nbthread 1
    maxconn 8000
    tune.ssl.cachesize 0
defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""
"""The global section every benchmark haproxy runs with: one thread, no TLS session cache."""


_TEMPLATES = Path(__file__).resolve().parent / "haproxy"


def haproxy_config(template: str, **values: object) -> str:
    """bench/haproxy/``template``.cfg with its ``$names`` filled in (all must be given)."""
    text = (_TEMPLATES / f"{template}.cfg").read_text()
    return string.Template(text).substitute({k: str(v) for k, v in values.items()})


@contextmanager
def haproxy(scratch: Path, name: str, body: str) -> Iterator[subprocess.Popen[bytes]]:
    """Debian's haproxy (1 thread) with :data:`HAPROXY_GLOBAL` plus ``body``."""
    config = scratch / f"{name}.cfg"
    config.write_text(HAPROXY_GLOBAL + body)
    with process(["haproxy", "-db", "-f", str(config)], scratch / f"{name}.log") as child:
        yield child


class _Backend(asyncio.Protocol):
    """Answers each request with :data:`RESPONSE`, keeping the connection."""

    def __init__(self) -> None:
        import httptools

        self._parser: Any = httptools.HttpRequestParser(self)
        self._transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except Exception:
            self._transport.close()

    def on_message_complete(self) -> None:
        self._transport.write(RESPONSE)


async def run_backend(port: int) -> None:
    """Serve the small backend (httptools; run it on uvloop) on 127.0.0.1:``port`` forever."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Backend, "127.0.0.1", port, backlog=4096)
    await server.serve_forever()


class WrkRun(NamedTuple):
    """One wrk run: throughput, latency percentiles (seconds), the request count, and how
    many requests went unanswered for longer than wrk's timeout (they are not failures)."""

    rps: float
    p50: float
    p99: float
    requests: int
    timeouts: int = 0


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_COUNT = re.compile(r"(\d+) requests in")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def _percentile(out: str, name: str) -> float:
    match = re.search(rf"^\s+{name}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if match is None:
        raise ValueError(f"no {name}% latency in the wrk output")
    return float(match[1]) * _UNITS[match[2]]


def parse_wrk(out: str) -> WrkRun:
    """Read ``wrk --latency`` output; errors (non-2xx, connect/read/write errors) raise
    ValueError, while slow answers (wrk's timeouts) are counted."""
    errors = _SOCKET_ERRORS.search(out)
    if "Non-2xx" in out or (errors is not None and any(int(n) for n in errors.groups()[:3])):
        raise ValueError(f"wrk saw errors:\n{out}")
    timeouts = int(errors[4]) if errors is not None else 0
    rps = _RPS.search(out)
    count = _COUNT.search(out)
    if rps is None or count is None:
        raise ValueError(f"cannot read wrk output:\n{out}")
    return WrkRun(
        float(rps[1]), _percentile(out, "50"), _percentile(out, "99"), int(count[1]), timeouts
    )


def wrk(
    url: str,
    connections: int,
    seconds: float,
    *,
    host: str | None = None,
    hosts_file: Path | None = None,
) -> WrkRun:
    """One closed-loop wrk run (1 thread) against ``url``.

    ``host`` sets the Host header. ``hosts_file`` runs wrk in a private mount namespace with
    that file over /etc/hosts, so that a https URL's name (which wrk sends as SNI) resolves
    to 127.0.0.1 for wrk alone.
    """
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s"]
    if host is not None:
        command += ["-H", f"Host: {host}"]
    command.append(url)
    if hosts_file is not None:
        script = f"mount --bind {hosts_file} /etc/hosts && exec {' '.join(command)}"
        command = ["unshare", "--mount", "sh", "-c", script]
    out = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=seconds + 30
    ).stdout
    return parse_wrk(out)


def wait_http_ok(url: str, timeout: float = 15.0) -> None:
    """Return once ``url`` answers 200 (a readiness endpoint)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - http only
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} never answered 200")


def service_pem(scratch: Path, name: str) -> Path:
    """A CA-signed leaf for DNS ``name``, cert and key in one file (haproxy's ``crt``)."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    path = scratch / f"{name}.pem"
    path.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


@contextmanager
def gateway(
    scratch: Path, mode: str, listen: int, backend: int
) -> Iterator[subprocess.Popen[bytes]]:
    """``snapbright gateway`` (forwarding ``mode``) on ``listen``, routing the exported
    service ``payments`` of cluster ``east`` in mesh ``acme`` (SNI
    ``payments.default.east.acme``) to 127.0.0.1:``backend``; yielded once ready."""
    admin = free_port()
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
    command = [sys.executable, "-m", "snapbright", "gateway", "--config", str(config)]
    with process(command, scratch / f"gateway-{mode}.log") as child:
        wait_http_ok(f"http://127.0.0.1:{admin}/ready")
        yield child
