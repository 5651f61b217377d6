"""The decision journal: every failover decision worth explaining, with what it rested on.

The loop records each decision worth explaining (it changed the weights or the mode, or fired
a rule other than ``hold``; see :mod:`health.failover.loop`): its explanation, the rule, the
old and new weights, the expected latencies and the observations it was decided on. The
journal keeps the newest ``per_service`` records of each service in memory (for
``snapbright policy explain SERVICE`` and the dashboard's timeline) and can append every record
to a JSONL file (O_APPEND, fsynced per record) so that a crash loses at most the record being
written. :func:`read_journal` reads such a file back.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from health.failover.model import (
    Decision,
    Direction,
    Mode,
    Observations,
    Rule,
    TargetObservation,
)

_log = logging.getLogger(__name__)


class JournalError(ValueError):
    """A journal line that is not a decision record; the message says where and why."""


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One recorded decision for a service in a caller cluster."""

    at: float
    """On the loop's clock."""
    unix_time: float
    """The wall clock when it was recorded, for people."""
    service: str
    caller_cluster: str
    policy: str | None
    """The FailoverPolicy in force (its name), or ``None``: default behaviour."""
    rule: Rule
    mode: Mode
    explanation: str
    previous_weights: Mapping[str, int]
    weights: Mapping[str, int]
    transition: Direction | None
    expected_latency: Mapping[str, float]
    inputs: Observations

    @classmethod
    def of(
        cls,
        service: str,
        caller_cluster: str,
        policy: str | None,
        decision: Decision,
        inputs: Observations,
        unix_time: float,
    ) -> DecisionRecord:
        """The record of ``decision``, decided on ``inputs``."""
        return cls(
            at=decision.at,
            unix_time=unix_time,
            service=service,
            caller_cluster=caller_cluster,
            policy=policy,
            rule=decision.rule,
            mode=decision.state.mode,
            explanation=decision.explanation,
            previous_weights=dict(decision.previous_weights),
            weights=dict(decision.weights),
            transition=decision.transition,
            expected_latency=dict(decision.expected_latency),
            inputs=inputs,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite numbers become ``null``)."""
        return {
            "at": self.at,
            "unixTime": self.unix_time,
            "service": self.service,
            "callerCluster": self.caller_cluster,
            "policy": self.policy,
            "rule": self.rule.value,
            "mode": self.mode.value,
            "explanation": self.explanation,
            "previousWeights": dict(self.previous_weights),
            "weights": dict(self.weights),
            "transition": None if self.transition is None else self.transition.value,
            "expectedLatency": dict(self.expected_latency),
            "inputs": {
                "local": self.inputs.local,
                "requestRate": self.inputs.request_rate,
                "targets": [
                    {k: _finite(v) for k, v in asdict(t).items()} for t in self.inputs.targets
                ],
            },
        }

    @classmethod
    def from_json(cls, data: Any) -> DecisionRecord:
        """The record :meth:`to_json` wrote; anything else raises :class:`JournalError`."""
        try:
            inputs = data["inputs"]
            targets = tuple(
                TargetObservation(
                    **{
                        **t,
                        "observed_at": -math.inf if t["observed_at"] is None else t["observed_at"],
                    }
                )
                for t in inputs["targets"]
            )
            return cls(
                at=float(data["at"]),
                unix_time=float(data["unixTime"]),
                service=str(data["service"]),
                caller_cluster=str(data["callerCluster"]),
                policy=None if data["policy"] is None else str(data["policy"]),
                rule=Rule(data["rule"]),
                mode=Mode(data["mode"]),
                explanation=str(data["explanation"]),
                previous_weights=_weights(data["previousWeights"]),
                weights=_weights(data["weights"]),
                transition=None if data["transition"] is None else Direction(data["transition"]),
                expected_latency={str(k): float(v) for k, v in data["expectedLatency"].items()},
                inputs=Observations(str(inputs["local"]), float(inputs["requestRate"]), targets),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise JournalError(f"not a decision record: {error!r}") from None


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _weights(value: Any) -> dict[str, int]:
    if not isinstance(value, dict) or not all(
        isinstance(w, int) and not isinstance(w, bool) for w in value.values()
    ):
        raise ValueError(f"weights must map clusters to integers: {value!r}")
    return {str(k): w for k, w in value.items()}


class Journal:
    """The newest ``per_service`` records of every service, and optionally a JSONL file."""

    def __init__(self, per_service: int = 256, path: Path | None = None) -> None:
        if per_service < 1:
            raise ValueError(f"per_service must be at least 1: {per_service!r}")
        self._per_service = per_service
        self._records: dict[str, deque[DecisionRecord]] = {}
        self._path = path
        self._fd: int | None = None
        if path is not None:
            # O_APPEND: every line lands at the end, whoever else appends. Unbuffered: a failed
            # write leaves nothing behind to fail again later.
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def record(self, record: DecisionRecord) -> None:
        """Keep ``record``; with a file, append it as one line, flushed and fsynced."""
        kept = self._records.get(record.service)
        if kept is None:
            kept = self._records[record.service] = deque(maxlen=self._per_service)
        kept.append(record)
        if self._fd is not None:
            line = (json.dumps(record.to_json(), separators=(",", ":")) + "\n").encode()
            try:
                written = 0
                while written < len(line):
                    written += os.write(self._fd, line[written:])
                os.fsync(self._fd)
            except OSError as error:
                # The in-memory journal and the controller go on; the file is best effort.
                _log.warning("decision journal %s: cannot write: %s", self._path, error)

    def for_service(
        self, service: str, *, caller_cluster: str | None = None, limit: int | None = None
    ) -> list[DecisionRecord]:
        """The kept records of ``service`` (optionally one caller cluster's), oldest first."""
        records = [
            r
            for r in self._records.get(service, ())
            if caller_cluster is None or r.caller_cluster == caller_cluster
        ]
        return records if limit is None else records[-limit:] if limit > 0 else []

    def latest(self, limit: int = 50) -> list[DecisionRecord]:
        """The newest ``limit`` records of all services, oldest first (the timeline)."""
        merged = sorted(
            (r for records in self._records.values() for r in records),
            key=lambda r: (r.at, r.service, r.caller_cluster),
        )
        return merged[-limit:] if limit > 0 else []

    def services(self) -> list[str]:
        """The services with kept records, sorted."""
        return sorted(self._records)

    def close(self) -> None:
        """Close the file, if any."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_journal(path: Path) -> Iterator[DecisionRecord]:
    """The records of a JSONL journal file, in file order; a bad line raises
    :class:`JournalError` naming the line. A torn last line (a crash mid-write) is skipped."""
    with path.open(encoding="utf-8") as lines:
        previous: tuple[int, str] | None = None
        for number, line in enumerate(lines, start=1):
            if previous is not None:
                yield _parse_line(path, *previous)
            previous = (number, line)
        if previous is not None:
            number, line = previous
            if line.endswith("\n"):
                yield _parse_line(path, number, line)


def _parse_line(path: Path, number: int, line: str) -> DecisionRecord:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise JournalError(f"{path}:{number}: not JSON: {error.msg}") from None
    try:
        return DecisionRecord.from_json(data)
    except JournalError as error:
        raise JournalError(f"{path}:{number}: {error}") from None
