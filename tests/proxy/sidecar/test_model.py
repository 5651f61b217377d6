"""SidecarConfig: what a file may say, and how a mistake is reported (file:line:col)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config.loader import load_bytes
from proxy.identity.model import TrustDomain
from proxy.sidecar.model import SidecarConfig, upstreams_of

EXAMPLE = Path(__file__).resolve().parents[3] / "deploy" / "examples" / "sidecar-checkout.yaml"
REGISTRY = {SidecarConfig.KIND: SidecarConfig}

BASE = """apiVersion: snapbright.io/v1alpha1
kind: SidecarConfig
metadata: {name: checkout}
spec:
  identity: {cluster: us-west, mesh: acme, serviceAccount: checkout, service: checkout}
  app: {address: 127.0.0.1, port: 8080}
  tls: {certificate: c.pem, key: c.key, bundles: [{trustDomain: us-west.acme, path: b.json}]}
"""


def _errors(text: str) -> list[str]:
    return [str(d) for d in load_bytes(text, REGISTRY, source="s.yaml").diagnostics]


def test_the_example_is_valid_and_derives_sni_and_trust_domains() -> None:
    result = load_bytes(EXAMPLE.read_bytes(), REGISTRY)
    assert result.diagnostics == ()
    config = result.documents[0]
    assert isinstance(config, SidecarConfig)
    payments = upstreams_of(config.spec)["payments"]
    names = [(t.name, t.sni, t.trust_domain, t.weight) for t in payments.targets]
    assert names == [
        ("payments", "payments.default.us-west.acme", TrustDomain("us-west.acme"), 0.9),
        (
            "payments@ap-southeast",
            "payments.default.ap-southeast.acme",
            TrustDomain("ap-southeast.acme"),
            0.1,
        ),
    ]


@pytest.mark.parametrize(
    ("extra", "where", "message"),
    [
        ("", "s.yaml:5:3: spec", "give upstreams/policies"),
        (
            "  upstreams: []\n  controlPlane: {address: 127.0.0.1, port: 15012}\n",
            "s.yaml:9:17: spec.controlPlane",
            "not both",
        ),
        (
            "  upstreams: []\n  listeners: {admin: {address: 10.0.0.1, port: 15000}}\n",
            "s.yaml:9:32: spec.listeners.admin.address",
            "loopback",
        ),
        (
            "  upstreams: []\n  listeners: {outbound: {address: 0.0.0.0, port: 15001}}\n",
            "s.yaml:9:35: spec.listeners.outbound.address",
            "loopback",
        ),
        (
            "  upstreams:\n"
            "    - {service: a, tcpPort: 9000, targets: [{cluster: x, endpoints: "
            "[{address: 10.0.0.1, port: 1}]}]}\n"
            "    - {service: b, tcpPort: 9000, targets: [{cluster: x, endpoints: "
            "[{address: 10.0.0.1, port: 1}]}]}\n",
            "s.yaml:10:29: spec.upstreams[1].tcpPort",
            "taken",
        ),
        (
            "  upstreams:\n"
            "    - {service: a, targets: [{cluster: x, weight: 0%, endpoints: "
            "[{address: 10.0.0.1, port: 1}]}]}\n",
            "s.yaml:9:29: spec.upstreams[0].targets",
            "weight above 0%",
        ),
        (
            "  upstreams: []\n  policies: [{apiVersion: snapbright.io/v1alpha1, kind: Nope, "
            "metadata: {name: x}, spec: {}}]\n",
            "s.yaml:9:",
            "",
        ),
    ],
    ids=[
        "no source",
        "two sources",
        "admin off loopback",
        "outbound off loopback",
        "tcp port twice",
        "no weight",
        "unknown policy kind",
    ],
)
def test_a_mistake_is_reported_at_its_place(extra: str, where: str, message: str) -> None:
    errors = _errors(BASE + extra)
    assert errors, "the file should be refused"
    assert any(e.startswith(where) and message in e for e in errors), errors
