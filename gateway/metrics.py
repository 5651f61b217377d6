"""The gateway's Prometheus metrics, each label child looked up once and kept.

- ``snapbright_gateway_connections_total{result}``: accepted connections by how they ended
  their setup: ``forwarded``, ``rejected`` (closed by the gateway; see the next metric) or
  ``upstream-failed`` (the chosen upstream could not be reached).
- ``snapbright_gateway_rejected_total{reason}``: why connections were closed: a ClientHello
  rejection (``no-sni``, ``plain-http``, …), a routing refusal (``not-exported``,
  ``unknown-name``, ``no-endpoints``), ``peek-timeout`` or ``over-limit``.
- ``snapbright_gateway_active_connections``: open client connections, peeking or forwarding.
- ``snapbright_gateway_bytes_total{direction}``: bytes passed through, ``upstream`` (client
  to service) and ``downstream``; added when a connection closes and at every idle sweep, so
  the hot path only adds to plain integers.
- ``snapbright_config_reload_total{result}``: config reloads, ``ok`` or ``rejected``.
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge

ConnectionResult = Literal["forwarded", "rejected", "upstream-failed"]

REJECT_REASONS = (
    "not-tls",
    "plain-http",
    "sslv2-hello",
    "no-sni",
    "multiple-names",
    "non-host-name-type",
    "bad-name",
    "oversized",
    "truncated",
    "malformed",
    "unknown-name",
    "not-exported",
    "no-endpoints",
    "peek-timeout",
    "over-limit",
)
"""Every reason label, created up front so that dashboards see zeros, not gaps."""


class GatewayMetrics:
    """Metrics of one gateway, in their own registry (one per process, or per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        connections = Counter(
            "snapbright_gateway_connections",
            "Accepted connections by the outcome of their setup.",
            ["result"],
            registry=self.registry,
        )
        self.forwarded = connections.labels("forwarded")
        self.rejected = connections.labels("rejected")
        self.upstream_failed = connections.labels("upstream-failed")
        rejected = Counter(
            "snapbright_gateway_rejected",
            "Connections the gateway closed, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self._rejected_by_reason = {reason: rejected.labels(reason) for reason in REJECT_REASONS}
        self.active = Gauge(
            "snapbright_gateway_active_connections",
            "Open client connections (peeking or forwarding).",
            registry=self.registry,
        )
        bytes_total = Counter(
            "snapbright_gateway_bytes",
            "Bytes passed through, by direction.",
            ["direction"],
            registry=self.registry,
        )
        self.bytes_upstream = bytes_total.labels("upstream")
        self.bytes_downstream = bytes_total.labels("downstream")
        reloads = Counter(
            "snapbright_config_reload",
            "Configuration reloads by result.",
            ["result"],
            registry=self.registry,
        )
        self.reload_ok = reloads.labels("ok")
        self.reload_rejected = reloads.labels("rejected")

    def reject(self, reason: str) -> None:
        """Count a connection closed for ``reason`` (one of :data:`REJECT_REASONS`)."""
        self.rejected.inc()
        self._rejected_by_reason[reason].inc()
