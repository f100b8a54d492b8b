"""HyperCLIP: a CLIP-style contrastive score between task-network weights and task descriptions.

Nava et al. 2023, §3.2: an MLP maps a task network's weights `w` (or their HVAE/HNet latent `z`) into the
text-embedding space, trained with CLIP's symmetric InfoNCE against the task descriptions' embeddings.
At test time it guides a latent by gradient ascent on cos(HyperCLIP(w(z)), text(description)) (§3.3).
The text encoder is frozen and lives elsewhere: here `c` is already a description embedding [B, d_txt].
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

LOG_SCALE_MAX = math.log(100.0)  # CLIP caps the logit scale at 100 (Radford et al. 2021, §2.5)


class HyperCLIP(nn.Module):
    """MLP from weights/latents [B, d_in] to unit vectors in text space [B, d_txt], plus CLIP's logit scale."""

    def __init__(self, d_in: int, d_txt: int, hidden: tuple[int, ...] = (128, 128)):
        super().__init__()
        dims = (d_in, *hidden)
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], d_txt))
        self.net = nn.Sequential(*layers)
        self.d_in, self.d_txt = d_in, d_txt
        # Learnable temperature as in CLIP: init 1/0.07, stored as a log so it stays positive.
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed(self, v: torch.Tensor) -> torch.Tensor:
        """v [B, d_in] -> unit vectors [B, d_txt]."""
        return F.normalize(self.net(v), dim=-1)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """Same as `embed`."""
        return self.embed(v)

    def scale(self) -> torch.Tensor:
        """The logit scale actually used, clamped to [1, 100] (a scalar tensor that carries gradient inside)."""
        return self.log_scale.clamp(0.0, LOG_SCALE_MAX).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the stored log scale into [0, log 100] (call after an optimiser step, as OpenCLIP does).

        `scale()` already clamps what is used; this keeps the raw parameter from drifting past the
        bound, where the clamp's zero gradient would otherwise leave it stuck.
        """
        self.log_scale.clamp_(0.0, LOG_SCALE_MAX)


def contrastive_loss(model: HyperCLIP, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between embed(v) [B, d_in] and the normalised descriptions c [B, d_txt]; row i pairs with i.

    Rows of one task repeated in a batch are false negatives for each other (as in the paper's setup);
    callers that care should sample one weight vector per task per batch.
    """
    return info_nce(model.embed(v), c, model.scale())


def info_nce(e_v: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, hard: float = 0.0, margin: float = 0.0) -> torch.Tensor:
    """CLIP's symmetric cross-entropy between unit vectors e_v [B, d] and descriptions c [B, d] (normalised here).

    hard > 0 weights each negative by exp(hard * cos(its description, the anchor's)), normalised to mean 1 over
    the anchor's negatives (the importance weighting of Robinson et al. 2021, here by description similarity):
    "is it red?" then weighs most against "is it not red?". margin > 0 subtracts a margin from every positive
    logit (AM-softmax, Wang et al. 2018). At hard = margin = 0 this is plain InfoNCE, bit for bit.
    """
    cn = F.normalize(c, dim=-1)
    logits = scale * e_v @ cn.T  # [B, B]
    labels = torch.arange(len(e_v), device=e_v.device)
    if hard == 0 and margin == 0:
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    eye = torch.eye(len(e_v), dtype=torch.bool, device=e_v.device)
    shift = -margin * scale * eye  # [B, B]
    if hard > 0 and len(e_v) > 1:
        sim = (hard * (cn @ cn.T)).masked_fill(eye, float("-inf"))  # [B, B], symmetric
        log_w = sim - (torch.logsumexp(sim, dim=1, keepdim=True) - math.log(len(e_v) - 1))  # mean weight 1 per row
        shift = shift + log_w.masked_fill(eye, 0.0)
    # Row i of logits.T anchors description i against every network: by symmetry its weights are row i's too.
    return 0.5 * (F.cross_entropy(logits + shift, labels) + F.cross_entropy(logits.T + shift, labels))


def score(model: HyperCLIP, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Cosine between embed(v) [B, d_in] and c [B, d_txt], row by row -> [B]."""
    return (model.embed(v) * F.normalize(c, dim=-1)).sum(-1)


def guide(
    z0: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    model: HyperCLIP,
    c: torch.Tensor,
    steps: int = 50,
    lr: float = 1e-3,
    l2: float = 0.0,
) -> torch.Tensor:
    """HyperCLIP guidance (§3.3): Adam on z from z0 [B, d_z] maximising cos(embed(decode(z)), c) - l2 |z - z0|^2.

    `decode` maps a latent to HyperCLIP's input (an HVAE/HNet decoder, or identity when HyperCLIP reads
    latents). Rows are optimised independently (the objective is a sum over rows). Gradients are taken
    with `torch.autograd.grad` w.r.t. z only, so neither the model's nor the decoder's parameters
    accumulate `.grad` or change. Returns the guided latent, detached.
    """
    z0 = z0.detach()
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    with torch.enable_grad():  # callers often sample under no_grad
        for _ in range(steps):
            obj = score(model, decode(z), c).sum()
            if l2 > 0:
                # The L2 pull keeps z near the prior's typical set, where the decoder is reliable.
                obj = obj - l2 * (z - z0).pow(2).sum()
            (g,) = torch.autograd.grad(-obj, z)
            z.grad = g
            opt.step()
    return z.detach()
