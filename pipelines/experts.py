"""Stage `experts`: the expert farm trains one task network per (task, seed) into the weight store.

    python -m pipelines.experts --preset default --set seeds_per_task=1 --set steps=300

Reads `<run_dir>/features`, writes `<run_dir>/store/weights`. Rerunning resumes: shards already in
the store with valid checksums are skipped, corrupted or missing ones are (re)trained.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from pipelines.core.cli import RunContext
from pipelines.core.config import Runtime, Seed, stage_config

INITS = ("shared", "independent")


@stage_config("experts")
class ExpertsConfig:
    """How the farm trains per-task experts and how it spreads them over Ray actors."""

    hidden: Annotated[int, Field(ge=1)] = 32
    """task network hidden width, image -> hidden -> text space (128 -> 32 -> 384: 16,800 weights; 53,664 with features.image_dims=0)"""
    logit_scale: Annotated[float, Field(gt=0.0, le=1000.0)] = 10.0
    """fixed scale of the cosine logits (0 would make every answer equally likely)"""
    steps: Annotated[int, Field(ge=1)] = 300
    """full-batch Adam steps per expert"""
    lr: Annotated[float, Field(ge=1e-7, le=10.0)] = 1e-3
    """Adam learning rate"""
    sample_fraction: Annotated[float, Field(ge=0.01, le=1.0)] = 1.0
    """share of the support set each step sees (1: full batch; below 1: stochastic minibatches)"""
    seeds_per_task: Annotated[int, Field(ge=1)] = 1
    """experts per task (K seeds; they differ only with sample_fraction < 1 or init=independent)"""
    init: Literal[INITS] = "shared"
    """shared: every expert starts from one init (weights aligned across tasks); independent: one init per expert"""
    init_seed: Seed = 0
    """seed of the shared init (or base of the independent ones)"""
    init_from: str | None = None
    """safetensors file with a flat 'w' to start every expert from (e.g. a multitask solution)"""
    checkpoint_every: Annotated[int, Field(ge=0)] = 0
    """also store weights every N steps (0: final only)"""
    shard_size: Annotated[int, Field(ge=1)] = 16
    """most experts trained together by one actor call (vmapped); small shards balance actors; fixes shard ids"""
    shard_samples: Annotated[int, Field(ge=1)] = 12288
    """most padded support samples (experts x largest support set) in one shard; fixes shard ids"""
    num_actors: Annotated[int, Runtime, Field(ge=0)] = 0
    """farm actors (0: one per cpus_per_actor CPUs of the cluster, at most one per shard)"""
    cpus_per_actor: Annotated[int, Runtime, Field(ge=1)] = 1
    """CPUs (and torch threads) per actor; 1 is fastest here (small ops gain nothing from threads)"""
    seed: Seed = 0
    """seeds stochastic minibatches (sample_fraction < 1)"""

    @field_validator("init_from")
    @classmethod
    def _init_from_exists(cls, path: str | None) -> str | None:
        if path and not Path(path).is_file():
            raise ValueError("no such file; give a safetensors file with a flat 'w'")
        return path

    @model_validator(mode="after")
    def _experts_differ(self):
        if self.seeds_per_task > 1 and self.init == "shared" and self.sample_fraction == 1.0 and not self.init_from:
            raise ValueError(
                "seeds_per_task > 1 with a shared init and full-batch training trains identical experts; "
                "set sample_fraction < 1 (stochastic minibatches) or init=independent"
            )
        return self


CONFIG = ExpertsConfig
NEEDS_RAY = True
PRESETS = {
    "smoke": dict(steps=60, shard_size=16),
    "default": dict(),
}


def run(cfg: ExpertsConfig, ctx: RunContext):
    """Train the missing experts into `<run_dir>/store/weights`; returns the farm summary."""
    from orchestrator.farm import run_farm
    from orchestrator.storage.store import WeightStore
    from orchestrator.storage.suite_features import SuiteFeatures

    feats = ctx.outputs.get("features") or SuiteFeatures.load(ctx.run.features)
    store = WeightStore(ctx.run.store)
    summary = run_farm(feats, cfg, store, progress=ctx.progress, log=ctx.log)
    # the actors' training loops, in wall time: their summed shard seconds over the actors that ran at once
    actors = max(1, min(cfg.num_actors or int((ctx.ray.cpus if ctx.ray else 1) // cfg.cpus_per_actor), summary.shards_trained))
    ctx.timings["experts_loop_s"] = min(summary.seconds, summary.train_seconds / actors)
    if summary.experts_trained:
        ctx.log(
            f"farm: {summary.experts_trained} experts in {summary.seconds:.1f}s "
            f"({summary.experts_trained / summary.seconds:.2f} experts/s, {summary.gflops:.1f} GFLOP/s)"
        )
    return summary


def track(summary, ctx: RunContext):
    """The experts' mean support-loss curve, farm throughput, mean accuracies per split (read back from the store),
    and the manifest."""
    from orchestrator.storage.store import MANIFEST, WeightStore

    ctx.tracker.series({"support_loss": summary.curve.points()})
    root = ctx.run.store
    m = {
        "experts_trained": summary.experts_trained, "shards_trained": summary.shards_trained,
        "shards_skipped": summary.shards_skipped, "shards_redone": len(summary.shards_redone),
        "farm_seconds": summary.seconds, "tasks_skipped": summary.tasks_skipped,
    }
    if summary.experts_trained:
        m["experts_per_second"] = summary.experts_trained / summary.seconds
        m["farm_gflops"] = summary.gflops
    meta = WeightStore(root).read_meta()
    for split, g in meta.groupby("split"):
        m[f"{split}_support_acc"] = float(g["support_acc"].mean())
        m[f"{split}_query_acc"] = float(g["query_acc"].mean())
        m[f"{split}_query_acc_min"] = float(g["query_acc"].min())
    return m, [root / MANIFEST]


def main() -> int:
    from pipelines.core.runner import run_stages

    return run_stages("experts", __doc__)


if __name__ == "__main__":
    from pipelines.core.cli import guarded

    guarded(main)()
