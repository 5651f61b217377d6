"""The example files in deploy/examples are valid, cover every kind, and agree with each other."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config.loader import load_file
from snapbright.policy.kinds import KINDS, load_files
from snapbright.topology.files import default_topology, load_topology
from snapbright.topology.model import LocalMesh

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "deploy" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    (result,) = load_files([path])
    assert result.ok, "\n".join(str(d) for d in result.diagnostics)


def test_every_kind_has_an_example() -> None:
    kinds = {doc.kind for result in load_files(EXAMPLES) for doc in result.documents}
    assert kinds == set(KINDS)


def test_topology_examples_name_policy_files_that_exist_and_are_valid() -> None:
    topologies = [p for p in EXAMPLES if all(isinstance(d, LocalMesh) for d in _docs(p))]
    assert topologies
    for path in topologies:
        mesh = load_topology(path)
        for policy in mesh.spec.policies:
            result = load_file(path.parent / policy, KINDS)
            assert result.ok, (policy, result.diagnostics)


def test_the_default_topology_is_one_of_the_kinds_files_validate_against() -> None:
    assert isinstance(default_topology(), KINDS["LocalMesh"])


def _docs(path: Path) -> tuple[object, ...]:
    return load_file(path, KINDS).documents
