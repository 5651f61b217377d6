"""ControlPlaneConfig: what a valid file gives, and each mistake named at its position."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config.loader import load_bytes
from snapbright.controlplane.model import ControlPlaneConfig

REGISTRY = {ControlPlaneConfig.KIND: ControlPlaneConfig}

MINIMAL = """\
apiVersion: snapbright.io/v1alpha1
kind: ControlPlaneConfig
metadata: {name: us-west}
spec:
  cluster: us-west
  mesh: acme.example
  stateDir: state
"""


def _load(text: str) -> ControlPlaneConfig:
    (document,) = load_bytes(text, REGISTRY, source="cp.yaml").raise_for_errors()
    assert isinstance(document, ControlPlaneConfig)
    return document


def test_defaults_listen_on_loopback_with_the_embedded_registry() -> None:
    spec = _load(MINIMAL).spec
    assert (spec.listen.admin.address, spec.listen.admin.port) == ("127.0.0.1", 15000)
    assert (spec.listen.discovery.port, spec.listen.peering.port) == (15012, 15013)
    assert spec.catalog.backend == "embedded"
    assert spec.catalog.registration_ttl == 30.0
    assert spec.admission.allow_loopback is False
    assert spec.stale_grace == 60.0
    assert spec.gateways == ()


def test_relative_paths_are_taken_from_the_files_directory(tmp_path: Path) -> None:
    config = _load(MINIMAL + "  policyDirectory: policies\n")
    assert config.state_dir(tmp_path) == tmp_path / "state"
    assert config.policy_directory(tmp_path) == tmp_path / "policies"
    assert _load(MINIMAL).policy_directory(tmp_path) is None


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "  listen: {admin: {address: 0.0.0.0}}\n",
            "cp.yaml:8:29: spec.listen.admin.address: the admin API can establish",
        ),
        (
            "  catalog: {backend: consul}\n",
            "cp.yaml:8:12: spec.catalog: backend consul needs consul: {address, leaderKey}",
        ),
        ("  gateways: [gw.example]\n", "cp.yaml:8:14: spec.gateways[0]: 'gw.example' is not"),
        ("  gateways: ['gw:70000']\n", "cp.yaml:8:14: spec.gateways[0]: 'gw:70000' is not"),
        ("  staleGrace: forever\n", "cp.yaml:8:15: spec.staleGrace: invalid duration"),
        ("  failover: {interval: 0s}\n", "cp.yaml:8:24: spec.failover.interval: must be longer"),
        (
            "  listen: {peering: {port: 70000}}\n",
            "cp.yaml:8:28: spec.listen.peering.port: must be less",
        ),
    ],
)
def test_mistakes_are_named_at_their_position(extra: str, expected: str) -> None:
    result = load_bytes(MINIMAL + extra, REGISTRY, source="cp.yaml")
    assert not result.ok
    assert str(result.diagnostics[0]).startswith(expected), str(result.diagnostics[0])


def test_a_non_loopback_admin_listener_needs_saying_so() -> None:
    spec = _load(
        MINIMAL + "  listen: {admin: {address: 10.0.0.5}, allowNonLoopbackAdmin: true}\n"
    ).spec
    assert spec.listen.admin.address == "10.0.0.5"


def test_a_bad_mesh_name_is_refused() -> None:
    result = load_bytes(MINIMAL.replace("acme.example", "Acme"), REGISTRY, source="cp.yaml")
    assert [d.path for d in result.diagnostics] == ["spec.mesh"]
