"""Which control planes `snapbright check` and `status` ask, from the flags and endpoints.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snapbright.check.gather import Target, targets
from snapbright.controlplane.client import AdminApiError


def _endpoints(state_dir: Path, *clusters: str) -> None:
    body = {"version": 1, "clusters": {c: {"admin": f"http://127.0.0.1:1/{c}/"} for c in clusters}}
    (state_dir / "endpoints.json").write_text(json.dumps(body))


def test_a_mesh_of_several_clusters_means_all_of_them_without_flags(tmp_path: Path) -> None:
    _endpoints(tmp_path, "us-west", "ap-southeast")
    assert targets(None, None, False, tmp_path) == [
        Target("ap-southeast", "http://127.0.0.1:1/ap-southeast"),
        Target("us-west", "http://127.0.0.1:1/us-west"),
    ]


def test_cluster_picks_one_of_several(tmp_path: Path) -> None:
    _endpoints(tmp_path, "us-west", "ap-southeast")
    (found,) = targets(None, "us-west", False, tmp_path)
    assert found.cluster == "us-west"


def test_a_single_cluster_is_asked_alone(tmp_path: Path) -> None:
    _endpoints(tmp_path, "us-west")
    assert [t.cluster for t in targets(None, None, False, tmp_path)] == [""]


def test_all_with_a_cluster_is_refused(tmp_path: Path) -> None:
    _endpoints(tmp_path, "us-west")
    with pytest.raises(AdminApiError, match="drop --api/--cluster"):
        targets(None, "us-west", True, tmp_path)


def test_no_mesh_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(AdminApiError, match=r"endpoints\.json"):
        targets(None, None, True, tmp_path)
