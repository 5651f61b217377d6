"""The committed JSON Schemas: fresh byte for byte, and they agree with the loader on examples."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from snapbright.policy.kinds import KINDS, schema, schema_text
from snapbright.topology import files as topology_files

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "deploy" / "schemas"
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
MODELINE = re.compile(r"^# yaml-language-server: \$schema=(?P<path>\S+)$", re.MULTILINE)


def _validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema(kind))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_committed_schema_is_fresh(kind: str) -> None:
    path = SCHEMAS / f"{kind}.json"
    assert path.read_text() == schema_text(kind), "run: .venv/bin/python scripts/schemas.py"


def test_no_schema_is_left_for_a_kind_that_is_gone() -> None:
    assert {p.stem for p in SCHEMAS.glob("*.json")} == set(KINDS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_schema_is_valid_json_schema_and_pins_kind_and_version(kind: str) -> None:
    generated = json.loads((SCHEMAS / f"{kind}.json").read_text())
    jsonschema.Draft202012Validator.check_schema(generated)
    assert generated["properties"]["kind"]["const"] == kind
    assert generated["properties"]["apiVersion"]["const"] == "snapbright.io/v1alpha1"
    assert generated["additionalProperties"] is False


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_satisfies_the_schema_of_its_kind(path: Path) -> None:
    for document in _documents(path):
        _validator(document["kind"]).validate(document)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_modelines_point_at_the_schema_of_their_kind(path: Path) -> None:
    text = path.read_text()
    kinds = {document["kind"] for document in _documents(path)}
    for match in MODELINE.finditer(text):
        target = (path.parent / match["path"]).resolve()
        assert target.is_file()
        assert target.stem in kinds


def test_examples_of_the_policy_kinds_carry_a_modeline() -> None:
    for path in EXAMPLES:
        kinds = {document["kind"] for document in _documents(path)}
        if kinds & {"TrafficPolicy", "AuthorizationPolicy", "ExportPolicy", "LocalMesh"}:
            assert MODELINE.search(path.read_text().splitlines()[0]), path.name


def test_default_topology_satisfies_the_schema() -> None:
    text = (Path(topology_files.__file__).parent / topology_files.DEFAULT_TOPOLOGY).read_text()
    _validator("LocalMesh").validate(yaml.safe_load(text))


MISTAKES = [
    pytest.param("TrafficPolicy", {"service": "pay", "timeout": {}}, id="unknown-field"),
    pytest.param("TrafficPolicy", {"service": "pay", "timeouts": {"connect": "5"}}, id="no-unit"),
    pytest.param(
        "TrafficPolicy",
        {"service": "pay", "faults": {"abort": {"status": 503, "percentage": "x%"}}},
        id="bad-share",
    ),
    pytest.param("AuthorizationPolicy", {"service": "pay", "rules": [{}]}, id="rule-without-from"),
    pytest.param("ExportPolicy", {"exports": [{"service": "pay", "peers": []}]}, id="no-peers"),
    pytest.param("LocalMesh", {"mesh": "demo", "clusters": []}, id="no-clusters"),
]


@pytest.mark.parametrize(("kind", "spec"), MISTAKES)
def test_schema_flags_mistakes_in_the_editor(kind: str, spec: dict[str, Any]) -> None:
    document = {
        "apiVersion": "snapbright.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x"},
        "spec": spec,
    }
    assert list(_validator(kind).iter_errors(document))


def test_schema_of_one_kind_rejects_a_document_of_another() -> None:
    document = {
        "apiVersion": "snapbright.io/v1alpha1",
        "kind": "ExportPolicy",
        "metadata": {"name": "x"},
        "spec": {},
    }
    assert list(_validator("TrafficPolicy").iter_errors(document))
