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

The requests of one (upstream, target cluster) are counted by a recorder the router gets
when it builds that target: plain integers (a counter per outcome, histogram buckets), no
label lookup, no lock. A collector turns them into the two families when Prometheus scrapes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.stats.core import Outcome

__all__ = ["INBOUND_REJECT_REASONS", "SidecarMetrics"]

INBOUND_REJECT_REASONS: Final = (
    "plaintext",
    "handshake-timeout",
    "handshake-failed",
    "no-certificate",
    "untrusted-chain",
    "expired",
    "foreign-root",
    "forbidden",
    "trust-withdrawn",
)
"""Reasons created up front so that dashboards see zeros, not gaps (others appear on use)."""

_LABELS: Final = ["source_cluster", "destination_service", "destination_cluster"]
_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class _TargetRecorder:
    """Counts the requests of one (upstream, target) in plain integers: a counter per outcome
    and the latency histogram's buckets. Prometheus reads them when it scrapes."""

    __slots__ = ("buckets", "counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(Outcome)
        self.buckets = [0] * (len(_BUCKETS) + 1)
        self.total = 0.0

    def __call__(self, outcome: Outcome, latency: float) -> None:
        self.counts[outcome] += 1
        self.buckets[bisect_left(_BUCKETS, latency)] += 1
        self.total += latency


class _RequestCollector(Collector):
    """Exposes every target's recorder as ``snapbright_requests_total`` and
    ``snapbright_request_duration_seconds`` at scrape time."""

    def __init__(self, source: str) -> None:
        self._source = source
        self.recorders: dict[tuple[str, str], _TargetRecorder] = {}

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "snapbright_requests",
            "Outbound requests by destination and how they ended.",
            labels=[*_LABELS, "response_class"],
        )
        duration = HistogramMetricFamily(
            "snapbright_request_duration_seconds",
            "Time from dispatch to response headers of outbound requests.",
            labels=_LABELS,
        )
        for (service, cluster), recorder in self.recorders.items():
            labels = [self._source, service, cluster]
            for outcome in Outcome:
                requests.add_metric([*labels, outcome.label], recorder.counts[outcome])
            cumulative = list(accumulate(recorder.buckets))
            buckets = [(_bound(b), float(c)) for b, c in zip(_BUCKETS, cumulative, strict=False)]
            buckets.append(("+Inf", float(cumulative[-1])))
            duration.add_metric(labels, buckets, recorder.total)
        yield requests
        yield duration


def _bound(value: float) -> str:
    return repr(float(value))


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
        self._requests = _RequestCollector(source_cluster)
        self.registry.register(self._requests)
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
        """The recorder of one (upstream, target cluster), and how to drop its series."""
        key = (service, cluster)
        recorders = self._requests.recorders
        recorder = recorders.get(key)
        if recorder is None:
            recorder = recorders[key] = _TargetRecorder()

        def drop() -> None:
            if recorders.get(key) is recorder:
                del recorders[key]

        return recorder, drop

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
