"""95 % confidence intervals of a mean accuracy by a two-level bootstrap over tasks and seeds.

A result is accuracies `acc[seed, task]`: every seed is scored on the same meta-test tasks. One
bootstrap replicate draws seeds with replacement and, independently, tasks with replacement (the same
tasks for every drawn seed, since the tasks are shared), and takes the mean of that sub-table. The
interval is the percentile interval of the replicates. It therefore covers both sources of noise the
tables report: which tasks happened to be held out and which training seed was used. With one seed it
is a bootstrap over tasks alone; with per-seed means only (no per-task accuracies) it is one over
seeds alone, and `CI.over` says which.

Pure numpy; seeded, so a table rendered twice shows the same interval.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
RESAMPLES = 4000
SEED = 0


@dataclass(frozen=True)
class CI:
    """A mean with its bootstrap interval, and what was resampled to get it."""

    mean: float
    low: float
    high: float
    seeds: int
    tasks: int  # 0 when per-task accuracies were not available

    @property
    def over(self) -> str:
        """Words for a caption: what the interval resamples."""
        if self.tasks and self.seeds > 1:
            return f"{self.tasks} tasks x {self.seeds} seeds"
        if self.tasks:
            return f"{self.tasks} tasks, 1 seed"
        return f"{self.seeds} seed means (no per-task accuracies)"


def bootstrap_ci(acc, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> CI:
    """Mean and percentile CI of `acc`: [seeds, tasks] (tasks and seeds resampled) or [seeds] (seeds only)."""
    a = np.asarray(acc, dtype=float)
    if a.ndim == 1:
        a, tasks = a[:, None], 0
    elif a.ndim == 2:
        tasks = a.shape[1]
    else:
        raise ValueError(f"accuracies must be [seeds] or [seeds, tasks], got shape {a.shape}")
    if a.size == 0 or np.isnan(a).any():
        raise ValueError(f"accuracies must be non-empty and without NaN, got shape {a.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n_s, n_t = a.shape
    rng = np.random.default_rng(seed)
    s = rng.integers(0, n_s, size=(resamples, n_s))  # [R, S]
    t = rng.integers(0, n_t, size=(resamples, n_t))  # [R, T]
    # mean over the drawn seeds and tasks: average each drawn seed's row over the drawn task columns
    per_task_mean = a[:, t].mean(axis=2)  # [S, R]: seed row i averaged over replicate r's tasks
    reps = np.take_along_axis(per_task_mean.T, s, axis=1).mean(axis=1)  # [R]
    low, high = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return CI(float(a.mean()), float(low), float(high), n_s, tasks)


def bootstrap_ci_se(means, ses, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> CI:
    """Mean and CI over seeds whose own means carry a standard error (e.g. over evaluation episodes).

    Seeds are resampled with replacement, and each drawn seed's mean is redrawn from a normal with its
    standard error: a bootstrap over seeds and, parametrically, over the episodes (tasks) inside each.
    """
    m, se = np.asarray(means, dtype=float), np.asarray(ses, dtype=float)
    if m.ndim != 1 or m.shape != se.shape or m.size == 0 or np.isnan(m).any() or np.isnan(se).any():
        raise ValueError(f"means and standard errors must be equal-length 1-d arrays without NaN, got {m.shape} and {se.shape}")
    rng = np.random.default_rng(seed)
    s = rng.integers(0, m.size, size=(resamples, m.size))  # [R, S]
    reps = (m[s] + se[s] * rng.standard_normal(s.shape)).mean(axis=1)  # [R]
    low, high = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return CI(float(m.mean()), float(low), float(high), m.size, 0)


def table_ci(per_task, keys: list[str], value: str = "accuracy", seed_col: str = "seed", task_col: str = "task") -> dict:
    """{key tuple: CI} for a long table with one row per (keys..., seed, task).

    A group with a task missing for some seed is an error: every seed must be scored on the same tasks.
    """
    out = {}
    for k, g in per_task.groupby(keys, sort=False, dropna=False):
        wide = g.pivot_table(index=seed_col, columns=task_col, values=value, aggfunc="first")
        if wide.isna().any().any():
            raise ValueError(f"{dict(zip(keys, k if isinstance(k, tuple) else (k,)))}: the seeds were not scored on the same tasks")
        out[k if isinstance(k, tuple) else (k,)] = bootstrap_ci(wide.to_numpy())
    return out


def seed_ci(table, keys: list[str], value: str = "accuracy") -> dict:
    """{key tuple: CI} over seed means only, for results saved without per-task accuracies."""
    return {(k if isinstance(k, tuple) else (k,)): bootstrap_ci(g[value].to_numpy())
            for k, g in table.groupby(keys, sort=False, dropna=False)}
