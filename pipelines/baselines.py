"""Stage `baselines`: the trained zero-shot baselines, per split and seed.

    python -m pipelines.baselines --run-dir runs/default

- multitask: one task network trained on every meta-train task's support set (uninformed);
- text_hnet: a text-conditioned hypernetwork, description embedding -> MLP -> latent -> HNet -> weights,
  trained end to end on the meta-train support losses;
- maml: a first-order MAML initialisation, evaluated zero-shot (no adaptation).
Chance, nearest-task and the per-task expert (oracle) need no training; `evaluate` computes them.
Writes `models/baselines/`.
"""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from pipelines.core.config import DataPath, MemoryBudgetMb, Runtime, stage_config
from pipelines.zeroshot.stage import entry_points


@stage_config("baselines")
class BaselinesConfig:
    """How the baselines train (task-loss Adam; MAML's inner loop)."""

    steps: Annotated[int, Field(ge=1)] = 1000
    """Adam steps of multitask and the text-conditioned HNet"""
    lr: Annotated[float, Field(ge=1e-7, le=1.0)] = 1e-3
    """their learning rate"""
    tasks_per_step: Annotated[int, Field(ge=1)] = 16
    """tasks per step"""
    samples_per_task: Annotated[int, Field(ge=1)] = 32
    """support samples per task per step"""
    d_latent: Annotated[int, Field(ge=1)] = 128
    """text-conditioned HNet latent size"""
    hidden: tuple[int, ...] = (128, 128)
    """text-conditioned HNet widths"""
    maml_steps: Annotated[int, Field(ge=1)] = 300
    """first-order MAML outer steps"""
    maml_inner_steps: Annotated[int, Field(ge=1)] = 1
    """MAML inner SGD steps"""
    maml_inner_lr: Annotated[float, Field(ge=0.0, le=10.0)] = 0.1
    """MAML inner learning rate"""
    data_path: DataPath = "auto"
    """how workers get the weight normaliser: memory (each loads its split's experts whole to fit it), stream (fit in one Ray Data pass on the driver; workers read no expert; equal up to float rounding, so results may change in the last digits), auto (memory when the store fits memory_budget_mb)"""
    memory_budget_mb: MemoryBudgetMb = 1024.0
    """auto's limit: the store's committed rows x weights x 4 bytes, in MiB, that may be loaded whole"""
    num_workers: Annotated[int, Runtime, Field(ge=1)] = 2
    """Ray Train workers"""
    ddp: bool = False
    """true: workers share each model (DDP over gloo); false: each trains its own (split, seed) models"""
    log_every: Annotated[int, Runtime, Field(ge=1)] = 100
    """steps between logged losses"""


CONFIG = BaselinesConfig
NEEDS_RAY = True
PRESETS = {"smoke": dict(steps=40, maml_steps=20, d_latent=16, hidden=(32, 32), log_every=4), "default": dict()}


def train_one(run, data, seed: int, cfg: BaselinesConfig, hooks):
    """Train multitask, text-conditioned HNet and MAML for one split and seed; returns (state, metrics)."""
    from models.task_net import init_weights
    from models.zeroshot.tasks import task_accuracy
    from models.zeroshot.task_models import SharedWeights, TextHNet, fit_task_model, train_maml_init

    fit = dict(lr=cfg.lr, tasks_per_step=cfg.tasks_per_step, samples_per_task=cfg.samples_per_task)
    torch.manual_seed(seed)
    multitask = fit_task_model(SharedWeights(init_weights(data.layout.spec, seed)), data.train, seed,
                               hooks.prefixed("multitask_"), steps=cfg.steps, **fit)
    torch.manual_seed(seed)
    text = fit_task_model(TextHNet(data.norm, data.train.c.shape[1], cfg.d_latent, cfg.hidden), data.train, seed,
                          hooks.prefixed("text_hnet_"), steps=cfg.steps, **fit)
    maml = train_maml_init(data.train, seed, hooks.prefixed("maml_"), steps=cfg.maml_steps, **fit,
                           inner_steps=cfg.maml_inner_steps, inner_lr=cfg.maml_inner_lr)
    rows = torch.arange(data.train.batch.n)
    metrics = {f"{k}_train_query_acc": float(task_accuracy(data.train, m(rows, data.train.c).detach()).mean())
               for k, m in (("multitask", multitask), ("text_hnet", text), ("maml", maml))}
    state = {f"{k}.{n}": t for k, m in (("multitask", multitask), ("text_hnet", text), ("maml", maml))
             for n, t in m.state_dict().items()}
    return state, metrics


run, track, main = entry_points("baselines", train_one)


if __name__ == "__main__":
    from pipelines.core.cli import guarded

    guarded(main)()
