"""Training loops of the weight-space models, pure torch: HVAE, HyperCLIP and HyperLDM.

Each `train_*` builds its model, runs Adam for `steps` and returns the trained module. Settings are
keyword-only with no defaults: the stage configs (pipelines.generators, .hyperclip, .hyperldm) are
their one source. The HVAE and HyperCLIP loops take their data as in-memory tensors or as a
`BatchSource` (e.g. the weight store streamed in batches), so no loop needs the whole store at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from models.diffusion import EMA, Diffusion, Standardizer
from models.zeroshot.denoiser import LatentDenoiser
from models.zeroshot.hvae import HVAE, vae_loss
from models.zeroshot.hyperclip import HyperCLIP, info_nce
from models.zeroshot.tasks import Hooks


BatchSource = Callable[[torch.Generator], Iterable]
"""Global batches for a training loop: called once with the loop's seeded generator, then one batch per step.
An in-memory source draws its rows from that generator (`minibatches`); a streamed one has its own seeded order."""


def minibatches(*xs: torch.Tensor, batch: int) -> BatchSource:
    """Random rows of in-memory tensors [N, ...] (the same rows of each), `batch` per step (all when fewer),
    drawn without replacement within a step."""

    def source(gen: torch.Generator) -> Iterator:
        while True:
            rows = torch.randperm(len(xs[0]), generator=gen)[: batch]
            yield xs[0][rows] if len(xs) == 1 else tuple(x[rows] for x in xs)

    return source


def train_hvae(wn: torch.Tensor | BatchSource, seed: int, hooks: Hooks = Hooks(), *, steps: int, lr: float, batch: int,
               beta: float, d_latent: int, hidden: tuple[int, ...], n_weights: int | None = None) -> HVAE:
    """HVAE on normalised expert weights (ELBO with a summed reconstruction; see `vae_loss`): wn [N, P] in
    memory, or a `BatchSource` of [B, P] batches (then `n_weights` = P)."""
    torch.manual_seed(seed)  # the model's init
    gen = torch.Generator().manual_seed(seed)
    if isinstance(wn, torch.Tensor):
        wn, n_weights = minibatches(wn, batch=batch), wn.shape[1]
    model = HVAE(n_weights, d_latent, hidden)
    net = hooks.wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    for step, w_all in zip(range(1, steps + 1), wn(gen)):
        eps_all = torch.randn(len(w_all), d_latent, generator=gen)  # global draw: independent of worker count
        mine = hooks.part(len(w_all))
        w = w_all[mine]
        rec, mu, logvar = net(w, eps=eps_all[mine])  # through the (DDP) wrapper
        loss, recon, kl = vae_loss(w, rec, mu, logvar, beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % hooks.log_every == 0 or step == steps:
            hooks.log(step, {"loss": loss, "recon_per_weight": recon / n_weights, "kl": kl})
    return model.eval()


def train_hyperclip(v: torch.Tensor | BatchSource, c: torch.Tensor | None, seed: int, hooks: Hooks = Hooks(), *,
                    steps: int, lr: float, hidden: tuple[int, ...], batch: int, dims: tuple[int, int] | None = None,
                    hard_negatives: float, margin: float) -> HyperCLIP:
    """HyperCLIP on (weights or latents v [N, d_in], description embeddings c [N, d_txt]), `batch` pairs per step;
    or on a `BatchSource` of (v [B, d_in], c [B, d_txt]) pairs (then c is None and `dims` = (d_in, d_txt)).

    `hard_negatives` and `margin` are `info_nce`'s hard and margin. InfoNCE needs every pair's negatives, so each worker computes the whole batch; DDP then
    averages identical gradients and the run equals a single worker's.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if isinstance(v, torch.Tensor):
        v, dims = minibatches(v, c, batch=batch), (v.shape[1], c.shape[1])
    model = HyperCLIP(dims[0], dims[1], hidden)
    net = hooks.wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    for step, (vb, cb) in zip(range(1, steps + 1), v(gen)):
        loss = info_nce(net(vb), cb, model.scale(), hard_negatives, margin)  # forward through the (DDP) wrapper
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.clamp_()
        if step % hooks.log_every == 0 or step == steps:
            hooks.log(step, {"loss": loss, "logit_scale": model.scale()})
    return model.eval()


@dataclass
class HyperLDM:
    """A trained latent diffusion model: EMA denoiser, latent standardiser and the noise schedule."""

    denoiser: nn.Module
    standardizer: Standardizer
    diffusion: Diffusion = field(repr=False)

    @torch.no_grad()
    def sample(self, c: torch.Tensor, gamma: float, sampler: str = "ddim", steps: int = 50,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents [B, d_z] (raw scale) for conditions c [B, d_c] with CFG scale gamma."""
        z = self.diffusion.sample(self.denoiser, c, gamma=gamma, sampler=sampler, steps=steps, generator=generator)
        return self.standardizer.decode(z)

    @torch.no_grad()
    def edit(self, z0: torch.Tensor, c: torch.Tensor, t_start: int, gamma: float, sampler: str = "ddim", steps: int = 50,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """SDEdit from given raw latents z0 [B, d_z] (see `Diffusion.edit`) -> raw latents [B, d_z]."""
        if t_start <= 0:  # nothing to edit: z0 itself, not its round trip through the standardiser
            return z0.clone()
        z = self.diffusion.edit(self.denoiser, self.standardizer.encode(z0), c, t_start, gamma=gamma, sampler=sampler,
                                steps=steps, generator=generator)
        return self.standardizer.decode(z)


def train_hyperldm(z: torch.Tensor, c: torch.Tensor, seed: int, hooks: Hooks = Hooks(), *, steps: int, lr: float, batch: int,
                   hidden: int, timesteps: int, schedule: str, ema_decay: float, drop_prob: float) -> HyperLDM:
    """HyperLDM (Nava et al. §3.4) on standardised latents z [N, d_z] with conditions c [N, d_c].

    Each step draws `batch` latents with replacement, each with its own (t, noise): 75 meta-train pairs
    are few, and many noise draws per latent per step was what made the conditional fit (measured:
    γ=1 sampling on held-out tasks 0.54 with a batch of 75 vs 0.72 with 600, same step count).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    std = Standardizer(z.shape[1]).fit(z)
    z_std = std.encode(z)  # [N, d_z]
    model = LatentDenoiser(z.shape[1], c.shape[1], hidden=hidden, drop_prob=drop_prob)
    ema = EMA(model, ema_decay)
    diffusion = Diffusion(timesteps, schedule)
    net = hooks.wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    n = batch
    for step in range(1, steps + 1):
        rows = torch.randint(0, len(z), (n,), generator=gen)
        z0, cc = z_std[rows], c[rows]
        t = torch.randint(0, diffusion.T, (n,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        drop = torch.rand(n, generator=gen) < drop_prob  # CFG: train ε(z, ∅) on a random 20%
        mine = hooks.part(n)
        zt = diffusion.q_sample(z0[mine], t[mine], noise[mine])
        loss = F.mse_loss(net(zt, t[mine], cc[mine], drop=drop[mine]), noise[mine])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)
        if step % hooks.log_every == 0 or step == steps:
            hooks.log(step, {"loss": loss})
    return HyperLDM(ema.module.eval(), std, diffusion)
