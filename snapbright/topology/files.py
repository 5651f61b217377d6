"""Reading topology files, and the built-in default topology shipped with the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from proxy.config.loader import LoadResult, load_bytes, load_file
from proxy.config.source import ConfigRejected
from snapbright.topology.model import LocalMesh

DEFAULT_TOPOLOGY = "default.yaml"
"""The package data file holding the default topology."""

_REGISTRY = {LocalMesh.KIND: LocalMesh}


def load_topology(path: str | Path) -> LocalMesh:
    """The LocalMesh in ``path``; :class:`ConfigRejected` lists every error otherwise."""
    return _single(load_file(path, _REGISTRY))


def default_topology() -> LocalMesh:
    """Two regions 80 ms apart (us-west, ap-southeast), payments in both, checkout in one."""
    data = resources.files(__package__).joinpath(DEFAULT_TOPOLOGY).read_bytes()
    return _single(load_bytes(data, _REGISTRY, source=f"{__package__}/{DEFAULT_TOPOLOGY}"))


def _single(result: LoadResult) -> LocalMesh:
    documents = result.raise_for_errors()
    if len(documents) != 1 or not isinstance(documents[0], LocalMesh):
        raise ConfigRejected(f"{result.source}:1:1: a topology file holds one LocalMesh document")
    return documents[0]
