"""Per-layer standardisation of flat task-network weights.

Experts adapted from one shared init sit in a narrow region of weight space, and the adapter's layers
differ in scale by orders of magnitude (fc1 ~ 1/sqrt(d_img), biases far smaller after training), so a
generative model fit to raw `w` would spend its capacity on the shared offset and the largest layer.
Subtracting the per-coordinate mean leaves the experts' differences; dividing each layer by one
scalar std puts the layers on a common scale while keeping the relative sizes of coordinates within a
layer (experts from one shared init, normalised per layer, are what a generative model can learn).
"""
from __future__ import annotations

import torch
from torch import nn

from models.task_net import WeightLayout


class WeightNormalizer(nn.Module):
    """Maps flat weights `w` [..., P] to `w_n` = (w - mean) / std_layer and back; fit from a batch."""

    def __init__(self, layout: WeightLayout, eps: float = 1e-8):
        super().__init__()
        self.layout = layout
        self.eps = eps
        self.names = list(layout.shapes)
        # Allocated at full size up front so a fresh normalizer can `load_state_dict` a fitted one.
        self.register_buffer("mean", torch.zeros(layout.size))  # [P]
        self.register_buffer("std", torch.ones(len(self.names)))  # [L], one scalar per layer
        sizes = [b - a for a, b in (layout.offsets[k] for k in self.names)]
        self.register_buffer("sizes", torch.tensor(sizes), persistent=False)  # [L]

    @torch.no_grad()
    def fit(self, w: torch.Tensor) -> "WeightNormalizer":
        """Set the per-coordinate mean and per-layer std from w [N, P]; returns self."""
        if w.dim() != 2 or w.shape[1] != self.layout.size:
            raise ValueError(f"fit expects w [N, {self.layout.size}], got {tuple(w.shape)}")
        # float64 statistics: experts differ by a small fraction of their shared values, which fp32
        # sums over many experts would blur.
        w = w.double()
        mean = w.mean(0)
        d = w - mean  # [N, P]
        self.mean.copy_(mean)
        for i, k in enumerate(self.names):
            a, b = self.layout.offsets[k]
            # Population std over all N x layer coordinates, so encoded layers have std exactly 1;
            # floored so a layer equal in every expert (e.g. frozen) maps to 0 instead of NaN.
            self.std[i] = d[:, a:b].pow(2).mean().sqrt().clamp_min(self.eps)
        return self

    def coord_std(self) -> torch.Tensor:
        """The per-layer std expanded to every coordinate: [P]."""
        return self.std.repeat_interleave(self.sizes.to(self.std.device))

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        """Raw weights w [..., P] -> normalised w_n [..., P]."""
        return (w - self.mean) / self.coord_std()

    def decode(self, w_n: torch.Tensor) -> torch.Tensor:
        """Normalised w_n [..., P] -> raw weights w [..., P]; the inverse of `encode`."""
        return w_n * self.coord_std() + self.mean

    def layer_stds(self) -> dict[str, float]:
        """The fitted std of each named layer (for logging)."""
        return {k: float(s) for k, s in zip(self.names, self.std)}
