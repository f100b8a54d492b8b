"""The bootstrap CI over tasks and seeds: coverage of a known mean, what it resamples, reproducibility, bad input."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.core.bootstrap import bootstrap_ci, bootstrap_ci_se, table_ci


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    hits = 0
    for i in range(200):  # 3 seeds x 30 tasks: task effects shared by the seeds, plus seed and noise effects
        acc = 0.7 + rng.normal(0, 0.1, 30)[None, :] + rng.normal(0, 0.02, (3, 1)) + rng.normal(0, 0.03, (3, 30))
        ci = bootstrap_ci(acc, resamples=1000, seed=i)
        hits += ci.low <= 0.7 <= ci.high
    assert 0.8 <= hits / 200 <= 1.0  # a percentile bootstrap with 3 seeds undercovers a little, never wildly


def test_tasks_widen_the_interval_beyond_seeds_alone():
    rng = np.random.default_rng(0)
    acc = 0.6 + rng.normal(0, 0.2, (3, 40))
    both, seeds_only = bootstrap_ci(acc), bootstrap_ci(acc.mean(axis=1))
    assert both.low < both.mean < both.high
    assert both.high - both.low > seeds_only.high - seeds_only.low
    assert (both.seeds, both.tasks, seeds_only.tasks) == (3, 40, 0)
    assert both.over == "40 tasks x 3 seeds" and "seed means" in seeds_only.over
    assert bootstrap_ci(acc) == both  # seeded: a table rendered twice shows the same interval


def test_one_seed_is_a_bootstrap_over_tasks_and_constant_accuracy_has_no_width():
    one = bootstrap_ci(np.linspace(0.2, 0.9, 25)[None, :])
    assert one.over == "25 tasks, 1 seed" and one.high - one.low > 0.05
    flat = bootstrap_ci(np.full((3, 10), 0.5))
    assert flat.low == flat.high == flat.mean == 0.5


def test_standard_errors_widen_the_interval_over_seeds():
    means = np.array([0.70, 0.71, 0.69])
    wide, narrow = bootstrap_ci_se(means, np.full(3, 0.02)), bootstrap_ci_se(means, np.zeros(3))
    assert wide.high - wide.low > narrow.high - narrow.low
    assert narrow.low >= 0.69 - 1e-12 and narrow.high <= 0.71 + 1e-12


def test_table_ci_groups_and_rejects_seeds_scored_on_other_tasks():
    rows = [dict(method=m, seed=s, task=f"t{t}", accuracy=0.5 + 0.1 * (m == "b") + 0.01 * t)
            for m in ("a", "b") for s in (0, 1) for t in range(5)]
    cis = table_ci(pd.DataFrame(rows), ["method"])
    assert set(cis) == {("a",), ("b",)} and cis[("b",)].mean == pytest.approx(cis[("a",)].mean + 0.1)
    with pytest.raises(ValueError, match="same tasks"):
        table_ci(pd.DataFrame(rows[:-1]), ["method"])


@pytest.mark.parametrize("bad", [np.zeros((0, 3)), np.array([[0.5, np.nan]]), np.zeros((2, 2, 2))])
def test_bad_input_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="accuracies must be"):
        bootstrap_ci(bad)
