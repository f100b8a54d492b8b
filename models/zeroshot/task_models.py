"""Models trained on the tasks' support losses, pure torch: the HNet route, the text-conditioned HNet,
multitask weights and a first-order MAML init, with their training loops."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import mlp
from models.task_net import functional_forward, init_weights, masked_logits
from models.weight_norm import WeightNormalizer
from models.zeroshot.hnet import HNet, HNetLatents
from models.zeroshot.tasks import Hooks, TaskData, sample_support, task_ce


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


def fit_task_model(model: nn.Module, data: TaskData, seed: int, hooks: Hooks = Hooks(), *, steps: int, lr: float,
                   tasks_per_step: int, samples_per_task: int) -> nn.Module:
    """Train `model(rows, c) -> w` on the support sets of `data`'s tasks; returns the unwrapped model."""
    gen = torch.Generator().manual_seed(seed)
    net = hooks.wrap(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)
    n_tasks = data.batch.n
    for step in range(1, steps + 1):
        rows = torch.randperm(n_tasks, generator=gen)[: min(tasks_per_step, n_tasks)]  # global batch
        idx, lab = sample_support(data.batch, rows, samples_per_task, gen)
        mine = hooks.part(len(rows))
        loss = task_ce(data, net(rows[mine], data.c[rows[mine]]), rows[mine], idx[mine], lab[mine])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % hooks.log_every == 0 or step == steps:
            hooks.log(step, {"loss": loss})
    return model


def train_maml_init(data: TaskData, seed: int, hooks: Hooks = Hooks(), *, steps: int, lr: float, tasks_per_step: int,
                    samples_per_task: int, inner_steps: int, inner_lr: float) -> nn.Module:
    """First-order MAML (Finn et al. 2017, §5.2): an init that adapts well in `inner_steps` SGD steps.

    The baseline evaluates this init zero-shot, with no adaptation (Nava et al. §5's "MAML zero-shot").
    Inner steps run on one support minibatch, the outer loss on another, per task.
    """
    gen = torch.Generator().manual_seed(seed)
    model = SharedWeights(init_weights(data.layout.spec, seed))
    net = hooks.wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)

    def adapted_loss(w, x_in, y_in, x_out, y_out, prompts, amask):
        def ce(v, x, y):
            logits = masked_logits(functional_forward(data.layout, v, x, prompts), amask)
            return F.cross_entropy(logits, y)

        for _ in range(inner_steps):
            w = w - inner_lr * torch.func.grad(ce)(w, x_in, y_in).detach()  # first order: no grad through the step
        return ce(w, x_out, y_out)

    for step in range(1, steps + 1):
        rows = torch.randperm(data.batch.n, generator=gen)[: tasks_per_step]
        i_in, y_in = sample_support(data.batch, rows, samples_per_task, gen)
        i_out, y_out = sample_support(data.batch, rows, samples_per_task, gen)
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
        if step % hooks.log_every == 0 or step == steps:
            hooks.log(step, {"loss": loss})
    return model
