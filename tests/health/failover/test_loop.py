"""The failover loop on a fake clock over scripted regional statistics: no sleeping.

us-west calls payments at 100 requests/s; eu-west serves it in 60 ms (p95) 80 ms away. The
sidecars' per-second windows go into real :class:`RegionalStats`, eu-west's summary and the
gateway probe into a real :class:`HealthView`, and the loop is ticked once per virtual second.
The loop decides the pairs the view names (every service it knows) unless a test names them.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from federation.peering.model import ServiceHealth, ServiceKey
from health.failover.loop import FailoverLoop
from health.failover.model import (
    TOTAL_WEIGHT,
    Decision,
    Direction,
    FailoverPolicy,
    Mode,
    Observations,
    Rule,
)
from health.failover.record import Journal, read_journal
from health.probe.core import ProbeSettings, ProbeStatus
from health.stats.core import HealthView, LocalService, RegionalStats, RemoteService
from proxy.config.model import API_VERSION
from proxy.stats.core import Histogram, Outcome, StatsWindow

US, EU = "us-west", "eu-west"
PAYMENTS = "payments"
RATE = 100  # requests/s from us-west
HEALTHY, BROWNOUT = 0.040, 0.440  # local latency before/after +400 ms
GATEWAY = ProbeStatus().succeeded(0.080, 0.0, ProbeSettings())

Latency = Callable[[int], float]
Observe = Callable[[str, str, float], Observations]


def _policy(service: str = PAYMENTS, name: str = "payments") -> FailoverPolicy:
    return FailoverPolicy.model_validate(
        {
            "apiVersion": API_VERSION,
            "kind": "FailoverPolicy",
            "metadata": {"name": name},
            "spec": {
                "service": service,
                "triggers": {
                    "latency": {
                        "percentile": "p95",
                        "enter": "300ms",
                        "exit": "150ms",
                        "enterAfter": "1s",
                        "exitAfter": "3s",
                    }
                },
                "ramp": {"step": "25%", "interval": "1s"},
                "keepShare": "2%",
                "failback": {"stableFor": "5s", "step": "20%", "interval": "1s"},
                "evidence": {"minSamples": 20, "maxAge": "5s"},
            },
        }
    )


class Mesh:
    """Scripted traffic and health, a real view and stats, the loop under test."""

    def __init__(
        self,
        latency: Latency,
        *,
        policies: tuple[FailoverPolicy, ...] = (_policy(),),
        healthy_local: Callable[[int], int] = lambda t: 3,
        journal: Journal | None = None,
        apply: Callable[[str, str, Mapping[str, int]], None] | None = None,
        observe: Callable[[HealthView], Observe] | None = None,
        on_decision: Callable[[str, str, Decision], None] | None = None,
        pairs: Callable[[float], Iterable[tuple[str, str]]] | None = None,
    ) -> None:
        self.latency = latency
        self.healthy_local = healthy_local
        self.stats = RegionalStats()
        self.view = HealthView(US, self.stats)
        self.view.set_gateways({EU: GATEWAY})
        self.registry = CollectorRegistry()
        self.applied: list[tuple[float, str, str, dict[str, int]]] = []
        self.now = 0.0
        self.weights: dict[str, int] = {US: TOTAL_WEIGHT}
        self.loop = FailoverLoop(
            US,
            pairs=pairs or self.view.pairs,
            observe=observe(self.view) if observe is not None else self.view.observe,
            apply=apply or self._apply,
            journal=journal or Journal(),
            registry=self.registry,
            policies=policies,
            clock=lambda: self.now,
            wall_clock=lambda: 1_800_000_000.0 + self.now,
            on_decision=on_decision,
        )

    def _apply(self, service: str, caller: str, weights: Mapping[str, int]) -> None:
        self.applied.append((self.now, service, caller, dict(weights)))
        if service == PAYMENTS:
            # None given (the pair released): discovery's default, all to the healthy local.
            self.weights = dict(weights) or {US: TOTAL_WEIGHT}

    def run(self, until: int, start: int = 1) -> None:
        """Tick once per second from ``start`` to ``until``; traffic follows applied weights."""
        for t in range(start, until + 1):
            self.now = float(t)
            self._traffic(t - 1)
            self.loop.tick()

    def _traffic(self, second: int) -> None:
        local = round(RATE * self.weights.get(US, 0) / TOTAL_WEIGHT)
        remote = RATE - local
        if local:
            latency = self.latency(second)
            histogram = Histogram.of([latency * (0.9 + 0.2 * i / local) for i in range(local)])
            counts = [0] * len(Outcome)
            counts[Outcome.HTTP_2XX] = local
            window = StatsWindow(second, PAYMENTS, US, tuple(counts), histogram)
            assert self.stats.add(US, window, self.now)
        if remote:
            counts = [0] * len(Outcome)
            counts[Outcome.HTTP_2XX] = remote
            histogram = Histogram.of([0.140] * remote)
            assert self.stats.add(
                US, StatsWindow(second, PAYMENTS, EU, tuple(counts), histogram), self.now
            )
        self.view.set_local(PAYMENTS, LocalService(self.healthy_local(second), self.now))
        summary = ServiceHealth(
            ServiceKey("default", PAYMENTS), 0.030, 0.060, 0.090, 0.999, 50.0, 1000.0, 4
        )
        self.view.set_remote(PAYMENTS, RemoteService(EU, 4, summary, received_at=self.now))

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


def _brownout(start: int = 10, end: int = 10**9) -> Latency:
    return lambda second: BROWNOUT if start <= second < end else HEALTHY


def _share(weights: Mapping[str, int], cluster: str) -> float:
    return weights.get(cluster, 0) / TOTAL_WEIGHT


# --- A brownout, end to end ---


def test_a_brownout_moves_weights_and_apply_gets_them() -> None:
    mesh = Mesh(_brownout(start=10))
    mesh.run(until=10)
    assert mesh.applied == []  # healthy: nothing to push
    mesh.run(start=11, until=20)
    first = mesh.applied[0]
    assert first[1:3] == (PAYMENTS, US)
    assert 0 < _share(first[3], EU) <= 0.25
    # Second 10 is slow; its window closes at 11 (over enter): slow since 10, so enterAfter
    # (1 s), counted from when the evidence says the brownout began, has held at 11.
    assert first[0] == 11.0
    assert mesh.weights == {US: 200, EU: 9800}  # all but the kept 2 %
    shares = [_share(w, EU) for *_, w in mesh.applied]
    assert shares == sorted(shares)  # in steps, one way


def test_the_journal_holds_the_explanation_inputs_and_weights() -> None:
    mesh = Mesh(_brownout(start=10))
    mesh.run(until=20)
    records = mesh.loop.journal.for_service(PAYMENTS)
    entered = next(r for r in records if r.rule is Rule.ENTER_DEGRADED)
    assert entered.policy == "payments"
    assert entered.caller_cluster == US
    assert entered.previous_weights == {US: TOTAL_WEIGHT, EU: 0}
    assert entered.weights[EU] > 0
    assert entered.transition is Direction.AWAY
    assert "degraded by latency" in entered.explanation
    assert "p95" in entered.explanation
    assert entered.expected_latency[EU] == pytest.approx(0.140)  # 60 ms there + 80 ms between
    local, remote = entered.inputs.targets
    assert (local.cluster, remote.cluster, remote.rtt) == (US, EU, 0.080)
    assert local.p95 is not None
    assert local.p95 > 0.3
    assert entered.unix_time == 1_800_000_000.0 + entered.at
    # Every weight change is in the journal.
    changes = [r for r in records if r.weights != r.previous_weights]
    assert len(changes) == len(mesh.applied)


def test_metrics_show_route_weights_and_one_transition() -> None:
    mesh = Mesh(_brownout(start=10))
    mesh.run(until=20)
    labels = {"service": PAYMENTS, "source_cluster": US}
    assert mesh.metric("snapbright_route_weight", **labels, target_cluster=EU) == 0.98
    assert mesh.metric("snapbright_route_weight", **labels, target_cluster=US) == 0.02
    transitions = [
        s
        for m in mesh.registry.collect()
        if m.name == "snapbright_failover_transitions"
        for s in m.samples
        if s.name.endswith("_total")
    ]
    assert [(s.labels, s.value) for s in transitions] == [
        (
            {
                "service": PAYMENTS,
                "from_cluster": US,
                "to_cluster": EU,
                "reason": "enter-degraded",
            },
            1.0,
        )
    ]
    holds = mesh.metric("snapbright_failover_decisions_total", rule="hold")
    assert holds is not None
    assert holds >= 10
    assert mesh.metric("snapbright_failover_pairs") == 1.0


def test_the_exposition_passes_promtool() -> None:
    mesh = Mesh(_brownout(start=10, end=30))
    mesh.run(until=60)
    text = mesh.exposition()
    assert "snapbright_route_weight{" in text
    checked = subprocess.run(
        ["/usr/bin/promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_recovery_fails_back_gradually_and_counts_one_transition_back() -> None:
    mesh = Mesh(_brownout(start=10, end=25))
    mesh.run(until=80)
    assert mesh.weights == {US: TOTAL_WEIGHT}
    back = [w for t, *_, w in mesh.applied if t > 25]
    assert len(back) >= 4  # 98 % home in 20 % steps
    shares = [_share(w, EU) for w in back]
    assert shares == sorted(shares, reverse=True)
    assert (
        mesh.metric(
            "snapbright_failover_transitions_total",
            service=PAYMENTS,
            from_cluster=EU,
            to_cluster=US,
            reason="failback-step",
        )
        == 1.0
    )
    state = mesh.loop.state(PAYMENTS, US)
    assert state is not None
    assert state.mode is Mode.STEADY


def test_latency_noise_without_degradation_moves_nothing() -> None:
    rng = random.Random(5)
    jitter = {second: HEALTHY + rng.uniform(-0.030, 0.030) for second in range(200)}
    mesh = Mesh(lambda second: jitter[second])
    mesh.run(until=120)
    assert mesh.applied == []
    assert mesh.loop.journal.for_service(PAYMENTS) == []


# --- Without a policy, and policies changing ---


def test_without_a_policy_a_brownout_moves_nothing() -> None:
    mesh = Mesh(_brownout(start=5), policies=())
    mesh.run(until=30)
    assert mesh.applied == []
    assert mesh.weights == {US: TOTAL_WEIGHT}


def test_without_a_policy_no_healthy_local_endpoint_moves_everything_at_once() -> None:
    mesh = Mesh(lambda _: HEALTHY, policies=(), healthy_local=lambda t: 0 if 10 <= t < 20 else 3)
    mesh.run(until=12)
    assert mesh.applied[0][0] == 11.0  # the first tick that sees no healthy endpoint
    assert mesh.applied[0][3] == {EU: TOTAL_WEIGHT}
    record = mesh.loop.journal.for_service(PAYMENTS)[-1]
    assert record.rule is Rule.NO_HEALTHY_LOCAL
    assert record.policy is None


def test_removing_the_policy_mid_brownout_brings_traffic_home() -> None:
    mesh = Mesh(_brownout(start=10))
    mesh.run(until=20)
    assert _share(mesh.weights, EU) == 0.98
    mesh.loop.set_policies([])
    assert mesh.loop.policies == {}
    mesh.run(start=21, until=60)
    assert mesh.weights == {US: TOTAL_WEIGHT}


def test_a_policy_added_while_running_takes_effect_on_the_next_tick() -> None:
    mesh = Mesh(_brownout(start=5), policies=())
    mesh.run(until=15)
    assert mesh.applied == []
    mesh.loop.set_policies([_policy()])
    mesh.run(start=16, until=20)
    assert mesh.applied
    # The first tick under the policy (16) sees second 15 slow: enterAfter (1 s) has held.
    assert mesh.applied[0][0] == 16.0


def test_two_policies_for_one_service_are_refused_and_the_old_set_stays() -> None:
    mesh = Mesh(_brownout())
    with pytest.raises(ValueError, match="two FailoverPolicies for service 'payments'"):
        mesh.loop.set_policies([_policy(name="a"), _policy(name="b")])
    assert mesh.loop.policies[PAYMENTS].metadata.name == "payments"


# --- Which pairs are decided, and handing them back ---

LEDGER = "ledger"  # imported from eu-west only: no local copy


class _Named:
    """The pairs the control plane names each tick (callers seen, a local copy that can
    fail over), as a test sets them."""

    def __init__(self, *services: str) -> None:
        self.services = set(services)

    def __call__(self, _now: float) -> list[tuple[str, str]]:
        return [(service, US) for service in sorted(self.services)]


def _import_ledger(mesh: Mesh) -> None:
    mesh.view.set_remote(LEDGER, RemoteService(EU, 2))


def _ledger(mesh: Mesh) -> list[tuple[float, dict[str, int]]]:
    return [(t, weights) for t, service, _, weights in mesh.applied if service == LEDGER]


def _gauge(mesh: Mesh, service: str, target: str) -> float | None:
    return mesh.metric(
        "snapbright_route_weight", service=service, source_cluster=US, target_cluster=target
    )


def test_a_service_nobody_names_and_without_a_policy_is_not_decided() -> None:
    mesh = Mesh(lambda _: HEALTHY, pairs=_Named())
    _import_ledger(mesh)
    mesh.run(until=5)
    assert mesh.loop.last_decision(LEDGER, US) is None
    assert _ledger(mesh) == []
    assert mesh.loop.journal.for_service(LEDGER) == []
    assert _gauge(mesh, LEDGER, EU) is None
    # payments is named by nobody either, but has a policy.
    assert mesh.loop.last_decision(PAYMENTS, US) is not None
    assert mesh.metric("snapbright_failover_pairs") == 1.0


def test_a_called_import_goes_remote_and_is_handed_back_to_the_default_when_calls_stop() -> None:
    named = _Named(LEDGER)
    mesh = Mesh(lambda _: HEALTHY, pairs=named)
    _import_ledger(mesh)
    mesh.run(until=3)
    decision = mesh.loop.last_decision(LEDGER, US)
    assert decision is not None
    assert (decision.rule, decision.state.mode) == (Rule.NO_HEALTHY_LOCAL, Mode.LOCAL_DOWN)
    assert _ledger(mesh) == [(1.0, {EU: TOTAL_WEIGHT})]
    assert _gauge(mesh, LEDGER, EU) == 1.0
    named.services.clear()
    mesh.run(start=4, until=6)
    # Nothing to come home to (no local copy): released at once, to discovery's default.
    assert _ledger(mesh) == [(1.0, {EU: TOTAL_WEIGHT}), (4.0, {})]
    assert mesh.loop.last_decision(LEDGER, US) is None
    assert _gauge(mesh, LEDGER, EU) is None
    assert _gauge(mesh, LEDGER, US) is None
    # Called again: decided from the initial state, as the first time.
    named.services.add(LEDGER)
    mesh.run(start=7, until=7)
    assert _ledger(mesh)[-1] == (7.0, {EU: TOTAL_WEIGHT})
    assert [r.rule for r in mesh.loop.journal.for_service(LEDGER)] == [
        Rule.NO_HEALTHY_LOCAL,
        Rule.NO_HEALTHY_LOCAL,
    ]


def test_traffic_away_is_decided_until_it_is_home_then_handed_back() -> None:
    named = _Named(PAYMENTS)
    mesh = Mesh(_brownout(start=10, end=25), pairs=named)
    mesh.run(until=20)
    assert _share(mesh.weights, EU) == 0.98
    # Neither named nor with a policy any more, but 98 % is away from a healthy local copy.
    named.services.clear()
    mesh.loop.set_policies([])
    mesh.run(start=21, until=80)
    home = next(t for t, *_, w in mesh.applied if w == {US: TOTAL_WEIGHT})
    assert home > 25
    back = [_share(w, EU) for t, *_, w in mesh.applied if 20 < t <= home]
    assert len(back) >= 4  # gradually, not at once
    assert back == sorted(back, reverse=True)
    # The tick after it came home, the pair is released (and its gauges go).
    assert mesh.applied[-1][0] == home + 1
    assert mesh.applied[-1][1:] == (PAYMENTS, US, {})
    assert mesh.loop.last_decision(PAYMENTS, US) is None
    assert _gauge(mesh, PAYMENTS, US) is None
    assert mesh.metric("snapbright_failover_pairs") == 0.0


def test_a_failed_hand_back_is_offered_again_on_the_next_tick() -> None:
    calls: list[tuple[str, dict[str, int]]] = []

    def flaky(service: str, caller: str, weights: Mapping[str, int]) -> None:
        calls.append((service, dict(weights)))
        if not weights and sum(1 for _, w in calls if not w) == 1:
            raise ConnectionError("discovery stream down")

    named = _Named(LEDGER)
    mesh = Mesh(lambda _: HEALTHY, pairs=named, apply=flaky)
    _import_ledger(mesh)
    mesh.run(until=2)
    named.services.clear()
    mesh.run(start=3, until=6)
    assert [w for service, w in calls if service == LEDGER] == [{EU: TOTAL_WEIGHT}, {}, {}]


def test_route_weight_gauges_follow_every_change_and_only_the_targets_held() -> None:
    mesh = Mesh(_brownout(start=10, end=25))
    seen: list[tuple[float | None, float | None]] = []
    for t in range(1, 81):
        mesh.run(start=t, until=t)
        seen.append((_gauge(mesh, PAYMENTS, US), _gauge(mesh, PAYMENTS, EU)))
        decision = mesh.loop.last_decision(PAYMENTS, US)
        assert decision is not None
        expected = {c: w / TOTAL_WEIGHT for c, w in decision.weights.items()}
        assert seen[-1] == (expected.get(US), expected.get(EU))
    assert len(set(seen)) > 5  # it moved away and back in steps


# --- Applying, recording, forgetting ---


def test_a_failed_apply_is_retried_on_the_next_tick() -> None:
    calls: list[dict[str, int]] = []

    def flaky(service: str, caller: str, weights: Mapping[str, int]) -> None:
        calls.append(dict(weights))
        if len(calls) == 1:
            raise ConnectionError("discovery stream down")

    mesh = Mesh(_brownout(start=10), apply=flaky)
    mesh.run(until=13)
    assert len(calls) >= 2
    assert calls[1][EU] >= calls[0][EU]  # offered again (or further along)


def test_a_repeated_rule_with_nothing_changed_is_recorded_once() -> None:
    mesh = Mesh(lambda _: HEALTHY)
    mesh.view.set_local("idle", LocalService(2, -100.0))  # stale: no-local-data every tick
    mesh.run(until=30)
    idle = mesh.loop.journal.for_service("idle")
    assert [r.rule for r in idle] == [Rule.NO_LOCAL_DATA]
    decisions = mesh.metric("snapbright_failover_decisions_total", rule="no-local-data")
    assert decisions == 30.0


def test_a_healthy_service_fills_no_journal() -> None:
    mesh = Mesh(lambda _: HEALTHY)
    mesh.run(until=30)
    assert mesh.loop.journal.for_service(PAYMENTS) == []
    assert mesh.loop.last_decision(PAYMENTS, US) is not None


def test_a_pair_that_disappears_is_forgotten_with_its_gauges() -> None:
    mesh = Mesh(lambda _: HEALTHY, policies=())
    mesh.view.set_local("orders", LocalService(1, 0.0))
    mesh.run(until=2)
    labels = {"service": "orders", "source_cluster": US, "target_cluster": US}
    assert mesh.metric("snapbright_route_weight", **labels) == 1.0
    mesh.view.set_local("orders", None)
    mesh.run(start=3, until=3)
    assert mesh.metric("snapbright_route_weight", **labels) is None
    assert mesh.loop.state("orders", US) is None


def test_a_failing_pair_does_not_stop_the_others() -> None:
    def broken_for_orders(view: HealthView) -> Observe:
        def observe(service: str, caller: str, now: float) -> Observations:
            if service == "orders":
                raise RuntimeError("bad data")
            return view.observe(service, caller, now)

        return observe

    mesh = Mesh(_brownout(start=10), observe=broken_for_orders)
    mesh.view.set_local("orders", LocalService(1, 0.0))
    mesh.run(until=20)
    assert _share(mesh.weights, EU) == 0.98


def test_every_decision_goes_to_the_observer_even_when_it_fails() -> None:
    seen: list[tuple[str, str, float, Rule]] = []

    def watch(service: str, caller: str, decision: Decision) -> None:
        seen.append((service, caller, decision.at, decision.rule))
        raise RuntimeError("a broken dashboard must not stop failover")

    mesh = Mesh(_brownout(start=10), on_decision=watch)
    mesh.run(until=20)
    assert [at for _, _, at, _ in seen] == [float(t) for t in range(1, 21)]
    assert {(service, caller) for service, caller, *_ in seen} == {(PAYMENTS, US)}
    assert (PAYMENTS, US, 11.0, Rule.ENTER_DEGRADED) in seen
    assert _share(mesh.weights, EU) == 0.98


def test_the_journal_file_holds_what_memory_holds(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    journal = Journal(path=path)
    mesh = Mesh(_brownout(start=10, end=25), journal=journal)
    mesh.run(until=60)
    journal.close()
    assert list(read_journal(path)) == journal.for_service(PAYMENTS)


async def test_run_ticks_every_interval_on_the_clock_and_never_bursts() -> None:
    mesh = Mesh(lambda _: HEALTHY)
    delays: list[float] = []

    async def fake_sleep(delay: float) -> None:
        delays.append(delay)
        # The third tick ran late (a slow apply): 2.5 s passed instead of 1 s.
        mesh.now += 2.5 if len(delays) == 3 else delay
        if len(delays) == 6:
            raise asyncio.CancelledError
        await asyncio.sleep(0)

    loop = FailoverLoop(
        US,
        pairs=mesh.view.pairs,
        observe=mesh.view.observe,
        apply=lambda *_: None,
        journal=Journal(),
        registry=CollectorRegistry(),
        clock=lambda: mesh.now,
        sleep=fake_sleep,
    )
    mesh.view.set_local(PAYMENTS, LocalService(1, 0.0))
    with pytest.raises(asyncio.CancelledError):
        await loop.run()
    # Late by 1.5 s: the missed tick is skipped, the cadence resumes; no catch-up burst.
    assert delays == [1.0] * 6
    decision = loop.last_decision(PAYMENTS, US)
    assert decision is not None
    assert decision.at == 6.5


async def test_with_a_phase_ticks_fall_just_after_each_whole_second_when_windows_arrive() -> None:
    mesh = Mesh(lambda _: HEALTHY)
    mesh.now = 100.37  # started anywhere in a second
    ticks: list[float] = []

    async def fake_sleep(delay: float) -> None:
        # The third sleep overruns by 1.3 s (a stalled loop): that tick is skipped, no burst.
        mesh.now += delay + (1.3 if len(ticks) == 3 else 0.0)
        if len(ticks) == 5:
            raise asyncio.CancelledError
        await asyncio.sleep(0)

    def on_decision(_service: str, _caller: str, decision: Decision) -> None:
        ticks.append(round(decision.at, 6))

    loop = FailoverLoop(
        US,
        pairs=mesh.view.pairs,
        observe=mesh.view.observe,
        apply=lambda *_: None,
        journal=Journal(),
        registry=CollectorRegistry(),
        clock=lambda: mesh.now,
        phase=0.25,
        sleep=fake_sleep,
        on_decision=on_decision,
    )
    mesh.view.set_local(PAYMENTS, LocalService(1, 0.0))
    with pytest.raises(asyncio.CancelledError):
        await loop.run()
    assert ticks == [100.37, 101.25, 102.25, 104.55, 105.25]


@pytest.mark.parametrize("phase", [-0.1, 1.0, 1.5])
def test_a_phase_outside_the_interval_is_refused(phase: float) -> None:
    with pytest.raises(ValueError, match="phase"):
        FailoverLoop(
            US,
            pairs=lambda _: [],
            observe=lambda *_: Mesh(lambda _: HEALTHY).view.observe(PAYMENTS, US, 0.0),
            apply=lambda *_: None,
            journal=Journal(),
            registry=CollectorRegistry(),
            phase=phase,
        )
