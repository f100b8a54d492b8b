"""Latent diffusion (HyperLDM, Nava et al. 2023, §3.4): training loss, DDPM/DDIM sampling with classifier-free guidance.

Models and samplers apart, as in DiT/diffusers: `Diffusion` holds only the noise schedule (diffusers'
schedulers) and takes the denoiser as an argument. A denoiser is any callable
`denoiser(z [B, d_z], t [B] long, c [B, d_c] | None, drop=[B] bool | None) -> eps [B, d_z]`, where
c=None or drop=True means the null condition ∅ (see `models.zeroshot.denoiser.LatentDenoiser`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

Denoiser = Callable[..., torch.Tensor]
SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear"}


def classifier_free_guidance(
    eps_uncond: torch.Tensor, eps_cond: torch.Tensor, gamma: float | torch.Tensor
) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): ε(z,∅) + γ (ε(z,c) − ε(z,∅)).

    `torch.lerp` computes exactly that, and returns eps_cond bit for bit at γ=1 and eps_uncond at γ=0.
    """
    return torch.lerp(eps_uncond, eps_cond, gamma)


class Diffusion:
    """Noise schedule (T steps, cosine or linear betas) with the ε-MSE loss and DDPM/DDIM samplers."""

    def __init__(self, num_train_timesteps: int = 1000, schedule: str = "cosine", clip: float | None = 10.0):
        self.T = num_train_timesteps
        # The x0 estimate is clamped to [-clip, clip] at each step (standardised units: 10 sigma is far past
        # nearly all real data). Near t = T the cosine schedule's ᾱ is ~2e-9 and x0 = (z - sqrt(1-ᾱ) ε) / sqrt(ᾱ)
        # amplifies a small ε error (e.g. at a tail z_T) ~2e4-fold; unclamped, DDPM's first step at
        # t = 999 can throw a sample far off the data and it never returns. None turns clamping off.
        kw = dict(clip_sample=clip is not None, clip_sample_range=clip or 1.0, prediction_type="epsilon")
        self.ddpm = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=SCHEDULES[schedule], **kw)
        # DDIM shares the DDPM's betas exactly; "leading" spacing as in the DDIM paper (t = 980, 960, ..., 0
        # for 50 steps) also keeps its first step off the ill-conditioned t = 999.
        self.ddim = DDIMScheduler(
            num_train_timesteps=num_train_timesteps, trained_betas=self.ddpm.betas.numpy(),
            set_alpha_to_one=True, timestep_spacing="leading", **kw,
        )

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t for t = 0..T-1 [T]."""
        return self.ddpm.alphas_cumprod

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(ᾱ_t) z0 + sqrt(1-ᾱ_t) noise, via the scheduler's add_noise."""
        return self.ddpm.add_noise(z0, noise, t)

    def loss(
        self, denoiser: Denoiser, z0: torch.Tensor, c: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """ε-prediction MSE (Ho et al. 2020, eq. 14) at uniform random t; the denoiser drops conditions itself."""
        B = len(z0)
        t = torch.randint(0, self.T, (B,), generator=generator, device=z0.device)
        noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        return F.mse_loss(denoiser(self.q_sample(z0, t, noise), t, c), noise)

    def guided_eps(
        self, denoiser: Denoiser, z: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None, gamma: float
    ) -> torch.Tensor:
        """CFG ε at one step: one batched denoiser call on [∅ rows; c rows] -> classifier_free_guidance(...) [B, d_z]."""
        B = len(z)
        t = torch.as_tensor(t, device=z.device).expand(B)  # [B]
        if c is None:
            return denoiser(z, t, None)
        # The first half is forced to ∅ by the drop mask, so the result does not depend on train/eval mode.
        drop = torch.arange(2 * B, device=z.device) < B  # [2B]
        eps = denoiser(torch.cat([z, z]), torch.cat([t, t]), torch.cat([c, c]), drop=drop)  # [2B, d_z]
        eps_uncond, eps_cond = eps.chunk(2)  # [B, d_z] each
        return classifier_free_guidance(eps_uncond, eps_cond, gamma)

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        c: torch.Tensor | None,
        gamma: float = 1.0,
        sampler: str = "ddim",
        steps: int = 50,
        generator: torch.Generator | None = None,
        z_T: torch.Tensor | None = None,
        d_z: int | None = None,
    ) -> torch.Tensor:
        """Draw z0 [B, d_z] for conditions c [B, d_c] with guidance scale gamma (c=None: unconditional, needs z_T).

        sampler="ddpm" runs all T ancestral steps; "ddim" runs `steps` deterministic steps (eta=0), so the
        result is a function of z_T alone. z_T defaults to N(0, I) from `generator`, with
        d_z from the argument or `denoiser.d_z`.
        """
        if z_T is None:
            assert c is not None, "unconditional sampling needs z_T (it fixes the batch size)"
            d_z = d_z or denoiser.d_z
            z_T = torch.randn(len(c), d_z, generator=generator, device=c.device, dtype=c.dtype)
        sched, kw = self._scheduler(sampler, steps, generator)
        return self._reverse(denoiser, z_T * sched.init_noise_sigma, sched, sched.timesteps, c, gamma, kw)

    @torch.no_grad()
    def edit(
        self,
        denoiser: Denoiser,
        z0: torch.Tensor,
        c: torch.Tensor,
        t_start: int,
        gamma: float = 1.0,
        sampler: str = "ddim",
        steps: int = 50,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """SDEdit (Meng et al. 2022, §3): noise a given z0 [B, d_z] to the sampler's first timestep below
        `t_start` and run the guided reverse process from there -> [B, d_z].

        The noise is the one `sample` would draw from `generator` as its z_T, so t_start >= T is `sample`
        itself, draw for draw, and t_start = 0 (no timestep below it) returns z0 unchanged.
        """
        noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        sched, kw = self._scheduler(sampler, steps, generator)
        if t_start >= self.T:
            return self._reverse(denoiser, noise * sched.init_noise_sigma, sched, sched.timesteps, c, gamma, kw)
        ts = sched.timesteps[sched.timesteps < t_start]
        if len(ts) == 0:
            return z0.clone()
        z = self.q_sample(z0, ts[:1].expand(len(z0)).to(z0.device), noise)  # z_t0 ~ q(z_t0 | z0)
        return self._reverse(denoiser, z, sched, ts, c, gamma, kw)

    def _scheduler(self, sampler: str, steps: int, generator: torch.Generator | None):
        """A fresh scheduler with its timesteps set (copies keep `self` stateless) and its step kwargs."""
        if sampler == "ddpm":
            sched = DDPMScheduler.from_config(self.ddpm.config)
            sched.set_timesteps(self.T)
            return sched, {"generator": generator}
        if sampler == "ddim":
            sched = DDIMScheduler.from_config(self.ddim.config)
            sched.set_timesteps(steps)
            return sched, {"eta": 0.0}
        raise ValueError(f"unknown sampler {sampler!r} (ddim or ddpm)")

    def _reverse(self, denoiser: Denoiser, z: torch.Tensor, sched, timesteps, c, gamma: float, kw: dict) -> torch.Tensor:
        """The guided reverse process over `timesteps` (descending) from z at the first of them."""
        for t in timesteps:
            eps = self.guided_eps(denoiser, z, t.to(z.device), c, gamma)
            z = sched.step(eps, t, z, **kw).prev_sample
        return z


class EMA(nn.Module):
    """Exponential moving average of a model's weights (torch's AveragedModel); sample with `.module`."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        # use_buffers: buffers (e.g. norm statistics) are averaged too, so `.module` is self-consistent.
        self.avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.avg.requires_grad_(False)
        self.decay = decay

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the model."""
        return self.avg.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * model (the first call copies the model)."""
        self.avg.update_parameters(model)

    def forward(self, *args, **kwargs):
        """Run the averaged model."""
        return self.avg.module(*args, **kwargs)


class Standardizer(nn.Module):
    """Per-dimension standardisation of latents, z -> (z - mean) / std (the paper trains HyperLDM on standardised latents)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))
        self.eps = eps

    @torch.no_grad()
    def fit(self, z: torch.Tensor) -> "Standardizer":
        """Set mean/std from latents z [N, d]; returns self."""
        self.mean.copy_(z.mean(0))
        self.std.copy_(z.std(0).clamp_min(self.eps))  # a constant dim would otherwise divide by 0
        return self

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> standardised."""
        return (z - self.mean) / self.std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised latents -> raw."""
        return z * self.std + self.mean

