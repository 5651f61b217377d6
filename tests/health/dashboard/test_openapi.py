"""deploy/openapi/dashboard.yaml describes what the server returns, so the doc cannot drift."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from health.dashboard.server import dashboard_app
from tests.health.dashboard.conftest import Serve
from tests.health.dashboard.feed import BROWNOUT_START
from tests.health.dashboard.sse import until

DOC_PATH = Path(__file__).parents[3] / "deploy" / "openapi" / "dashboard.yaml"
DOC_URI = "urn:snapbright:openapi:dashboard"


def _document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(DOC_PATH.read_text())
    return document


def _validator(schema_name: str) -> jsonschema.Draft202012Validator:
    registry: Registry[Any] = Registry().with_resource(
        DOC_URI, Resource.from_contents(_document(), default_specification=DRAFT202012)
    )
    return jsonschema.Draft202012Validator(
        {"$ref": f"{DOC_URI}#/components/schemas/{schema_name}"},
        registry=registry,
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )


def _errors(schema_name: str, instance: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in _validator(schema_name).iter_errors(instance)
    ]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


def test_the_document_is_openapi_3_1_and_its_schemas_are_valid_json_schema() -> None:
    document = _document()
    assert document["openapi"] == "3.1.0"
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_the_documented_paths_are_the_served_api() -> None:
    app = dashboard_app(_NoState())
    served = {
        info.get("path") or info.get("formatter")
        for route in app.router.routes()
        if (info := route.resource.get_info() if route.resource else {})
    }
    api = {path for path in served if path and path.startswith("/api/")}
    assert api == set(_document()["paths"])


async def test_state_and_its_decisions_match_the_schemas_through_a_brownout(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    served = await serve(until=BROWNOUT_START + 8)
    async with http.get(served.url + "api/v1/state") as response:
        state = await response.json()
    assert state["decisions"], "the brownout has made decisions to check"
    assert _errors("State", state) == []
    # With nulls: a link down and a service without measurements.
    state["rtt"][0] |= {"rttMs": None, "alive": False}
    state["services"][0] |= {"p99Ms": None, "successRate": None}
    assert _errors("State", state) == []


async def test_decisions_and_errors_match_the_schemas(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    served = await serve(until=BROWNOUT_START + 8)
    async with http.get(served.url + "api/v1/decisions?limit=1") as response:
        body = await response.json()
    assert len(body["decisions"]) == 1  # of two: the example moves away in two steps
    assert _errors("DecisionList", body) == []
    async with http.get(served.url + "api/v1/decisions?limit=0") as response:
        assert response.status == 400
        assert _errors("Error", await response.json()) == []


async def test_event_data_match_the_schemas(serve: Serve, http: aiohttp.ClientSession) -> None:
    served = await serve()
    async with http.get(served.url + "api/v1/events") as response:
        await until(response, "state")
        served.feed.run_until(BROWNOUT_START + 3)
        decision = await until(response, "decision")
        state = await until(response, "state")
    assert _errors("Decision", decision.data) == []
    assert _errors("State", state.data) == []


@pytest.mark.parametrize(
    ("schema", "mutate"),
    [
        ("State", lambda s: s | {"unexpected": 1}),
        ("State", lambda s: {k: v for k, v in s.items() if k != "routes"}),
        ("Region", lambda s: s | {"status": "on-fire"}),
        ("Decision", lambda s: s | {"rule": "guess"}),
        ("Decision", lambda s: s | {"weights": [{"cluster": "a", "weight": 10001}]}),
    ],
)
async def test_the_schemas_reject_drift(
    serve: Serve, http: aiohttp.ClientSession, schema: str, mutate: Any
) -> None:
    served = await serve(until=BROWNOUT_START + 8)
    async with http.get(served.url + "api/v1/state") as response:
        state = await response.json()
    instance = {
        "State": state,
        "Region": state["regions"][0],
        "Decision": state["decisions"][0],
    }[schema]
    assert _errors(schema, mutate(instance)) != []


class _NoState:
    """Enough of a DashboardState to build the app and list its routes (never served)."""

    cluster = "none"
    version = 0

    def snapshot(self) -> Any:
        raise AssertionError("not served")

    def decisions(self, **_: Any) -> Any:
        raise AssertionError("not served")

    async def changed(self, version: int) -> int:
        raise AssertionError("not served")
