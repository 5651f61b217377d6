"""The decision journal: bounded per service, queryable, and a JSONL file that reads back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from health.failover.core import decide
from health.failover.model import (
    ControllerState,
    Direction,
    Mode,
    Observations,
    Rule,
    TargetObservation,
)
from health.failover.record import DecisionRecord, Journal, JournalError, read_journal

US, EU = "us-west", "eu-west"


def _record(service: str = "payments", at: float = 1.0, caller: str = US) -> DecisionRecord:
    """A real decision: no healthy local endpoint moves everything to eu-west."""
    inputs = Observations(
        local=caller,
        request_rate=100.0,
        targets=(
            TargetObservation(caller, at, 500, 0, p95=0.04),
            TargetObservation(EU, -math.inf, 0, 3),  # never heard from: not fresh
            TargetObservation(EU.replace("eu", "ap"), at, 500, 3, p95=0.05, rtt=0.08),
        ),
    )
    decision = decide(None, ControllerState.initial(caller), inputs, at)
    return DecisionRecord.of(service, caller, None, decision, inputs, 1_800_000_000.0 + at)


def test_a_record_carries_the_decision_and_its_inputs() -> None:
    record = _record()
    assert record.rule is Rule.NO_HEALTHY_LOCAL
    assert record.mode is Mode.LOCAL_DOWN
    assert record.transition is Direction.AWAY
    assert record.previous_weights[US] == 10_000
    assert record.weights == {"ap-west": 10_000, EU: 0, US: 0}
    assert "no healthy local endpoint" in record.explanation
    assert record.inputs.targets[0].healthy_endpoints == 0


def test_a_record_survives_json_including_non_finite_times() -> None:
    record = _record()
    text = json.dumps(record.to_json(), allow_nan=False)  # strict JSON: no Infinity
    assert DecisionRecord.from_json(json.loads(text)) == record


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.pop("rule"),
        lambda d: d.update(rule="panic"),
        lambda d: d.update(weights={"us-west": "all"}),
        lambda d: d["inputs"]["targets"][0].update(bogus=1),
        lambda d: d.update(inputs=None),
    ],
)
def test_a_damaged_record_is_refused(damage: object) -> None:
    data = _record().to_json()
    damage(data)  # type: ignore[operator]
    with pytest.raises(JournalError, match="not a decision record"):
        DecisionRecord.from_json(data)


def test_the_journal_keeps_the_newest_records_per_service() -> None:
    journal = Journal(per_service=3)
    for at in range(10):
        journal.record(_record("payments", float(at)))
    journal.record(_record("orders", 4.5))
    assert [r.at for r in journal.for_service("payments")] == [7.0, 8.0, 9.0]
    # A busy service does not push another's history out.
    assert [r.at for r in journal.for_service("orders")] == [4.5]
    assert journal.services() == ["orders", "payments"]


def test_queries_by_caller_limit_and_across_services() -> None:
    journal = Journal()
    journal.record(_record("payments", 1.0, US))
    journal.record(_record("payments", 2.0, EU))
    journal.record(_record("orders", 1.5, US))
    journal.record(_record("payments", 3.0, US))
    assert [r.at for r in journal.for_service("payments", caller_cluster=US)] == [1.0, 3.0]
    assert [r.at for r in journal.for_service("payments", limit=1)] == [3.0]
    assert journal.for_service("payments", limit=0) == []
    assert journal.for_service("unknown") == []
    assert [(r.service, r.at) for r in journal.latest(3)] == [
        ("orders", 1.5),
        ("payments", 2.0),
        ("payments", 3.0),
    ]


def test_the_file_gets_one_line_per_record_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path=path)
    records = [_record("payments", float(at)) for at in range(3)]
    for record in records:
        journal.record(record)
    # Written through (flushed and fsynced), before any close.
    assert len(path.read_text().splitlines()) == 3
    journal.close()
    assert list(read_journal(path)) == records


def test_the_file_is_appended_to_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    for at in (1.0, 2.0):
        journal = Journal(path=path)
        journal.record(_record(at=at))
        journal.close()
    assert [r.at for r in read_journal(path)] == [1.0, 2.0]


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    line = json.dumps(_record().to_json())
    path.write_text(line + "\n" + line[: len(line) // 2])
    assert len(list(read_journal(path))) == 1


def test_a_bad_line_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    line = json.dumps(_record().to_json())
    path.write_text(line + "\n{not json\n" + line + "\n")
    with pytest.raises(JournalError, match=r"journal\.jsonl:2: not JSON"):
        list(read_journal(path))


def test_a_full_disk_does_not_stop_the_journal(caplog: pytest.LogCaptureFixture) -> None:
    journal = Journal(path=Path("/dev/full"))  # every write fails with ENOSPC
    journal.record(_record())
    assert len(journal.for_service("payments")) == 1
    assert "cannot write" in caplog.text
    journal.close()


def test_per_service_must_be_positive() -> None:
    with pytest.raises(ValueError, match="per_service"):
        Journal(per_service=0)
