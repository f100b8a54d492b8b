"""Many same-shaped HyperLDM denoisers trained as one program: one vmapped loss over stacked parameters.

Each model keeps what it has when trained alone by `models.zeroshot.training.train_hyperldm`: its init
(the global seed set to its seed before it is built), its own generator drawing rows, timesteps,
noise and dropped conditions in the same order, its own standardiser. Adam and the EMA are
elementwise, so one of each over parameters stacked on a leading model axis is M independent ones.
What changes is the kernels: the models' matmuls run as batched matmuls (more work per call, fewer
calls) and LayerNorm's affine runs apart from its normalisation, so weights agree with one-at-a-time
training to float rounding, not bit for bit (the tests bound the gap).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from models.diffusion import Diffusion, Standardizer
from models.zeroshot.denoiser import LatentDenoiser
from models.zeroshot.training import HyperLDM


@dataclass
class LdmJob:
    """One denoiser to train: raw latents z [N, d_z], their conditions c [N, d_c], its seed."""

    z: torch.Tensor
    c: torch.Tensor
    seed: int


def ldm_step_flops(d_z: int, d_c: int, hidden: int, t_dim: int, batch: int) -> int:
    """Matmul FLOPs of one training step of one `LatentDenoiser` on `batch` rows.

    Forward: the condition projection and the three Linears. Backward: every weight gradient, and
    input gradients down to the first Linear's input (the condition's embedding needs it; z and c
    are data).
    """
    d_in = d_z + 2 * t_dim
    fwd = d_c * t_dim + d_in * hidden + hidden * hidden + hidden * d_z
    bwd_input = d_in * hidden + hidden * hidden + hidden * d_z
    return 2 * batch * (2 * fwd + bwd_input)


def _draw(gen: torch.Generator, n_rows: int, d_z: int, batch: int, timesteps: int, drop_prob: float):
    """One step's random draws, in `train_hyperldm`'s order: (rows, t, noise, drop)."""
    rows = torch.randint(0, n_rows, (batch,), generator=gen)
    t = torch.randint(0, timesteps, (batch,), generator=gen)
    noise = torch.randn((batch, d_z), generator=gen)
    drop = torch.rand(batch, generator=gen) < drop_prob
    return rows, t, noise, drop


def train_hyperldms(jobs: list[LdmJob], on_log: Callable[[int, torch.Tensor], None] | None = None, *, steps: int,
                    lr: float, batch: int, hidden: int, timesteps: int, schedule: str, ema_decay: float,
                    drop_prob: float, log_every: int) -> list[HyperLDM]:
    """Train one HyperLDM per job at once; `on_log(step, losses [M])` every `log_every` steps and at the end.

    All jobs must share d_z and d_c (one shape). Jobs with the same seed and number of latents (the
    routes of one split and seed) draw the same stream, so it is drawn once for them.
    """
    d_z, d_c = jobs[0].z.shape[1], jobs[0].c.shape[1]
    if any(j.z.shape[1] != d_z or j.c.shape[1] != d_c for j in jobs):
        raise ValueError("train_hyperldms trains one shape at a time: every job needs the same d_z and d_c")
    stds, z_std, models = [], [], []
    for j in jobs:
        torch.manual_seed(j.seed)  # the model's init, as when trained alone
        std = Standardizer(d_z).fit(j.z)
        stds.append(std)
        z_std.append(std.encode(j.z))  # [N, d_z]
        models.append(LatentDenoiser(d_z, d_c, hidden=hidden, drop_prob=drop_prob))
    streams = {(j.seed, len(j.z)): torch.Generator().manual_seed(j.seed) for j in jobs}
    diffusion = Diffusion(timesteps, schedule)

    params, buffers = stack_module_state(models)  # {name: [M, ...]}, params are fresh leaves
    base = copy.deepcopy(models[0]).to("meta")

    def loss_one(p, b, zt, t, c, drop, noise):
        return F.mse_loss(functional_call(base, (p, b), (zt, t, c), {"drop": drop}), noise)

    step_fn = vmap(grad_and_value(loss_one))
    opt = torch.optim.Adam(params.values(), lr=lr, fused=True)
    ema: dict[str, torch.Tensor] = {}
    for step in range(1, steps + 1):
        draws = {key: _draw(g, key[1], d_z, batch, diffusion.T, drop_prob) for key, g in streams.items()}
        per_job = [draws[(j.seed, len(j.z))] for j in jobs]
        z0 = torch.stack([zs[d[0]] for zs, d in zip(z_std, per_job)])  # [M, B, d_z]
        c = torch.stack([j.c[d[0]] for j, d in zip(jobs, per_job)])  # [M, B, d_c]
        t, noise, drop = (torch.stack([d[k] for d in per_job]) for k in (1, 2, 3))  # [M, B], [M, B, d_z], [M, B]
        zt = diffusion.q_sample(z0.reshape(-1, d_z), t.reshape(-1), noise.reshape(-1, d_z)).view_as(z0)  # elementwise
        with torch.no_grad():
            grads, losses = step_fn({k: v.detach() for k, v in params.items()}, buffers, zt, t, c, drop, noise)
        for k, p in params.items():
            p.grad = grads[k]
        opt.step()
        with torch.no_grad():
            if not ema:  # the EMA's first update copies the model, as torch's AveragedModel does
                ema = {k: v.detach().clone() for k, v in params.items()}
            else:
                torch._foreach_lerp_(list(ema.values()), [v.detach() for v in params.values()], 1 - ema_decay)
        if on_log is not None and (step % log_every == 0 or step == steps):
            on_log(step, losses)
    out = []
    for i, (model, std) in enumerate(zip(models, stds)):
        model.load_state_dict({k: v[i] for k, v in ema.items()})
        out.append(HyperLDM(model.eval(), std, diffusion))
    return out
