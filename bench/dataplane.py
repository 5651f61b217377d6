"""Benchmark: the data plane (sidecar, sidecar pair over mTLS, gateway) against HAProxy.

    .venv/bin/python -m bench.dataplane [--seconds 4] [--rounds 3]

Not a test: one run takes a few minutes on this 2-core machine. It starts, each as its own
process on 127.0.0.1:

- the app: a small uvloop + httptools backend answering every request with a 200 (2 bytes);
- ``plain``: the real sidecar (`proxy.sidecar.process.Sidecar` over a static SidecarConfig:
  router, resilience cores, per-second stats, Prometheus metrics, admin, inbound listener)
  whose upstream connector is swapped for plain TCP after start, so that its outbound HTTP
  path can be compared with haproxy's http mode (the sidecar itself always dials peers with
  mTLS; this is the one change, and it is made here, not in the sidecar);
- ``A`` and ``B``: two ``snapbright sidecar --config FILE`` processes; the app calls A's
  outbound listener (``Host: svc``), A calls B's inbound over mTLS, B calls the app;
- the gateway: ``snapbright gateway --config FILE`` (its default forwarding mode) in front of a
  TLS endpoint (haproxy terminating TLS and answering 200 itself);
- Debian's haproxy, one thread each, in the equivalent configurations (bench/haproxy/*.cfg):
  http mode; an mTLS pair (http → TLS 1.3 with a client certificate, verify required →
  http); tcp mode routing on ``req.ssl_sni``.

Certificates: one trust domain, ``east.bench``, made with `federation.trust.ca.create_ca`; the
SVIDs of A (``sa/client``) and B (``sa/svc``, with the DNS SAN ``svc.default.east.bench``
because haproxy checks the server's name against the SNI it sends) serve haproxy as well
(``crt`` = chain + key, ``ca-file`` = the root). One domain is enough here: the pair measures
the cost of mTLS, and the foreign-domain rules are covered by the sidecar's tests.

Measurements, each pair interleaved (A B, then B A, … for ``--rounds`` rounds; medians):

- ``l7_rps_ratio``: wrk -t1 -c50 through ``plain`` vs haproxy http mode;
- ``l7_added_p50_ratio``: wrk -c1 p50 through each minus the p50 direct to the app;
- ``mtls_rps_ratio``: wrk -c50 through A → B vs haproxy → TLS → haproxy;
- ``gateway_rps_ratio``: wrk -c50 over TLS (SNI ``payments.default.east.acme``, resolved in a
  private mount namespace) through the gateway vs haproxy tcp ``req.ssl_sni``;
- ``mtls_p99_ratio``: p99 through A → B vs the haproxy pair at one fixed offered rate, 70 % of
  the haproxy pair's median wrk throughput, measured by bench/loadgen/openloop.c (when that
  rate is beyond the sidecar pair's capacity, its queue grows for the whole run and this ratio
  says "overloaded" more than "slow tail"; so ``mtls_p99_ratio_at_sidecar_rate`` repeats the
  comparison at 70 % of the sidecar pair's own median throughput);
- ``handshake_ratio``: full mTLS handshakes per second against B's inbound vs haproxy's TLS
  frontend, by bench/loadgen/handshake.c;
- ``sidecar_rss_idle_mib`` (A after start, before any traffic), ``sidecar_rss_load_mib`` (A's
  largest VmRSS sampled during its c50 runs), ``sidecar_kib_per_conn`` (A's VmRSS with 1,000
  idle keep-alive client connections, each having made one request, minus before, per
  connection; ``sidecar_fds_per_idle_conn`` counts A's file descriptors the same way, which
  shows whether an idle client connection also holds an upstream connection);
  ``sidecar_uss_idle_mib`` and ``sidecar_pss_idle_mib`` beside it (A's private pages, and its
  share of the shared-library pages that RSS counts in full in every process);
  ``python_rss_mib``, ``runtime_libraries_rss_mib`` and ``config_libraries_rss_mib`` are the
  floor under it: the RSS of fresh interpreters that run nothing, import the data plane's
  libraries, and also build one pydantic model from YAML (``_RSS_LAYERS``).

Why our own open-loop generator: wrk is closed loop (a stalled response delays the next
send, so the stall is measured once: coordinated omission) and wrk2 is not in Debian.
Debian's ``h2load --rps`` (nghttp2 1.52) paces each client's requests, but it times each
request from when it was actually written, not from when the schedule wanted it written, so
a proxy stall that delays sends hides from its latency too. openloop.c keeps a fixed schedule
per connection (CONNECTIONS keep-alive connections, RATE requests/s overall), allows one
outstanding request per connection and measures each latency from the INTENDED send time
(the wrk2 model); it also reports how many sends went out late. Handshakes: ``openssl s_time``
has no client-certificate mode worth the name and reuses sessions with ``-reuse``; handshake.c
runs N concurrent non-blocking full handshakes (fresh SSL object, no session, client
certificate, TLS 1.3), and waits for the server to close after its close_notify so that a
counted handshake is one the server finished and accepted. Both are compiled with gcc at run
time (libssl-dev is apt-installed if missing).

The machine is shared (2 cores, other work may run), so wall-clock figures move; each wrk run
also reads the proxies' CPU time from /proc and the table shows CPU µs per request (for the
pairs, both proxies together; split into user and system time), a figure other load moves
far less. The last line printed is one
JSON object with the ratios and the targets' verdicts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import yaml

# Run as `python bench/dataplane.py`, this directory comes first on sys.path and
# bench/gateway.py would shadow the `gateway` package.
if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

from bench import harness

__all__ = ["TARGETS", "OpenLoopRun", "main", "parse_key_values", "verdicts"]

_MESH = "bench"
_CLUSTER = "east"
_SNI = f"svc.default.{_CLUSTER}.{_MESH}"
_GATEWAY_SNI = "payments.default.east.acme"
_LOADGEN = Path(__file__).resolve().parent / "loadgen"

# What sidecar A's idle RSS is made of, measured as fresh interpreters that run only:
# - nothing;
# - imports of the libraries the data plane is built on (asyncio with ssl, uvloop, httptools;
#   pyOpenSSL, whose OpenSSL lives in cryptography's Rust extension, for the TLS engine; and
#   prometheus-client for the metrics);
# - those, and PyYAML, and one pydantic model built and validated (pydantic loads most of
#   itself only when the first model class is built).
_RUNTIME_LIBRARIES = "import asyncio, ssl, uvloop, httptools, OpenSSL.SSL, prometheus_client"
_RSS_LAYERS: dict[str, str] = {
    "python": "",
    "runtime libraries": _RUNTIME_LIBRARIES,
    "+ config libraries": f"""{_RUNTIME_LIBRARIES}
import yaml, pydantic
class Model(pydantic.BaseModel):
    port: int
Model.model_validate(yaml.safe_load("port: 80"))""",
}

TARGETS: dict[str, tuple[str, float]] = {
    "l7_rps_ratio": (">=", 0.75),
    "l7_added_p50_ratio": ("<=", 1.5),
    "mtls_rps_ratio": (">=", 0.75),
    "mtls_p99_ratio": ("<=", 1.5),
    "gateway_rps_ratio": (">=", 0.9),
    "handshake_ratio": (">=", 0.85),
    "sidecar_rss_idle_mib": ("<=", 40.0),
    "sidecar_kib_per_conn": ("<=", 16.0),
}
"""Each figure's target from the data-plane issue: (comparison, bound)."""


def verdicts(results: dict[str, Any]) -> dict[str, bool]:
    """Whether each targeted figure in ``results`` meets its target."""
    met = {}
    for name, (op, bound) in TARGETS.items():
        value = results[name]
        met[name] = value >= bound if op == ">=" else value <= bound
    return met


def parse_key_values(line: str) -> dict[str, float]:
    """The ``key=value`` pairs the load tools print (numbers only)."""
    pairs = {}
    for field in line.split():
        key, sep, value = field.partition("=")
        if not sep:
            raise ValueError(f"not key=value: {field!r} in {line!r}")
        pairs[key] = float(value)
    return pairs


class OpenLoopRun(NamedTuple):
    """One openloop run: achieved rate, latency percentiles (µs), late sends."""

    rate: float
    p50_us: float
    p99_us: float
    p999_us: float
    late: int


# --- processes -------------------------------------------------------------------------------


def _build_tools(out: Path) -> dict[str, Path]:
    """Compile the load tools (apt-installing libssl-dev if its headers are missing)."""
    if not Path("/usr/include/openssl/ssl.h").exists():
        subprocess.run(["apt-get", "install", "-y", "-q", "libssl-dev"], check=True)
    tools = {}
    for name, libs in (("openloop", []), ("handshake", ["-lssl", "-lcrypto"])):
        binary = out / name
        subprocess.run(
            ["gcc", "-O2", "-Wall", "-o", str(binary), str(_LOADGEN / f"{name}.c"), *libs],
            check=True,
        )
        tools[name] = binary
    return tools


class _Pki(NamedTuple):
    ca: Path  # the root, PEM
    bundle: Path  # the SPIFFE bundle of east.bench
    client: tuple[Path, Path]  # A's SVID: chain, key
    server: tuple[Path, Path]  # B's SVID
    client_pem: Path  # chain + key, for haproxy's crt
    server_pem: Path


def _pki(scratch: Path) -> _Pki:
    from cryptography.hazmat.primitives import serialization

    from federation.trust.ca import create_ca
    from proxy.identity.bundle import format_bundle
    from proxy.identity.model import SpiffeId, TrustDomain
    from proxy.identity.svid import X509Svid

    now = datetime.now(UTC)
    ca = create_ca(TrustDomain.for_cluster(_CLUSTER, _MESH), now - timedelta(hours=1))
    paths: dict[str, tuple[Path, Path, Path]] = {}
    for account, dns in (("client", ()), ("svc", (_SNI,))):
        spiffe_id = SpiffeId.workload(ca.trust_domain, "default", account)
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        chain = ca.sign_svid(spiffe_id, key.public_key(), now - timedelta(minutes=1), dns_names=dns)
        svid = X509Svid(spiffe_id, chain, key)
        cert, key_path, both = (scratch / f"{account}{ext}" for ext in (".pem", ".key", ".crt"))
        cert.write_bytes(svid.chain_pem())
        key_path.write_bytes(svid.key_pem())
        both.write_bytes(svid.chain_pem() + svid.key_pem())
        paths[account] = (cert, key_path, both)
    root = scratch / "root.pem"
    root.write_bytes(ca.active.root.public_bytes(serialization.Encoding.PEM))
    bundle = scratch / "east.bench.bundle.json"
    bundle.write_bytes(format_bundle(ca.bundle()))
    return _Pki(
        root,
        bundle,
        paths["client"][:2],
        paths["svc"][:2],
        paths["client"][2],
        paths["svc"][2],
    )


def _sidecar_config(
    path: Path,
    pki: _Pki,
    account: str,
    app: int,
    ports: dict[str, int],
    upstream: int | None,
) -> Path:
    cert, key = pki.client if account == "client" else pki.server
    spec: dict[str, Any] = {
        "identity": {
            "cluster": _CLUSTER,
            "mesh": _MESH,
            "serviceAccount": account,
            "service": account,
        },
        "app": {"address": "127.0.0.1", "port": app},
        "listeners": {
            "outbound": {"port": ports["outbound"]},
            "inbound": {"address": "127.0.0.1", "port": ports["inbound"]},
            "admin": {"port": ports["admin"]},
        },
        "tls": {
            "certificate": str(cert),
            "key": str(key),
            "bundles": [{"trustDomain": f"{_CLUSTER}.{_MESH}", "path": str(pki.bundle)}],
        },
        "drainTimeout": "1s",
        "upstreams": [],
        "policies": [],
    }
    if upstream is not None:
        spec["upstreams"] = [
            {
                "service": "svc",
                "targets": [
                    {
                        "cluster": _CLUSTER,
                        "endpoints": [{"address": "127.0.0.1", "port": upstream}],
                    }
                ],
            }
        ]
    document = {
        "apiVersion": "snapbright.io/v1alpha1",
        "kind": "SidecarConfig",
        "metadata": {"name": f"bench-{path.stem}"},
        "spec": spec,
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _listener_ports() -> dict[str, int]:
    return {name: harness.free_port() for name in ("outbound", "inbound", "admin")}


@contextmanager
def _sidecar(
    command: list[str], scratch: Path, name: str, ports: dict[str, int]
) -> Iterator[subprocess.Popen[bytes]]:
    with harness.process(command, scratch / f"{name}.log") as child:
        harness.wait_http_ok(f"http://127.0.0.1:{ports['admin']}/ready")
        yield child


async def _serve_plain_sidecar(config_path: Path) -> None:
    """The real sidecar, with its upstream connections in plain TCP (see the docstring)."""
    import asyncio

    from proxy.sidecar.process import Sidecar
    from proxy.sidecar.source import SidecarFileSource

    source = SidecarFileSource(config_path)
    sidecar = Sidecar(source.config, source)
    await sidecar.start()
    assert sidecar.outbound is not None
    # The only change from the product: the pool dials plain TCP instead of mTLS.
    sidecar.outbound._shared.pool.connector = None
    await asyncio.Event().wait()


# --- load ------------------------------------------------------------------------------------


class _Measured(NamedTuple):
    run: harness.WrkRun
    cpu_us: float  # the proxies' CPU time per request, µs
    user_us: float  # of which in user space
    sys_us: float  # of which in the kernel


def _wrk_measured(
    url: str, pids: list[int], connections: int, seconds: float, **kwargs: Any
) -> _Measured:
    before = [harness.cpu_split(pid) for pid in pids]
    run = harness.wrk(url, connections, seconds, **kwargs)
    after = [harness.cpu_split(pid) for pid in pids]
    per = 1e6 / max(run.requests, 1)
    user = sum(a[0] - b[0] for a, b in zip(after, before, strict=True)) * per
    system = sum(a[1] - b[1] for a, b in zip(after, before, strict=True)) * per
    return _Measured(run, user + system, user, system)


def _openloop(tool: Path, port: int, rate: float, seconds: float) -> OpenLoopRun:
    out = subprocess.run(
        [str(tool), "127.0.0.1", str(port), "50", f"{rate:.0f}", f"{seconds:g}", "1", "svc"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    values = parse_key_values(out.stdout.strip())
    if out.returncode != 0 or values.get("errors", 1) > 0:
        raise RuntimeError(f"openloop failed: {out.stdout}{out.stderr}")
    return OpenLoopRun(
        values["rate"], values["p50_us"], values["p99_us"], values["p999_us"], int(values["late"])
    )


def _handshakes(tool: Path, port: int, pki: _Pki, seconds: float, pid: int) -> tuple[float, float]:
    """Handshakes per second against ``port``, and the server's CPU µs per handshake."""
    cert, key = pki.client
    before = harness.cpu_seconds(pid)
    out = subprocess.run(
        [
            str(tool),
            "127.0.0.1",
            str(port),
            "32",
            f"{seconds:g}",
            str(cert),
            str(key),
            str(pki.ca),
            _SNI,
            "http/1.1",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    cpu = harness.cpu_seconds(pid) - before
    values = parse_key_values(out.stdout.strip())
    if out.returncode != 0 or values["errors"] > values["handshakes"] * 0.01:
        raise RuntimeError(f"handshake failed: {out.stdout}{out.stderr}")
    return values["rate"], cpu * 1e6 / max(values["handshakes"], 1)


class _RssSampler:
    """The largest VmRSS of one process while active (sampled every 0.2 s)."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.peak_kib = 0
        self._active = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            if self._active.is_set():
                self.peak_kib = max(self.peak_kib, harness.rss_kib(self._pid))

    @contextmanager
    def sampling(self) -> Iterator[None]:
        self._active.set()
        try:
            yield
        finally:
            self._active.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _idle_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` keep-alive connections to ``port``, each after one answered request."""
    request = b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n"
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(request)
        data = b""
        while not data.endswith(b"\r\n\r\nok"):
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError("the sidecar closed an idle-test connection")
            data += chunk
        sockets.append(sock)
    return sockets


def _interleaved(
    rounds: int, names: tuple[str, str], measure: Callable[[str], Any]
) -> dict[str, list[Any]]:
    """``measure(name)`` for A B, B A, A B … over ``rounds`` rounds."""
    results: dict[str, list[Any]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else tuple(reversed(names)):
            results[name].append(measure(name))
    return results


# --- the run ---------------------------------------------------------------------------------


def _run(args: argparse.Namespace, scratch: Path, stack: ExitStack) -> dict[str, Any]:
    tools = _build_tools(scratch)
    pki = _pki(scratch)
    me = [sys.executable, "-m", "bench.dataplane"]
    snapbright = [sys.executable, "-m", "snapbright", "sidecar", "--config"]

    app = harness.free_port()
    stack.enter_context(
        harness.process([*me, "--role", "backend", "--port", str(app)], scratch / "app.log")
    )
    harness.wait_port(app)

    # The sidecars. A is measured for memory before anything else runs through it.
    plain_ports, a_ports, b_ports = _listener_ports(), _listener_ports(), _listener_ports()
    b_config = _sidecar_config(scratch / "b.yaml", pki, "svc", app, b_ports, None)
    b = stack.enter_context(_sidecar([*snapbright, str(b_config)], scratch, "sidecar-b", b_ports))
    a_config = _sidecar_config(scratch / "a.yaml", pki, "client", app, a_ports, b_ports["inbound"])
    a = stack.enter_context(_sidecar([*snapbright, str(a_config)], scratch, "sidecar-a", a_ports))
    plain_config = _sidecar_config(scratch / "plain.yaml", pki, "client", app, plain_ports, app)
    plain = stack.enter_context(
        _sidecar(
            [*me, "--role", "plain-sidecar", "--config", str(plain_config)],
            scratch,
            "sidecar-plain",
            plain_ports,
        )
    )
    time.sleep(1.0)
    rss_idle_kib = harness.rss_kib(a.pid)
    uss_idle_kib, pss_idle_kib = harness.private_kib(a.pid)
    rss_layers = {name: harness.rss_after_kib(code) for name, code in _RSS_LAYERS.items()}

    # haproxy: http mode, the mTLS pair, and the SNI router; the TLS endpoint for the gateway.
    hp = {name: harness.free_port() for name in ("http", "client", "server", "router", "tls")}
    proxies: dict[str, subprocess.Popen[bytes]] = {}
    proxies["haproxy-http"] = stack.enter_context(
        harness.haproxy(scratch, "http", harness.haproxy_config("http", port=hp["http"], app=app))
    )
    proxies["haproxy-server"] = stack.enter_context(
        harness.haproxy(
            scratch,
            "server",
            harness.haproxy_config(
                "mtls-server", port=hp["server"], crt=pki.server_pem, ca=pki.ca, app=app
            ),
        )
    )
    proxies["haproxy-client"] = stack.enter_context(
        harness.haproxy(
            scratch,
            "client",
            harness.haproxy_config(
                "mtls-client",
                port=hp["client"],
                peer=hp["server"],
                crt=pki.client_pem,
                ca=pki.ca,
                sni=_SNI,
            ),
        )
    )
    tls_pem = harness.service_pem(scratch, _GATEWAY_SNI)
    stack.enter_context(
        harness.haproxy(
            scratch, "tls", harness.haproxy_config("tls-backend", port=hp["tls"], crt=tls_pem)
        )
    )
    proxies["haproxy-router"] = stack.enter_context(
        harness.haproxy(
            scratch,
            "router",
            harness.haproxy_config(
                "sni-router", port=hp["router"], sni=_GATEWAY_SNI, backend=hp["tls"]
            ),
        )
    )
    from gateway.config.model import GatewaySpec

    mode = GatewaySpec.model_fields["forwarding"].default
    gateway_port = harness.free_port()
    gw = stack.enter_context(harness.gateway(scratch, mode, gateway_port, hp["tls"]))
    for port in hp.values():
        harness.wait_port(port)
    hosts = scratch / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {_GATEWAY_SNI}\n")

    def http(port: int) -> str:
        return f"http://127.0.0.1:{port}/"

    gateway_url = f"https://{_GATEWAY_SNI}:{{}}/"
    # (url, pids whose CPU counts, wrk options) per path under test.
    paths: dict[str, tuple[str, list[int], dict[str, Any]]] = {
        "l7 sidecar": (http(plain_ports["outbound"]), [plain.pid], {"host": "svc"}),
        "l7 haproxy": (http(hp["http"]), [proxies["haproxy-http"].pid], {"host": "svc"}),
        "mtls sidecars": (http(a_ports["outbound"]), [a.pid, b.pid], {"host": "svc"}),
        "mtls haproxy": (
            http(hp["client"]),
            [proxies["haproxy-client"].pid, proxies["haproxy-server"].pid],
            {"host": "svc"},
        ),
        "gateway": (gateway_url.format(gateway_port), [gw.pid], {"hosts_file": hosts}),
        "gateway haproxy": (
            gateway_url.format(hp["router"]),
            [proxies["haproxy-router"].pid],
            {"hosts_file": hosts},
        ),
    }
    sampler = _RssSampler(a.pid)
    stack.callback(sampler.close)

    def c50(name: str) -> _Measured:
        url, pids, options = paths[name]
        if name == "mtls sidecars":
            with sampler.sampling():
                result = _wrk_measured(url, pids, 50, args.seconds, **options)
        else:
            result = _wrk_measured(url, pids, 50, args.seconds, **options)
        print(
            f"  c50 {name:<16} {result.run.rps:>9,.0f} req/s {result.cpu_us:>7.1f} µs CPU/req"
            f" ({result.user_us:.1f} user + {result.sys_us:.1f} sys)"
            + (f", {result.run.timeouts} over 10 s" if result.run.timeouts else "")
        )
        return result

    print("warm-up")
    for name in paths:
        c50(name)
    results: dict[str, list[_Measured]] = {}
    for pair in (
        ("l7 sidecar", "l7 haproxy"),
        ("mtls sidecars", "mtls haproxy"),
        ("gateway", "gateway haproxy"),
    ):
        print(f"{pair[0]} vs {pair[1]}, c50")
        results.update(_interleaved(args.rounds, pair, c50))

    print("added latency, c1")
    c1_urls = {
        "direct": http(app),
        "l7 sidecar": paths["l7 sidecar"][0],
        "l7 haproxy": paths["l7 haproxy"][0],
    }
    c1: dict[str, list[float]] = {name: [] for name in c1_urls}
    for round_ in range(args.rounds):
        names = list(c1_urls) if round_ % 2 == 0 else list(reversed(c1_urls))
        for name in names:
            run = harness.wrk(c1_urls[name], 1, args.latency_seconds, host="svc")
            c1[name].append(run.p50)
            print(f"  c1 {name:<12} p50 {run.p50 * 1e6:7.1f} µs")

    mtls_haproxy_rps = statistics.median(m.run.rps for m in results["mtls haproxy"])
    rate = 0.7 * mtls_haproxy_rps
    print(f"open loop at {rate:,.0f} req/s (70 % of the haproxy pair), 50 connections")
    open_ports = {"mtls sidecars": a_ports["outbound"], "mtls haproxy": hp["client"]}

    def open_loop(name: str) -> OpenLoopRun:
        run = _openloop(tools["openloop"], open_ports[name], rate, args.open_seconds)
        print(
            f"  {name:<14} rate {run.rate:>8,.0f}  p50 {run.p50_us:>8.0f} µs"
            f"  p99 {run.p99_us:>8.0f} µs  p99.9 {run.p999_us:>8.0f} µs  late {run.late}"
        )
        return run

    open_results = _interleaved(args.rounds, ("mtls sidecars", "mtls haproxy"), open_loop)
    # A companion at a rate both sustain: 70 % of the sidecar pair's own maximum.
    rate_both = 0.7 * min(
        mtls_haproxy_rps, statistics.median(m.run.rps for m in results["mtls sidecars"])
    )
    print(f"open loop at {rate_both:,.0f} req/s (70 % of the sidecar pair), 50 connections")
    rate, rate_high = rate_both, rate
    open_both = _interleaved(args.rounds, ("mtls sidecars", "mtls haproxy"), open_loop)
    rate = rate_high

    print("full mTLS handshakes, 32 in flight")
    hs_targets = {
        "sidecar inbound": (b_ports["inbound"], b.pid),
        "haproxy": (hp["server"], proxies["haproxy-server"].pid),
    }

    def handshake(name: str) -> tuple[float, float]:
        port, pid = hs_targets[name]
        value = _handshakes(tools["handshake"], port, pki, args.seconds, pid)
        print(f"  {name:<16} {value[0]:>8,.0f} handshakes/s {value[1]:>8.0f} µs CPU each")
        return value

    hs = _interleaved(args.rounds, ("sidecar inbound", "haproxy"), handshake)

    print("memory: 1,000 idle keep-alive connections to sidecar A's outbound listener")
    time.sleep(1.0)
    rss_before, fds_before = harness.rss_kib(a.pid), harness.open_fds(a.pid)
    conns = _idle_connections(a_ports["outbound"], 1000)
    time.sleep(1.0)
    rss_with, fds_with = harness.rss_kib(a.pid), harness.open_fds(a.pid)
    for sock in conns:
        sock.close()
    print(
        f"  VmRSS {rss_before} KiB before, {rss_with} KiB with 1,000 connections;"
        f" open fds {fds_before} before, {fds_with} with"
    )

    def med(values: list[float]) -> float:
        return statistics.median(values)

    rps = {name: med([m.run.rps for m in runs]) for name, runs in results.items()}
    cpu = {name: med([m.cpu_us for m in runs]) for name, runs in results.items()}
    p50 = {name: med(values) for name, values in c1.items()}
    added = {name: p50[name] - p50["direct"] for name in ("l7 sidecar", "l7 haproxy")}
    p99 = {name: med([r.p99_us for r in runs]) for name, runs in open_results.items()}
    p99_both = {name: med([r.p99_us for r in runs]) for name, runs in open_both.items()}
    hs_rate = {name: med([r[0] for r in runs]) for name, runs in hs.items()}
    hs_cpu = {name: med([r[1] for r in runs]) for name, runs in hs.items()}

    print()
    user = {name: med([m.user_us for m in runs]) for name, runs in results.items()}
    system = {name: med([m.sys_us for m in runs]) for name, runs in results.items()}
    print(f"{'path':<18}{'req/s':>10}{'CPU µs/req':>12}{'user':>7}{'sys':>7}   each round (req/s)")
    for name, runs in results.items():
        each = " ".join(f"{m.run.rps:,.0f}" for m in runs)
        print(
            f"{name:<18}{rps[name]:>10,.0f}{cpu[name]:>12.1f}{user[name]:>7.1f}"
            f"{system[name]:>7.1f}   {each}"
        )
    print(f"{'c1 p50':<18}" + "  ".join(f"{n} {v * 1e6:.1f} µs" for n, v in p50.items()))
    print(f"{'added p50':<18}" + "  ".join(f"{n} {v * 1e6:.1f} µs" for n, v in added.items()))
    print(
        f"{'open-loop p99':<18}"
        + "  ".join(f"{n} {v:,.0f} µs" for n, v in p99.items())
        + f"  at {rate:,.0f} req/s"
    )
    print(
        f"{'open-loop p99':<18}"
        + "  ".join(f"{n} {v:,.0f} µs" for n, v in p99_both.items())
        + f"  at {rate_both:,.0f} req/s"
    )
    print(
        f"{'handshakes/s':<18}"
        + "  ".join(f"{n} {hs_rate[n]:,.0f} ({hs_cpu[n]:.0f} µs CPU)" for n in hs_rate)
    )
    print(
        f"{'sidecar A VmRSS':<18}idle {rss_idle_kib / 1024:.1f} MiB, under load "
        f"{sampler.peak_kib / 1024:.1f} MiB, +{(rss_with - rss_before) / 1000:.1f} KiB/conn,"
        f" +{(fds_with - fds_before) / 1000:.2f} fds/conn"
    )
    print(
        f"{'sidecar A idle':<18}USS {uss_idle_kib / 1024:.1f} MiB (private), "
        f"PSS {pss_idle_kib / 1024:.1f} MiB (shared pages split among the processes mapping them)"
    )
    print(
        f"{'idle RSS floor':<18}"
        + ", ".join(f"{name} {kib / 1024:.1f} MiB" for name, kib in rss_layers.items())
        + f"; sidecar A {rss_idle_kib / 1024:.1f} MiB"
    )

    ratio_p50 = added["l7 sidecar"] / added["l7 haproxy"] if added["l7 haproxy"] > 0 else 99.0
    summary: dict[str, Any] = {
        "l7_rps_ratio": round(rps["l7 sidecar"] / rps["l7 haproxy"], 3),
        "l7_added_p50_ratio": round(ratio_p50, 3),
        "mtls_rps_ratio": round(rps["mtls sidecars"] / rps["mtls haproxy"], 3),
        "gateway_rps_ratio": round(rps["gateway"] / rps["gateway haproxy"], 3),
        "mtls_p99_ratio": round(p99["mtls sidecars"] / p99["mtls haproxy"], 3),
        "handshake_ratio": round(hs_rate["sidecar inbound"] / hs_rate["haproxy"], 3),
        "sidecar_rss_idle_mib": round(rss_idle_kib / 1024, 1),
        "sidecar_rss_load_mib": round(sampler.peak_kib / 1024, 1),
        "sidecar_uss_idle_mib": round(uss_idle_kib / 1024, 1),
        "sidecar_pss_idle_mib": round(pss_idle_kib / 1024, 1),
        "sidecar_kib_per_conn": round((rss_with - rss_before) / 1000, 2),
        "python_rss_mib": round(rss_layers["python"] / 1024, 1),
        "runtime_libraries_rss_mib": round(rss_layers["runtime libraries"] / 1024, 1),
        "config_libraries_rss_mib": round(rss_layers["+ config libraries"] / 1024, 1),
        # Contention-robust companions: haproxy's CPU per request (handshake) over ours.
        "l7_cpu_ratio": round(cpu["l7 haproxy"] / cpu["l7 sidecar"], 3),
        "mtls_cpu_ratio": round(cpu["mtls haproxy"] / cpu["mtls sidecars"], 3),
        "gateway_cpu_ratio": round(cpu["gateway haproxy"] / cpu["gateway"], 3),
        "handshake_cpu_ratio": round(hs_cpu["haproxy"] / hs_cpu["sidecar inbound"], 3),
        "mtls_p99_ratio_at_sidecar_rate": round(
            p99_both["mtls sidecars"] / p99_both["mtls haproxy"], 3
        ),
        "sidecar_fds_per_idle_conn": round((fds_with - fds_before) / 1000, 2),
        "wrk_timeouts": {
            name: sum(m.run.timeouts for m in runs)
            for name, runs in results.items()
            if any(m.run.timeouts for m in runs)
        },
        "haproxy_l7_rps": round(rps["l7 haproxy"]),
        "haproxy_mtls_rps": round(rps["mtls haproxy"]),
        "open_loop_rate": round(rate),
        "open_loop_rate_sidecar": round(rate_both),
        "gateway_forwarding": mode,
        "rounds": args.rounds,
    }
    summary["targets_met"] = verdicts(summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or one of its child roles); print a table, then one line of JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per c50 and handshake run")
    parser.add_argument("--latency-seconds", type=float, default=3.0, help="per c1 run")
    parser.add_argument("--open-seconds", type=float, default=6.0, help="per open-loop run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--role", choices=["backend", "plain-sidecar"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.role is not None:
        import uvloop

        if args.role == "backend":
            uvloop.run(harness.run_backend(args.port))
        else:
            uvloop.run(_serve_plain_sidecar(args.config))
        return 0

    for tool in ("haproxy", "wrk", "unshare", "gcc"):
        if shutil.which(tool) is None:
            print(f"bench/dataplane.py needs {tool}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="dataplane-") as tmp, ExitStack() as stack:
        scratch = Path(tmp)
        try:
            summary = _run(args, scratch, stack)
        except (RuntimeError, subprocess.CalledProcessError, ValueError):
            for log in sorted(scratch.glob("*.log")):
                print(f"--- {log.name}\n{log.read_text()[-2000:]}", file=sys.stderr)
            raise
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
