"""Paired differences a report may call, and the correction over all the calls of one report.

A report compares variants seed by seed (the two runs of a seed share its data order), so each
difference is ``other - base`` per seed and the test is the paired t test on those differences:
the interval is ``mean ± t(1 - alpha/2, n - 1) · s.e.`` and a difference is *called* exactly when
that interval excludes 0. Under no real difference a single test calls 5% of the time whatever the
number of seeds (the rule it replaces, two or more seeds of one sign and a mean beyond twice its
standard error, called 29% at two seeds and 18% at three). One seed never calls: with one
difference the spread over seeds is unmeasured, so its interval is NaN.

A report makes many such calls; :func:`holm` corrects them together (Holm–Bonferroni, family-wise
5%: the chance that any of them is called under no real difference at all). It rebuilds each
interval at the level Holm tests it at, so the printed interval is the corrected one and "called"
still means "the interval excludes 0".

Task scores measured item by item (SciQ accuracy, exact match, ROUGE-L) add a second source of
noise, the sample of items: :func:`paired_items` folds it in with the seeds' (see its docstring).

Student's t distribution is computed here (no scipy): the two-sided tail through the regularized
incomplete beta function (a continued fraction), the quantile by a safeguarded Newton search.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import Sequence

import numpy as np

ALPHA = 0.05  # a single test's false-call rate, and the family-wise rate of one report's calls
_TINY = 1e-300


@dataclass(frozen=True)
class Verdict:
    """``other - base``, paired by seed: the mean difference and its interval, and whether it is called.

    ``low``/``high`` bound the paired t interval at ``level`` (0.95 from :func:`paired`, Holm's level
    after :func:`holm`); they are NaN when fewer than two seeds leave the spread unmeasured.
    ``called`` is true exactly when the interval excludes 0. ``p`` is the two-sided p-value (NaN
    under two seeds), ``se`` the standard error of the mean and ``df`` its degrees of freedom, which
    are what :func:`holm` rebuilds the interval from. ``items`` counts the items of an item-level
    test (0 for a seed-level one); ``family`` the comparisons a correction covered (1 before one)."""

    mean: float
    low: float
    high: float
    called: bool
    n: int
    higher_is_better: bool
    p: float
    level: float
    se: float
    df: float
    items: int = 0
    family: int = 1

    @property
    def better(self) -> bool | None:
        """Whether ``other`` is better than ``base``; None when the difference is not called."""
        return (self.mean > 0) == self.higher_is_better if self.called else None


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 1000):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return _betai(df / 2.0, 0.5, df / (df + t * t))


def _t_pdf(t: float, df: float) -> float:
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
                    - (df + 1) / 2 * math.log1p(t * t / df))


@lru_cache(maxsize=4096)
def _t_upper(p: float, df: float) -> float:
    """The t > 0 with P(|T| >= t) = p: Newton on log p against log t (close to a line in the tails),
    kept inside a bracket that bisection shrinks whenever a step would leave it."""
    lo, hi = -math.inf, math.inf  # log t: the tail is too large at lo, too small at hi
    u = math.log(NormalDist().inv_cdf(1.0 - p / 2.0))
    for _ in range(200):
        t = math.exp(u)
        tail = _two_sided_p(t, df)
        g = math.log(tail) - math.log(p) if tail > 0 else -math.inf
        if abs(g) < 1e-13:
            break
        lo, hi = (u, hi) if g > 0 else (lo, u)
        step = u + g * tail / (2.0 * t * _t_pdf(t, df)) if tail > 0 else math.nan
        if not lo < step < hi:  # also NaN: bisect, or walk out while one side is open
            step = (lo + hi) / 2 if math.isfinite(lo) and math.isfinite(hi) else (lo + 1 if math.isfinite(lo) else hi - 1)
        if abs(step - u) < 1e-15:
            break
        u = step
    return math.exp(u)


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` > 0 (real) degrees of freedom."""
    if not 0.0 < q < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < q < 1 and df > 0, got q={q}, df={df}")
    if q == 0.5:
        return 0.0
    return _t_upper(2.0 * (1.0 - q), float(df)) if q > 0.5 else -_t_upper(2.0 * q, float(df))


def _verdict(mean: float, se: float, df: float, n: int, higher_is_better: bool, alpha: float = ALPHA,
             items: int = 0, family: int = 1) -> Verdict:
    """The t interval at ``1 - alpha`` and its call, from a mean, its standard error and degrees of freedom."""
    t = abs(mean) / se if se > 0 else (math.inf if mean != 0 else 0.0)
    half = t_quantile(1.0 - alpha / 2.0, df) * se if se > 0 else 0.0
    low, high = mean - half, mean + half
    return Verdict(mean=mean, low=low, high=high, called=low > 0 or high < 0, n=n, higher_is_better=higher_is_better,
                   p=_two_sided_p(t, df), level=1.0 - alpha, se=se, df=df, items=items, family=family)


def _uncalled(mean: float, n: int, higher_is_better: bool, items: int = 0) -> Verdict:
    nan = math.nan
    return Verdict(mean=mean, low=nan, high=nan, called=False, n=n, higher_is_better=higher_is_better, p=nan,
                   level=1.0 - ALPHA, se=nan, df=nan, items=items)


def paired(base: Sequence[float], other: Sequence[float], higher_is_better: bool = False) -> Verdict:
    """``other - base`` paired by position (the same seed), tested by the paired t test at 5%.

    Fewer than two pairs never call: the interval, ``p``, ``se`` and ``df`` are NaN (the mean is
    NaN too with none)."""
    if len(base) != len(other):
        raise ValueError(f"paired needs one value per seed on both sides, got {len(base)} and {len(other)}")
    d = [float(o) - float(b) for b, o in zip(base, other)]
    n = len(d)
    mean = math.fsum(d) / n if n else math.nan
    if n < 2:
        return _uncalled(mean, n, higher_is_better)
    se = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1) / n)
    return _verdict(mean, se, n - 1.0, n, higher_is_better)


def paired_items(base: Sequence[Sequence[float]], other: Sequence[Sequence[float]],
                 higher_is_better: bool = True) -> Verdict:
    """``other - base`` of a task score measured per item: rows are seeds, columns items, both paired
    by position (the same seed, the same test item).

    The mean difference over seeds and items is noisy twice over: another seed trains another model,
    another test sample asks other questions. With the differences ``D`` as a seeds × items table,
    the two-way random-effects analysis of variance gives the mean squares of seeds ``MS_s``, items
    ``MS_i`` and the rest ``MS_e``, and the mean's variance is estimated by
    ``(MS_s + MS_i - MS_e) / (seeds · items)``, never below what either the seeds or the items alone
    show (``max(MS_s, MS_i) / (seeds · items)``); its degrees of freedom are Satterthwaite's. With one
    item per seed this is :func:`paired`; with one seed nothing is called (the models' training noise
    is unmeasured), as in :func:`paired`. The normal approximation over items is what makes this a
    t test on 0/1 scores too: use it with tens of items or more. The result goes through
    :func:`holm` like any other verdict; ``n`` counts the seeds and ``items`` the items."""
    b, o = np.asarray(base, dtype=float), np.asarray(other, dtype=float)
    if b.ndim != 2 or b.shape != o.shape:
        raise ValueError(f"paired_items needs two seeds × items tables of one shape, got {b.shape} and {o.shape}")
    d = o - b
    seeds, items = d.shape
    mean = float(d.mean()) if d.size else math.nan
    if seeds < 2 or items < 1:
        return _uncalled(mean, seeds, higher_is_better, items)
    if items == 1:
        return paired(b[:, 0].tolist(), o[:, 0].tolist(), higher_is_better)
    rows, cols = d.mean(axis=1), d.mean(axis=0)
    df_s, df_i = seeds - 1, items - 1
    ms_s = items * float(((rows - mean) ** 2).sum()) / df_s
    ms_i = seeds * float(((cols - mean) ** 2).sum()) / df_i
    ms_e = float(((d - rows[:, None] - cols[None, :] + mean) ** 2).sum()) / (df_s * df_i)
    parts = max([((ms_s, df_s), (ms_i, df_i), (-ms_e, df_s * df_i)), [(ms_s, df_s)], [(ms_i, df_i)]],
                key=lambda ps: sum(m for m, _ in ps))
    var = sum(m for m, _ in parts)
    if var <= 0:
        return _verdict(mean, 0.0, float(df_s), seeds, higher_is_better, items=items)
    df = var**2 / sum(m * m / k for m, k in parts)
    return _verdict(mean, math.sqrt(var / (seeds * items)), df, seeds, higher_is_better, items=items)


def holm(verdicts: Sequence[Verdict], alpha: float = ALPHA) -> list[Verdict]:
    """Holm–Bonferroni over one report's verdicts (family-wise ``alpha``), in their order.

    The family is every verdict with two or more seeds (one seed calls nothing, so it corrects
    nothing and passes through). By p-value, smallest first, the k-th of m is tested at
    ``alpha / (m - k + 1)``: its interval is rebuilt at that level and called when it excludes 0.
    At the first that is not called the procedure stops, and it and every later one keep that
    step's level (at which none of them excludes 0). So a verdict is called exactly when Holm
    rejects it and exactly when its printed, corrected interval excludes 0."""
    family = [i for i, v in enumerate(verdicts) if v.n >= 2 and math.isfinite(v.se)]
    m = len(family)
    out = list(verdicts)
    step_alpha, stopped = alpha, False
    for k, i in enumerate(sorted(family, key=lambda i: verdicts[i].p)):
        v = verdicts[i]
        step_alpha = step_alpha if stopped else alpha / (m - k)
        out[i] = _verdict(v.mean, v.se, v.df, v.n, v.higher_is_better, step_alpha, v.items, m)
        stopped = stopped or not out[i].called
    return out


def _signed(x: float, digits: int) -> str:
    return f"{x:+.{digits}f}".replace("-", "\u2212")


def format_interval(v: Verdict, unit: str = "", digits: int = 3) -> str:
    """One line: ``+0.031 [−0.012, +0.074] bpb, not called (3 seeds, 98.33% interval)``."""
    unit = f" {unit}" if unit else ""
    if v.n == 0:
        return "not measured"
    if not math.isfinite(v.low):
        return f"{_signed(v.mean, digits)}{unit}, not called (one seed: the spread over seeds is unmeasured)"
    call = ("called better" if v.better else "called worse") if v.called else "not called"
    size = f"{v.n} seeds" + (f" × {v.items} items" if v.items else "")
    return (f"{_signed(v.mean, digits)} [{_signed(v.low, digits)}, {_signed(v.high, digits)}]{unit}, {call} "
            f"({size}, {100 * v.level:.4g}% interval)")
