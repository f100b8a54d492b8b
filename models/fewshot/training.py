"""Build, meta-train and evaluate any few-shot method on task pools: pure torch, no Ray.

The stage (`pipelines.fewshot`) wraps these in a Ray Train loop; tests and benches call them directly.
Every method is an nn.Module with `forward(batch) -> meta-training loss` (so DDP can wrap it) and
`accuracy(batch) -> per-episode query accuracy`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from models.fewshot import METHODS
from models.fewshot.episodes import Episode, EpisodeBatch, TaskPool, collate
from models.fewshot.hypermaml import HyperMAML
from models.fewshot.hypertransformer import HyperTransformer
from models.fewshot.maml import MAML
from models.fewshot.metadiff import MetaDiff, fit_multitask, fit_targets
from models.task_net import TaskNetSpec, init_weights



MAX_ANSWERS = 8  # candidate answers the hypernetworks are built for


def build(method: str, spec: TaskNetSpec, settings, seed: int) -> nn.Module:
    """A freshly initialised `method` model (torch's RNG seeded by `seed` for its own layers).

    `settings` holds the method's own knobs, read by name (the stage's `fewshot.<method>` section):
    maml/fomaml inner_steps, inner_lr; hypermaml warmup_steps, warmup_lr, rotate_views;
    hypertransformer layers, init_gain, rotate_views; metadiff denoise_steps, width.
    """
    torch.manual_seed(seed)
    s = settings
    if method in ("maml", "fomaml"):
        return MAML(spec, s.inner_steps, s.inner_lr, first_order=method == "fomaml", seed=seed)
    if method == "hypermaml":
        return HyperMAML(spec, MAX_ANSWERS, s.warmup_steps, s.warmup_lr, rotate=s.rotate_views, seed=seed)
    if method == "hypertransformer":
        return HyperTransformer(spec, s.layers, max_answers=MAX_ANSWERS, init_gain=s.init_gain, rotate=s.rotate_views, seed=seed)
    if method == "metadiff":
        return MetaDiff(spec, steps=s.denoise_steps, width=s.width)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def prepare(model: nn.Module, pool: TaskPool, image_feats: torch.Tensor, settings, seed: int, pretrain_steps: int) -> None:
    """Pre-meta-training work: the multitask extractor (fc1, `pretrain_steps` Adam steps) of MetaDiff,
    HyperMAML and HyperTransformer, and MetaDiff's per-task targets (`settings.target_steps`); nothing for MAML."""
    if not isinstance(model, (MetaDiff, HyperMAML, HyperTransformer)):
        return
    layout = model.layout
    rng = np.random.default_rng(seed)
    w_base = fit_multitask(layout, init_weights(layout.spec, seed), pool, image_feats, pretrain_steps, rng=rng)
    if isinstance(model, MetaDiff):
        model.prepare(w_base, fit_targets(layout, w_base, pool, image_feats, settings.target_steps, rng=rng))
    else:
        model.set_extractor(w_base)


def set_progress(model: nn.Module, step: int, total: int, settings) -> None:
    """Per-step schedules: HyperMAML's warm-up blend β rises linearly from 0 to 1 over `settings.warmup_fraction`."""
    if isinstance(model, HyperMAML):
        ramp = max(1, round(settings.warmup_fraction * total))
        model.blend.fill_(min(1.0, step / ramp))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: EpisodeBatch) -> float:
    """One meta-training step on a batch of episodes; returns the loss. (`model` may be DDP-wrapped.)"""
    opt.zero_grad(set_to_none=True)
    loss = model(batch)
    loss.backward()
    opt.step()
    return float(loss.detach())


def eval_episodes(pool: TaskPool, shots: int, n: int, n_query: int, seed: int) -> list[Episode]:
    """`n` seeded episodes of the pool's tasks: the same list for every method and training seed."""
    return pool.episodes(n, shots, n_query, np.random.default_rng([seed, shots]))


@torch.no_grad()
def evaluate(
    model: nn.Module, episodes: list[Episode], pool: TaskPool, image_feats: torch.Tensor,
    batch_size: int = 200, seed: int = 0,
) -> np.ndarray:
    """Query accuracy of every episode [n] (MetaDiff's sampling noise seeded by `seed`)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(episodes), batch_size):
        b = collate(episodes[i: i + batch_size], image_feats, pool.prompts)
        acc = model.accuracy(b, g) if isinstance(model, MetaDiff) else model.accuracy(b)
        out.append(acc.cpu().numpy())
    model.train()
    return np.concatenate(out)


def chance(episodes: list[Episode], pool: TaskPool) -> np.ndarray:
    """Expected accuracy of a uniform guess per episode, 1 / number of candidate answers [n]."""
    return np.array([1.0 / pool.n_answers(e.task) for e in episodes])


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% interval, 1.96 std / sqrt(n)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(len(values)))


def n_params(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "METHODS", "MAX_ANSWERS", "build", "prepare", "set_progress", "train_step", "eval_episodes",
    "evaluate", "chance", "mean_ci95", "n_params",
]
