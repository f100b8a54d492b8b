"""Descriptions in a user's own words: each meta-test task scored from rephrasings of its description.

A rephrasing file (JSONL, one task a line) gives a task id, the task's description as the suite words it
(checked against the run, so a file cannot be applied to other tasks by mistake) and one or more
rephrasings. Every method generates the split's meta-test tasks once from their own descriptions and
once per rephrasing slot with the rephrased rows' embeddings swapped in: the batch, and so the sampler
noise, stays the same, so each task's two accuracies are paired, and its own-description accuracy is the
one the evaluate stage reports. A task rephrased several times scores the mean over its rephrasings.
Only this module reads the file: no stage trains or tunes on it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipelines.core.config import ConfigError

DEFAULT_FILE = Path(__file__).resolve().parents[2] / "configs" / "paraphrases" / "easyvqa.jsonl"
# Tasks whose most common answer scores at most this: the open questions (which colour, which shape),
# where a description has to carry the task; easyvqa's yes/no tasks have majority answers of 62-93 %.
OPEN_MAJORITY = 0.5
SUBSETS = {  # id -> (name, which tasks by majority-answer accuracy m)
    "all": ("all rephrased tasks", lambda m: m == m),
    "closed": (f"majority answer > {100 * OPEN_MAJORITY:g} % (yes/no questions)", lambda m: m > OPEN_MAJORITY),
    "open": (f"majority answer ≤ {100 * OPEN_MAJORITY:g} % (open questions)", lambda m: m <= OPEN_MAJORITY),
}
REFERENCES = ("oracle", "multitask")  # scored beside the conditioned methods; they do not read the description


@dataclass(frozen=True)
class Rephrasing:
    """One task of a rephrasing file: its id, its own description and the rephrasings of it."""

    task_id: str
    description: str
    rephrased: tuple[str, ...]


def read_rephrasings(path: Path) -> list[Rephrasing]:
    """The tasks of a JSONL rephrasing file; a malformed line is a ConfigError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"rephrasing file {path}: no such file")
    out, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or set(obj) != {"task_id", "description", "rephrased"}:
            raise ConfigError(f"{where}: expected an object with exactly task_id, description and rephrased")
        texts = obj["rephrased"]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ConfigError(f"{where}: rephrased must be a non-empty list of non-empty strings")
        if not all(isinstance(obj[k], str) and obj[k] for k in ("task_id", "description")):
            raise ConfigError(f"{where}: task_id and description must be non-empty strings")
        if obj["task_id"] in seen:
            raise ConfigError(f"{where}: task {obj['task_id']!r} appears twice; give all its rephrasings on one line")
        if len(set(texts)) != len(texts) or obj["description"] in texts:
            raise ConfigError(f"{where}: rephrasings must differ from each other and from the description")
        seen.add(obj["task_id"])
        out.append(Rephrasing(obj["task_id"], obj["description"], tuple(texts)))
    if not out:
        raise ConfigError(f"rephrasing file {path} holds no tasks")
    return out


def check_tasks(items: list[Rephrasing], tasks: pd.DataFrame, path: Path) -> None:
    """A ConfigError unless every task of the file is a task of the run with the same description."""
    own = dict(zip(tasks["id"], tasks["description"]))
    unknown = [r.task_id for r in items if r.task_id not in own]
    if unknown:
        raise ConfigError(f"{len(unknown)} of the {len(items)} tasks of {path} are not tasks of this run (e.g. "
                          f"{unknown[0]!r}): the file is for another suite; pass --rephrased with a file for this run's tasks")
    changed = [r for r in items if own[r.task_id] != r.description]
    if changed:
        r = changed[0]
        raise ConfigError(f"{path}: task {r.task_id!r} is described {own[r.task_id]!r} in this run, not {r.description!r}")


def majority_accuracy(batch) -> torch.Tensor:
    """Share [T] of each task's query examples whose answer is its most common one (always giving that answer)."""
    out = torch.zeros(batch.n)
    for i in range(batch.n):
        lab = batch.query_lab[i, : int(batch.query_n[i])]
        out[i] = torch.bincount(lab).max() / len(lab) if len(lab) else float("nan")
    return out


def slots(items: list[Rephrasing], test_ids: list[str]) -> list[tuple[torch.Tensor, list[str]]]:
    """Slot k: (rows of the meta-test tasks with a k-th rephrasing [n_k], those rephrasings); tasks that
    are not meta-test in this split are left out."""
    at = {t: i for i, t in enumerate(test_ids)}
    here = [r for r in items if r.task_id in at]
    depth = max((len(r.rephrased) for r in here), default=0)
    return [(torch.tensor([at[r.task_id] for r in here if len(r.rephrased) > k]),
             [r.rephrased[k] for r in here if len(r.rephrased) > k]) for k in range(depth)]


def score(name: str, models, data, sampling, slot_c: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(own-description accuracy [T], mean accuracy over each task's rephrasings [T], NaN where none)."""
    from models.zeroshot.tasks import task_accuracy
    from pipelines.zeroshot.methods import METHODS, accuracy, generate

    own = accuracy(name, models, data.test, data.w_test, sampling)  # [T]
    total, count = torch.zeros_like(own), torch.zeros_like(own)
    for rows, c_k in slot_c:
        if METHODS[name].weights is None or not METHODS[name].conditioned:
            acc = own  # it never reads the description
        else:
            c = data.test.c.clone()
            c[rows] = c_k.to(c.dtype)  # [T, d]: the rephrased rows swapped in, every other row as evaluated
            acc = task_accuracy(data.test, generate(name, models, c, sampling))
        total[rows] += acc[rows]
        count[rows] += 1
    return own, torch.where(count > 0, total / count.clamp(min=1), torch.full_like(own, float("nan")))


def task_rows(key: dict, data, own: torch.Tensor, rephrased: torch.Tensor, majority: torch.Tensor,
              n_rephrased: dict[str, int]) -> list[dict]:
    """One row per rephrased meta-test task: own and rephrased accuracy, majority-answer accuracy."""
    return [dict(key, task=t, rephrasings=n_rephrased[t], majority=float(m), original=float(o), rephrased=float(r))
            for t, o, r, m in zip(data.test_ids, own.tolist(), rephrased.tolist(), majority.tolist()) if t in n_rephrased]


def summarise(per_task: pd.DataFrame) -> pd.DataFrame:
    """Per (split, subset, method, γ): original, rephrased and drop as mean, seed std and a 95 % CI over tasks
    and seeds, with the subset's mean majority-answer accuracy, task and description counts."""
    from pipelines.core.bootstrap import bootstrap_ci

    t = per_task.assign(g=per_task["guidance_scale"].fillna(-1.0), drop=per_task["original"] - per_task["rephrased"])
    out = []
    for split, by_split in t.groupby("split", sort=False):
        for subset, (_, chosen) in SUBSETS.items():
            part = by_split[chosen(by_split["majority"])]
            for (method, g), grp in part.groupby(["method", "g"], sort=False):
                first = grp[grp["seed"] == grp["seed"].iloc[0]]
                base = dict(split=split, subset=subset, method=method, guidance_scale=None if g < 0 else g,
                            majority=float(first["majority"].mean()), tasks=len(first), descriptions=int(first["rephrasings"].sum()))
                for condition in ("original", "rephrased", "drop"):
                    wide = grp.pivot_table(index="seed", columns="task", values=condition, aggfunc="first")  # [seeds, tasks]
                    ci = bootstrap_ci(wide.to_numpy())
                    std = float(wide.mean(axis=1).std()) if len(wide) > 1 else np.nan  # over seed means
                    out.append(dict(base, condition=condition, mean=ci.mean, std=std, ci_low=ci.low, ci_high=ci.high, seeds=len(wide)))
    return pd.DataFrame(out)


def markdown(summary: pd.DataFrame, source: str) -> str:
    """One table per split and subset: methods as rows; original, rephrased and drop, in %."""
    from pipelines.core import names

    lines = ["# Descriptions in a user's own words", "",
             (f"Query accuracy (%) of each meta-test task generated from its own description (original) and from "
              f"rephrasings in words no suite uses ({source}; a task rephrased several times scores its mean), "
              f"and the drop. Cells: mean ± std over seeds [95 % CI from a bootstrap over tasks and seeds]. "
              f"References do not read the description."), ""]
    conditions = ("original", "rephrased", "drop")
    for (split, subset), sp in summary.groupby(["split", "subset"], sort=False):
        first = sp.iloc[0]
        lines += [f"## {names.split_name(split)}: {SUBSETS[subset][0]}", "",
                  f"{int(first['tasks'])} tasks, {int(first['descriptions'])} rephrasings, {int(sp['seeds'].max())} seed(s); "
                  f"always giving each task's most common answer scores {names.pct(first['majority'])} %.", "",
                  "| method | " + " | ".join(conditions) + " |", "|---|---|---|---|",
                  f"| Majority answer | {names.pct(first['majority'])} | | |"]
        for (method, g), grp in sp.groupby(["method", sp["guidance_scale"].fillna(-1.0)], sort=False):
            cell = {r.condition: f"{names.mean_spread(r.mean, r.std, r.seeds)} {names.interval(r.ci_low, r.ci_high)}"
                    for r in grp.itertuples() if r.condition == "original" or method not in REFERENCES}
            lines.append(f"| {names.method_name(method, None if g < 0 else g)} | " + " | ".join(cell.get(c, "") for c in conditions) + " |")
        lines.append("")
    return "\n".join(lines)


def best(summary: pd.DataFrame) -> dict:
    """Per split: the conditioned method with the highest rephrased accuracy on the open tasks, against the goal."""
    from pipelines.core.results import method_label

    out = {}
    for split, sp in summary.groupby("split", sort=False):
        r = sp[(sp["condition"] == "rephrased") & ~sp["method"].isin(REFERENCES)]
        r = r[r["subset"] == "open"] if (r["subset"] == "open").any() else r[r["subset"] == "all"]
        if r.empty:
            continue
        top = r.loc[r["mean"].idxmax()]
        uninformed = sp[(sp["method"] == "multitask") & (sp["subset"] == top["subset"]) & (sp["condition"] == "original")]
        out[split] = dict(method=method_label(top["method"], top["guidance_scale"]), subset=top["subset"],
                          rephrased=round(float(top["mean"]), 4), ci=[round(float(top["ci_low"]), 4), round(float(top["ci_high"]), 4)],
                          majority=round(float(top["majority"]), 4), tasks=int(top["tasks"]),
                          multitask=round(float(uninformed["mean"].iloc[0]), 4) if len(uninformed) else None)
    return out


def write(per_task: pd.DataFrame, folder: Path, source: str) -> tuple[pd.DataFrame, list[Path]]:
    """`paraphrases.csv` (the summary), `paraphrases_tasks.csv` (per task and seed) and `paraphrases.md`, atomically."""
    from orchestrator.storage.atomic import atomic_path, write_text

    summary = summarise(per_task)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "paraphrases.csv", folder / "paraphrases_tasks.csv", folder / "paraphrases.md"]
    for table, path in zip((summary, per_task), paths):
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
    write_text(paths[2], markdown(summary, source))
    return summary, paths
