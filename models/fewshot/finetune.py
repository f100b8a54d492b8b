"""Zero-shot models given a support set: fine-tuning their weights, or guiding HyperLDM's sampler by it.

The zero-shot models (multitask network, text-conditioned hypernetwork, ...) produce weights without
seeing any example; given the same K-shot support set as the few-shot methods, the fair comparison
(Nava et al. 2023, §5 "fine-tuning") is to fine-tune those weights on it: plain gradient descent on
every layer, vmapped over episodes with torch.func (MAML's inner loop, with nothing meta-learned).
HyperLDM can instead use the support set while sampling: `support_guided_latents` adds the support
loss's gradient to each denoising step (classifier guidance with the support likelihood).
"""
from __future__ import annotations

from typing import Callable

import torch

from models.fewshot.episodes import EpisodeBatch, batch_accuracy
from models.fewshot.maml import inner_adapt
from models.task_net import WeightLayout


def finetune(layout: WeightLayout, w: torch.Tensor, batch: EpisodeBatch, steps: int, lr: float) -> torch.Tensor:
    """`steps` gradient steps of each episode's support loss from its own start w [B, P] -> [B, P]."""
    if steps == 0:
        return w
    fn = lambda w0, *s: inner_adapt(layout, w0, *s, steps=steps, lr=lr, first_order=True)  # noqa: E731
    with torch.enable_grad():
        return torch.func.vmap(fn)(w.detach(), *batch.support()).detach()


@torch.no_grad()
def finetuned_accuracy(layout: WeightLayout, w: torch.Tensor, batch: EpisodeBatch, steps: int, lr: float) -> torch.Tensor:
    """Query accuracy [B] of w [B, P] after fine-tuning on each episode's support set."""
    return batch_accuracy(layout, finetune(layout, w, batch, steps, lr), *batch.query())


def support_guided_latents(
    diffusion, denoiser, c: torch.Tensor, gamma: float, z_T: torch.Tensor, steps: int, scale: float,
    support_loss: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """HyperLDM's DDIM sampling (classifier-free guidance γ on the description c [B, d_c]) plus classifier
    guidance by the support set (Dhariwal & Nichol 2021, §4.2 for DDIM): ε̃ = ε − √(1−ᾱ_t) ∇ log p(support)
    = ε + scale √(1−ᾱ_t) ĝ, where ĝ is the gradient of each episode's support loss at the step's clean
    estimate ẑ0(z_t), scaled to unit RMS per episode (so `scale` is in units of the noise itself).

    support_loss: standardised latents [B, d_z] -> each episode's support loss [B]. Returns z0 [B, d_z].
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(diffusion.ddim.config)
    sched.set_timesteps(steps)
    abar = diffusion.alphas_cumprod
    z = z_T * sched.init_noise_sigma
    for t in sched.timesteps:
        with torch.no_grad():
            eps = diffusion.guided_eps(denoiser, z, t, c, gamma)
        a = abar[t].to(z.dtype)
        if scale > 0:
            with torch.enable_grad():
                zz = z.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(support_loss((zz - (1 - a).sqrt() * eps) / a.sqrt()).sum(), zz)
            eps = eps + scale * (1 - a).sqrt() * g / g.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
        z = sched.step(eps, t, z, eta=0.0).prev_sample
    return z
