"""Which (service, caller) pairs the control plane's failover loop decides: pure, no clock."""

from __future__ import annotations

import pytest

from health.stats.core import LocalService, RegionalStats, RemoteService
from proxy.stats.core import Histogram, Outcome, StatsWindow
from snapbright.controlplane.health import ClusterHealth

US, EU, AP = "us-west", "eu-west", "ap-southeast"
NOW = 1000.0


def _called(stats: RegionalStats, service: str, caller: str, target: str, second: int) -> None:
    counts = [0] * len(Outcome)
    counts[Outcome.HTTP_2XX] = 5
    window = StatsWindow(second, service, target, tuple(counts), Histogram.of([0.01] * 5))
    assert stats.add(caller, window, float(second + 1))


def _services(view: ClusterHealth, now: float = NOW) -> list[str]:
    pairs = view.failover_pairs(now)
    assert all(caller == US for _, caller in pairs)
    return [service for service, _ in pairs]


@pytest.mark.parametrize(
    ("local", "remotes", "decided"),
    [
        (True, (EU,), True),  # a local failure can move traffic: decided before any call
        (True, (EU, AP), True),
        (False, (EU,), False),  # imported only, nobody calls it: the default
        (True, (), False),  # local only, nobody calls it: nowhere to move
    ],
    ids=["local-and-remote", "local-and-two-remotes", "imported-only", "local-only"],
)
def test_a_service_nobody_calls_is_decided_only_with_a_local_and_a_remote_copy(
    local: bool, remotes: tuple[str, ...], decided: bool
) -> None:
    view = ClusterHealth(US, RegionalStats())
    if local:
        view.set_local("pay", LocalService(2, NOW))
    for cluster in remotes:
        view.set_remote("pay", RemoteService(cluster, 1))
    assert _services(view) == (["pay"] if decided else [])


def test_a_service_called_from_here_is_decided_whatever_its_copies() -> None:
    stats = RegionalStats()
    view = ClusterHealth(US, stats)
    view.set_remote("imported", RemoteService(EU, 1))
    view.set_remote("quiet", RemoteService(EU, 1))
    _called(stats, "imported", US, EU, 998)
    _called(stats, "unknown", US, US, 998)  # called, though nobody serves it
    _called(stats, "theirs", EU, US, 998)  # eu-west's callers are not ours to decide
    assert _services(view) == ["imported", "unknown"]


def test_a_service_no_longer_called_for_the_stats_horizon_is_no_longer_decided() -> None:
    stats = RegionalStats(horizon_s=60)
    view = ClusterHealth(US, stats)
    view.set_remote("imported", RemoteService(EU, 1))
    _called(stats, "imported", US, EU, 998)
    assert _services(view, now=1058.0) == ["imported"]
    assert _services(view, now=1060.0) == []
    assert stats.traffic_keys() == frozenset()


def test_losing_either_copy_stops_the_decisions_and_the_view_still_observes() -> None:
    view = ClusterHealth(US, RegionalStats())
    view.set_local("pay", LocalService(2, NOW))
    view.set_remote("pay", RemoteService(EU, 1))
    view.set_remote("pay", RemoteService(AP, 1))
    view.remove_remote("pay", EU)
    assert _services(view) == ["pay"]  # ap-southeast still has a copy
    view.remove_remote("pay", AP)
    assert _services(view) == []
    view.set_remote("pay", RemoteService(EU, 1))
    assert _services(view) == ["pay"]
    view.set_local("pay", None)
    assert _services(view) == []
    # It is the health view the loop observes through: the copies are there.
    assert view.pairs(NOW) == [("pay", US)]
    observed = view.observe("pay", US, NOW)
    assert [t.cluster for t in observed.targets] == [US, EU]
    assert observed.targets[0].healthy_endpoints == 0
