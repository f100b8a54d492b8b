"""Building blocks shared by the zero-shot and few-shot models: MLPs and timestep embeddings."""
from __future__ import annotations

import math

import torch
from torch import nn


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers over consecutive `sizes`, ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sinusoidal features of a timestep: t [B] (int or float) -> [B, dim]."""

    def __init__(self, dim: int, max_period: float = 10_000.0):
        super().__init__()
        assert dim % 2 == 0, "dim must be even (cos and sin halves)"
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] -> [B, dim] = [cos(t f), sin(t f)]."""
        args = t.to(self.freqs.dtype)[:, None] * self.freqs[None]  # [B, dim/2]
        return torch.cat([args.cos(), args.sin()], dim=-1)
