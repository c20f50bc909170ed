"""Paired bootstrap intervals (megatron_copsd.eval.stats) against closed forms, and the winner rule."""
import math

import numpy as np
import pytest

from megatron_copsd.eval.metrics import ScoredGeneration
from megatron_copsd.eval.stats import compare_methods, correctness, paired_bootstrap, paired_difference, split_label


def _binom_quantile(n: int, p: float, q: float):
    """Smallest x with P(Binomial(n, p) <= x) >= q, with the CDF just below and at x."""
    cdf = 0.0
    for x in range(n + 1):
        below, cdf = cdf, cdf + math.comb(n, x) * p ** x * (1 - p) ** (n - x)
        if cdf >= q:
            return x, below, cdf
    raise AssertionError("unreachable")


def test_bootstrap_interval_equals_the_binomial_closed_form():
    """One seed, binary differences: the bootstrap distribution of the mean is exactly Binomial(n, k/n) / n,
    so the percentile interval is its 2.5% and 97.5% quantiles divided by n."""
    n, k = 40, 16
    d = np.array([1.0] * k + [0.0] * (n - k))
    lo_x, lo_below, lo_at = _binom_quantile(n, k / n, 0.025)
    hi_x, hi_below, hi_at = _binom_quantile(n, k / n, 0.975)
    # neither threshold is near a step of the CDF, so 100k resamples land on the same order statistic
    for below, at, q in ((lo_below, lo_at, 0.025), (hi_below, hi_at, 0.975)):
        assert q - below > 0.005 and at - q > 0.005
    ci = paired_bootstrap(d, num_resamples=100_000, seed=3)
    assert ci.estimate == pytest.approx(k / n)
    assert ci.low == pytest.approx(lo_x / n) and ci.high == pytest.approx(hi_x / n)
    assert ci.num_seeds == 1 and ci.num_problems == n and ci.excludes_zero


def test_bootstrap_interval_matches_the_normal_closed_form_for_many_problems():
    """Paired differences in {-1, 0, 1} over 2000 problems: mean +- 1.96 sd / sqrt(n) within 4%."""
    rng = np.random.default_rng(0)
    d = rng.choice([-1.0, 0.0, 1.0], p=[0.2, 0.65, 0.15], size=2000)
    half = 1.959964 * d.std() / math.sqrt(d.size)
    ci = paired_bootstrap(d, num_resamples=20_000, seed=1)
    assert ci.low == pytest.approx(d.mean() - half, abs=0.04 * half)
    assert ci.high == pytest.approx(d.mean() + half, abs=0.04 * half)


def test_seed_resampling_widens_the_interval_when_seeds_disagree():
    # two seeds that disagree completely: with seed resampling the interval must cover both seeds' means
    d = np.vstack([np.ones(400), -np.ones(400) * 0.5])
    wide = paired_bootstrap(d, num_resamples=5000, seed=0)
    narrow = paired_bootstrap(d, num_resamples=5000, seed=0, resample_seeds=False)
    assert wide.low <= -0.5 + 1e-9 and wide.high >= 1 - 1e-9 and not wide.excludes_zero
    assert narrow.high - narrow.low < 0.05 and narrow.excludes_zero
    with pytest.raises(ValueError, match="num_resamples"):
        paired_bootstrap(d, num_resamples=10)


def _records(model, lang, correct_by_problem):
    return [ScoredGeneration(model, lang, "math", f"p{i}", 0, True, "", None, bool(c), True, 1)
            for i, c in enumerate(correct_by_problem)]


def test_compare_methods_names_a_winner_only_when_the_interval_excludes_zero():
    n = 200
    recs = _records("base", "qge", [i % 4 == 0 for i in range(n)])
    for s in range(3):
        recs += _records(f"good-s{s}", "qge", [i % 4 != 3 for i in range(n)])  # far better than base
        recs += _records(f"same-s{s}", "qge", [(i + s) % 2 == 0 for i in range(n)])  # 0.5 on average
        recs += _records(f"twin-s{s}", "qge", [(i + s + 1) % 2 == 0 for i in range(n)])
    assert split_label("good-s2") == ("good", 2) and split_label("base") == ("base", None)
    x, seeds, problems = correctness(recs, "good", ["qge"])
    assert x.shape == (3, n) and seeds == [0, 1, 2] and len(problems) == n
    d, seeds = paired_difference(recs, "good", "base", ["qge"])  # base is repeated over good's seeds
    assert d.shape == (3, n) and d.mean() == pytest.approx(0.75 - 0.25)
    rows = {(r["a"], r["b"]): r for r in compare_methods(recs, ["base", "good", "same", "twin"], langs=["qge"],
                                                         num_resamples=2000)}
    assert rows[("base", "good")]["winner"] == "good" and rows[("base", "good")]["high"] < 0
    assert rows[("same", "twin")]["winner"] is None and rows[("same", "twin")]["low"] < 0 < rows[("same", "twin")]["high"]


def test_pairing_needs_the_same_problems():
    recs = _records("a-s0", "qge", [True] * 10) + _records("b-s0", "qge", [True] * 9)
    with pytest.raises(ValueError, match="different problems"):
        paired_difference(recs, "a", "b", ["qge"])
    recs = _records("a-s0", "qge", [True] * 10) + _records("a-s0", "qva", [True] * 9)
    with pytest.raises(ValueError, match="no greedy record"):
        correctness(recs, "a", ["qge", "qva"])
