"""MetaDiff (Zhang et al., AAAI 2024): the few-shot inner loop as denoising of the task weights.

MetaDiff observes that a DDPM/DDIM reverse step, z_{t-1} = a_t z_t − b_t ε(z_t, t), has the form of
a gradient-descent step, and replaces a gradient-based inner loop by a conditional diffusion model
over the base learner's weights: start from Gaussian noise and denoise, the denoiser conditioned on
the support set through the gradient of the support loss at the current weights (§4.2, the
task-conditional UNet; here a time-modulated MLP at our scale). Training is the plain ε-MSE loss
towards target weights, so no backpropagation runs through an inner loop (§4.3) and memory does not
grow with the number of inner steps.

Choices at our scale (documented in the stage too):
- What is generated: the classifier part of the adapter, fc2 (weight and bias: 12,672 numbers), as the
  paper generates the base learner on top of a frozen, pretrained feature extractor. fc1 is that
  extractor: it comes from a multitask network trained on all meta-train tasks (`fit_multitask`).
- Targets: per meta-train task, fc2 fine-tuned from the multitask solution on all of the task's
  samples with fc1 frozen (`fit_targets`); not the stored experts, whose fc2 only works with their own
  fc1 (every expert trains all layers).
- Space: z = (fc2 − mean of the targets) / (one scalar RMS of the targets' spread), T = 1000 linear
  betas as in the paper (`models.diffusion.Diffusion(schedule="linear")`), DDIM with few steps to sample.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.layers import SinusoidalEmbedding
from models.diffusion import Diffusion
from models.fewshot.episodes import Episode, EpisodeBatch, TaskPool, batch_accuracy, collate, task_loss
from models.fewshot.support import hidden_features
from models.layers import mlp
from models.task_net import TaskNetSpec, WeightLayout

HEAD = ("fc2.weight", "fc2.bias")


def head_slice(layout: WeightLayout) -> slice:
    """Flat indices of fc2 (weight then bias): the part MetaDiff generates."""
    return slice(layout.offsets["fc2.weight"][0], layout.offsets["fc2.bias"][1])


def head_params(layout: WeightLayout, v: torch.Tensor) -> dict[str, torch.Tensor]:
    """Adapter params that read precomputed hidden features h: fc1 = identity (relu(h) = h), fc2 from v [d_head].

    Lets `task_loss` score fc2 alone on h = relu(fc1 x) with exactly the adapter's logits.
    """
    s = layout.spec
    a = s.d_txt * s.hidden
    return {
        "fc1.weight": torch.eye(s.hidden, dtype=v.dtype), "fc1.bias": torch.zeros(s.hidden, dtype=v.dtype),
        "fc2.weight": v[:a].reshape(s.d_txt, s.hidden), "fc2.bias": v[a:],
    }


def head_loss(layout: WeightLayout, v: torch.Tensor, h, y, m, prompts, amask) -> torch.Tensor:
    """Support/query loss of fc2 = v [d_head] on hidden features h [n, hidden] (one episode). Vmappable."""
    return task_loss(layout, head_params(layout, v), h, y, m, prompts, amask)


# ----------------------------------------------------------------------------- pretraining and targets


def fit_multitask(
    layout: WeightLayout, w: torch.Tensor, pool: TaskPool, image_feats: torch.Tensor, steps: int,
    lr: float = 1e-3, tasks_per_step: int = 16, samples: int = 32, rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """One network for all tasks of `pool` (each with its own answer prompts): Adam on minibatches -> w [P].

    Every step draws `tasks_per_step` tasks and `samples` of each task's support ∪ query samples.
    """
    rng = rng or np.random.default_rng(0)
    w = w.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    pools = [(np.concatenate([si, qi]), np.concatenate([sl, ql])) for si, sl, qi, ql in
             zip(pool.support_images, pool.support_labels, pool.query_images, pool.query_labels)]
    for _ in range(steps):
        eps = []
        for t in rng.integers(0, len(pool), size=tasks_per_step):
            idx, lab = pools[t]
            pos = rng.choice(len(idx), size=min(samples, len(idx)), replace=False)
            eps.append(Episode(int(t), idx[pos], lab[pos], idx[:0], lab[:0]))
        b = collate(eps, image_feats, pool.prompts)
        loss = torch.func.vmap(lambda *a: task_loss(layout, w, *a))(*b.support()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach()


def fit_targets(
    layout: WeightLayout, w_base: torch.Tensor, pool: TaskPool, image_feats: torch.Tensor,
    steps: int = 100, lr: float = 1e-2, max_samples: int = 256, rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Per task of `pool`: fc2 fine-tuned from w_base's on its samples, fc1 frozen -> [n_tasks, d_head].

    A task's samples are its support ∪ query pools, at most `max_samples` of them (drawn at random:
    the pools are padded to the largest, so one big task would otherwise set the cost of all).
    One Adam over the stacked heads: Adam is elementwise and the summed loss separates by task, so this
    is n_tasks independent fine-tunings at once (as the expert farm trains experts).
    """
    rng = rng or np.random.default_rng(0)
    eps = []
    for t in range(len(pool)):
        idx = np.concatenate([pool.support_images[t], pool.query_images[t]])
        lab = np.concatenate([pool.support_labels[t], pool.query_labels[t]])
        pos = rng.choice(len(idx), size=min(max_samples, len(idx)), replace=False)
        eps.append(Episode(t, idx[pos], lab[pos], idx[:0], lab[:0]))
    b = collate(eps, image_feats, pool.prompts)
    h = hidden_features(layout, w_base, b.x_s)  # [n_tasks, n_max, hidden], computed once: fc1 is frozen
    v = w_base[head_slice(layout)].expand(len(pool), -1).clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    loss_fn = torch.func.vmap(lambda *a: head_loss(layout, *a))
    for _ in range(steps):
        loss = loss_fn(v, h, b.y_s, b.m_s, b.prompts, b.answer_mask).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return v.detach()


# ----------------------------------------------------------------------------- the denoiser


class GradientConditionedDenoiser(nn.Module):
    """ε(z_t, t | support): an MLP over z_t and the support-loss gradient, both modulated by the timestep.

    The gradient g (at the current weights, unit-RMS normalised) enters twice: through an encoder whose
    output is scaled by a learned gate σ(G e_t) of the time embedding (the paper's gated, time-modulated
    condition), and directly, scaled by a learned function of t (zero at init), so the network can
    express a gradient step exactly, as the paper's analogy between denoising and descent suggests.
    """

    def __init__(self, d: int, width: int = 256, d_t: int = 128, n_blocks: int = 2):
        super().__init__()
        self.d = d
        self.t_emb = SinusoidalEmbedding(d_t)
        self.t_mlp = mlp([d_t, width, width])
        self.z_in = nn.Linear(d, width)
        self.g_in = mlp([d, width, width])
        self.gate = nn.Linear(width, width)
        self.blocks = nn.ModuleList([mlp([width, 2 * width, width]) for _ in range(n_blocks)])
        self.films = nn.ModuleList([nn.Linear(width, 2 * width) for _ in range(n_blocks)])
        self.norms = nn.ModuleList([nn.LayerNorm(width, elementwise_affine=False) for _ in range(n_blocks)])
        self.out = nn.Linear(width, d)
        self.g_skip = nn.Linear(width, 1)
        for layer in (self.g_skip, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """z [B, d], t [B], g [B, d] (normalised support gradient) -> predicted noise [B, d]."""
        e = self.t_mlp(self.t_emb(t))  # [B, width]
        c = torch.sigmoid(self.gate(F.silu(e))) * self.g_in(g)  # time-gated condition [B, width]
        h = self.z_in(z) + e + c
        for block, film, norm in zip(self.blocks, self.films, self.norms):
            scale, shift = film(F.silu(e)).chunk(2, -1)  # FiLM by the timestep
            h = h + block(norm(h) * (1 + scale) + shift)
        return self.out(F.silu(h)) + self.g_skip(F.silu(e)) * g


class MetaDiff(nn.Module):
    """Frozen fc1 (from `prepare`), a weight-space diffusion over fc2, and its gradient-conditioned denoiser."""

    def __init__(self, spec: TaskNetSpec, steps: int = 10, width: int = 256, T: int = 1000, clip: float | None = 10.0):
        super().__init__()
        self.layout = WeightLayout(spec)
        self.head = head_slice(self.layout)
        d = self.head.stop - self.head.start
        self.steps = steps  # DDIM steps at sampling time (MetaDiff's "inner steps")
        self.diffusion = Diffusion(T, schedule="linear", clip=clip)
        self.denoiser = GradientConditionedDenoiser(d, width)
        self.register_buffer("w_base", torch.zeros(self.layout.size))  # fc1 (and a fallback fc2) [P]
        self.register_buffer("mu", torch.zeros(d))  # latent centre [d]
        self.register_buffer("sigma", torch.ones(()))  # latent scale []
        self.register_buffer("targets", torch.zeros(0, d))  # per meta-train task fc2 targets [n_tasks, d]

    @torch.no_grad()
    def prepare(self, w_base: torch.Tensor, targets: torch.Tensor) -> None:
        """Set the frozen fc1 (from w_base [P]) and the targets [n_tasks, d_head]; fits the latent scaling."""
        self.w_base.copy_(w_base)
        self.targets = targets.clone()
        self.mu.copy_(targets.mean(0))
        self.sigma.copy_((targets - self.mu).pow(2).mean().sqrt().clamp_min(1e-8))

    def encode(self, v: torch.Tensor) -> torch.Tensor:
        return (v - self.mu) / self.sigma

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.mu + self.sigma * z

    def support_state(self, batch: EpisodeBatch) -> tuple[torch.Tensor, ...]:
        """The support set as the condition: (h [B, n_s, hidden], y, mask, prompts, answer_mask)."""
        h = hidden_features(self.layout, self.w_base, batch.x_s)
        return h, batch.y_s, batch.m_s, batch.prompts, batch.answer_mask

    def support_gradient(self, z: torch.Tensor, cond: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """∇_z of each episode's support loss at the weights decode(z) [B, d], normalised to unit RMS."""
        grad = torch.func.vmap(torch.func.grad(lambda v, *a: head_loss(self.layout, v, *a)))
        g = grad(self.decode(z.detach()), *cond) * self.sigma  # chain rule through decode: [B, d]
        return g / g.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)

    def eps(self, z: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Predicted noise at (z [B, d], t [B]) given the support state.

        Preconditioned as in EDM (Karras et al. 2022): a fixed skip sqrt(1 − ᾱ_t) z_t, the best linear
        guess of ε for unit-variance data, plus the network's residual. The identity part of ε would
        otherwise have to pass through the MLP's narrow (width ≪ d) bottleneck, which it cannot.
        """
        skip = (1 - self.diffusion.alphas_cumprod.to(z.device)[t]).sqrt().to(z.dtype)[:, None]  # [B, 1]
        return skip * z + self.denoiser(z, t, self.support_gradient(z, cond))

    def forward(self, batch: EpisodeBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """ε-MSE training loss (Ho et al. eq. 14) towards each episode's task target; no inner loop."""
        if len(self.targets) == 0:
            raise RuntimeError("MetaDiff.prepare(w_base, targets) must run before training")
        z0 = self.encode(self.targets[batch.task])  # [B, d]
        denoiser = lambda z, t, c, drop=None: self.eps(z, t, c)
        return self.diffusion.loss(denoiser, z0, self.support_state(batch), generator=generator)

    @torch.no_grad()
    def sample_head(self, batch: EpisodeBatch, generator: torch.Generator | None = None,
                    z_T: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM from Gaussian noise in `self.steps` steps -> fc2 weights [B, d_head]."""
        cond = self.support_state(batch)
        if z_T is None:
            z_T = torch.randn(len(batch), len(self.mu), generator=generator)
        denoiser = lambda z, t, c, drop=None: self.eps(z, t, cond)
        z0 = self.diffusion.sample(denoiser, None, sampler="ddim", steps=self.steps, z_T=z_T)
        return self.decode(z0)

    @torch.no_grad()
    def adapt(self, batch: EpisodeBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Task weights [B, P]: the frozen fc1 with a denoised fc2."""
        w = self.w_base.expand(len(batch), -1).clone()
        w[:, self.head] = self.sample_head(batch, generator)
        return w

    @torch.no_grad()
    def accuracy(self, batch: EpisodeBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Query accuracy of each episode [B]."""
        return batch_accuracy(self.layout, self.adapt(batch, generator), *batch.query())
