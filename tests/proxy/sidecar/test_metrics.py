"""The request metrics: plain counters per (upstream, target), exposed at scrape time."""

from __future__ import annotations

from proxy.sidecar.metrics import SidecarMetrics
from proxy.stats.core import Outcome

LABELS = {
    "source_cluster": "us-west",
    "destination_service": "payments",
    "destination_cluster": "eu",
}


def test_requests_are_counted_by_class_and_latency_bucket() -> None:
    metrics = SidecarMetrics("us-west")
    record, _ = metrics.target("payments", "eu")
    record(Outcome.HTTP_2XX, 0.001)
    record(Outcome.HTTP_2XX, 0.004)
    record(Outcome.CONNECT_FAILURE, 2.0)
    value = metrics.registry.get_sample_value
    assert value("snapbright_requests_total", {**LABELS, "response_class": "2xx"}) == 2.0
    assert value("snapbright_requests_total", {**LABELS, "response_class": "5xx"}) == 0.0
    assert (
        value("snapbright_requests_total", {**LABELS, "response_class": "connect-failure"}) == 1.0
    )
    # A latency equal to a bound is in that bucket (le means <=).
    assert value("snapbright_request_duration_seconds_bucket", {**LABELS, "le": "0.001"}) == 1.0
    assert value("snapbright_request_duration_seconds_bucket", {**LABELS, "le": "0.005"}) == 2.0
    assert value("snapbright_request_duration_seconds_bucket", {**LABELS, "le": "+Inf"}) == 3.0
    assert value("snapbright_request_duration_seconds_count", LABELS) == 3.0
    assert value("snapbright_request_duration_seconds_sum", LABELS) == 2.005


def test_a_target_that_leaves_the_config_leaves_the_exposition() -> None:
    metrics = SidecarMetrics("us-west")
    record, drop = metrics.target("payments", "eu")
    record(Outcome.HTTP_2XX, 0.001)
    drop()
    labels = {**LABELS, "response_class": "2xx"}
    assert metrics.registry.get_sample_value("snapbright_requests_total", labels) is None


def test_a_target_built_again_keeps_counting_where_it_was() -> None:
    metrics = SidecarMetrics("us-west")
    first, _ = metrics.target("payments", "eu")
    first(Outcome.HTTP_2XX, 0.001)
    again, _ = metrics.target("payments", "eu")
    again(Outcome.HTTP_2XX, 0.001)
    labels = {**LABELS, "response_class": "2xx"}
    assert metrics.registry.get_sample_value("snapbright_requests_total", labels) == 2.0
