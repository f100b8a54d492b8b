"""Stage `evaluate`: zero-shot query accuracy of every method on the meta-test tasks, per split and seed.

    python -m pipelines.evaluate --run-dir runs/default --set guidance_scales=0,1,4

Writes `results/zero_shot.csv` (suite, split, method, guidance_scale, seed, accuracy, n_tasks),
`results/zero_shot.md` (mean ± std over seeds) and `results/zero_shot.png`; the means go to MLflow.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines.core.cli import RunContext, check_choice, check_range

RESULTS = "results"


@dataclass(frozen=True)
class EvaluateConfig:
    """How generative methods sample at test time."""

    guidance_scales: tuple[float, ...] = (0.0, 1.0, 1.5, 4.0, 7.5, 15.0)  # HyperLDM CFG scales γ (the paper's grid)
    guidance_steps: int = 50  # HyperCLIP guidance Adam steps (paper: 50)
    guidance_lr: float = 3e-2  # HyperCLIP guidance learning rate (paper: 1e-3; 50 Adam steps of 1e-3 move each coordinate <= 0.05, far less than our latents spread)
    guidance_l2: float = 0.0  # L2 pull of the guided latent to its start
    sampler: str = "ddim"  # HyperLDM sampler: ddim or ddpm
    sampler_steps: int = 50  # DDIM steps (DDPM always runs all T)

    def __post_init__(self):
        check_choice("sampler", self.sampler, ("ddim", "ddpm"))
        check_range("guidance_steps", self.guidance_steps, 0)
        check_range("guidance_lr", self.guidance_lr, 0.0, 10.0)
        check_range("guidance_l2", self.guidance_l2, 0.0)
        check_range("sampler_steps", self.sampler_steps, 1, 1000)
        for g in self.guidance_scales:
            check_range("guidance_scales", g, 0.0, 100.0)


CONFIG = EvaluateConfig
NEEDS_RAY = False
PRESETS = {"smoke": dict(guidance_scales=(0.0, 1.0), guidance_steps=5, sampler_steps=5), "default": dict()}


def method_weights(data, seed: int, cfg: EvaluateConfig) -> dict[tuple[str, float | None], torch.Tensor]:
    """{(method, guidance scale or None): raw weights [M, P] for the meta-test tasks} for one split and seed."""
    from pipelines.zeroshot.trained import (
        Sampling, hyperclip_weights, hyperldm_weights, load_baselines, load_hyperclip, load_hyperldm,
        load_routes, nearest_task,
    )

    s = Sampling(cfg.guidance_steps, cfg.guidance_lr, cfg.guidance_l2, cfg.sampler, cfg.sampler_steps)
    c, rows = data.test.c, torch.arange(data.test.batch.n)
    routes = load_routes(data.run_dir, data, seed)
    clips = load_hyperclip(data.run_dir, data, seed)
    ldms = load_hyperldm(data.run_dir, data, seed, routes["hnet"].z_train.shape[1])
    base = load_baselines(data.run_dir, data, seed)
    out: dict = {("oracle", None): data.w_test, ("nearest_task", None): nearest_task(data, c)}
    with torch.no_grad():
        out[("multitask", None)] = base["multitask"](rows, c)
        out[("maml_zero_shot", None)] = base["maml"](rows, c)
        out[("text_hnet", None)] = base["text_hnet"](rows, c)
    for r in routes:
        out[(f"{r}_hyperclip", None)] = hyperclip_weights(routes[r], clips[r], c, s)
        for g in cfg.guidance_scales:
            out[(f"{r}_hyperldm", g)] = hyperldm_weights(routes[r], ldms[r], c, g, s, seed)
    return out


def evaluate_split(data, seed: int, cfg: EvaluateConfig, suite: str) -> list[dict]:
    """Result rows (one per method) of one split and seed."""
    from models.zeroshot.training import chance_accuracy, task_accuracy

    rows = [dict(suite=suite, split=data.name, method="chance", guidance_scale=None, seed=seed,
                 accuracy=float(chance_accuracy(data.test).mean()), n_tasks=data.test.batch.n)]
    for (method, g), w in method_weights(data, seed, cfg).items():
        acc = float(task_accuracy(data.test, w).mean())
        rows.append(dict(suite=suite, split=data.name, method=method, guidance_scale=g, seed=seed, accuracy=acc, n_tasks=data.test.batch.n))
    return rows


def run(cfg: EvaluateConfig, ctx: RunContext):
    """Evaluate every (split, seed) of the plan; write the results table, CSV and chart."""
    import pandas as pd

    from orchestrator.storage.suite_features import SuiteFeatures
    from pipelines.core.results import write_results
    from pipelines.zeroshot.data import load_split, read_plan

    feats = ctx.outputs.get("features") or SuiteFeatures.load(ctx.run_dir / "features")
    splits, seeds = read_plan(ctx.run_dir)
    rows = []
    for split in splits:
        data = load_split(ctx.run_dir, split, feats)
        for seed in seeds:
            rows += evaluate_split(data, seed, cfg, feats.info.get("suite", "tasks"))
            ctx.log(f"evaluate: {split} seed {seed} done")
    table = pd.DataFrame(rows)
    paths = write_results(table, ctx.run_dir / RESULTS, "zero_shot", title="Zero-shot query accuracy on meta-test tasks")
    ctx.log("\n" + (ctx.run_dir / RESULTS / "zero_shot.md").read_text())
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
