"""Target selection for one request, in two pure steps.

1. A target cluster by the weights the control plane gives (``payments`` stays local,
   ``payments@ap-southeast`` goes through that cluster's gateway): `WeightedTargets`, built
   once per weight change, picks with one random draw and a bisect.
2. An endpoint within the target by power of two choices over peak-EWMA latency times
   outstanding requests, as linkerd2-proxy and Finagle do: `p2c_pick` draws two distinct
   endpoints and takes the cheaper one. An `Endpoint` keeps the cost: a slower response
   raises it at once, faster ones pull it down with a time constant, and idle time decays it,
   so an endpoint that was slow is tried again once it has rested.

Both steps take the ``rng`` and ``now`` as arguments and run on the request path: plain
classes with ``__slots__``, no allocation per call.
"""

from __future__ import annotations

import math
import sys
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from itertools import accumulate
from random import Random
from typing import Final

__all__ = ["Endpoint", "WeightedTargets", "p2c_pick", "pick_cluster"]

_exp: Final = math.exp
_INF: Final = math.inf


class WeightedTargets:
    """Target clusters with their weights, ready to pick from.

    Weights are non-negative and relative (they need not add up to anything). Targets with
    weight zero are never picked. When every weight is zero there is nothing to pick and
    `pick` returns ``None``: the caller answers that no target is available rather than
    guessing one.
    """

    __slots__ = ("_cumulative", "_only", "_targets", "_total")

    def __init__(self, weights: Mapping[str, float]) -> None:
        targets: list[str] = []
        values: list[float] = []
        for target, weight in weights.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise TypeError(f"weight of target {target!r} must be a number, not {weight!r}")
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weight of target {target!r} must be finite and >= 0: {weight}")
            if weight > 0:
                targets.append(target)
                values.append(float(weight))
        self._targets = tuple(targets)
        self._cumulative = tuple(accumulate(values))
        self._total = self._cumulative[-1] if values else 0.0
        if 0.0 < self._total < sys.float_info.min:
            raise ValueError(f"weights add up to {self._total}: too small to pick from")
        # One target (the common case: all local) needs no random draw at all.
        self._only = targets[0] if len(targets) == 1 else None

    @property
    def targets(self) -> tuple[str, ...]:
        """The targets that can be picked (weight above zero), in the order given."""
        return self._targets

    def pick(self, rng: Random) -> str | None:
        """One target, each with probability weight / total; ``None`` if all weights are 0."""
        if self._only is not None:
            return self._only
        if not self._targets:
            return None
        # random() < 1 and x × (1 - 2^-53) never rounds up to x, so the index stays in range.
        return self._targets[bisect_right(self._cumulative, rng.random() * self._total)]

    def __repr__(self) -> str:
        return f"WeightedTargets({dict(zip(self._targets, self._weights(), strict=True))!r})"

    def _weights(self) -> list[float]:
        previous = 0.0
        weights = []
        for cumulative in self._cumulative:
            weights.append(cumulative - previous)
            previous = cumulative
        return weights


def pick_cluster(weights: Mapping[str, float], rng: Random) -> str | None:
    """One target cluster by weight, or ``None`` if every weight is zero.

    Builds the table on each call: the request path keeps a `WeightedTargets` instead and
    rebuilds it only when the control plane changes the weights.
    """
    return WeightedTargets(weights).pick(rng)


class Endpoint:
    """One endpoint of a target and its load: peak-EWMA latency and outstanding requests.

    ``cost(now)`` is the latency estimate decayed to ``now`` times ``outstanding + 1``.
    ``observe`` takes a response time: above the estimate it replaces it at once (peak);
    below, it is blended in with weight ``1 - exp(-elapsed / decay_s)``, elapsed being the
    time since the previous observation. Between observations the estimate read by ``cost``
    decays towards zero with the same time constant, so a rested endpoint is tried again.
    A new endpoint starts at ``default_rtt_s`` so it is neither flooded nor starved before
    it answers.
    ``ejected_until`` is set by outlier ejection; the endpoint is skipped while
    ``now < ejected_until``.
    """

    __slots__ = (
        "_ewma",
        "_neg_inv_decay",
        "_stamp",
        "ejected_until",
        "host",
        "outstanding",
        "port",
    )

    def __init__(
        self,
        host: str,
        port: int,
        now: float,
        *,
        default_rtt_s: float = 0.03,
        decay_s: float = 10.0,
    ) -> None:
        if not host:
            raise ValueError("endpoint host must not be empty")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"endpoint port must be an integer in 1..65535: {port!r}")
        # A zero estimate would make every cost zero and hide the outstanding count.
        if not math.isfinite(default_rtt_s) or default_rtt_s <= 0:
            raise ValueError(f"default_rtt_s must be finite and > 0: {default_rtt_s}")
        if not math.isfinite(decay_s) or decay_s <= 0:
            raise ValueError(f"decay_s must be finite and > 0: {decay_s}")
        self.host = host
        self.port = port
        self.outstanding = 0
        self.ejected_until = -math.inf
        self._ewma = float(default_rtt_s)
        self._stamp = now
        self._neg_inv_decay = -1.0 / decay_s

    def ewma(self, now: float) -> float:
        """The peak-EWMA latency estimate in seconds, decayed to ``now``."""
        elapsed = now - self._stamp
        if elapsed <= 0.0:
            return self._ewma
        return self._ewma * _exp(elapsed * self._neg_inv_decay)

    def cost(self, now: float) -> float:
        """What sending one more request here is expected to cost: ewma × (outstanding + 1)."""
        elapsed = now - self._stamp
        ewma = self._ewma if elapsed <= 0.0 else self._ewma * _exp(elapsed * self._neg_inv_decay)
        return ewma * (self.outstanding + 1)

    def observe(self, rtt: float, now: float) -> None:
        """Take one response time (seconds) measured at ``now``."""
        # One NaN or infinity would poison the estimate for good: refuse it loudly.
        if not 0.0 <= rtt < _INF:
            raise ValueError(f"{self!r}: response time must be finite and >= 0: {rtt!r}")
        if rtt > self._ewma:
            self._ewma = rtt
        else:
            elapsed = now - self._stamp
            # Responses measured at the same instant or out of order: no time has passed.
            weight = _exp(elapsed * self._neg_inv_decay) if elapsed > 0.0 else 1.0
            self._ewma = self._ewma * weight + rtt * (1.0 - weight)
        if now > self._stamp:
            self._stamp = now

    def start(self) -> None:
        """A request was sent to this endpoint."""
        self.outstanding += 1

    def end(self) -> None:
        """A request sent to this endpoint finished (in any way)."""
        if self.outstanding <= 0:
            raise RuntimeError(f"{self!r}: end() without a matching start()")
        self.outstanding -= 1

    def __repr__(self) -> str:
        return f"Endpoint({self.host}:{self.port}, outstanding={self.outstanding})"


def p2c_pick(endpoints: Sequence[Endpoint], rng: Random, now: float) -> Endpoint | None:
    """The cheaper of two distinct random endpoints that are not ejected at ``now``.

    Returns ``None`` only when there is no endpoint in rotation (none, or all ejected;
    outlier ejection always leaves one in, so the latter means no healthy endpoint).
    """
    count = len(endpoints)
    if count == 1:
        only = endpoints[0]
        return only if only.ejected_until <= now else None
    if count == 0:
        return None
    # One draw over the count × (count - 1) ordered pairs of distinct endpoints: the second
    # index is taken among the other count - 1, then shifted past the first.
    others = count - 1
    pairs = count * others
    draw = int(rng.random() * pairs)
    first = draw // others
    second = draw - first * others
    if second >= first:
        second += 1
    a = endpoints[first]
    b = endpoints[second]
    if a.ejected_until > now or b.ejected_until > now:
        if a.ejected_until <= now:
            return a
        if b.ejected_until <= now:
            return b
        return _pick_in_rotation(endpoints, rng, now)
    # a.cost(now) <= b.cost(now), inlined: this is the hottest comparison of the request path.
    # With one time constant, both decay alike from their own stamps, so it is enough to
    # decay the older one to the newer one's stamp: one exp(), of a negative number (an idle
    # endpoint may be hours older, and exp of a large positive number overflows).
    cost_a = a._ewma * (a.outstanding + 1)
    cost_b = b._ewma * (b.outstanding + 1)
    stamp_a = a._stamp if a._stamp < now else now
    stamp_b = b._stamp if b._stamp < now else now
    decay = a._neg_inv_decay
    if decay == b._neg_inv_decay:
        if stamp_a < stamp_b:
            cost_a *= _exp((stamp_b - stamp_a) * decay)
        elif stamp_b < stamp_a:
            cost_b *= _exp((stamp_a - stamp_b) * decay)
    else:
        cost_a *= _exp((now - stamp_a) * decay)
        cost_b *= _exp((now - stamp_b) * b._neg_inv_decay)
    return a if cost_a <= cost_b else b


def _pick_in_rotation(endpoints: Sequence[Endpoint], rng: Random, now: float) -> Endpoint | None:
    # Rare path (both draws were ejected): choose among those still in rotation.
    in_rotation = [endpoint for endpoint in endpoints if endpoint.ejected_until <= now]
    if len(in_rotation) < 2:
        return in_rotation[0] if in_rotation else None
    return p2c_pick(in_rotation, rng, now)
