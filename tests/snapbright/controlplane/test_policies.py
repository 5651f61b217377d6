"""The policy directory: a set is accepted whole or not at all, and the last good one stays."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry

from snapbright.controlplane.policies import PolicyDirectory, PolicySet
from tests.snapbright.controlplane.conftest import BAD_POLICY, GOOD_POLICY, until

EXAMPLES = Path(__file__).parents[3] / "deploy" / "examples"

FAILOVER = (EXAMPLES / "failover-payments.yaml").read_text()
EXPORT = (EXAMPLES / "export-policy-us-west.yaml").read_text()


def _directory(path: Path, files: dict[str, str]) -> PolicyDirectory:
    path.mkdir(exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return PolicyDirectory(path, CollectorRegistry(), clock=lambda: 1234.0)


def test_a_directory_of_good_files_becomes_one_set_by_kind(tmp_path: Path) -> None:
    policies = _directory(
        tmp_path / "p", {"pay.yaml": GOOD_POLICY, "failover.yml": FAILOVER, "export.yaml": EXPORT}
    )
    state = policies.reload()
    current = policies.current()
    assert state.ok
    assert current is not None
    assert [p.metadata.name for p in current.traffic] == ["pay"]
    assert [p.spec.service for p in current.failover] == ["payments"]
    assert current.peers_of("payments") == {"ap-southeast", "eu-central"}
    assert current.peers_of("pay") == frozenset()  # nothing is exported by default
    assert state.last_success_at == 1234.0


def test_editor_temporaries_and_other_files_are_not_read(tmp_path: Path) -> None:
    policies = _directory(
        tmp_path / "p",
        {"pay.yaml": GOOD_POLICY, ".pay.yaml.swp": BAD_POLICY, "notes.txt": BAD_POLICY},
    )
    assert policies.reload().ok


def test_an_empty_directory_is_an_empty_set_and_no_directory_is_one_too(tmp_path: Path) -> None:
    empty = _directory(tmp_path / "p", {})
    assert not empty.ready  # nothing read yet: not the same as an empty set
    assert empty.reload().ok
    assert empty.current() is not None
    none = PolicyDirectory(None, CollectorRegistry())
    assert none.ready
    assert none.current() is not None


def test_a_missing_directory_is_not_ready(tmp_path: Path) -> None:
    policies = PolicyDirectory(tmp_path / "absent", CollectorRegistry())
    state = policies.reload()
    assert not state.ok
    assert state.errors == (f"{tmp_path / 'absent'}: not a directory",)
    assert policies.current() is None


def test_contradicting_files_are_refused_together_naming_both(tmp_path: Path) -> None:
    second_failover = FAILOVER.replace("name: payments", "name: payments-2", 1)
    policies = _directory(
        tmp_path / "p",
        {
            "a.yaml": GOOD_POLICY,
            "b.yaml": GOOD_POLICY,
            "c.yaml": FAILOVER,
            "d.yaml": second_failover,
        },
    )
    state = policies.reload()
    assert not state.ok
    directory = tmp_path / "p"
    assert state.errors == (
        f"{directory / 'b.yaml'}:1:1: metadata.name: TrafficPolicy default/pay is also defined "
        f"in {directory / 'a.yaml'}",
        f"{directory / 'd.yaml'}:1:1: spec.service: service 'payments' already has a "
        f"FailoverPolicy in {directory / 'c.yaml'}",
    )


def test_a_kind_that_does_not_belong_in_a_policy_directory_is_refused(tmp_path: Path) -> None:
    mesh = (EXAMPLES / "local-mesh-three-regions.yaml").read_text()
    policies = _directory(tmp_path / "p", {"mesh.yaml": mesh})
    state = policies.reload()
    assert not state.ok
    assert "LocalMesh" in state.errors[0]


def test_a_bad_reload_keeps_the_last_good_set_and_counts_both(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    directory = tmp_path / "p"
    directory.mkdir()
    (directory / "pay.yaml").write_text(GOOD_POLICY)
    policies = PolicyDirectory(directory, registry, clock=lambda: 50.0)
    assert policies.reload().ok
    good = policies.current()
    (directory / "pay.yaml").write_text(BAD_POLICY)
    (directory / "other.yaml").write_text(EXPORT)
    state = policies.reload()
    assert not state.ok
    assert policies.current() is good  # the whole new set is refused, not just the bad file
    assert state.last_success_at == 50.0
    sample = registry.get_sample_value
    assert sample("snapbright_config_reload_total", {"result": "ok"}) == 1
    assert sample("snapbright_config_reload_total", {"result": "rejected"}) == 1
    assert sample("snapbright_config_last_reload_success_timestamp_seconds") == 50.0


async def test_watch_yields_each_accepted_set_as_files_change(tmp_path: Path) -> None:
    directory = tmp_path / "p"
    directory.mkdir()
    policies = PolicyDirectory(directory, CollectorRegistry(), poll_interval=0.02)
    policies.reload()
    seen: list[PolicySet] = []

    async def follow() -> None:
        async for accepted in policies.watch():
            seen.append(accepted)

    task = asyncio.create_task(follow())
    try:
        await until(lambda: len(seen) == 1)
        (directory / "bad.yaml").write_text(BAD_POLICY)
        (directory / "pay.yaml").write_text(GOOD_POLICY)
        await until(lambda: not policies.state.ok)
        assert len(seen) == 1  # a refused set is never handed on
        (directory / "bad.yaml").unlink()
        await until(lambda: len(seen) == 2)
    finally:
        task.cancel()
    assert seen[0].traffic == ()
    assert [p.metadata.name for p in seen[1].traffic] == ["pay"]
