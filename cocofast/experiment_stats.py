"""Paired tests of one method against a baseline, seed by seed: the sign test and the paired t-test.

    differences = [m - b for m, b in zip(method_miou, baseline_miou)]   # the same seeds, in the same order
    sign_test(differences)            # two-sided exact binomial p-value
    paired_t_test(differences)        # (t, two-sided p-value), Student's t with n - 1 degrees of freedom

Both take the per-seed differences, so the pairing (same seed = same data order, augmentation and
initialisation draws) is the caller's. Conventions, as in textbooks (e.g. Conover, Practical Nonparametric
Statistics, 3rd ed., §3.4 for the sign test; Student 1908 for t):

- sign test: zero differences are ties and are dropped; with n non-zero differences of which k are positive,
  p = min(1, 2 · P[X <= min(k, n - k)]) for X ~ Binomial(n, 1/2). With n = 5 the smallest possible p is
  2 / 32 = 0.0625: five seeds can never reach p < 0.05 on this test, whatever the effect;
- paired t-test: t = mean(d) / (sd(d) / sqrt(n)), sd the sample standard deviation (n - 1 in the
  denominator), p = 2 · P[T_{n-1} >= |t|]. Undefined (nan) for fewer than two differences or when every
  difference is zero; differences all equal and non-zero give t = ±inf and p = 0.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

from scipy import stats


def sign_test(differences: Sequence[float]) -> float:
    """Two-sided exact sign test of median(difference) = 0; nan when every difference is zero (or none)."""
    nonzero = [d for d in differences if d != 0]
    if any(math.isnan(d) for d in nonzero):
        raise ValueError(f"sign_test: differences must be numbers, got {list(differences)}")
    n = len(nonzero)
    if n == 0:
        return math.nan
    k = sum(d > 0 for d in nonzero)
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_t_test(differences: Sequence[float]) -> tuple[float, float]:
    """(t, two-sided p) of mean(difference) = 0 with n - 1 degrees of freedom; (nan, nan) where undefined."""
    d = list(differences)
    if any(math.isnan(x) for x in d):
        raise ValueError(f"paired_t_test: differences must be numbers, got {d}")
    n = len(d)
    if n < 2:
        return math.nan, math.nan
    mean, sd = statistics.mean(d), statistics.stdev(d)
    if sd == 0:
        if mean == 0:
            return math.nan, math.nan
        return math.copysign(math.inf, mean), 0.0
    t = mean / (sd / math.sqrt(n))
    return t, float(2 * stats.t.sf(abs(t), df=n - 1))


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    """'mean ± sample std' (one value: the value alone)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def format_p(p: float) -> str:
    if math.isnan(p):
        return "–"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
