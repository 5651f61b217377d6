"""The cluster CA's state directory: every file written atomically, private keys 0600.

Layout (``<state-dir>`` defaults to ``.snapbright/state/<cluster>``)::

    <state-dir>/ca/ca.json                   trust domain, bundle sequence, authorities
    <state-dir>/ca/<root-serial>/root.pem    one directory per authority
    <state-dir>/ca/<root-serial>/root.key    0600, absent once the authority is retired
    <state-dir>/ca/<root-serial>/intermediate.pem, intermediate.key (optional)

A write goes to a temporary file in the same directory, is fsynced, renamed over the target
and the directory is fsynced, so a crash leaves the old file or the new one, never half of
one. ``ca.json`` is written last: it is the commit point of a save, and files it no longer
names are removed after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.trust.ca import Authority, ClusterCA
from proxy.identity.model import TrustDomain

KEY_MODE = 0o600
CERT_MODE = 0o644
DIR_MODE = 0o700
_STATE_FILE = "ca.json"
_FORMAT = 1


class StoreError(Exception):
    """The state directory is missing, unreadable or inconsistent; the message says why."""


def write_atomic(path: Path, data: bytes, mode: int = CERT_MODE) -> None:
    """Replace ``path`` with ``data`` atomically and durably, with file mode ``mode``."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file 0600, so a key is never readable by others, even briefly.
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ca_dir(state_dir: Path) -> Path:
    """Where the CA lives inside a state directory."""
    return state_dir / "ca"


def exists(state_dir: Path) -> bool:
    """True if ``state_dir`` holds a CA."""
    return (ca_dir(state_dir) / _STATE_FILE).is_file()


def save_ca(state_dir: Path, ca: ClusterCA) -> None:
    """Persist ``ca`` under ``state_dir`` (see the module docstring for the layout)."""
    root = ca_dir(state_dir)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, DIR_MODE)
    for authority in ca.authorities:
        _save_authority(root / authority.name, authority)
    state = {
        "format": _FORMAT,
        "trust_domain": ca.trust_domain.name,
        "sequence": ca.sequence,
        "authorities": [
            {
                "name": a.name,
                "retire_at": a.retire_at.isoformat() if a.retire_at else None,
                "switch_by": a.switch_by.isoformat() if a.switch_by else None,
            }
            for a in ca.authorities
        ],
    }
    write_atomic(root / _STATE_FILE, (json.dumps(state, indent=2) + "\n").encode(), CERT_MODE)
    kept = {a.name for a in ca.authorities}
    for child in root.iterdir():
        if child.is_dir() and child.name not in kept:
            shutil.rmtree(child)
    _fsync_dir(root)


def _save_authority(directory: Path, authority: Authority) -> None:
    directory.mkdir(exist_ok=True)
    os.chmod(directory, DIR_MODE)
    files: dict[str, tuple[bytes, int] | None] = {
        "root.pem": (_cert_pem(authority.root), CERT_MODE),
        "root.key": _key_entry(authority.root_key),
        "intermediate.pem": (
            (_cert_pem(authority.intermediate), CERT_MODE) if authority.intermediate else None
        ),
        "intermediate.key": _key_entry(authority.intermediate_key),
    }
    for name, entry in files.items():
        path = directory / name
        if entry is None:
            # A retired authority's keys go: it must never sign again.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        data, mode = entry
        if not (path.is_file() and path.read_bytes() == data):
            write_atomic(path, data, mode)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_entry(key: ec.EllipticCurvePrivateKey | None) -> tuple[bytes, int] | None:
    if key is None:
        return None
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, KEY_MODE


def load_ca(state_dir: Path) -> ClusterCA:
    """Read the CA saved under ``state_dir``; raise :class:`StoreError` if it is not usable."""
    root = ca_dir(state_dir)
    path = root / _STATE_FILE
    try:
        state: Any = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"no CA in {state_dir} (run `snapbright ca init` first)") from None
    except (OSError, ValueError) as error:
        raise StoreError(f"cannot read {path}: {error}") from None
    try:
        if state["format"] != _FORMAT:
            raise StoreError(f"{path}: unknown format {state['format']!r}")
        authorities = tuple(
            _load_authority(root / entry["name"], entry["retire_at"], entry.get("switch_by"))
            for entry in state["authorities"]
        )
        if not authorities:
            raise StoreError(f"{path}: no authority")
        if authorities[0].staged or any(a.staged for a in authorities[:-1]):
            raise StoreError(f"{path}: only the newest of several authorities may be staged")
        return ClusterCA(TrustDomain(state["trust_domain"]), authorities, int(state["sequence"]))
    except (KeyError, TypeError, ValueError) as error:
        raise StoreError(f"{path}: damaged CA state ({error})") from None


def _load_authority(directory: Path, retire_at: str | None, switch_by: str | None) -> Authority:
    try:
        root = x509.load_pem_x509_certificate((directory / "root.pem").read_bytes())
        intermediate_path = directory / "intermediate.pem"
        intermediate = (
            x509.load_pem_x509_certificate(intermediate_path.read_bytes())
            if intermediate_path.is_file()
            else None
        )
    except OSError as error:
        raise StoreError(f"cannot read authority {directory}: {error}") from None
    return Authority(
        root=root,
        root_key=_load_key(directory / "root.key"),
        intermediate=intermediate,
        intermediate_key=_load_key(directory / "intermediate.key"),
        retire_at=datetime.fromisoformat(retire_at) if retire_at else None,
        # Absent in files written before rotations were staged: nothing is staged there.
        switch_by=datetime.fromisoformat(switch_by) if switch_by else None,
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise StoreError(f"cannot read {path}: {error}") from None
    if path.stat().st_mode & 0o077:
        raise StoreError(f"{path} is readable by others: chmod 600 it")
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StoreError(f"{path} is not an EC private key")
    return key
