"""How far generated task networks sit from the experts they were trained on: memorisation vs novelty.

Generative models of weights can reproduce or interpolate their training checkpoints instead of
producing new networks (Zeng et al. 2025, "Generative Modeling of Weights: Generalization or
Memorization?"). Distances are taken in the normalised weight space (per-coordinate mean removed,
each layer divided by its std), where every layer counts on one scale:

- cosine similarity (1: same direction from the experts' mean);
- normalised L2: ||a - b|| / sqrt(P), the root-mean-square coordinate difference. Meta-train experts
  have unit mean square there, so two independent experts sit about sqrt(2) apart.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MEASURES = ("cos_nearest_train", "l2_nearest_train", "cos_own_oracle", "l2_own_oracle")


def pairwise(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine [A, B], normalised L2 [A, B]) between normalised weights a [A, P] and b [B, P]."""
    a, b = a.double(), b.double()
    cos = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    l2 = torch.cdist(a, b) / a.shape[1] ** 0.5
    return cos.float(), l2.float()


@torch.no_grad()
def novelty(w_n: torch.Tensor, train_n: torch.Tensor, own_n: torch.Tensor | None = None,
            exclude_self: bool = False) -> dict[str, torch.Tensor]:
    """Per network of w_n [B, P]: similarity to its nearest meta-train expert (train_n [N, P]) and to its own oracle.

    `own_n` [B, P] are the networks' own tasks' experts (None: NaN). `exclude_self` skips the diagonal,
    for the meta-train experts measured against each other (B == N, same order).
    """
    cos, l2 = pairwise(w_n, train_n)  # [B, N]
    if exclude_self:
        eye = torch.eye(len(w_n), dtype=torch.bool)
        cos, l2 = cos.masked_fill(eye, -float("inf")), l2.masked_fill(eye, float("inf"))
    out = {"cos_nearest_train": cos.max(1).values, "l2_nearest_train": l2.min(1).values}
    if own_n is None:
        nan = torch.full((len(w_n),), float("nan"))
        out.update(cos_own_oracle=nan, l2_own_oracle=nan.clone())
    else:
        c, d = pairwise(w_n, own_n)
        out.update(cos_own_oracle=c.diagonal(), l2_own_oracle=d.diagonal())
    return out
