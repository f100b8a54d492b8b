"""MAML (Finn et al. 2017) on the task network's flat weights, with torch.func.

The inner loop is plain gradient descent on one episode's support loss, `w <- w - lr * grad`, written
with `torch.func.grad` and mapped over the episodes of a batch with `torch.func.vmap`. The gradient
that `torch.func.grad` returns stays differentiable with respect to the meta-parameters `w0`
(regular autograd is the outer level), so the meta-gradient of the query loss is second-order MAML;
first-order MAML (FOMAML, Finn et al. §5.2) detaches each inner gradient, so dw_task/dw0 = I.
`part="last"` adapts only fc2 (weight and bias), the classifier head, as HyperMAML's warm-up does.
"""
from __future__ import annotations

import torch
from torch import nn

from models.fewshot.episodes import EpisodeBatch, batch_accuracy, batch_loss, task_loss
from models.task_net import TaskNetSpec, WeightLayout, init_weights

PARTS = ("all", "last")


def adapted_names(part: str) -> tuple[str, ...]:
    """Names of the parameters the inner loop moves: every layer, or fc2 (weight and bias) only."""
    if part not in PARTS:
        raise ValueError(f"part={part!r}: choose one of {PARTS}")
    return ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias") if part == "all" else ("fc2.weight", "fc2.bias")


def inner_adapt(
    layout: WeightLayout, w0: torch.Tensor, x, y, m, prompts, amask,
    steps: int, lr: float, first_order: bool = False, part: str = "all",
) -> torch.Tensor:
    """`steps` gradient steps on one episode's support loss from w0 [P]; returns the adapted w [P].

    Every step takes its gradient at the current fast weights (the weights after the previous step).
    The loop runs on named tensors (one slice of w0 each), so its backward never builds a full-size
    gradient per layer; only the `part` layers move, and frozen ones are never differentiated (which
    also saves fc1's large gradient when only the last layer adapts).
    """
    names = adapted_names(part)
    p = layout.unflatten(w0)
    fast = {k: p[k] for k in names}
    frozen = {k: v for k, v in p.items() if k not in names}

    def support_loss(fast: dict[str, torch.Tensor]) -> torch.Tensor:
        return task_loss(layout, {**frozen, **fast}, x, y, m, prompts, amask)

    grad_fn = torch.func.grad(support_loss)
    for _ in range(steps):
        g = grad_fn(fast)
        if first_order:
            g = {k: v.detach() for k, v in g.items()}  # FOMAML: each inner update is a constant offset
        fast = {k: fast[k] - lr * g[k] for k in names}
    return layout.flatten({**frozen, **fast})


def adapt(
    layout: WeightLayout, w0: torch.Tensor, batch: EpisodeBatch,
    steps: int, lr: float, first_order: bool = False, part: str = "all",
) -> torch.Tensor:
    """Adapt the shared w0 [P] to every episode of `batch` -> w_task [B, P]."""
    fn = lambda *s: inner_adapt(layout, w0, *s, steps=steps, lr=lr, first_order=first_order, part=part)
    return torch.func.vmap(fn)(*batch.support())


def query_loss(layout: WeightLayout, w: torch.Tensor, batch: EpisodeBatch) -> torch.Tensor:
    """Mean over episodes of the query loss of per-episode weights w [B, P] (the meta-objective)."""
    return batch_loss(layout, w, *batch.query()).mean()


class MAML(nn.Module):
    """Meta-learned init `w0` of the task network; `adapt` runs the inner loop, `forward` the meta-loss."""

    def __init__(
        self, spec: TaskNetSpec, steps: int = 5, lr: float = 0.1, first_order: bool = False,
        part: str = "all", seed: int = 0,
    ):
        super().__init__()
        adapted_names(part)  # validates part
        self.layout = WeightLayout(spec)
        self.steps, self.lr, self.first_order, self.part = steps, lr, first_order, part
        self.w0 = nn.Parameter(init_weights(spec, seed))  # [P]

    def adapt(self, batch: EpisodeBatch) -> torch.Tensor:
        """Per-episode adapted weights [B, P] (differentiable w.r.t. w0 unless first-order)."""
        return adapt(self.layout, self.w0, batch, self.steps, self.lr, self.first_order, self.part)

    def forward(self, batch: EpisodeBatch) -> torch.Tensor:
        """Meta-training loss: mean query cross-entropy after adaptation (a scalar)."""
        return meta_loss(self, batch)

    @torch.no_grad()
    def accuracy(self, batch: EpisodeBatch) -> torch.Tensor:
        """Query accuracy of each episode after adaptation [B]; torch.func.grad ignores the outer no_grad."""
        return batch_accuracy(self.layout, self.adapt(batch), *batch.query())


def meta_loss(model: MAML, batch: EpisodeBatch) -> torch.Tensor:
    """MAML's meta-objective (Finn et al. eq. 1): mean query loss of the adapted weights."""
    return query_loss(model.layout, model.adapt(batch), batch)
