"""GatewayConfig files: good ones load into values, bad ones name the field at fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.file import load_gateway_config
from proxy.config.source import ConfigRejected

_HEAD = """\
apiVersion: snapbright.io/v1alpha1
kind: GatewayConfig
metadata: {name: gw}
spec:
  cluster: east
  mesh: acme.example
"""


def _write(tmp_path: Path, spec_lines: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(_HEAD + spec_lines)
    return path


def test_a_full_config_loads_with_durations_and_defaults(tmp_path: Path) -> None:
    config = load_gateway_config(
        _write(
            tmp_path,
            """\
  listen: {address: 127.0.0.1, port: 16443}
  limits: {maxConnections: 10, peekTimeout: 250ms}
  drainTimeout: 2s
  controlPlane: {address: 127.0.0.1, port: 15012}
  services:
    - {name: payments, exported: true, endpoints: [{address: "::1", port: 9000}]}
""",
        )
    )
    spec = config.spec
    assert (spec.listen.port, spec.limits.max_connections) == (16443, 10)
    assert (spec.limits.peek_timeout, spec.limits.idle_timeout, spec.drain_timeout) == (
        0.25,
        3600.0,
        2.0,
    )
    assert spec.admin.address == "127.0.0.1"
    assert spec.services[0].namespace == "default"
    assert spec.services[0].endpoints[0].address == "::1"


@pytest.mark.parametrize(
    ("spec_lines", "message"),
    [
        ("  admin: {address: 0.0.0.0}\n", "spec.admin.address: the admin listener"),
        ("  listen: {address: localhost}\n", "spec.listen.address"),
        ("  limits: {peekTimeout: 0s}\n", "spec.limits.peekTimeout"),
        ("  limits: {maxConnections: 0}\n", "spec.limits.maxConnections"),
        ("  services: [{name: a, namespace: snapbright}]\n", "spec.services[0].namespace"),
        ("  services: [{name: a}, {name: a}]\n", "spec.services[1]: a.default is listed twice"),
        ("  services: [{name: A_b}]\n", "spec.services[0].name"),
        ("  forwarding: sendfile\n", "spec.forwarding"),
    ],
)
def test_bad_fields_are_refused_with_their_location(
    tmp_path: Path, spec_lines: str, message: str
) -> None:
    with pytest.raises(ConfigRejected) as caught:
        load_gateway_config(_write(tmp_path, spec_lines))
    assert message in caught.value.reason


def test_a_bad_mesh_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(_HEAD.replace("acme.example", "acme..example"))
    with pytest.raises(ConfigRejected, match=r"spec\.mesh"):
        load_gateway_config(path)


def test_a_non_loopback_admin_address_is_allowed_when_asked(tmp_path: Path) -> None:
    config = load_gateway_config(
        _write(tmp_path, "  admin: {address: 0.0.0.0, allowNonLoopback: true}\n")
    )
    assert config.spec.admin.address == "0.0.0.0"
