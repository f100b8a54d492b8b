"""Training loops of the zero-shot models, pure torch: HNet routes, HVAE, HyperCLIP, HyperLDM and baselines.

Each `train_*` function builds its model, runs Adam for `steps`, and returns the trained module.
Distribution stays outside: `Hooks.wrap` may wrap the model (Ray Train passes DDP's `prepare_model`),
`Hooks.part` picks this worker's rows of a global batch, `Hooks.log` receives metrics. With the
default hooks these loops run in a plain process, which is how the tests call them.
Every global batch is drawn from one seeded generator, the same on every worker, so a run's
trajectory does not depend on how many workers share it (up to float reduction order).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.diffusion import EMA, Diffusion, Standardizer
from models.zeroshot.denoiser import LatentDenoiser
from models.expert_training import ExpertBatch, evaluate_experts
from models.layers import mlp
from models.zeroshot.hnet import HNet, HNetLatents
from models.zeroshot.hvae import HVAE, vae_loss
from models.zeroshot.hyperclip import HyperCLIP, info_nce
from models.task_net import WeightLayout, functional_forward, init_weights, masked_logits
from models.weight_norm import WeightNormalizer


@dataclass
class Hooks:
    """How a loop meets its runtime: model wrapper, this worker's share of a batch, metric sink."""

    wrap: Callable[[nn.Module], nn.Module] = lambda m: m
    part: Callable[[int], slice] = lambda n: slice(0, n)
    log: Callable[[int, dict], None] = lambda step, metrics: None
    log_every: int = 100

    def prefixed(self, prefix: str) -> "Hooks":
        """The same hooks with metric names prefixed (two models trained in one job keep apart)."""
        log = self.log
        return Hooks(self.wrap, self.part, lambda step, m: log(step, {prefix + k: v for k, v in m.items()}), self.log_every)


@dataclass
class TaskData:
    """One meta-train set as tensors: image features, padded tasks, description embeddings."""

    layout: WeightLayout
    X: torch.Tensor  # [n_img, d_img]
    batch: ExpertBatch  # the tasks, padded
    c: torch.Tensor  # [T, d_txt] description embeddings


def sample_support(batch: ExpertBatch, rows: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n support samples per task row, with replacement: (image idx [B, n], labels [B, n])."""
    pos = (torch.rand(len(rows), n, generator=gen) * batch.support_n[rows, None]).long()  # [B, n]
    return batch.support_idx[rows].gather(1, pos), batch.support_lab[rows].gather(1, pos)


def task_ce(data: TaskData, w: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of task networks w [B, P] on their tasks' samples idx/lab [B, n]."""
    fwd = torch.func.vmap(partial(functional_forward, data.layout))
    logits = fwd(w, data.X[idx], data.batch.prompts[rows])  # [B, n, A]
    logits = masked_logits(logits, data.batch.answer_mask[rows][:, None, :])
    return F.cross_entropy(logits.transpose(1, 2), lab)


@torch.no_grad()
def task_accuracy(data: TaskData, w: torch.Tensor, on: str = "query") -> torch.Tensor:
    """Accuracy [T] of task networks w [T, P] (or one w [P] for every task) on each task's query or support set."""
    b = data.batch
    w = w.expand(b.n, -1) if w.dim() == 1 else w
    idx, lab, n = (b.query_idx, b.query_lab, b.query_n) if on == "query" else (b.support_idx, b.support_lab, b.support_n)
    return evaluate_experts(data.layout, data.X, w, b.prompts, b.answer_mask, idx, lab, n)[0]


def chance_accuracy(data: TaskData) -> torch.Tensor:
    """Expected accuracy [T] of guessing uniformly among each task's candidate answers."""
    return 1.0 / data.batch.answer_mask.sum(1).float()


# ----------------------------------------------------------------------------- task-loss models


class LatentHNet(nn.Module):
    """HNet route (Nava et al. §3.1): w = denorm(HNet(z_task)), z_task = meta latent + learned per-task offset."""

    def __init__(self, norm: WeightNormalizer, n_tasks: int, d_latent: int, hidden: tuple[int, ...], gen: torch.Generator):
        super().__init__()
        self.norm = norm
        self.hnet = HNet(norm.layout.size, d_latent, hidden)
        self.latents = HNetLatents(n_tasks, d_latent, generator=gen)

    def forward(self, rows: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Task rows [B] -> raw weights [B, P] (c unused: this model knows tasks by index)."""
        return self.norm.decode(self.hnet(self.latents(rows)))


class TextHNet(nn.Module):
    """Baseline: a text-conditioned hypernetwork, w = denorm(HNet(MLP(description embedding))), trained end to end."""

    def __init__(self, norm: WeightNormalizer, d_txt: int, d_latent: int, hidden: tuple[int, ...]):
        super().__init__()
        self.norm = norm
        self.text = mlp([d_txt, *hidden, d_latent])
        self.hnet = HNet(norm.layout.size, d_latent, hidden)

    def forward(self, rows: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Description embeddings c [B, d_txt] -> raw weights [B, P]."""
        return self.norm.decode(self.hnet(self.text(c)))


class SharedWeights(nn.Module):
    """Baseline: one task network for every task (uninformed multitask)."""

    def __init__(self, w0: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w0.clone())  # [P]

    def forward(self, rows: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.w.expand(len(rows), -1)


@dataclass(frozen=True)
class TaskFit:
    """Adam on the task loss: steps, lr, tasks and support samples per step."""

    steps: int = 1500
    lr: float = 1e-3
    tasks_per_step: int = 16
    samples_per_task: int = 32


def fit_task_model(model: nn.Module, data: TaskData, fit: TaskFit, seed: int, hooks: Hooks = Hooks()) -> nn.Module:
    """Train `model(rows, c) -> w` on the support sets of `data`'s tasks; returns the unwrapped model."""
    gen = torch.Generator().manual_seed(seed)
    net = hooks.wrap(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=fit.lr, fused=True)
    n_tasks = data.batch.n
    for step in range(1, fit.steps + 1):
        rows = torch.randperm(n_tasks, generator=gen)[: min(fit.tasks_per_step, n_tasks)]  # global batch
        idx, lab = sample_support(data.batch, rows, fit.samples_per_task, gen)
        mine = hooks.part(len(rows))
        loss = task_ce(data, net(rows[mine], data.c[rows[mine]]), rows[mine], idx[mine], lab[mine])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % hooks.log_every == 0 or step == fit.steps:
            hooks.log(step, {"loss": loss})
    return model


def train_maml_init(data: TaskData, fit: TaskFit, inner_steps: int, inner_lr: float, seed: int, hooks: Hooks = Hooks()) -> nn.Module:
    """First-order MAML (Finn et al. 2017, §5.2): an init that adapts well in `inner_steps` SGD steps.

    The baseline evaluates this init zero-shot, with no adaptation (Nava et al. §5's "MAML zero-shot").
    Inner steps run on one support minibatch, the outer loss on another, per task.
    """
    gen = torch.Generator().manual_seed(seed)
    model = SharedWeights(init_weights(data.layout.spec, seed))
    net = hooks.wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=fit.lr, fused=True)

    def adapted_loss(w, x_in, y_in, x_out, y_out, prompts, amask):
        def ce(v, x, y):
            logits = masked_logits(functional_forward(data.layout, v, x, prompts), amask)
            return F.cross_entropy(logits, y)

        for _ in range(inner_steps):
            w = w - inner_lr * torch.func.grad(ce)(w, x_in, y_in).detach()  # first order: no grad through the step
        return ce(w, x_out, y_out)

    for step in range(1, fit.steps + 1):
        rows = torch.randperm(data.batch.n, generator=gen)[: fit.tasks_per_step]
        i_in, y_in = sample_support(data.batch, rows, fit.samples_per_task, gen)
        i_out, y_out = sample_support(data.batch, rows, fit.samples_per_task, gen)
        mine = hooks.part(len(rows))
        r = rows[mine]
        w = net(r, data.c[r])  # [b, P], through the (DDP) wrapper so gradients are reduced
        losses = torch.func.vmap(adapted_loss)(
            w, data.X[i_in[mine]], y_in[mine], data.X[i_out[mine]], y_out[mine],
            data.batch.prompts[r], data.batch.answer_mask[r],
        )
        loss = losses.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % hooks.log_every == 0 or step == fit.steps:
            hooks.log(step, {"loss": loss})
    return model


# ----------------------------------------------------------------------------- weight-space models


@dataclass(frozen=True)
class VaeFit:
    """HVAE training: steps, lr, batch size, KL weight, latent size and hidden widths."""

    steps: int = 600
    lr: float = 1e-3
    batch: int = 32
    beta: float = 1.0
    d_latent: int = 128
    hidden: tuple[int, ...] = (128, 128)


def train_hvae(wn: torch.Tensor, fit: VaeFit, seed: int, hooks: Hooks = Hooks()) -> HVAE:
    """HVAE on normalised expert weights wn [N, P] (ELBO with a summed reconstruction; see `vae_loss`)."""
    torch.manual_seed(seed)  # the model's init
    gen = torch.Generator().manual_seed(seed)
    model = HVAE(wn.shape[1], fit.d_latent, fit.hidden)
    net = hooks.wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=fit.lr, fused=True)
    for step in range(1, fit.steps + 1):
        rows = torch.randperm(len(wn), generator=gen)[: fit.batch]
        eps_all = torch.randn(len(rows), fit.d_latent, generator=gen)  # global draw: independent of worker count
        mine = hooks.part(len(rows))
        w = wn[rows[mine]]
        rec, mu, logvar = net(w, eps=eps_all[mine])  # through the (DDP) wrapper
        loss, recon, kl = vae_loss(w, rec, mu, logvar, fit.beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % hooks.log_every == 0 or step == fit.steps:
            hooks.log(step, {"loss": loss, "recon_per_weight": recon / wn.shape[1], "kl": kl})
    return model.eval()


@dataclass(frozen=True)
class ClipFit:
    """HyperCLIP training: steps, lr, hidden widths (paper: [128, 128])."""

    steps: int = 300
    lr: float = 1e-3
    hidden: tuple[int, ...] = (128, 128)
    batch: int = 256  # pairs per step (all of them when fewer)


def train_hyperclip(v: torch.Tensor, c: torch.Tensor, fit: ClipFit, seed: int, hooks: Hooks = Hooks()) -> HyperCLIP:
    """HyperCLIP on (weights or latents v [N, d_in], description embeddings c [N, d_txt]), `batch` pairs per step.

    InfoNCE needs every pair's negatives, so each worker computes the whole batch; DDP then
    averages identical gradients and the run equals a single worker's.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = HyperCLIP(v.shape[1], c.shape[1], fit.hidden)
    net = hooks.wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=fit.lr, fused=True)
    for step in range(1, fit.steps + 1):
        rows = torch.randperm(len(v), generator=gen)[: fit.batch]
        loss = info_nce(net(v[rows]), c[rows], model.scale())  # forward through the (DDP) wrapper
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.clamp_()
        if step % hooks.log_every == 0 or step == fit.steps:
            hooks.log(step, {"loss": loss, "logit_scale": model.scale()})
    return model.eval()


@dataclass(frozen=True)
class LdmFit:
    """HyperLDM training: steps, lr, (latent, t, noise) draws per step, width, T, schedule, EMA decay."""

    steps: int = 3000
    lr: float = 1e-3
    batch: int = 600
    hidden: int = 512
    timesteps: int = 1000
    schedule: str = "cosine"
    ema_decay: float = 0.999
    drop_prob: float = 0.2


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


def train_hyperldm(z: torch.Tensor, c: torch.Tensor, fit: LdmFit, seed: int, hooks: Hooks = Hooks()) -> HyperLDM:
    """HyperLDM (Nava et al. §3.4) on standardised latents z [N, d_z] with conditions c [N, d_c].

    Each step draws `batch` latents with replacement, each with its own (t, noise): 75 meta-train pairs
    are few, and many noise draws per latent per step was what made the conditional fit (measured:
    γ=1 sampling on held-out tasks 0.54 with a batch of 75 vs 0.72 with 600, same step count).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    std = Standardizer(z.shape[1]).fit(z)
    z_std = std.encode(z)  # [N, d_z]
    model = LatentDenoiser(z.shape[1], c.shape[1], hidden=fit.hidden, drop_prob=fit.drop_prob)
    ema = EMA(model, fit.ema_decay)
    diffusion = Diffusion(fit.timesteps, fit.schedule)
    net = hooks.wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=fit.lr, fused=True)
    n = fit.batch
    for step in range(1, fit.steps + 1):
        rows = torch.randint(0, len(z), (n,), generator=gen)
        z0, cc = z_std[rows], c[rows]
        t = torch.randint(0, diffusion.T, (n,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        drop = torch.rand(n, generator=gen) < fit.drop_prob  # CFG: train ε(z, ∅) on a random 20%
        mine = hooks.part(n)
        zt = diffusion.q_sample(z0[mine], t[mine], noise[mine])
        loss = F.mse_loss(net(zt, t[mine], cc[mine], drop=drop[mine]), noise[mine])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)
        if step % hooks.log_every == 0 or step == fit.steps:
            hooks.log(step, {"loss": loss})
    return HyperLDM(ema.module.eval(), std, diffusion)
