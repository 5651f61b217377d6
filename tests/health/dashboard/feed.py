"""Fills a dashboard Board from real pieces: example traces played through the real failover core.

Each track is a (service, FailoverPolicy, FailoverTrace); every tick builds the observations the
trace describes, runs ``decide`` on them, and hands the board what a control plane would: the
regions and RTT its probes see, the per-region statistics, and the decision.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from health.dashboard.board import Board
from health.dashboard.model import (
    Region,
    RttLink,
    ServiceStats,
    degraded_metrics,
    region_status,
)
from health.failover.core import decide
from health.failover.model import (
    TOTAL_WEIGHT,
    ControllerState,
    Decision,
    FailoverPolicy,
    Observations,
    TargetObservation,
    Trace,
    TraceCluster,
)
from proxy.config.loader import Registry, load_file
from proxy.config.model import Document

EXAMPLES = Path(__file__).parents[3] / "deploy" / "examples"
_D = TypeVar("_D", bound=Document)
_KINDS: Registry = {"FailoverPolicy": FailoverPolicy, "FailoverTrace": Trace}

BROWNOUT_START = 60.0  # as written in trace-brownout.yaml


def load_example(name: str, kind: type[_D]) -> _D:
    """The single document of ``kind`` in deploy/examples/``name``."""
    result = load_file(EXAMPLES / name, _KINDS)
    assert result.diagnostics == (), result.diagnostics
    (document,) = result.documents
    assert isinstance(document, kind)
    return document


@dataclass
class Track:
    """One service in one caller cluster, replayed from a trace under a policy."""

    service: str
    policy: FailoverPolicy | None
    trace: Trace
    state: ControllerState = field(init=False)
    rng: random.Random = field(init=False)
    last: Decision | None = None
    observed: tuple[TargetObservation, ...] = ()

    def __post_init__(self) -> None:
        self.state = ControllerState.initial(self.trace.spec.caller)
        self.rng = random.Random(self.trace.spec.seed)

    def tick(self, now: float) -> Decision:
        """Observe the trace at ``now`` and run the core once."""
        spec = self.trace.spec
        self.observed = tuple(
            _observe(name, cluster, now, self.rng, self.state.weights, spec.request_rate)
            for name, cluster in sorted(spec.clusters.items())
        )
        observations = Observations(spec.caller, spec.request_rate, self.observed)
        decision = decide(self.policy, self.state, observations, now)
        self.state, self.last = decision.state, decision
        return decision


class TraceFeed:
    """Advances every track by one tick at a time and publishes the result to the board."""

    def __init__(self, board: Board, tracks: list[Track], *, start: float) -> None:
        self.board = board
        self.tracks = tracks
        self.start = start
        self.now = 0.0
        self.tick_length = tracks[0].trace.spec.tick

    def run(self, ticks: int) -> list[Decision]:
        """Play ``ticks`` ticks; return every decision made."""
        made: list[Decision] = []
        for _ in range(ticks):
            for track in self.tracks:
                decision = track.tick(self.now)
                self.board.observe(
                    track.service,
                    track.trace.spec.caller,
                    decision,
                    at=self.start + self.now,
                )
                made.append(decision)
            self._publish()
            self.now += self.tick_length
        return made

    def run_until(self, t: float) -> list[Decision]:
        """Play ticks until the trace time reaches ``t``."""
        return self.run(max(0, round((t - self.now) / self.tick_length)))

    def _publish(self) -> None:
        stats: list[ServiceStats] = []
        links: dict[tuple[str, str], float | None] = {}
        for track in self.tracks:
            caller = track.trace.spec.caller
            weights = track.state.weights
            for obs in track.observed:
                success = 1.0 - obs.error_rate
                stats.append(
                    ServiceStats(
                        service=track.service,
                        caller=caller,
                        region=obs.cluster,
                        p50=obs.p50,
                        p95=obs.p95,
                        p99=obs.p99,
                        success_rate=success,
                        request_rate=weights.get(obs.cluster, 0)
                        / TOTAL_WEIGHT
                        * track.trace.spec.request_rate,
                        degraded=degraded_metrics(
                            track.policy,
                            p50=obs.p50,
                            p95=obs.p95,
                            p99=obs.p99,
                            success_rate=success,
                        ),
                    )
                )
                if obs.cluster != caller:
                    # A round trip is the same both ways; the peer's own probes would agree.
                    links[(caller, obs.cluster)] = obs.rtt
                    links[(obs.cluster, caller)] = obs.rtt
        names = sorted({s.region for s in stats})
        local = self.tracks[0].trace.spec.caller
        regions = [
            Region(
                name=name,
                status=region_status(
                    reachable=True,
                    degraded_services=sum(1 for s in stats if s.region == name and s.degraded),
                ),
                local=name == local,
                detail=_detail(name, stats),
            )
            for name in names
        ]
        self.board.update(
            regions=regions,
            rtt=[RttLink(a, b, rtt) for (a, b), rtt in sorted(links.items())],
            services=stats,
        )


def _detail(region: str, stats: list[ServiceStats]) -> str:
    degraded = sorted({s.service for s in stats if s.region == region and s.degraded})
    served = sorted({s.service for s in stats if s.region == region})
    if degraded:
        return "slow or failing: " + ", ".join(degraded)
    return f"{len(served)} service(s) within thresholds"


def _observe(
    name: str,
    cluster: TraceCluster,
    now: float,
    rng: random.Random,
    weights: Mapping[str, int],
    request_rate: float,
) -> TargetObservation:
    """What the trace says ``name`` looks like at ``now``, with its jitter drawn from ``rng``."""
    sample = cluster.start
    extra = 0.0
    for change in cluster.changes:
        if change.applies(now):
            written = change.set_.model_fields_set
            sample = sample.model_copy(update={k: getattr(change.set_, k) for k in written})
            extra += change.add_latency
    jitter = cluster.jitter
    shift = extra + rng.uniform(-jitter.latency, jitter.latency)
    rtt = max(0.0, (sample.rtt or 0.0) + rng.uniform(-jitter.rtt, jitter.rtt))
    error_rate = min(
        1.0,
        max(0.0, (sample.error_rate or 0.0) + rng.uniform(-jitter.error_rate, jitter.error_rate)),
    )
    headroom = sample.headroom
    if headroom is not None:
        headroom -= weights.get(name, 0) / TOTAL_WEIGHT * request_rate

    def shifted(value: float | None) -> float | None:
        return None if value is None else max(0.0, value + shift)

    return TargetObservation(
        cluster=name,
        observed_at=now - (sample.age or 0.0),
        samples=sample.samples if sample.samples is not None else 100,
        healthy_endpoints=sample.healthy_endpoints if sample.healthy_endpoints is not None else 1,
        p50=shifted(sample.p50),
        p90=shifted(sample.p90),
        p95=shifted(sample.p95),
        p99=shifted(sample.p99),
        error_rate=error_rate,
        rtt=rtt,
        headroom=headroom,
    )


def example_feed(board: Board, *, start: float, service: str = "payments") -> TraceFeed:
    """The brownout example for ``service`` and the noise example for ``ledger``, both from
    us-west under the payments policy."""
    policy = load_example("failover-payments.yaml", FailoverPolicy)
    tracks = [
        Track(service, policy, load_example("trace-brownout.yaml", Trace)),
        Track("ledger", policy, load_example("trace-noise.yaml", Trace)),
    ]
    return TraceFeed(board, tracks, start=start)
