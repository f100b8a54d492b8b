"""The hypernetwork route of Nava et al. (2023): a latent `z` per task, one MLP `z -> w`.

The paper's HNet is trained on task losses: a shared MLP decodes a latent into task-network weights,
and each task's latent is adapted from one meta-learned latent, so tasks live on a low-dimensional
manifold of working networks. HyperCLIP and HyperLDM then search or sample in that latent space.
Here `HNet` outputs weights in the normalised space of a `WeightNormalizer` (when one is given),
`HNetLatents` holds the per-task latents, and `hnet_task_loss` is the task-network cross-entropy.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import mlp
from models.task_net import WeightLayout, functional_forward, masked_logits
from models.weight_norm import WeightNormalizer


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


def decode_weights(hnet: HNet, z: torch.Tensor, normalizer: WeightNormalizer | None = None) -> torch.Tensor:
    """Raw task-network weights w [B, P] from latents z [B, d_latent] (denormalised if a normalizer is given)."""
    w = hnet(z)
    return normalizer.decode(w) if normalizer is not None else w


def hnet_task_logits(
    hnet: HNet,
    z: torch.Tensor,
    x: torch.Tensor,
    prompts: torch.Tensor,
    answer_mask: torch.Tensor,
    layout: WeightLayout,
    normalizer: WeightNormalizer | None = None,
) -> torch.Tensor:
    """Masked task-network logits [B, n, a] of the weights decoded from z [B, d_latent].

    x [B, n, d_img] (or [n, d_img], shared by every task), prompts [B, a, d_txt], answer_mask [B, a] bool.
    """
    w = decode_weights(hnet, z, normalizer)  # [B, P]
    if x.dim() == 2:
        x = x.expand(w.shape[0], *x.shape)  # [B, n, d_img]
    # One definition of the network (functional_forward), mapped over the task axis.
    logits = torch.func.vmap(partial(functional_forward, layout))(w, x, prompts)  # [B, n, a]
    return masked_logits(logits, answer_mask[:, None, :])


def hnet_task_loss(
    hnet: HNet,
    z: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    prompts: torch.Tensor,
    answer_mask: torch.Tensor,
    layout: WeightLayout,
    normalizer: WeightNormalizer | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the task networks decoded from z over their samples: the HNet training loss.

    y [B, n] labels (indices into each task's answers); `valid` [B, n] bool marks real samples when
    support sets are padded (default: all real). Shapes of the other arguments as `hnet_task_logits`.
    Gradients reach `hnet` and `z`, so the same loss trains the HNet and adapts per-task latents.
    """
    logits = hnet_task_logits(hnet, z, x, prompts, answer_mask, layout, normalizer)
    ce = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # [B, n]
    if valid is None:
        return ce.mean()
    valid = valid.to(ce.dtype)
    return (ce * valid).sum() / valid.sum().clamp_min(1.0)
