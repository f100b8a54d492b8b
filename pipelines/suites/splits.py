"""Seeded splits: per-task support/query (stratified by answer) and tasks into meta-train/meta-test."""
from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .base import META_TEST, META_TRAIN, SuiteError

SPLIT_MODES = ("random", "compositional")


def task_rng(seed: int, task_id: str) -> np.random.Generator:
    """A generator for one task, derived from the suite seed and the task id (not its position)."""
    # Keyed by id so a task's support/query stays the same when other tasks are added or reordered.
    return np.random.default_rng([int(seed), zlib.crc32(task_id.encode("utf-8"))])


def _check_fraction(name: str, value: float, closed: bool) -> float:
    """Validate a fraction; `closed` allows the end points 0 and 1."""
    ok = 0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0
    if not ok:
        bounds = "[0, 1]" if closed else "(0, 1)"
        raise SuiteError(f"{name}={value!r} must lie in {bounds}")
    return float(value)


def stratified_support_query(
    labels: np.ndarray, support_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample positions into (support_pos, query_pos), stratified by answer label."""
    _check_fraction("support_fraction", support_fraction, closed=False)
    labels = np.asarray(labels)
    support, query = [], []
    for c in np.unique(labels):
        pos = rng.permutation(np.flatnonzero(labels == c))
        # Every answer with >= 2 samples lands on both sides; a lone sample goes to support,
        # because a method cannot be asked about an answer it was never shown.
        k = len(pos) if len(pos) == 1 else min(max(round(len(pos) * support_fraction), 1), len(pos) - 1)
        support.append(pos[:k])
        query.append(pos[k:])
    cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)  # noqa: E731
    # Shuffle so that neither side comes out grouped by answer.
    return rng.permutation(cat(support)), rng.permutation(cat(query))


def stratified_subsample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Pick `n` positions keeping answer proportions (each answer keeps >= 1 sample when n allows)."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    classes, sizes = np.unique(labels, return_counts=True)
    quota = np.floor(sizes * n / len(labels)).astype(np.int64)
    quota = np.maximum(quota, np.minimum(1, sizes)) if n >= len(classes) else quota
    # Hand out what rounding left over (or take back what the >= 1 rule added), largest pools first.
    order = np.argsort(-sizes, kind="stable")
    i = 0
    while quota.sum() != n:
        j = order[i % len(order)]
        step = 1 if quota.sum() < n else -1
        if 0 <= quota[j] + step <= sizes[j] and not (step < 0 and quota[j] <= 1):
            quota[j] += step
        i += 1
    picked = [rng.choice(np.flatnonzero(labels == c), size=int(q), replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def split_tasks_random(task_ids: Iterable[str], meta_test_fraction: float, seed: int) -> dict[str, str]:
    """Assign tasks to META_TRAIN / META_TEST at random (seeded); returns {task_id: split}."""
    _check_fraction("meta_test_fraction", meta_test_fraction, closed=True)
    ids = sorted(set(task_ids))  # sorted, so the split does not depend on the order tasks were listed in
    n_test = int(round(len(ids) * meta_test_fraction))
    if len(ids) >= 2 and 0.0 < meta_test_fraction < 1.0:
        n_test = int(np.clip(n_test, 1, len(ids) - 1))  # both sides non-empty whenever possible
    test = set(np.random.default_rng(seed).permutation(len(ids))[:n_test].tolist())
    return {t: (META_TEST if i in test else META_TRAIN) for i, t in enumerate(ids)}


def split_tasks_compositional(
    concepts_per_task: Mapping[str, Sequence[str]], holdout: Sequence[str]
) -> dict[str, str]:
    """Send every task that mentions a held-out concept to META_TEST, the rest to META_TRAIN."""
    held = set(holdout)
    return {t: (META_TEST if held & set(c) else META_TRAIN) for t, c in concepts_per_task.items()}


def check_holdout(holdout: Sequence[str], valid: Iterable[str], split_mode: str) -> tuple[str, ...]:
    """Validate `split_mode` and the held-out concept names against the concepts a suite knows."""
    if split_mode not in SPLIT_MODES:
        raise SuiteError(f"unknown split_mode {split_mode!r}; valid: {', '.join(SPLIT_MODES)}")
    if isinstance(holdout, str):
        holdout = (holdout,)
    holdout = tuple(holdout)
    valid = sorted(set(valid))
    bad = [h for h in holdout if h not in valid]
    if bad:
        raise SuiteError(f"unknown holdout concept(s) {bad}; valid concepts: {', '.join(valid)}")
    if split_mode == "compositional" and not holdout:
        raise SuiteError(f"split_mode='compositional' needs at least one holdout concept; valid: {', '.join(valid)}")
    return tuple(holdout)


def assign_splits(
    concepts_per_task: Mapping[str, Sequence[str]],
    split_mode: str,
    holdout: Sequence[str],
    meta_test_fraction: float,
    seed: int,
    min_meta_test: int = 1,
) -> dict[str, str]:
    """Split tasks by `split_mode` ('random' or 'compositional'); shared by the built-in suites."""
    if split_mode == "random":
        return split_tasks_random(concepts_per_task.keys(), meta_test_fraction, seed)
    if split_mode != "compositional":
        raise SuiteError(f"unknown split_mode {split_mode!r}; valid: {', '.join(SPLIT_MODES)}")
    splits = split_tasks_compositional(concepts_per_task, holdout)
    n_test = sum(s == META_TEST for s in splits.values())
    n_train = len(splits) - n_test
    if n_test < min_meta_test or n_train == 0:
        raise SuiteError(
            f"compositional split holding out {list(holdout)} gives {n_train} meta-train and {n_test} "
            f"meta-test tasks; need >= {min_meta_test} meta-test and >= 1 meta-train: choose other holdout concepts"
        )
    return splits
