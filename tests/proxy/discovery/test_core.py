"""The discovery client's decisions: control-plane names, reconnect backoff, the stats outbox."""

from __future__ import annotations

import random

import pytest

from proxy.discovery.core import Backoff, StatsOutbox, control_plane_host, control_plane_id
from proxy.identity.model import TrustDomain
from proxy.stats.core import Histogram, StatsWindow

TD = TrustDomain.for_cluster("us-west", "acme")


def test_the_control_plane_is_named_in_its_own_trust_domain() -> None:
    assert str(control_plane_id(TD)) == "spiffe://us-west.acme/ns/snapbright-system/sa/controlplane"
    assert control_plane_host(TD) == "controlplane.snapbright-system.us-west.acme"


def test_backoff_grows_exponentially_to_the_cap_without_jitter() -> None:
    backoff = Backoff(base_s=0.5, cap_s=4.0, jitter=0.0)
    rng = random.Random(1)
    assert [backoff.delay(n, rng) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.delay(10_000, rng) == 4.0


def test_backoff_jitter_stays_between_half_and_the_full_delay() -> None:
    backoff = Backoff(base_s=1.0, cap_s=8.0, jitter=0.5)
    rng = random.Random(7)
    delays = [backoff.delay(3, rng) for _ in range(500)]
    assert all(4.0 <= d <= 8.0 for d in delays)
    # Spread out, so proxies that lost the control plane together do not return together.
    assert max(delays) - min(delays) > 3.0


def test_a_stream_that_stayed_up_resets_the_backoff() -> None:
    backoff = Backoff(stable_s=30.0)
    assert backoff.attempt_after(5, lived_s=29.9) == 5
    assert backoff.attempt_after(5, lived_s=30.0) == 0


@pytest.mark.parametrize(
    "arguments",
    [
        {"base_s": 0.0},
        {"base_s": 5.0, "cap_s": 1.0},
        {"factor": 0.5},
        {"jitter": 1.0},
        {"stable_s": -1.0},
    ],
)
def test_backoff_refuses_nonsense(arguments: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(**arguments)


def _window(start: int) -> StatsWindow:
    return StatsWindow(start, "pay", "us-west", (1, 0, 0, 0, 0, 0), Histogram.of([0.002]))


def test_the_outbox_keeps_the_newest_windows_and_counts_what_it_dropped() -> None:
    outbox = StatsOutbox(capacity=3)
    outbox.add(_window(s) for s in range(5))
    assert len(outbox) == 3
    assert outbox.dropped == 2
    assert [w.start for w in outbox.take(2)] == [2, 3]
    outbox.lost(2)
    assert outbox.dropped == 4
    assert [w.start for w in outbox.take(10)] == [4]
    assert outbox.take(10) == []


def test_the_outbox_needs_room_for_one_window() -> None:
    with pytest.raises(ValueError, match="capacity"):
        StatsOutbox(0)
