"""ExportPolicy: nothing is exported unless listed, and mistakes point at their line."""

from __future__ import annotations

import pytest

from federation.export.model import ExportPolicy
from proxy.config.loader import LoadResult, load_bytes

HEAD = "apiVersion: snapbright.io/v1alpha1\nkind: ExportPolicy\nmetadata: {name: exports}\nspec:\n"


def _load(body: str) -> LoadResult:
    return load_bytes(HEAD + body, {ExportPolicy.KIND: ExportPolicy}, source="e.yaml")


def _policy(body: str) -> ExportPolicy:
    (document,) = _load(body).raise_for_errors()
    assert isinstance(document, ExportPolicy)
    return document


def test_nothing_is_exported_by_default() -> None:
    policy = _policy("  {}\n")
    assert policy.exported_to("ap-southeast") == frozenset()
    assert policy.peers_of("payments") == frozenset()


def test_each_peer_sees_only_the_services_listed_for_it() -> None:
    policy = _policy(
        "  exports:\n"
        "    - {service: payments, peers: [ap-southeast, eu-central]}\n"
        "    - {service: ledger, peers: [eu-central]}\n"
    )
    assert policy.exported_to("ap-southeast") == {"payments"}
    assert policy.exported_to("eu-central") == {"payments", "ledger"}
    assert policy.exported_to("us-east") == frozenset()
    assert policy.peers_of("payments") == {"ap-southeast", "eu-central"}


ERRORS = [
    pytest.param(
        "  exports:\n    - {service: payments, peers: []}\n",
        ("SB0201", 6, 34, "spec.exports[0].peers"),
        "at least 1 item",
        id="no-peers",
    ),
    pytest.param(
        "  exports:\n    - {service: payments}\n",
        ("SB0202", 6, 7, "spec.exports[0].peers"),
        "required",
        id="peers-missing",
    ),
    pytest.param(
        "  exports:\n    - {service: payments, peers: [a, b, a]}\n",
        ("SB0201", 6, 41, "spec.exports[0].peers[2]"),
        "listed twice",
        id="peer-twice",
    ),
    pytest.param(
        "  exports:\n"
        "    - {service: payments, peers: [a]}\n"
        "    - {service: payments, peers: [b]}\n",
        ("SB0201", 7, 17, "spec.exports[1].service"),
        "one entry",
        id="service-twice",
    ),
    pytest.param(
        "  exports:\n    - {service: payments, peers: ['*']}\n",
        ("SB0201", 6, 35, "spec.exports[0].peers[0]"),
        "pattern",
        id="no-wildcard-peer",
    ),
    pytest.param(
        "  exports: [payments]\n",
        ("SB0204", 5, 13, "spec.exports[0]"),
        "must be a mapping",
        id="bare-service-name",
    ),
]


@pytest.mark.parametrize(("body", "where", "reason"), ERRORS)
def test_config_error(body: str, where: tuple[str, int, int, str], reason: str) -> None:
    result = _load(body)
    assert len(result.diagnostics) == 1, result.diagnostics
    (diagnostic,) = result.diagnostics
    assert (diagnostic.code.value, diagnostic.line, diagnostic.column, diagnostic.path) == where
    assert reason in diagnostic.message
