"""Ratios with 95% confidence intervals, and verdicts that only say MET when the whole interval agrees.

Why paired rounds: the benchmarks run on shared machines whose load drifts. ``benchmarks.common.interleaved_times``
times every candidate once (or ``per_round`` times) per round, round-robin, so a load change hits all of them in the
same round. The ratio is therefore taken per round (numerator's round median over denominator's round median), and
the interval is a percentile bootstrap over rounds of the geometric mean of those per-round ratios (ratios are
multiplicative; the geometric mean of ``a/b`` is the inverse of that of ``b/a``).

``measure_ratio`` adds rounds until the interval no longer straddles the target (or a round/time budget runs out),
so a verdict is resolved by measurement instead of by one lucky median. Looking again after every batch of rounds and
stopping as soon as the interval clears the target would make a wrong verdict likelier than 5% (each look is another
chance); so each look uses a Bonferroni interval, ``1 - 0.05 / k`` for the ``k`` looks the budget allows
(``look_confidence``), and a verdict reached at any look is wrong about 5% of the time (simulated in
tests/test_benchmark_stats.py: a candidate exactly at its target got a verdict in 18 of 100 measurements with 95%
intervals at every look, 6 with the per-look level; the bootstrap interval is a little narrow at 20 rounds).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import common

MET, MISSED, INCONCLUSIVE = "MET", "MISSED", "INCONCLUSIVE"


@dataclass(frozen=True)
class RatioEstimate:
    """Geometric mean of per-round ratios with a bootstrap interval, resting on ``rounds`` paired rounds."""

    ratio: float
    low: float
    high: float
    rounds: int
    confidence: float = 0.95

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.ratio:.3f}x [{self.low:.3f}, {self.high:.3f}] ({self.rounds} rounds)"


def per_round(samples: Sequence[float], rounds: int) -> list[float]:
    """Median of each round's samples (``interleaved_times`` stores a candidate's samples in round order)."""
    if rounds < 1 or len(samples) % rounds:
        raise ValueError(f"{len(samples)} samples do not split into {rounds} equal rounds")
    size = len(samples) // rounds
    return [statistics.median(samples[i * size:(i + 1) * size]) for i in range(rounds)]


def ratio_interval(numerator: Sequence[float], denominator: Sequence[float], confidence: float = 0.95,
                   resamples: int | None = None, seed: int = 0) -> RatioEstimate:
    """Paired ratio ``numerator / denominator`` of per-round values (same length, same rounds).

    ``resamples`` defaults to 4000, more for a high ``confidence`` so that each tail holds 20 or more resamples.
    """
    resamples = resamples or max(4000, math.ceil(40 / (1.0 - confidence)))
    if len(numerator) != len(denominator) or len(numerator) < 2:
        raise ValueError(f"need two or more paired rounds, got {len(numerator)} and {len(denominator)}")
    logs = np.log(np.asarray(numerator, dtype=float) / np.asarray(denominator, dtype=float))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(logs), size=(resamples, len(logs)))
    means = logs[picks].mean(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return RatioEstimate(math.exp(logs.mean()), math.exp(low), math.exp(high), len(logs), confidence)


def verdict(estimate: RatioEstimate, target: float, lower_is_better: bool = True) -> str:
    """MET only when the whole interval is on the right side of ``target``; MISSED when it is all on the wrong side."""
    good_side = estimate.high <= target if lower_is_better else estimate.low >= target
    bad_side = estimate.low > target if lower_is_better else estimate.high < target
    return MET if good_side else MISSED if bad_side else INCONCLUSIVE


def look_confidence(min_rounds: int, max_rounds: int, batch_rounds: int, confidence: float = 0.95) -> float:
    """The confidence of each look of a sequential measurement (``min_rounds`` first, then ``batch_rounds`` at a time
    up to ``max_rounds``) that keeps the chance of any wrong verdict within ``1 - confidence`` (Bonferroni)."""
    looks = 1 + max(0, math.ceil((max_rounds - min_rounds) / batch_rounds))
    return 1.0 - (1.0 - confidence) / looks


def measure_ratio(fns: dict[str, Callable[[], Any]], numerator: str, denominator: str, target: float | None = None,
                  lower_is_better: bool = True, min_rounds: int = 10, max_rounds: int = 200, per_round_calls: int = 1,
                  max_seconds: float = 120.0, batch_rounds: int = 10) -> tuple[RatioEstimate, dict[str, list[float]]]:
    """Interleave ``fns``, adding ``batch_rounds`` rounds at a time until the verdict against ``target`` is resolved.

    Stops at ``max_rounds`` or after ``max_seconds``; with ``target=None`` it runs ``min_rounds``. Returns the
    estimate (with a target, at ``look_confidence``: its interval is what the verdict reads) and every candidate's
    per-round medians (for other ratios among the same candidates).
    """
    confidence = 0.95 if target is None else look_confidence(min_rounds, max(min_rounds, max_rounds), batch_rounds)
    rounds: dict[str, list[float]] = {name: [] for name in fns}
    started = time.perf_counter()
    warmup = 2
    while True:
        step = min_rounds if not rounds[numerator] else batch_rounds
        times = common.interleaved_times(fns, step, per_round_calls, warmup=warmup)
        warmup = 0
        for name, values in times.items():
            rounds[name].extend(per_round(values, step))
        estimate = ratio_interval(rounds[numerator], rounds[denominator], confidence)
        done = target is None or verdict(estimate, target, lower_is_better) != INCONCLUSIVE
        if done or len(rounds[numerator]) >= max_rounds or time.perf_counter() - started > max_seconds:
            return estimate, rounds
