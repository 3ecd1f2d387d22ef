"""Is a difference between two recipes real? Mean ± std over seeds and Welch's t-test.

Two training runs that differ only in their seed end at different losses (nanochat's leaderboard
shows CORE moving by 0.0165 between identical runs), so one run per variant says little. Over
n seeds per variant we report the mean and the sample standard deviation, and test whether the
means differ with Welch's t-test, which does not assume the two variants vary equally:

    t  = (mean_a − mean_b) / sqrt(s_a²/n_a + s_b²/n_b)
    df = (s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)²/(n_a−1) + (s_b²/n_b)²/(n_b−1))     (Welch–Satterthwaite)
    p  = P(|T_df| ≥ |t|)   two-sided;   P(T_df ≤ t) for "a is lower than b"

The t distribution's tail comes from scipy (`scipy.stats.ttest_ind(equal_var=False)`), so the
numbers are the reference implementation's. modded-nanogpt accepts a speed record at p < 0.01.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with n − 1); std is nan for a single value."""
    xs = [float(x) for x in xs]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def welch_p(a: Sequence[float], b: Sequence[float], alternative: Literal["two-sided", "less"] = "two-sided") -> float:
    """p-value of Welch's t-test of mean(a) vs mean(b); "less": the evidence that mean(a) < mean(b).

    With a single value in `b` (a champion trained once), it is the one-sample t-test of `a` against
    that value. nan when there are too few values to estimate a spread (fewer than 2 in `a`).
    """
    from scipy import stats

    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or not b:
        return float("nan")
    if len(b) == 1:
        res = stats.ttest_1samp(a, b[0], alternative=alternative)
    else:
        res = stats.ttest_ind(a, b, equal_var=False, alternative=alternative)
    p = float(res.pvalue)
    if math.isnan(p) and mean_std(a)[1] == 0 and (len(b) == 1 or mean_std(b)[1] == 0):
        # no spread at all (identical values): the difference is certain, or there is none
        diff = sum(a) / len(a) - sum(b) / len(b)
        p = 1.0 if diff == 0 or (alternative == "less" and diff > 0) else 0.0
    return p
