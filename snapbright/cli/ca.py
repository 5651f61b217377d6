"""`snapbright ca …`: the cluster CA (init, issue, show, rotate).

The CA lives in a state directory, ``.snapbright/state/<cluster>`` unless ``--state-dir`` says
otherwise. Every command first lets a staged root take over once its switch deadline has
passed, and drops roots whose rotation overlap has ended (and saves that, with a higher bundle
sequence), so the bundle on disk never lists a root past its time. A running control plane
switches earlier, as soon as every peer has acknowledged the new root.
Errors print one line saying why and exit 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from pydantic import TypeAdapter, ValidationError

from federation.trust import store
from federation.trust.ca import (
    DEFAULT_ROTATION_OVERLAP,
    DEFAULT_SVID_TTL,
    CaError,
    ClusterCA,
    create_ca,
)
from proxy.config.model import Duration
from proxy.identity.bundle import BundleError, format_bundle
from proxy.identity.model import SpiffeId, SpiffeIdError, TrustDomain

app = typer.Typer(
    help="Manage this cluster's certificate authority and SVIDs.", no_args_is_help=True
)

DEFAULT_STATE_ROOT = Path(".snapbright/state")
_DURATION = TypeAdapter(Duration)
_DEFAULT_TTL = f"{DEFAULT_SVID_TTL // timedelta(hours=1)}h"
_DEFAULT_OVERLAP = f"{DEFAULT_ROTATION_OVERLAP // timedelta(hours=1)}h"


class OutputFormat(StrEnum):
    """How `ca show` prints."""

    text = "text"
    json = "json"


ClusterOption = Annotated[
    str | None, typer.Option("--cluster", help="Cluster name (state in .snapbright/state/NAME).")
]
StateDirOption = Annotated[
    Path | None, typer.Option("--state-dir", help="State directory (overrides --cluster).")
]


class _CliError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except (_CliError, CaError, store.StoreError, SpiffeIdError, BundleError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=1) from None
    except OSError as error:
        typer.echo(f"error: {error.strerror or error}: {error.filename or ''}".rstrip(), err=True)
        raise typer.Exit(code=1) from None


def _now() -> datetime:
    # The one clock read: everything below takes `now` as an argument.
    return datetime.now(UTC).replace(microsecond=0)


def _duration(text: str, what: str) -> timedelta:
    try:
        seconds = _DURATION.validate_python(text)
    except ValidationError as error:
        reason = error.errors()[0]["msg"].removeprefix("Value error, ")
        raise _CliError(f"{what}: {reason}") from None
    return timedelta(seconds=seconds)


def _state_dir(cluster: str | None, state_dir: Path | None) -> Path:
    if state_dir is not None:
        return state_dir
    if cluster is not None:
        return DEFAULT_STATE_ROOT / cluster
    known = sorted(p for p in DEFAULT_STATE_ROOT.glob("*") if store.exists(p))
    if len(known) == 1:
        return known[0]
    raise _CliError("pass --cluster or --state-dir (no single CA under .snapbright/state)")


def _load(state_dir: Path, now: datetime) -> ClusterCA:
    ca = store.load_ca(state_dir)
    pruned = ca.prune(now)
    if pruned is not ca:
        store.save_ca(state_dir, pruned)
    return pruned


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


@app.command()
def init(
    cluster: Annotated[str, typer.Option("--cluster", help="This cluster's name.")],
    mesh: Annotated[str, typer.Option("--mesh", help="The mesh's name.")],
    state_dir: StateDirOption = None,
    intermediate: Annotated[
        bool, typer.Option("--intermediate", help="Sign SVIDs through an intermediate CA.")
    ] = False,
) -> None:
    """Create the cluster's CA: a P-256 root for spiffe://CLUSTER.MESH."""
    with _errors():
        trust_domain = TrustDomain.for_cluster(cluster, mesh)
        directory = _state_dir(cluster, state_dir)
        if store.exists(directory):
            raise _CliError(f"a CA already exists in {directory} (use `snapbright ca rotate`)")
        ca = create_ca(trust_domain, _now(), intermediate=intermediate)
        store.save_ca(directory, ca)
        typer.echo(f"created CA for {trust_domain.spiffe_id} in {directory}")
        typer.echo(f"root SHA-256 {_fingerprint(ca.active.root)}")
        typer.echo(f"root expires {ca.active.root.not_valid_after_utc.isoformat()}")


@app.command()
def issue(
    namespace: Annotated[str, typer.Option("--namespace", help="The workload's namespace.")],
    service_account: Annotated[
        str, typer.Option("--service-account", help="The workload's service account.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the SVID files to.")],
    ttl: Annotated[
        str, typer.Option("--ttl", help="SVID lifetime, e.g. 24h or 30m.")
    ] = _DEFAULT_TTL,
    cluster: ClusterOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Issue an X.509-SVID: writes svid.pem, key.pem (0600), bundle.pem and bundle.json."""
    with _errors():
        lifetime = _duration(ttl, "--ttl")
        now = _now()
        ca = _load(_state_dir(cluster, state_dir), now)
        spiffe_id = SpiffeId.workload(ca.trust_domain, namespace, service_account)
        svid = ca.issue(spiffe_id, now, lifetime)
        bundle = ca.bundle()
        store.write_atomic(out / "key.pem", svid.key_pem(), store.KEY_MODE)
        store.write_atomic(out / "svid.pem", svid.chain_pem())
        store.write_atomic(out / "bundle.pem", bundle.roots_pem())
        store.write_atomic(out / "bundle.json", format_bundle(bundle))
        typer.echo(f"issued {spiffe_id} into {out}")
        typer.echo(f"expires {svid.not_after.isoformat()}, renew at {svid.renew_at.isoformat()}")


@app.command()
def show(
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", help="text or json.")
    ] = OutputFormat.text,
    cluster: ClusterOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Show the trust bundle: roots, their expiry and SHA-256 fingerprints."""
    with _errors():
        ca = _load(_state_dir(cluster, state_dir), _now())
        summary = _summary(ca)
        if output is OutputFormat.json:
            typer.echo(json.dumps(summary, indent=2))
            return
        typer.echo(f"trust domain  {summary['trust_domain']}")
        typer.echo(f"sequence      {summary['sequence']}")
        for entry in summary["certificates"]:
            leaves = f", leaves the bundle at {entry['retire_at']}" if entry["retire_at"] else ""
            signs = (
                f", signs once peers hold it, at the latest at {entry['signs_by']}"
                if entry["signs_by"]
                else ""
            )
            typer.echo(f"{entry['role']} ({entry['state']}{signs}{leaves})")
            typer.echo(f"  valid    {entry['not_before']} to {entry['not_after']}")
            typer.echo(f"  SHA-256  {entry['sha256']}")


def _summary(ca: ClusterCA) -> dict[str, Any]:
    certificates = []
    for authority in ca.authorities:
        state = "staged" if authority.staged else "active" if authority is ca.active else "retiring"
        retire = authority.retire_at.isoformat() if authority.retire_at else None
        switch = authority.switch_by.isoformat() if authority.switch_by else None
        pairs = [("root", authority.root), ("intermediate", authority.intermediate)]
        for role, cert in pairs:
            if cert is None:
                continue
            certificates.append(
                {
                    "role": role,
                    "state": state,
                    "not_before": cert.not_valid_before_utc.isoformat(),
                    "not_after": cert.not_valid_after_utc.isoformat(),
                    "retire_at": retire,
                    "signs_by": switch,
                    "sha256": _fingerprint(cert),
                }
            )
    return {
        "trust_domain": str(ca.trust_domain.spiffe_id),
        "sequence": ca.sequence,
        "certificates": certificates,
        "bundle": json.loads(format_bundle(ca.bundle())),
    }


@app.command()
def rotate(
    overlap: Annotated[
        str, typer.Option("--overlap", help="How long the old root stays trusted, e.g. 72h.")
    ] = _DEFAULT_OVERLAP,
    switch_within: Annotated[
        str | None,
        typer.Option(
            "--switch-within",
            help="When the new root signs if peers never acknowledge it (default: half the "
            "overlap).",
        ),
    ] = None,
    cluster: ClusterOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Add a new root: published at once, it signs once every peer holds it (the control plane
    switches when they have acknowledged it); the old root leaves after the overlap."""
    with _errors():
        keep = _duration(overlap, "--overlap")
        within = None if switch_within is None else _duration(switch_within, "--switch-within")
        now = _now()
        directory = _state_dir(cluster, state_dir)
        rotated = _load(directory, now).rotate(now, keep, switch_within=within)
        staged = rotated.authorities[-1]  # rotate() stages the new authority last
        signs_by = staged.switch_by.isoformat() if staged.switch_by else now.isoformat()
        store.save_ca(directory, rotated)
        typer.echo(f"new root SHA-256 {_fingerprint(staged.root)}")
        typer.echo(
            f"it signs once every peer holds it, at the latest at {signs_by}; "
            "the previous root signs until then"
        )
        typer.echo(f"the previous root leaves the bundle at {(now + keep).isoformat()}")
        typer.echo(f"bundle sequence {rotated.sequence}")
