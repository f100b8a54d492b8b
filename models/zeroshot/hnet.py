"""The hypernetwork route of Nava et al. (2023): a latent `z` per task, one MLP `z -> w`.

The paper's HNet is trained on task losses: a shared MLP decodes a latent into task-network weights,
and each task's latent is adapted from one meta-learned latent, so tasks live on a low-dimensional
manifold of working networks. HyperCLIP and HyperLDM then search or sample in that latent space.
Here `HNet` outputs weights in the normalised space of a `WeightNormalizer` and `HNetLatents` holds
the per-task latents; `models.zeroshot.training.LatentHNet` joins them and `fit_task_model` trains it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from models.layers import mlp


class HNet(nn.Module):
    """Hypernetwork: latent z [B, d_latent] -> MLP (Linear+ReLU per hidden size) -> w [B, n_weights]."""

    def __init__(self, n_weights: int, d_latent: int = 128, hidden: tuple[int, ...] = (128, 128)):
        super().__init__()
        self.n_weights, self.d_latent = n_weights, d_latent
        self.net = mlp([d_latent, *hidden, n_weights])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, d_latent] -> w [B, n_weights] (normalised space when trained with a normalizer)."""
        return self.net(z)


class HNetLatents(nn.Module):
    """Per-task latents z_i = meta + delta_i: every task starts at one shared, learned meta latent.

    As in the paper's per-task adaptation, a task's latent is the meta latent moved by a task-specific
    step; `delta` starts as small noise so tasks are distinguishable from step 0 but none starts far
    from the meta point. Training both `meta` and `delta` learns the shared point and the offsets.
    """

    def __init__(
        self, n_tasks: int, d_latent: int, noise: float = 1e-2, generator: torch.Generator | None = None
    ):
        super().__init__()
        self.meta = nn.Parameter(torch.randn(d_latent, generator=generator))  # [d_latent]
        self.delta = nn.Parameter(noise * torch.randn(n_tasks, d_latent, generator=generator))  # [T, d]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Task indices idx [B] (long) -> latents z [B, d_latent]."""
        return self.meta + self.delta[idx]

    @torch.no_grad()
    def reset(self, noise: float = 1e-2, generator: torch.Generator | None = None) -> None:
        """Restart every task at the (current) meta latent plus fresh small noise, e.g. before adapting."""
        self.delta.copy_(noise * torch.randn(self.delta.shape, generator=generator))

    @property
    def z(self) -> torch.Tensor:
        """All task latents [T, d_latent]."""
        return self.meta + self.delta


def invert(hnet: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, z_init: torch.Tensor, steps: int = 200, lr: float = 0.05) -> torch.Tensor:
    """Latents whose decoded weights are nearest `w` [B, n_weights] in squared error, by Adam from z_init [B, d] -> [B, d].

    `hnet` is any latent-to-weights decoder. The HNet has no encoder, so a network from elsewhere (e.g. the
    text-conditioned hypernetwork's) is brought into its latent space by projection onto the decoder's manifold. Rows are independent (the
    loss is a sum over rows); only z moves, the HNet's parameters get no gradient.
    """
    z = z_init.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            (g,) = torch.autograd.grad((hnet(z) - w).pow(2).sum(), z)
            z.grad = g
            opt.step()
    return z.detach()
