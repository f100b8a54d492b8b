"""HVAE: a variational autoencoder over flat task-network weights (Nava et al. 2023).

The paper's HyperLDM runs diffusion in the latent space of a VAE over expert weights; this is that
VAE. It sees weights in the normalised space of a `WeightNormalizer`, where each layer has unit std
across experts, so one MSE treats every layer alike.
"""
from __future__ import annotations

import torch
from torch import nn

from models.layers import mlp


class HVAE(nn.Module):
    """Encoder w [B, n_weights] -> (mu, logvar) [B, d_latent]; decoder z -> mirrored MLP -> w."""

    def __init__(self, n_weights: int, d_latent: int = 128, hidden: tuple[int, ...] = (128, 128)):
        super().__init__()
        self.n_weights, self.d_latent = n_weights, d_latent
        self.encoder = mlp([n_weights, *hidden, 2 * d_latent])
        self.decoder = mlp([d_latent, *reversed(hidden), n_weights])

    def encode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w [B, n_weights] -> posterior mean and log-variance, each [B, d_latent]."""
        mu, logvar = self.encoder(w).chunk(2, dim=-1)  # [B, 2 d] -> 2 x [B, d]
        # Bounded log-variance: with a reconstruction summed over ~54k coordinates the early gradients are
        # large, and an unbounded logvar overflowed exp() to inf and the loss to NaN within 500 steps.
        return mu, logvar.clamp(-12.0, 4.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, d_latent] -> w [B, n_weights]."""
        return self.decoder(z)

    @staticmethod
    def reparameterize(
        mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z = mu + sigma * eps with eps ~ N(0, I) drawn from `generator` (for reproducible runs)."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def forward(
        self, w: torch.Tensor, generator: torch.Generator | None = None, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w [B, n_weights] -> (w_rec, mu, logvar). Samples z in training mode (noise `eps` [B, d_latent]
        when given, else from `generator`); decodes mu in eval mode."""
        mu, logvar = self.encode(w)
        if self.training and eps is not None:
            z = mu + torch.exp(0.5 * logvar) * eps
        else:
            z = self.reparameterize(mu, logvar, generator) if self.training else mu
        return self.decode(z), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n weight vectors [n, n_weights] decoded from prior draws z ~ N(0, I)."""
        p = next(self.parameters())
        z = torch.randn(n, self.d_latent, generator=generator, device=p.device, dtype=p.dtype)
        return self.decode(z)


def vae_loss(
    w: torch.Tensor, w_rec: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, recon, kl) with loss = recon + beta * kl, every term a per-example average over the batch.

    recon is the squared error summed over coordinates (not averaged): that is the negative
    log-likelihood of a unit-variance Gaussian decoder up to a constant, so recon and KL are on the
    ELBO's common per-example scale and `beta` keeps its beta-VAE meaning whatever n_weights is.
    A per-coordinate mean would shrink recon by n_weights (54k here) and let the KL collapse the posterior.
    kl is KL(N(mu, sigma^2) || N(0, I)), summed over latent dimensions.
    """
    recon = (w_rec - w).pow(2).sum(-1).mean()
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)).mean()
    return recon + beta * kl, recon, kl
