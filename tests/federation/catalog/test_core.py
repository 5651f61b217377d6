"""Pure decisions: blocking-query index steps, backoff and expiry, in virtual time."""

from __future__ import annotations

import random

import pytest

from federation.catalog.core import (
    Backoff,
    IndexEvent,
    IndexStep,
    blocking_timeout,
    deadline,
    expired,
    step_index,
)

STEPS = [
    ("first read", 0, 42, IndexStep(42, True, IndexEvent.ADVANCED)),
    ("steady update", 42, 43, IndexStep(43, True, IndexEvent.ADVANCED)),
    ("wake-up with no change", 43, 43, IndexStep(43, True, IndexEvent.UNCHANGED)),
    ("index went backwards", 43, 7, IndexStep(0, False, IndexEvent.BACKWARDS)),
    ("index reset to 0", 43, 0, IndexStep(0, False, IndexEvent.BACKWARDS)),
    ("zero after a reset", 0, 0, IndexStep(1, True, IndexEvent.NOT_POSITIVE)),
    ("negative index", 0, -5, IndexStep(1, True, IndexEvent.NOT_POSITIVE)),
    ("zero while at 1", 1, 0, IndexStep(0, False, IndexEvent.BACKWARDS)),
]


@pytest.mark.parametrize(
    ("previous", "reported", "step"), [s[1:] for s in STEPS], ids=[s[0] for s in STEPS]
)
def test_index_steps_follow_consul_blocking_query_rules(
    previous: int, reported: int, step: IndexStep
) -> None:
    assert step_index(previous, reported) == step


def test_backoff_grows_exponentially_within_jitter_and_cap() -> None:
    backoff = Backoff(base=0.1, cap=2.0)
    rng = random.Random(7)
    for failures, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (5, 1.6), (6, 2.0), (40, 2.0)]:
        delays = [backoff.delay(failures, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4  # really jittered


def test_backoff_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="base"):
        Backoff(base=0.0)
    with pytest.raises(ValueError, match="failures"):
        Backoff().delay(0, random.Random(1))


def test_blocking_timeout_sits_above_wait_and_consul_jitter() -> None:
    assert blocking_timeout(16.0, 1.0) == pytest.approx(18.0)
    with pytest.raises(ValueError, match="positive"):
        blocking_timeout(0, 1)


def test_expiry_is_decided_by_now() -> None:
    deadlines = {"b": deadline(100.0, 10.0), "a": deadline(100.0, 5.0), "c": deadline(104.0, 30.0)}
    assert expired(deadlines, 104.9) == ()
    assert expired(deadlines, 105.0) == ("a",)
    assert expired(deadlines, 110.0) == ("a", "b")
    assert expired(deadlines, 1e9) == ("a", "b", "c")
    with pytest.raises(ValueError, match="ttl"):
        deadline(0.0, 0.0)
