"""nblib.stats: Student's t, the paired test's false-call rate under no real difference (alone and
Holm-corrected over a family), the item-level test, and the interval that calls exactly when it
excludes 0. Simulations are seeded, so every run draws the same numbers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nblib import stats


@pytest.mark.parametrize("q, df, expected", [
    (0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 4, 2.7764), (0.975, 9, 2.2622), (0.975, 29, 2.0452),
    (0.995, 3, 5.8409), (0.9995, 1, 636.619), (0.975, 1000, 1.9623), (0.025, 5, -2.5706), (0.5, 7, 0.0),
])
def test_t_quantiles_match_the_tables(q, df, expected):
    assert stats.t_quantile(q, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_refuses_what_has_none():
    for q, df in ((0.0, 3), (1.0, 3), (0.9, 0)):
        with pytest.raises(ValueError, match="0 < q < 1 and df > 0"):
            stats.t_quantile(q, df)


def _null_draws(rng: np.random.Generator, draws: int, seeds: int) -> list[stats.Verdict]:
    """``paired`` on ``draws`` pairs of variants with no real difference (normal noise, unit variance)."""
    x = rng.normal(size=(draws, 2, seeds))
    return [stats.paired(base.tolist(), other.tolist()) for base, other in x]


def _bound(rate: float, draws: int) -> float:
    """The nominal rate plus three standard errors of a simulation of ``draws`` (a calibrated test's
    measured rate lands within them)."""
    return rate + 3 * math.sqrt(rate * (1 - rate) / draws)


@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_paired_calls_five_percent_under_no_difference(seeds):
    draws = 40_000
    calls = np.mean([v.called for v in _null_draws(np.random.default_rng(seeds), draws, seeds)])
    assert 0.03 <= calls <= _bound(stats.ALPHA, draws), calls


@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_holm_keeps_the_family_wise_rate(seeds):
    family, families = 6, 10_000
    verdicts = _null_draws(np.random.default_rng(100 + seeds), family * families, seeds)
    corrected = [stats.holm(verdicts[i:i + family]) for i in range(0, len(verdicts), family)]
    any_call = np.mean([any(v.called for v in f) for f in corrected])
    uncorrected = np.mean([any(v.called for v in verdicts[i:i + family]) for i in range(0, len(verdicts), family)])
    assert 0.03 <= any_call <= _bound(stats.ALPHA, families), any_call
    assert uncorrected > 0.2  # six uncorrected calls: 1 - 0.95**6 = 26% of families call something
    assert all(v.family == family for v in corrected[0])


def test_a_clear_difference_is_called_and_one_seed_never():
    worse = stats.paired([3.0, 3.1, 2.9], [3.2, 3.31, 3.1])
    assert worse.called and worse.better is False and worse.low > 0 and worse.level == 0.95
    assert stats.paired([0.5, 0.6], [0.7, 0.81], higher_is_better=True).better is True
    noisy = stats.paired([1.0, 1.0, 1.0], [1.03, 0.99, 1.02])
    assert not noisy.called and noisy.better is None and noisy.low < 0 < noisy.high
    one = stats.paired([1.0], [2.0])
    assert not one.called and one.mean == 1.0 and math.isnan(one.low) and math.isnan(one.high) and math.isnan(one.p)
    assert stats.holm([one]) == [one]  # nothing to correct
    with pytest.raises(ValueError, match="one value per seed"):
        stats.paired([1.0, 2.0], [1.0])


def test_the_interval_excludes_zero_iff_called_before_and_after_holm():
    rng = np.random.default_rng(7)
    for _ in range(200):
        n, m = int(rng.integers(2, 6)), int(rng.integers(1, 12))
        shift = rng.normal(0, 1.5, size=(m, 1))
        verdicts = [stats.paired(b.tolist(), (b + s + rng.normal(size=n)).tolist())
                    for b, s in zip(rng.normal(size=(m, n)), shift)]
        corrected = stats.holm(verdicts)
        for before, after in zip(verdicts, corrected):
            for v in (before, after):
                assert v.called == (v.low > 0 or v.high < 0)
            assert after.mean == before.mean and after.level >= before.level
            assert after.low <= before.low and after.high >= before.high  # widened, never narrowed
            assert not after.called or before.called
        called = sorted(v.p for v in corrected if v.called)
        assert called == sorted(v.p for v in verdicts)[:len(called)]  # Holm calls the smallest p-values


def test_holm_steps_down_and_stops_at_the_first_failure():
    p_of = [stats.paired([0.0, 0.0, 0.0], [d, d + 0.1, d - 0.1]) for d in (1.0, 0.5, 0.3, 0.2)]
    out = stats.holm(p_of)
    levels = [round(v.level, 6) for v in out]
    assert levels[0] == round(1 - 0.05 / 4, 6) and out[0].called
    first_miss = next(i for i, v in enumerate(out) if not v.called)
    assert all(not v.called for v in out[first_miss:])
    assert len(set(levels[first_miss:])) == 1  # the later ones keep the failing step's level


def test_item_level_test_folds_items_and_seeds():
    rng = np.random.default_rng(3)
    seeds, items, draws = 3, 100, 4000
    calls = []
    for _ in range(draws):  # no real difference: the two models score alike on average over items
        p = rng.uniform(0.2, 0.8, items)
        item_effect = rng.normal(0, 0.1, items)
        pb = np.clip(p + rng.normal(0, 0.03, (seeds, 1)), 0, 1)
        po = np.clip(p + item_effect + rng.normal(0, 0.03, (seeds, 1)), 0, 1)
        base, other = (rng.random((seeds, items)) < pb) * 1.0, (rng.random((seeds, items)) < po) * 1.0
        calls.append(stats.paired_items(base, other).called)
    assert np.mean(calls) <= _bound(stats.ALPHA, draws), np.mean(calls)
    base = (rng.random((3, 200)) < 0.4) * 1.0
    better = stats.paired_items(base, np.maximum(base, (rng.random((3, 200)) < 0.3) * 1.0))
    assert better.called and better.better is True and better.items == 200 and better.n == 3
    assert not stats.paired_items(base[:1], base[:1] + 1).called  # one seed calls nothing
    column = stats.paired_items(base[:, :1], base[:, :1] + [[0.1], [0.2], [0.3]])
    assert column == stats.paired(base[:, 0].tolist(), (base[:, 0] + [0.1, 0.2, 0.3]).tolist(), True)


def test_format_interval_says_the_interval_the_call_and_the_size():
    v = stats.paired([1.0, 1.0, 1.0], [1.03, 0.99, 1.02])
    line = stats.format_interval(v, "bpb")
    assert line.startswith("+0.013 [\u2212") and line.endswith("] bpb, not called (3 seeds, 95% interval)")
    worse = stats.holm([stats.paired([3.0, 3.1, 2.9], [3.2, 3.31, 3.1]), v])[0]
    assert stats.format_interval(worse, "bpb").endswith("bpb, called worse (3 seeds, 97.5% interval)")
    assert stats.format_interval(stats.paired([1.0], [0.9]), "bpb") == (
        "\u22120.100 bpb, not called (one seed: the spread over seeds is unmeasured)")
    assert stats.format_interval(stats.paired([], []), "bpb") == "not measured"
