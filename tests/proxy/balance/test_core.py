"""Target-cluster weights and power-of-two-choices over peak-EWMA, in virtual time."""

from __future__ import annotations

import math
from collections import Counter
from random import Random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.balance.core import Endpoint, WeightedTargets, p2c_pick, pick_cluster


class _TopRandom(Random):
    """Draws the largest float below 1, the value where float rounding bites."""

    def random(self) -> float:
        return math.nextafter(1.0, 0.0)


def _endpoints(count: int, now: float = 0.0) -> list[Endpoint]:
    # A small starting estimate, so the first observed response sets it (a peak).
    return [Endpoint("10.0.0.1", 8000 + i, now, default_rtt_s=0.001) for i in range(count)]


# --- target clusters by weight -------------------------------------------------------------


def test_weighted_pick_follows_weights() -> None:
    weights = {"payments": 70.0, "payments@ap-southeast": 20.0, "payments@eu-west": 10.0}
    targets = WeightedTargets(weights)
    rng = Random(7)
    draws = 20_000
    seen = Counter(targets.pick(rng) for _ in range(draws))
    total = sum(weights.values())
    chi_square = sum(
        (seen[target] - draws * weight / total) ** 2 / (draws * weight / total)
        for target, weight in weights.items()
    )
    # 13.8 is the 99.9th percentile of chi-square with 2 degrees of freedom.
    assert chi_square < 13.8


@given(
    weights=st.dictionaries(
        st.sampled_from(["a", "b", "c", "d", "e"]),
        st.sampled_from([0.0, 0.5, 1.0, 3.0, 100.0]),
        min_size=1,
    ),
    seed=st.integers(0, 2**32),
)
def test_zero_weight_target_is_never_picked(weights: dict[str, float], seed: int) -> None:
    targets = WeightedTargets(weights)
    rng = Random(seed)
    picked = {targets.pick(rng) for _ in range(50)}
    if all(weight == 0 for weight in weights.values()):
        assert picked == {None}
    else:
        assert picked <= {target for target, weight in weights.items() if weight > 0}


@pytest.mark.parametrize("weights", [{}, {"payments": 0.0, "payments@eu-west": 0}])
def test_all_zero_weights_pick_nothing(weights: dict[str, float]) -> None:
    targets = WeightedTargets(weights)
    assert targets.targets == ()
    assert targets.pick(Random(1)) is None
    assert pick_cluster(weights, Random(1)) is None


def test_single_target_is_picked_without_drawing() -> None:
    targets = WeightedTargets({"payments": 0.0, "payments@eu-west": 5.0})
    rng = Random(3)
    state = rng.getstate()
    assert targets.pick(rng) == "payments@eu-west"
    assert rng.getstate() == state


def test_top_draw_rounding_picks_last_target() -> None:
    targets = WeightedTargets({"a": 0.1, "b": 0.2, "c": 0.7})
    assert targets.pick(_TopRandom()) == "c"


def test_subnormal_weights_are_rejected() -> None:
    with pytest.raises(ValueError, match="too small to pick from"):
        WeightedTargets({"payments": 5e-324})


def test_pick_cluster_matches_weighted_targets() -> None:
    weights = {"a": 1.0, "b": 2.0}
    one_shot = [pick_cluster(weights, Random(seed)) for seed in range(20)]
    table = WeightedTargets(weights)
    assert one_shot == [table.pick(Random(seed)) for seed in range(20)]


@pytest.mark.parametrize(
    ("weight", "error"),
    [(-1.0, ValueError), (math.nan, ValueError), (math.inf, ValueError)],
)
def test_invalid_weight_is_rejected(weight: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="weight of target 'payments'"):
        WeightedTargets({"payments": weight})  # type: ignore[dict-item]


def test_a_weight_that_is_not_a_number_is_a_type_error() -> None:
    # Compiled (mypyc), the signature refuses it before the check that names the target.
    with pytest.raises(TypeError):
        WeightedTargets({"payments": "5"})  # type: ignore[dict-item]


# --- endpoints by power of two choices ----------------------------------------------------


def test_p2c_prefers_the_faster_endpoint() -> None:
    fast, slow = _endpoints(2)
    fast.observe(0.010, 1.0)
    slow.observe(0.100, 1.0)
    rng = Random(11)
    assert all(p2c_pick([fast, slow], rng, 1.0) is fast for _ in range(100))


def test_p2c_prefers_the_less_loaded_endpoint() -> None:
    idle, busy = _endpoints(2)
    busy.start()
    rng = Random(11)
    assert all(p2c_pick([busy, idle], rng, 0.0) is idle for _ in range(100))


def test_cost_is_latency_times_outstanding_plus_one() -> None:
    endpoint = Endpoint("10.0.0.1", 80, 0.0, default_rtt_s=0.02)
    for _ in range(3):
        endpoint.start()
    assert endpoint.cost(0.0) == pytest.approx(0.08)
    endpoint.end()
    assert endpoint.cost(0.0) == pytest.approx(0.06)


def test_p2c_never_picks_the_costliest_of_three() -> None:
    endpoints = _endpoints(3)
    for endpoint, rtt in zip(endpoints, [0.01, 0.02, 0.5], strict=True):
        endpoint.observe(rtt, 0.0)
    rng = Random(5)
    picks = Counter(p2c_pick(endpoints, rng, 0.0) for _ in range(3000))
    assert picks[endpoints[2]] == 0
    # The cheapest wins both of its pairs, the middle one only against the costliest.
    assert picks[endpoints[0]] == pytest.approx(2000, rel=0.1)
    assert picks[endpoints[1]] == pytest.approx(1000, rel=0.1)


_endpoint_state = st.tuples(
    st.floats(1e-4, 10.0),  # observed response time
    st.floats(0.0, 100_000.0),  # when it was observed
    st.integers(0, 50),  # outstanding requests
    st.sampled_from([1.0, 10.0]),  # decay time constant
)


@given(a=_endpoint_state, b=_endpoint_state, now=st.floats(0.0, 200_000.0), seed=st.integers(0, 99))
def test_p2c_of_two_picks_the_lower_cost(
    a: tuple[float, float, int, float],
    b: tuple[float, float, int, float],
    now: float,
    seed: int,
) -> None:
    pair = []
    for port, (rtt, stamp, outstanding, decay) in enumerate((a, b), start=1):
        endpoint = Endpoint("10.0.0.1", port, 0.0, default_rtt_s=1e-6, decay_s=decay)
        endpoint.observe(rtt, stamp)
        for _ in range(outstanding):
            endpoint.start()
        pair.append(endpoint)
    costs = [endpoint.cost(now) for endpoint in pair]
    picked = p2c_pick(pair, Random(seed), now)
    assert picked is not None
    if not math.isclose(costs[0], costs[1], rel_tol=1e-9, abs_tol=1e-300):
        assert picked is pair[costs.index(min(costs))]


def test_peak_ewma_jumps_at_once_to_a_slow_response() -> None:
    endpoint = Endpoint("10.0.0.1", 80, 0.0, default_rtt_s=0.01)
    endpoint.observe(0.5, 0.001)
    assert endpoint.ewma(0.001) == 0.5


def test_peak_ewma_blends_fast_responses_with_time_constant() -> None:
    endpoint = Endpoint("10.0.0.1", 80, 0.0, default_rtt_s=0.01, decay_s=10.0)
    endpoint.observe(0.5, 0.0)
    endpoint.observe(0.01, 10.0)
    weight = math.exp(-1.0)
    assert endpoint.ewma(10.0) == pytest.approx(0.5 * weight + 0.01 * (1 - weight))


def test_fast_responses_in_quick_succession_barely_move_the_peak() -> None:
    endpoint = Endpoint("10.0.0.1", 80, 0.0, decay_s=10.0)
    endpoint.observe(0.5, 0.0)
    for i in range(1, 11):
        endpoint.observe(0.01, i * 0.001)
    # Ten fast answers within 10 ms move a 10 s time constant by about 0.1 %.
    assert endpoint.ewma(0.01) == pytest.approx(0.5, rel=2e-3)


def test_idle_endpoint_estimate_decays_towards_zero() -> None:
    endpoint = Endpoint("10.0.0.1", 80, 0.0, decay_s=10.0)
    endpoint.observe(0.5, 0.0)
    assert endpoint.ewma(10.0) == pytest.approx(0.5 * math.exp(-1.0))
    assert endpoint.ewma(100.0) < 0.5 * 1e-4


def test_rested_slow_endpoint_is_picked_again() -> None:
    rested, steady = _endpoints(2)
    rested.observe(1.0, 0.0)
    steady.observe(0.05, 29.0)
    steady.observe(0.05, 30.0)
    rng = Random(1)
    assert p2c_pick([rested, steady], rng, 1.0) is steady
    # After 40 s (four time constants) without answers, 1 s decays to about 18 ms.
    assert p2c_pick([rested, steady], rng, 40.0) is rested


def test_p2c_compares_with_an_endpoint_idle_for_hours() -> None:
    idle, busy = _endpoints(2)
    idle.observe(0.05, 0.0)
    busy.observe(0.05, 7200.0)
    busy.start()
    # Two hours at a 10 s time constant: the idle estimate has decayed to nothing.
    assert p2c_pick([busy, idle], Random(1), 7200.0) is idle
    assert p2c_pick([idle, busy], Random(1), 7200.0) is idle


def test_p2c_never_picks_an_ejected_endpoint() -> None:
    endpoints = _endpoints(5)
    for endpoint in endpoints[:4]:
        endpoint.ejected_until = 30.0
    rng = Random(2)
    assert {p2c_pick(endpoints, rng, 10.0) for _ in range(200)} == {endpoints[4]}


def test_ejected_endpoint_returns_to_rotation_when_its_time_passes() -> None:
    endpoints = _endpoints(2)
    endpoints[0].ejected_until = 30.0
    endpoints[1].start()
    rng = Random(2)
    assert p2c_pick(endpoints, rng, 29.9) is endpoints[1]
    assert p2c_pick(endpoints, rng, 30.0) is endpoints[0]


def test_p2c_with_everything_ejected_picks_nothing() -> None:
    endpoints = _endpoints(3)
    for endpoint in endpoints:
        endpoint.ejected_until = 30.0
    assert p2c_pick(endpoints, Random(2), 10.0) is None


def test_p2c_with_one_endpoint_picks_it() -> None:
    (only,) = _endpoints(1)
    only.start()
    assert p2c_pick([only], Random(2), 0.0) is only
    only.ejected_until = 5.0
    assert p2c_pick([only], Random(2), 0.0) is None


def test_p2c_with_no_endpoints_picks_nothing() -> None:
    assert p2c_pick([], Random(2), 0.0) is None


def test_p2c_draws_every_endpoint_equally_often() -> None:
    endpoints = _endpoints(4)
    rng = Random(8)
    # Equal costs: the first of the pair wins, so picks show how often each is drawn first.
    picks = Counter(p2c_pick(endpoints, rng, 0.0) for _ in range(8000))
    assert all(picks[endpoint] == pytest.approx(2000, rel=0.1) for endpoint in endpoints)


def test_p2c_top_draw_rounding_stays_in_range() -> None:
    endpoints = _endpoints(3)
    assert p2c_pick(endpoints, _TopRandom(), 0.0) is endpoints[2]


@given(count=st.integers(2, 20), seed=st.integers(0, 2**32))
def test_p2c_spreads_over_equal_endpoints(count: int, seed: int) -> None:
    endpoints = _endpoints(count)
    rng = Random(seed)
    picks = [p2c_pick(endpoints, rng, 0.0) for _ in range(count * 20)]
    assert None not in picks
    # With equal costs the first of the pair wins, so every endpoint can be picked.
    assert len(set(picks)) > 1


@pytest.mark.parametrize("rtt", [math.nan, math.inf, -0.001])
def test_impossible_response_time_is_refused(rtt: float) -> None:
    (endpoint,) = _endpoints(1)
    with pytest.raises(ValueError, match="response time must be finite and >= 0"):
        endpoint.observe(rtt, 1.0)
    assert endpoint.ewma(0.0) == 0.001


def test_end_without_start_is_an_error() -> None:
    (endpoint,) = _endpoints(1)
    with pytest.raises(RuntimeError, match="without a matching start"):
        endpoint.end()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"host": ""}, "host must not be empty"),
        ({"port": 0}, "port must be an integer"),
        ({"port": 70000}, "port must be an integer"),
        ({"default_rtt_s": 0.0}, "default_rtt_s must be finite and > 0"),
        ({"decay_s": -1.0}, "decay_s must be finite and > 0"),
    ],
)
def test_invalid_endpoint_is_rejected(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"host": "10.0.0.1", "port": 80, "now": 0.0} | kwargs
    with pytest.raises(ValueError, match=message):
        Endpoint(**arguments)  # type: ignore[arg-type]
