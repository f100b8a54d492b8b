"""HyperLDM's ε-predictor over hypernetwork latents (Nava et al. 2023, §3.4).

An MLP on concat[z, cond_emb(c), t_emb(t)]. The conditioning embedder owns classifier-free guidance's
training half: it replaces a random share of conditions by a learned null embedding (Ho & Salimans 2022,
§3.2; the paper drops 20%), so the same network learns ε(z, c) and ε(z, ∅). Sampling lives in
`models.diffusion`, which takes any callable with this module's `forward` signature.
"""
from __future__ import annotations

import torch
from torch import nn

from models.layers import SinusoidalEmbedding


class ConditionEmbedder(nn.Module):
    """Linear map of a condition c [B, d_c] to [B, d_out]; in training a random `drop_prob` of rows become the learned null."""

    def __init__(self, d_c: int, d_out: int, drop_prob: float = 0.2):
        super().__init__()
        self.proj = nn.Linear(d_c, d_out)
        # The null condition ∅ is a learned vector in embedding space (as DiT's extra label), not a zero c.
        self.null_emb = nn.Parameter(torch.randn(d_out) * 0.02)
        self.drop_prob = drop_prob

    def null(self, batch: int) -> torch.Tensor:
        """The null embedding repeated for `batch` rows -> [batch, d_out]."""
        return self.null_emb[None].expand(batch, -1)

    def forward(self, c: torch.Tensor | None, drop: torch.Tensor | None = None, batch: int | None = None) -> torch.Tensor:
        """c [B, d_c] -> [B, d_out]; `drop` [B] bool forces exactly those rows to ∅ (no random drop then).

        c=None means all rows unconditional (`batch` rows). Without `drop`, rows are dropped at random
        only in training mode; eval mode never drops.
        """
        if c is None:
            assert batch is not None, "c=None needs the batch size"
            return self.null(batch)
        e = self.proj(c)  # [B, d_out]
        if drop is None and self.training and self.drop_prob > 0:
            drop = torch.rand(len(c), device=c.device) < self.drop_prob
        if drop is None:
            return e
        return torch.where(drop.to(torch.bool)[:, None], self.null(len(c)).to(e.dtype), e)


class LatentDenoiser(nn.Module):
    """ε(z, t, c): MLP on concat[z, cond_emb(c), t_emb(t)] -> [Linear+LayerNorm+ReLU] x 2 -> Linear -> d_z."""

    def __init__(self, d_z: int, d_c: int, hidden: int = 512, t_dim: int = 128, drop_prob: float = 0.2):
        super().__init__()
        self.d_z, self.d_c = d_z, d_c
        self.t_emb = SinusoidalEmbedding(t_dim)
        # The condition is embedded to the same width as t so neither dominates the concat by size.
        self.cond_emb = ConditionEmbedder(d_c, t_dim, drop_prob)
        self.net = nn.Sequential(
            nn.Linear(d_z + 2 * t_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.ReLU(),
            nn.Linear(hidden, d_z),
        )

    def forward(
        self, z: torch.Tensor, t: torch.Tensor | int, c: torch.Tensor | None, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z [B, d_z], t [B] or scalar, c [B, d_c] or None (unconditional), drop [B] bool -> eps [B, d_z]."""
        B = len(z)
        t = torch.as_tensor(t, device=z.device)
        if t.ndim == 0:
            t = t.expand(B)  # [B]
        h = torch.cat([z, self.cond_emb(c, drop, batch=B), self.t_emb(t)], dim=-1)  # [B, d_z + 2 t_dim]
        return self.net(h)
