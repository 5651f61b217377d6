"""The sidecar's Prometheus metrics, in their own registry; label children looked up once.

- ``snapbright_requests_total{source_cluster, destination_service, destination_cluster,
  response_class}``: outbound requests by how they ended (``2xx`` … ``5xx``,
  ``connect-failure``, ``timeout``).
- ``snapbright_request_duration_seconds{source_cluster, destination_service,
  destination_cluster}``: time to response headers (histogram).
- ``snapbright_inbound_rejected_total{reason}``: inbound connections or requests refused.
- ``snapbright_outbound_rejected_total{reason}``: upstream servers whose identity was refused.
- ``snapbright_config_reload_total{result}``: configuration updates, ``ok`` or ``rejected``.
- ``snapbright_cert_expiry_timestamp_seconds``: when the sidecar's own SVID expires.

The children of one (upstream, target cluster) are resolved when the router builds that
target and kept by it, so a request costs one counter increment and one observation.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy.stats.core import Outcome

__all__ = ["INBOUND_REJECT_REASONS", "SidecarMetrics"]

INBOUND_REJECT_REASONS = (
    "plaintext",
    "handshake-timeout",
    "handshake-failed",
    "no-certificate",
    "untrusted-chain",
    "expired",
    "foreign-root",
    "forbidden",
)
"""Reasons created up front so that dashboards see zeros, not gaps (others appear on use)."""

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _TargetRecorder:
    """Counts one (upstream, target) request: its children, resolved once."""

    __slots__ = ("_by_outcome", "_duration")

    def __init__(self, by_outcome: list[Counter], duration: Histogram) -> None:
        self._by_outcome = by_outcome
        self._duration = duration

    def __call__(self, outcome: Outcome, latency: float) -> None:
        self._by_outcome[outcome].inc()
        self._duration.observe(latency)


class SidecarMetrics:
    """Metrics of one sidecar."""

    def __init__(
        self,
        source_cluster: str,
        registry: CollectorRegistry | None = None,
        *,
        reloads: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._source = source_cluster
        labels = ["source_cluster", "destination_service", "destination_cluster"]
        self._requests = Counter(
            "snapbright_requests",
            "Outbound requests by destination and how they ended.",
            [*labels, "response_class"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "snapbright_request_duration_seconds",
            "Time from dispatch to response headers of outbound requests.",
            labels,
            buckets=_BUCKETS,
            registry=self.registry,
        )
        inbound = Counter(
            "snapbright_inbound_rejected",
            "Inbound connections or requests refused, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self._inbound = inbound
        self._inbound_children = {
            reason: inbound.labels(reason) for reason in INBOUND_REJECT_REASONS
        }
        self._outbound = Counter(
            "snapbright_outbound_rejected",
            "Upstream connections refused for the server's identity, by reason.",
            ["reason"],
            registry=self.registry,
        )
        # The discovery client registers this family itself in discovery mode.
        self.reload_ok: Callable[[], None] = _nothing
        self.reload_rejected: Callable[[], None] = _nothing
        if reloads:
            family = Counter(
                "snapbright_config_reload",
                "Configuration updates by result.",
                ["result"],
                registry=self.registry,
            )
            self.reload_ok = family.labels("ok").inc
            self.reload_rejected = family.labels("rejected").inc
        self.cert_expiry = Gauge(
            "snapbright_cert_expiry_timestamp_seconds",
            "When the sidecar's own SVID expires (Unix time).",
            registry=self.registry,
        )

    def target(
        self, service: str, cluster: str
    ) -> tuple[Callable[[Outcome, float], None], Callable[[], None]]:
        """The recorder of one (upstream, target cluster), and how to drop its children."""
        source = self._source
        by_outcome = [
            self._requests.labels(source, service, cluster, outcome.label) for outcome in Outcome
        ]
        duration = self._duration.labels(source, service, cluster)

        def drop() -> None:
            for outcome in Outcome:
                self._requests.remove(source, service, cluster, outcome.label)
            self._duration.remove(source, service, cluster)

        return _TargetRecorder(by_outcome, duration), drop

    def inbound_rejected(self, reason: str) -> None:
        """Count one refused inbound connection or request."""
        child = self._inbound_children.get(reason)
        if child is None:
            child = self._inbound_children[reason] = self._inbound.labels(reason)
        child.inc()

    def outbound_rejected(self, reason: str) -> None:
        """Count one upstream connection refused for the server's identity."""
        self._outbound.labels(reason).inc()

    def inbound_rejections(self, reason: str) -> float:
        """How many refusals ``reason`` counted (tests, ``snapbright check``)."""
        value = self.registry.get_sample_value(
            "snapbright_inbound_rejected_total", {"reason": reason}
        )
        return 0.0 if value is None else value


def _nothing() -> None:
    """Nothing to count."""
