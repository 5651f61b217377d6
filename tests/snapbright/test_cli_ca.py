"""`snapbright ca`: the real CLI, as subprocesses, checked with real openssl and cryptography.

Virtual-time checks (rotation overlap) run the same Typer app in-process under time-machine.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import time_machine
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store
from typer.testing import CliRunner

from federation.trust.ca import create_ca
from proxy.identity.bundle import TrustBundleSet, parse_bundle
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.identity.svid import Purpose, validate_svid
from snapbright.cli.app import app

SNAPBRIGHT = Path(sys.executable).parent / "snapbright"
TD = TrustDomain("us-west.acme")
API = SpiffeId.parse("spiffe://us-west.acme/ns/payments/sa/api")


def _cli(command: str, *args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``snapbright <command> <args>``; ``command`` is split on spaces, ``args`` are not."""
    result = subprocess.run(
        [str(SNAPBRIGHT), *command.split(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def _openssl_verify(bundle: Path, svid: Path, purpose: str) -> subprocess.CompletedProcess[str]:
    # -untrusted: svid.pem carries the intermediate, if any, after the leaf.
    argv = ["openssl", "verify", "-purpose", purpose, "-CAfile", str(bundle)]
    return subprocess.run(
        [*argv, "-untrusted", str(svid), str(svid)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _init_and_issue(tmp_path: Path, *extra: str) -> Path:
    tmp_path.mkdir(exist_ok=True)
    state = tmp_path / "state"
    out = tmp_path / "out"
    _cli("ca init --cluster us-west --mesh acme", "--state-dir", str(state), *extra, cwd=tmp_path)
    issue = "ca issue --namespace payments --service-account api"
    _cli(issue, "--out", str(out), "--state-dir", str(state), cwd=tmp_path)
    return out


@pytest.mark.parametrize("extra", [(), ("--intermediate",)], ids=["root-only", "intermediate"])
def test_init_then_issue_yields_an_svid_that_openssl_and_cryptography_accept_with_private_keys(
    tmp_path: Path, extra: tuple[str, ...]
) -> None:
    out = _init_and_issue(tmp_path, *extra)
    assert sorted(p.name for p in out.iterdir()) == [
        "bundle.json",
        "bundle.pem",
        "key.pem",
        "svid.pem",
    ]
    for purpose in ("sslclient", "sslserver"):
        verified = _openssl_verify(out / "bundle.pem", out / "svid.pem", purpose)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert verified.stdout.strip().endswith(": OK")

    chain = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())
    roots = x509.load_pem_x509_certificates((out / "bundle.pem").read_bytes())
    assert len(chain) == (2 if extra else 1)
    verified_client = (
        PolicyBuilder()
        .store(Store(roots))
        .time(chain[0].not_valid_before_utc + timedelta(minutes=1))
        .build_client_verifier()
        .verify(chain[0], chain[1:])
    )
    assert verified_client.subjects == [x509.UniformResourceIdentifier(str(API))]

    bundle = parse_bundle(TD, (out / "bundle.json").read_bytes())
    assert bundle.roots == tuple(roots)
    now = chain[0].not_valid_before_utc
    assert validate_svid(chain[0], [], TrustBundleSet([bundle]), now, Purpose.SERVER) == API

    key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == chain[0].public_key()
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    state_keys = list((tmp_path / "state").rglob("*.key"))
    assert len(state_keys) == (2 if extra else 1)
    assert {stat.S_IMODE(k.stat().st_mode) for k in state_keys} == {0o600}


def test_openssl_rejects_the_svid_against_another_clusters_bundle(tmp_path: Path) -> None:
    out = _init_and_issue(tmp_path, "--intermediate")
    other = tmp_path / "other-bundle.pem"
    other.write_bytes(create_ca(TD, datetime.now(UTC)).bundle().roots_pem())
    verified = _openssl_verify(other, out / "svid.pem", "sslclient")
    assert verified.returncode != 0
    assert "unable to get local issuer certificate" in verified.stdout + verified.stderr


def test_rotate_publishes_the_new_root_and_issue_uses_it_only_after_the_switch(
    tmp_path: Path,
) -> None:
    _cli("ca init --cluster us-west --mesh acme", cwd=tmp_path)
    assert (tmp_path / ".snapbright/state/us-west/ca/ca.json").is_file()  # the default dir
    before = json.loads(_cli("ca show -o json", cwd=tmp_path).stdout)
    rotated = _cli("ca rotate --overlap 72h --cluster us-west", cwd=tmp_path).stdout
    after = json.loads(_cli("ca show -o json", cwd=tmp_path).stdout)

    assert "it signs once every peer holds it, at the latest at" in rotated
    assert before["sequence"] == 1
    assert after["sequence"] == 2
    assert [c["state"] for c in after["certificates"]] == ["active", "staged"]
    assert after["certificates"][0]["sha256"] == before["certificates"][0]["sha256"]
    assert after["certificates"][0]["retire_at"] is not None
    assert len(after["bundle"]["keys"]) == 2
    assert after["bundle"]["spiffe_sequence"] == 2
    text = _cli("ca show", cwd=tmp_path).stdout
    assert "trust domain  spiffe://us-west.acme" in text
    assert "root (staged, signs once peers hold it, at the latest at" in text

    # Until the switch, leaves come from the old root, which every peer already trusts.
    out = tmp_path / "out"
    _cli("ca issue --namespace payments --service-account api", "--out", str(out), cwd=tmp_path)
    assert _signer_fingerprint(out) == after["certificates"][0]["sha256"]


def _signer_fingerprint(out: Path) -> str:
    leaf = x509.load_pem_x509_certificate((out / "svid.pem").read_bytes())
    roots = x509.load_pem_x509_certificates((out / "bundle.pem").read_bytes())
    assert len(roots) == 2
    signer = next(r for r in roots if r.subject == leaf.issuer)
    leaf.verify_directly_issued_by(signer)
    return signer.fingerprint(hashes.SHA256()).hex(":").upper()


def test_with_no_control_plane_the_new_root_signs_at_the_switch_deadline(tmp_path: Path) -> None:
    runner = CliRunner()
    state = ["--state-dir", str(tmp_path)]
    start = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    issue = ["ca", "issue", "--namespace", "payments", "--service-account", "api", *state]

    with time_machine.travel(start, tick=False):
        assert (
            runner.invoke(app, ["ca", "init", "--cluster", "c", "--mesh", "m", *state]).exit_code
            == 0
        )
        rotate = ["ca", "rotate", "--overlap", "10h", "--switch-within", "1h", *state]
        assert runner.invoke(app, rotate).exit_code == 0
    with time_machine.travel(start + timedelta(minutes=59), tick=False):
        shown = json.loads(runner.invoke(app, ["ca", "show", "-o", "json", *state]).stdout)
        assert runner.invoke(app, [*issue, "--out", str(tmp_path / "early")]).exit_code == 0
    assert [c["state"] for c in shown["certificates"]] == ["active", "staged"]
    assert _signer_fingerprint(tmp_path / "early") == shown["certificates"][0]["sha256"]
    with time_machine.travel(start + timedelta(hours=1), tick=False):
        shown = json.loads(runner.invoke(app, ["ca", "show", "-o", "json", *state]).stdout)
        assert runner.invoke(app, [*issue, "--out", str(tmp_path / "late")]).exit_code == 0
    assert [c["state"] for c in shown["certificates"]] == ["retiring", "active"]
    assert shown["sequence"] == 2  # the switch changes no bundle
    assert _signer_fingerprint(tmp_path / "late") == shown["certificates"][1]["sha256"]


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("ca show --state-dir nowhere", "no CA in nowhere"),
        ("ca init --cluster US --mesh acme", "cluster must be a DNS label"),
        (
            "ca issue --namespace a --service-account b --out o --ttl soon --state-dir s",
            "--ttl: invalid duration 'soon'",
        ),
        ("ca rotate", "pass --cluster or --state-dir"),
    ],
)
def test_errors_print_one_line_and_exit_1(tmp_path: Path, command: str, message: str) -> None:
    result = _cli(command, cwd=tmp_path, ok=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert message in result.stderr


def test_init_refuses_to_overwrite_a_ca(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["ca", "init", "--cluster", "us-west", "--mesh", "acme", "--state-dir", str(tmp_path)]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 1
    assert "already exists" in again.stderr


def test_the_old_root_leaves_the_bundle_when_the_overlap_ends(tmp_path: Path) -> None:
    runner = CliRunner()
    state = ["--state-dir", str(tmp_path)]
    start = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)

    def show_at(moment: datetime) -> dict[str, Any]:
        with time_machine.travel(moment, tick=False):
            result = runner.invoke(app, ["ca", "show", "-o", "json", *state])
        assert result.exit_code == 0, result.stderr
        shown: dict[str, Any] = json.loads(result.stdout)
        return shown

    with time_machine.travel(start, tick=False):
        assert (
            runner.invoke(app, ["ca", "init", "--cluster", "c", "--mesh", "m", *state]).exit_code
            == 0
        )
        assert runner.invoke(app, ["ca", "rotate", "--overlap", "1h", *state]).exit_code == 0

    during = show_at(start + timedelta(minutes=59))
    assert during["sequence"] == 2
    assert len(during["certificates"]) == 2
    after = show_at(start + timedelta(hours=1))
    assert after["sequence"] == 3  # dropping the old root is a change of the bundle
    assert [c["state"] for c in after["certificates"]] == ["active"]
    assert len(list(tmp_path.rglob("root.pem"))) == 1
    assert show_at(start + timedelta(hours=2))["sequence"] == 3  # nothing more to drop
