"""Zeng et al.'s (2025) memorisation baselines: perturb or average meta-train experts, nearest by description.

If a weight generator does no better than these, its gain can come from retrieving and blending its
training checkpoints rather than from generating new networks. "Nearest" is by cosine in the text
encoder's description-embedding space, as in `nearest_task`. Each baseline has one setting (the noise
scale, the number of experts averaged), chosen on the validation tasks by mean query accuracy; a run
without validation tasks chooses it on the meta-train tasks, leaving each task's own expert out.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from pipelines.zeroshot.sampling import SamplingSettings
    from pipelines.zeroshot.trained import TrainedModels

NOISE_GRID = (0.05, 0.1, 0.2, 0.5, 1.0)  # σ in normalised weight units, where experts have unit mean square
K_GRID = (1, 2, 3, 5, 8, 13, 21, 34, 55)
NOISE_SEED_OFFSET = 7919  # the noise stream differs from the HyperLDM sampler's, which uses the training seed itself


def nearest_rows(c: torch.Tensor, c_train: torch.Tensor, k: int, exclude_self: bool = False) -> torch.Tensor:
    """Indices [B, k] of the k meta-train tasks nearest (cosine) to each description embedding of c [B, d]."""
    import torch.nn.functional as F

    sim = F.normalize(c, dim=-1) @ F.normalize(c_train, dim=-1).T  # [B, N]
    if exclude_self:
        sim = sim.fill_diagonal_(-float("inf"))
    return sim.topk(min(k, sim.shape[1] - exclude_self), dim=1).indices


def noisy_nearest(m: TrainedModels, c: torch.Tensor, sigma: float, exclude_self: bool = False) -> torch.Tensor:
    """Raw weights [B, P]: the nearest meta-train expert plus N(0, σ²) noise in the normalised weight space."""
    import torch

    d = m.data
    w_n = d.norm.encode(d.w_train[nearest_rows(c, d.train.c, 1, exclude_self)[:, 0]])  # [B, P]
    gen = torch.Generator().manual_seed(m.seed + NOISE_SEED_OFFSET)
    return d.norm.decode(w_n + sigma * torch.randn(w_n.shape, generator=gen))


def knn_average(m: TrainedModels, c: torch.Tensor, k: int, exclude_self: bool = False) -> torch.Tensor:
    """Raw weights [B, P]: the mean of the k nearest meta-train experts."""
    d = m.data
    return d.w_train[nearest_rows(c, d.train.c, k, exclude_self)].mean(1)


def tuned(m: TrainedModels) -> dict[str, float]:
    """{noise_scale, k} chosen on the validation tasks (meta-train, leave-one-out, without them); cached per models."""
    from models.zeroshot.tasks import task_accuracy

    if "noise_scale" not in m.tuned:
        d = m.data
        part, loo = (d.val, False) if d.val is not None else (d.train, True)

        def best(grid, weights):
            scores = [float(task_accuracy(part, weights(v)).mean()) for v in grid]
            return grid[max(range(len(grid)), key=scores.__getitem__)]  # first of the best: the smallest setting

        ks = tuple(k for k in K_GRID if k <= len(d.train_ids) - loo) or (1,)
        m.tuned["noise_scale"] = best(NOISE_GRID, lambda s: noisy_nearest(m, part.c, s, loo))
        m.tuned["k"] = best(ks, lambda k: knn_average(m, part.c, k, loo))
    return m.tuned


def nearest_task_noise(m: TrainedModels, c: torch.Tensor, s: SamplingSettings) -> torch.Tensor:
    """The nearest meta-train expert by description plus Gaussian noise, its scale chosen on validation."""
    return noisy_nearest(m, c, tuned(m)["noise_scale"])


def nearest_k_average(m: TrainedModels, c: torch.Tensor, s: SamplingSettings) -> torch.Tensor:
    """The average of the k nearest meta-train experts by description, k chosen on validation."""
    return knn_average(m, c, int(tuned(m)["k"]))
