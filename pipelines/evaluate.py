"""Stage `evaluate`: zero-shot query accuracy of every method on the meta-test tasks, per split and seed.

    python -m pipelines.evaluate --run-dir runs/default --set guidance_scales=0,1,4 --set sampling.sampler=ddpm

Writes `results/zero_shot.csv` (suite, split, method, guidance_scale, seed, accuracy, n_tasks),
`results/zero_shot_tasks.csv` (the same, one row per meta-test task: the bootstrap CI resamples them),
`results/zero_shot.md` (mean ± std over seeds, 95 % CI) and `results/zero_shot.png`; the means go to MLflow,
and the trained generators become MLflow logged models, one per split and seed serving every
generative method (`log_models`; README, "Python API").
Beside them, from the same generated networks: `results/memorisation.{csv,md}` (distances to the
meta-train experts and to each task's own expert) and `results/description_ablation.{csv,md}` (each
conditioned method given another task's description or a random string). Rerunning this stage on a
finished run adds them without retraining anything.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field

from pipelines.core.cli import RunContext
from pipelines.core.config import Runtime, stage_config
from pipelines.zeroshot.methods import VARIANTS
from pipelines.zeroshot.sampling import PAPER_GUIDANCE_GRID, SamplingSettings


@stage_config("evaluate", seed_field=None)
class EvaluateConfig:
    """Which guidance scales the table reports and how the generative methods sample."""

    guidance_scales: tuple[Annotated[float, Field(ge=0.0, le=100.0)], ...] = PAPER_GUIDANCE_GRID
    """HyperLDM classifier-free guidance scales γ, one table row each (the paper's grid)"""
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    """HyperCLIP guidance and HyperLDM sampler settings"""
    extra_methods: tuple[Literal[VARIANTS], ...] = ()
    """opt-in method variants to add to the table (e.g. hnet_hybrid), each at every guidance scale it uses"""
    description_ablation: bool = True
    """also score every conditioned method with another task's description and with a random string"""
    log_models: Annotated[bool, Runtime] = True
    """log the trained generators as MLflow models, one per split and seed serving every generative method (loadable by models:/ URI)"""


CONFIG = EvaluateConfig
TITLE = "Zero-shot query accuracy on meta-test tasks"
NEEDS_RAY = False
PRESETS = {"smoke": {"guidance_scales": (0.0, 1.0), "sampling": {"guidance_steps": 5, "sampler_steps": 5}},
           "default": dict()}


def evaluate_split(data, models, cfg: EvaluateConfig, suite: str, ablation: dict | None = None) -> dict[str, list[dict]]:
    """Rows of one split and seed: every method of the registry, HyperLDM once per guidance scale.

    {"zero_shot": accuracy rows, "per_task": the same per meta-test task, "memorisation": distance rows of
    each generated set of networks, "description_ablation": accuracy under each of `ablation`'s conditions
    ({name: c [T, d]}; None: skipped)}.
    """
    from models.zeroshot.tasks import task_accuracy
    from pipelines.zeroshot import description_ablation, memorisation
    from pipelines.zeroshot.methods import METHODS, TABLE, accuracy, generate

    out = {"zero_shot": [], "per_task": [], "memorisation": [], "description_ablation": []}
    where = dict(suite=suite, split=data.name, seed=models.seed)
    for name in (*TABLE, *cfg.extra_methods):
        m = METHODS[name]
        scales = cfg.guidance_scales if "guidance_scale" in m.uses else (None,)
        for g in scales:
            s = cfg.sampling if g is None else dataclasses.replace(cfg.sampling, guidance_scale=g)
            row = dict(where, guidance_scale=g)
            if m.weights is None:
                acc = accuracy(name, models, data.test, data.w_test, s)  # [T]
            else:
                w = generate(name, models, data.test.c, s)
                acc = task_accuracy(data.test, w)  # [T]
                out["memorisation"] += memorisation.rows(data, name, w, row)
                if ablation and m.conditioned:
                    accs = {k: float(acc.mean()) if k == "own" else float(task_accuracy(data.test, generate(name, models, c, s)).mean())
                            for k, c in ablation.items()}
                    out["description_ablation"] += description_ablation.rows(dict(row, n_tasks=data.test.batch.n), name, accs)
            key = dict(suite=suite, split=data.name, method=name, guidance_scale=g, seed=models.seed)
            out["zero_shot"].append(dict(**key, accuracy=float(acc.mean()), n_tasks=data.test.batch.n))
            out["per_task"] += [dict(**key, task=t, accuracy=float(a)) for t, a in zip(data.test_ids, acc.tolist())]
    out["memorisation"] += memorisation.reference_rows(data, dict(where, guidance_scale=None))
    return out


def run(cfg: EvaluateConfig, ctx: RunContext):
    """Evaluate every (split, seed) of the plan; write the results table, CSV and chart."""
    import pandas as pd

    from orchestrator.storage.suite_features import SuiteFeatures
    from pipelines.core.results import write_results
    from pipelines.zeroshot.data import load_split, read_plan
    from pipelines.zeroshot.trained import TrainedModels

    from pipelines.zeroshot import description_ablation, memorisation

    feats = ctx.outputs.get("features") or SuiteFeatures.load(ctx.run.features)
    splits, seeds = read_plan(ctx.run)
    rows = {"zero_shot": [], "per_task": [], "memorisation": [], "description_ablation": []}
    encoder = description_ablation.text_encoder(feats.info) if cfg.description_ablation else None
    for split in splits:
        data = load_split(ctx.run, split, feats)
        ablation = description_ablation.conditions(data, encoder.encode) if encoder and data.test.batch.n > 1 else None
        for seed in seeds:
            models = TrainedModels(ctx.run, data, seed)
            t0 = time.perf_counter()
            for k, v in evaluate_split(data, models, cfg, feats.info.get("suite", "tasks"), ablation).items():
                rows[k] += v
            ctx.timings["evaluate_loop_s"] = ctx.timings.get("evaluate_loop_s", 0.0) + time.perf_counter() - t0
            ctx.log(f"evaluate: {split} seed {seed} done; chosen on validation: {models.tuned}")
    table = pd.DataFrame(rows["zero_shot"])
    paths = write_results(table, ctx.run.results, "zero_shot", title=TITLE, per_task=pd.DataFrame(rows["per_task"]),
                          features_info=feats.info)
    ctx.log("\n" + paths[1].read_text())
    paths += memorisation.write(pd.DataFrame(rows["memorisation"]), ctx.run.results, features_info=feats.info)
    ctx.log("\n" + paths[-1].read_text())
    if rows["description_ablation"]:
        paths += description_ablation.write(pd.DataFrame(rows["description_ablation"]), ctx.run.results,
                                            features_info=feats.info)
        ctx.log("\n" + paths[-1].read_text())
    return table, paths, cfg


def track(out, ctx: RunContext):
    """Mean accuracy per (split, method) as MLflow metrics; the CSV, Markdown and chart as artifacts."""
    from pipelines.core.results import method_label

    table, paths, cfg = out
    if cfg.log_models:
        log_models(ctx, cfg.sampling.guidance_scale)
    m = {}
    for (split, method, g), grp in table.groupby(["split", "method", table["guidance_scale"].fillna(-1)]):
        m[f"{split}/{method_label(method, None if g < 0 else g)}"] = float(grp["accuracy"].mean())
    return m, paths


DEFAULT_LOGGED = "hnet_hyperldm"  # the method a logged model's predict uses when not told


def log_models(ctx: RunContext, guidance: float) -> None:
    """The generative methods' models, one MLflow logged model per split and seed, of this stage's run."""
    import tempfile
    from pathlib import Path

    from orchestrator.tracking.logged_models import can_log, log_generators
    from pipelines.zeroshot.bundle import write_bundle
    from pipelines.zeroshot.data import read_plan, store_spec
    from models.task_net import WeightLayout
    from pipelines.zeroshot.methods import GENERATIVE

    if not can_log(ctx.tracker):
        return
    methods = tuple(sorted(GENERATIVE, key=lambda m: m != DEFAULT_LOGGED))  # the first is predict's default
    splits, seeds = read_plan(ctx.run)
    n_weights = WeightLayout(store_spec(ctx.run)).size
    for split in splits:
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                bundle = write_bundle(ctx.run, methods, split, seed, Path(tmp) / "run")
                uri = log_generators(bundle, methods, split, seed, guidance, n_weights)
            ctx.log(f"evaluate: logged model {uri} (every generator, {split}, seed {seed})")


def headline(metrics: dict) -> dict[str, float]:
    """For the pipeline's parent run: zero-shot accuracy per split and method (`zero_shot/random/hnet_hyperldm_g1`)."""
    return {f"zero_shot/{k}": v for k, v in metrics.items() if not k.endswith("_seconds")}


def main() -> int:
    from pipelines.core.runner import run_stages

    return run_stages("evaluate", __doc__)


if __name__ == "__main__":
    from pipelines.core.cli import guarded

    guarded(main)()
