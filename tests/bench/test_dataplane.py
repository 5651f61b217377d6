"""The data-plane benchmark's pure parts: reading the load tools' output, the verdicts."""

from __future__ import annotations

import subprocess

import pytest

from bench.dataplane import TARGETS, parse_key_values, verdicts
from bench.harness import haproxy_config, parse_wrk, rss_after_kib

_WRK = """\
Running 3s test @ http://127.0.0.1:40001/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   710.12us  120.40us   5.10ms   91.00%
    Req/Sec    70.12k     2.10k   74.00k    80.00%
  Latency Distribution
     50%  690.00us
     75%  750.00us
     90%  820.00us
     99%    1.20ms
  209512 requests in 3.00s, 20.18MB read
Requests/sec:  69837.33
Transfer/sec:      6.73MB
"""


def test_wrk_output_gives_rate_percentiles_in_seconds_and_count() -> None:
    run = parse_wrk(_WRK)
    assert run.rps == pytest.approx(69837.33)
    assert run.p50 == pytest.approx(690e-6)
    assert run.p99 == pytest.approx(1.2e-3)
    assert run.requests == 209512


def test_wrk_timeouts_are_counted_not_refused() -> None:
    run = parse_wrk(_WRK + "  Socket errors: connect 0, read 0, write 0, timeout 7\n")
    assert run.timeouts == 7
    assert run.requests == 209512


@pytest.mark.parametrize(
    "extra",
    [
        "  Non-2xx or 3xx responses: 12\n",
        "  Socket errors: connect 0, read 3, write 0, timeout 0\n",
    ],
)
def test_wrk_errors_are_refused_not_counted(extra: str) -> None:
    with pytest.raises(ValueError, match="wrk saw errors"):
        parse_wrk(_WRK + extra)


def test_wrk_output_without_a_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot read"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_load_tool_lines_become_numbers() -> None:
    line = "sent=1200 recorded=1000 errors=0 late=3 rate=500.0 p50_us=91.5 p99_us=2000.0"
    values = parse_key_values(line)
    assert values["recorded"] == 1000
    assert values["p99_us"] == 2000.0
    assert values["late"] == 3


def test_a_load_tool_line_with_a_stray_word_is_refused() -> None:
    with pytest.raises(ValueError, match="not key=value"):
        parse_key_values("handshakes=10 oops")


def _passing() -> dict[str, float]:
    return {name: bound for name, (_, bound) in TARGETS.items()}


def test_figures_exactly_at_their_targets_pass() -> None:
    assert all(verdicts(_passing()).values())


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("l7_rps_ratio", 0.749),
        ("l7_added_p50_ratio", 1.51),
        ("mtls_rps_ratio", 0.7),
        ("mtls_p99_ratio", 1.6),
        ("gateway_rps_ratio", 0.89),
        ("handshake_ratio", 0.84),
        ("sidecar_rss_idle_mib", 40.1),
        ("sidecar_kib_per_conn", 16.5),
    ],
)
def test_a_figure_on_the_wrong_side_of_its_target_fails_alone(name: str, value: float) -> None:
    figures = _passing() | {name: value}
    met = verdicts(figures)
    assert [key for key, ok in met.items() if not ok] == [name]


def test_haproxy_templates_fill_every_name() -> None:
    config = haproxy_config("http", port=1234, app=5678)
    assert "bind 127.0.0.1:1234" in config
    assert "server app 127.0.0.1:5678" in config


def test_haproxy_template_with_a_missing_name_is_refused() -> None:
    with pytest.raises(KeyError):
        haproxy_config("mtls-client", port=1)


def test_the_rss_floor_grows_with_what_the_interpreter_imports() -> None:
    bare = rss_after_kib("")
    with_asyncio = rss_after_kib("import asyncio")
    assert 1024 < bare < with_asyncio
    with pytest.raises(subprocess.CalledProcessError):
        rss_after_kib("import no_such_module_here")
