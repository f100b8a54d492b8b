"""Stage `evaluate`: zero-shot query accuracy of every method on the meta-test tasks, per split and seed.

    python -m pipelines.evaluate --run-dir runs/default --set guidance_scales=0,1,4 --set sampling.sampler=ddpm

Writes `results/zero_shot.csv` (suite, split, method, guidance_scale, seed, accuracy, n_tasks),
`results/zero_shot_tasks.csv` (the same, one row per meta-test task: the bootstrap CI resamples them),
`results/zero_shot.md` (mean ± std over seeds, 95 % CI) and `results/zero_shot.png`; the means go to MLflow.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Annotated

from pydantic import Field

from pipelines.core.cli import RunContext
from pipelines.core.config import stage_config
from pipelines.zeroshot.sampling import PAPER_GUIDANCE_GRID, SamplingSettings


@stage_config("evaluate", seed_field=None)
class EvaluateConfig:
    """Which guidance scales the table reports and how the generative methods sample."""

    guidance_scales: tuple[Annotated[float, Field(ge=0.0, le=100.0)], ...] = PAPER_GUIDANCE_GRID
    """HyperLDM classifier-free guidance scales γ, one table row each (the paper's grid)"""
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    """HyperCLIP guidance and HyperLDM sampler settings"""


CONFIG = EvaluateConfig
TITLE = "Zero-shot query accuracy on meta-test tasks"
NEEDS_RAY = False
PRESETS = {"smoke": {"guidance_scales": (0.0, 1.0), "sampling": {"guidance_steps": 5, "sampler_steps": 5}},
           "default": dict()}


def evaluate_split(data, models, cfg: EvaluateConfig, suite: str) -> tuple[list[dict], list[dict]]:
    """Result rows of one split and seed (every method of the registry, HyperLDM once per guidance scale),
    and the same per meta-test task."""
    from pipelines.zeroshot.methods import METHODS, accuracy

    rows, per_task = [], []
    for name, m in METHODS.items():
        scales = cfg.guidance_scales if "guidance_scale" in m.uses else (None,)
        for g in scales:
            s = cfg.sampling if g is None else dataclasses.replace(cfg.sampling, guidance_scale=g)
            acc = accuracy(name, models, data.test, data.w_test, s)  # [T]
            key = dict(suite=suite, split=data.name, method=name, guidance_scale=g, seed=models.seed)
            rows.append(dict(**key, accuracy=float(acc.mean()), n_tasks=data.test.batch.n))
            per_task += [dict(**key, task=t, accuracy=float(a)) for t, a in zip(data.test_ids, acc.tolist())]
    return rows, per_task


def run(cfg: EvaluateConfig, ctx: RunContext):
    """Evaluate every (split, seed) of the plan; write the results table, CSV and chart."""
    import pandas as pd

    from orchestrator.storage.suite_features import SuiteFeatures
    from pipelines.core.results import write_results
    from pipelines.zeroshot.data import load_split, read_plan
    from pipelines.zeroshot.trained import TrainedModels

    feats = ctx.outputs.get("features") or SuiteFeatures.load(ctx.run.features)
    splits, seeds = read_plan(ctx.run)
    rows, per_task = [], []
    for split in splits:
        data = load_split(ctx.run, split, feats)
        for seed in seeds:
            r, t = evaluate_split(data, TrainedModels(ctx.run, data, seed), cfg, feats.info.get("suite", "tasks"))
            rows, per_task = rows + r, per_task + t
            ctx.log(f"evaluate: {split} seed {seed} done")
    table = pd.DataFrame(rows)
    paths = write_results(table, ctx.run.results, "zero_shot", title=TITLE, per_task=pd.DataFrame(per_task), features_info=feats.info)
    ctx.log("\n" + paths[1].read_text())
    return table, paths


def track(out, ctx: RunContext):
    """Mean accuracy per (split, method) as MLflow metrics; the CSV, Markdown and chart as artifacts."""
    from pipelines.core.results import method_label

    table, paths = out
    m = {}
    for (split, method, g), grp in table.groupby(["split", "method", table["guidance_scale"].fillna(-1)]):
        m[f"{split}/{method_label(method, None if g < 0 else g)}"] = float(grp["accuracy"].mean())
    return m, paths


def main() -> int:
    from pipelines.core.runner import run_stages

    return run_stages("evaluate", __doc__)


if __name__ == "__main__":
    from pipelines.core.cli import guarded

    guarded(main)()
