"""The registry of document kinds, their JSON Schemas, and loading files against them.

This is the one place that knows every kind: the loader (``proxy.config.loader``) lives in the
lowest layer and is handed this registry; ``snapbright policy validate`` and ``snapbright up``
read files through :func:`load_files`. A new kind is one line in :data:`KINDS`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from federation.export.model import ExportPolicy
from gateway.config.model import GatewayConfig
from health.failover.model import FailoverPolicy, Trace
from proxy.config.loader import LoadResult, load_file
from proxy.config.model import API_VERSION, Document
from proxy.policy.model import AuthorizationPolicy, TrafficPolicy
from proxy.sidecar.model import SidecarConfig
from snapbright.controlplane.model import ControlPlaneConfig
from snapbright.topology.model import LocalMesh

KINDS: Mapping[str, type[Document]] = {
    kind.KIND: kind
    for kind in (
        FailoverPolicy,
        Trace,
        TrafficPolicy,
        AuthorizationPolicy,
        ExportPolicy,
        LocalMesh,
        ControlPlaneConfig,
        GatewayConfig,
        SidecarConfig,
    )
}
"""Every document kind, by its ``kind``."""


def load_files(paths: Iterable[str | Path]) -> list[LoadResult]:
    """Load and validate each file against every known kind (one result per file)."""
    return [load_file(path, KINDS) for path in paths]


def schema(kind: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one kind, as editors validate files with it.

    ``apiVersion`` and ``kind`` are pinned to their only accepted values, so an editor given
    the schema of one kind flags a file of another.
    """
    model = KINDS[kind]
    generated = model.model_json_schema(
        by_alias=True, mode="validation", schema_generator=_SchemaGenerator
    )
    properties = generated["properties"]
    properties["apiVersion"] = {"const": API_VERSION, "title": "Apiversion", "type": "string"}
    properties["kind"] = {"const": kind, "title": "Kind", "type": "string"}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **generated}


def schema_text(kind: str) -> str:
    """The JSON Schema of one kind as committed in ``deploy/schemas/<kind>.json``."""
    return json.dumps(schema(kind), indent=2, ensure_ascii=False, sort_keys=False) + "\n"


class _SchemaGenerator(GenerateJsonSchema):
    """Writes defaults as files spell them (``25ms``, not ``0.025``).

    Pydantic applies a type's plain serializer to defaults only in serialization mode; these
    schemas describe input (validation mode), where ``Duration`` is a string.
    """

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        json_schema = super().default_schema(schema)
        default = schema.get("default")
        serializer = _plain_serializer(schema["schema"])
        if "default" in json_schema and default is not None and serializer is not None:
            json_schema["default"] = serializer(default)
        return json_schema


def _plain_serializer(schema: core_schema.CoreSchema) -> Any:
    """The plain serializer function of a (validator-wrapped) type, if it has one."""
    current: Any = schema
    while isinstance(current, dict):
        serialization = current.get("serialization")
        if isinstance(serialization, dict) and serialization.get("type") == "function-plain":
            return serialization["function"]
        current = current.get("schema")
    return None
