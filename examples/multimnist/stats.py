"""Statistics over seeds: mean, standard deviation, 95% t-intervals, and the group of methods tied
with the best.

Every method is trained once per seed, with the same seeds (same initialisation, same batches)
for all methods, so two methods are compared through their per-seed differences: method ``a`` is
*tied with the best* method ``b`` when the 95% t-interval of the paired differences
``score_a(seed) - score_b(seed)`` contains 0.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy.stats import t as student

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    mean: float
    std: float  # sample standard deviation (n - 1); 0 for one value
    half_width: float  # of the 95% t-interval of the mean; inf for one value
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def estimate(values: Sequence[float]) -> Estimate:
    """Mean, standard deviation and 95% t-interval of the mean of ``values``."""
    n = len(values)
    if n == 0:
        raise ValueError("`values` must not be empty.")
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, 0.0, math.inf, 1)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    quantile = student.ppf(0.5 + CONFIDENCE / 2, df=n - 1)
    return Estimate(mean, std, quantile * std / math.sqrt(n), n)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> Estimate:
    """Estimate of ``a - b`` over the seeds that both have (``a`` and ``b``: seed -> score)."""
    seeds = sorted(set(a) & set(b))
    return estimate([a[s] - b[s] for s in seeds])


def tied_with_best(scores: Mapping[str, Mapping[int, float]]) -> tuple[str, dict[str, Estimate]]:
    """The best method (lowest mean score) and, for every method, the estimate of its paired
    difference to it. A method is tied with the best when that interval contains 0 (the best
    itself included: its difference is 0)."""
    best = min(scores, key=lambda k: sum(scores[k].values()) / len(scores[k]))
    return best, {k: paired_difference(v, scores[best]) for k, v in scores.items()}


def is_tied(difference: Estimate) -> bool:
    """Whether the 95% interval of a paired difference contains 0 (always, for one seed)."""
    return difference.low <= 0.0 <= difference.high
