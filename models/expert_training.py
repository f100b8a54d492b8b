"""Train many per-task experts at once: one vmapped loss over stacked parameters, one Adam.

Adam is elementwise, so `torch.optim.Adam` over parameters stacked along a leading expert axis is
exactly E independent Adams; the expert axis turns the adapter's matmuls into large batched matmuls,
which is where a CPU gets its FLOPs (measured: vmap in one process beat many actors).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from models.task_net import TaskNetwork, WeightLayout, masked_logits, skeleton


@dataclass
class ExpertBatch:
    """E tasks as padded tensors. Indices point into a shared image-feature matrix."""

    prompts: torch.Tensor  # [E, A, d_txt] answer-prompt embeddings, zero-padded
    answer_mask: torch.Tensor  # [E, A] bool, True for real candidates
    support_idx: torch.Tensor  # [E, S] long, padded with 0
    support_lab: torch.Tensor  # [E, S] long
    support_n: torch.Tensor  # [E] long, real support sizes (>= 1)
    query_idx: torch.Tensor  # [E, Q] long
    query_lab: torch.Tensor  # [E, Q] long
    query_n: torch.Tensor  # [E] long (may be 0)

    @property
    def n(self) -> int:
        return self.prompts.shape[0]


def pad_batch(
    prompts: list[torch.Tensor],
    support: list[tuple[torch.Tensor, torch.Tensor]],
    query: list[tuple[torch.Tensor, torch.Tensor]],
) -> ExpertBatch:
    """Pad per-task prompts [a_i, d], (support idx, labels) and (query idx, labels) into one ExpertBatch."""

    def pad(seqs: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(len(seqs), max(1, max(len(q) for q in seqs)), dtype=torch.long)
        for i, q in enumerate(seqs):
            out[i, : len(q)] = q
        return out

    a_max = max(p.shape[0] for p in prompts)
    pr = torch.zeros(len(prompts), a_max, prompts[0].shape[1])
    amask = torch.zeros(len(prompts), a_max, dtype=torch.bool)
    for i, p in enumerate(prompts):
        pr[i, : p.shape[0]] = p
        amask[i, : p.shape[0]] = True
    return ExpertBatch(
        prompts=pr, answer_mask=amask,
        support_idx=pad([s[0] for s in support]), support_lab=pad([s[1] for s in support]),
        support_n=torch.tensor([len(s[0]) for s in support]),
        query_idx=pad([q[0] for q in query]), query_lab=pad([q[1] for q in query]),
        query_n=torch.tensor([len(q[0]) for q in query]),
    )


def step_flops(d_img: int, hidden: int, d_txt: int, n: int, a: int) -> int:
    """Matmul FLOPs of one training step of one expert on n samples and a answers, as `TaskNetwork` runs it.

    fc1 forward and its weight gradient (no input gradient: features are frozen); prompts @ fc2
    forward and its fc2 gradient (prompts are frozen); the Gram matrix and the [n, hidden] products,
    each forward plus two backward matmuls.
    """
    fc1 = 2 * 2 * n * d_img * hidden
    prompts = 2 * 2 * a * d_txt * hidden
    folded = 3 * 2 * (hidden * hidden * d_txt + n * hidden * (a + hidden))
    return fc1 + prompts + folded


def _loss(net: TaskNetwork, params, x, lab, weight, prompts, amask):
    """Weighted mean cross-entropy of one expert (weight 0 marks padding or unsampled rows); vmapped."""
    logits = masked_logits(functional_call(net, params, (x, prompts)), amask)
    ce = F.cross_entropy(logits, lab, reduction="none")
    return (ce * weight).sum() / weight.sum().clamp_min(1.0)


def train_experts(
    layout: WeightLayout,
    features: torch.Tensor,
    batch: ExpertBatch,
    w0: torch.Tensor,
    steps: int,
    lr: float,
    checkpoint_every: int = 0,
    sample_fraction: float = 1.0,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Full-batch Adam on every expert's support loss at once; yields (step, w [E, P]) at checkpoints and the end.

    features [n_img, d_img]; w0 [E, P] start points (rows equal for a shared init). Support features
    are gathered once and stay resident, padded to the shard's largest support set; padding is masked
    out of the loss, so each expert's trajectory is that of training it alone. With
    `sample_fraction` < 1 each step keeps a random subset of every support set (stochastic
    minibatches without a per-step gather), drawn from `generator`. `on_step(step, losses [E])`, when
    given, is called after every step with each expert's support loss before it (progress, curves).
    """
    net = skeleton(layout.spec)
    params = {k: v.clone().requires_grad_(True) for k, v in layout.unflatten(w0).items()}
    opt = torch.optim.Adam(params.values(), lr=lr, fused=True)
    step_fn = vmap(grad_and_value(lambda p, *a: _loss(net, p, *a)))
    x = features[batch.support_idx]  # [E, S, d_img]
    valid = (torch.arange(x.shape[1])[None, :] < batch.support_n[:, None]).to(x.dtype)  # [E, S]
    for step in range(1, steps + 1):
        weight = valid
        if sample_fraction < 1.0:
            weight = valid * (torch.rand(valid.shape, generator=generator) < sample_fraction)
        with torch.no_grad():
            grads, losses = step_fn(
                {k: v.detach() for k, v in params.items()},
                x, batch.support_lab, weight, batch.prompts, batch.answer_mask,
            )
        for k, p in params.items():
            p.grad = grads[k]
        opt.step()
        if on_step is not None:
            on_step(step, losses)
        if step == steps or (checkpoint_every and step % checkpoint_every == 0):
            yield step, layout.flatten({k: v.detach() for k, v in params.items()}).clone()


class LossCurve:
    """The mean support loss of many experts per step, kept at about `points` steps: the farm's training curve.
    Shards add their experts' losses; `merge` sums curves of shards trained elsewhere."""

    def __init__(self, steps: int, points: int = 100):
        self.every = max(1, steps // points)
        self.sums: dict[int, list[float]] = {}  # step -> [sum of losses, experts]

    def add(self, step: int, losses: torch.Tensor) -> None:
        if step % self.every == 0 or step == 1:
            s = self.sums.setdefault(step, [0.0, 0])
            s[0] += float(losses.sum())
            s[1] += int(losses.numel())

    def merge(self, sums: dict) -> None:
        for step, (total, n) in sums.items():
            s = self.sums.setdefault(int(step), [0.0, 0])
            s[0] += total
            s[1] += n

    def points(self) -> list[tuple[int, float]]:
        """[(step, mean loss over every expert added)], by step."""
        return [(step, total / n) for step, (total, n) in sorted(self.sums.items()) if n]


@torch.no_grad()
def evaluate_experts(
    layout: WeightLayout,
    features: torch.Tensor,
    w: torch.Tensor,
    prompts: torch.Tensor,
    answer_mask: torch.Tensor,
    idx: torch.Tensor,
    lab: torch.Tensor,
    n: torch.Tensor,
    chunk: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy and mean cross-entropy [E] of each expert on its own padded sample set (NaN where n = 0)."""
    net = skeleton(layout.spec)
    fwd = vmap(lambda p, x, c: functional_call(net, p, (x, c)))
    accs, losses = [], []
    for a in range(0, w.shape[0], chunk):
        s = slice(a, a + chunk)
        logits = masked_logits(fwd(layout.unflatten(w[s]), features[idx[s]], prompts[s]), answer_mask[s][:, None, :])
        valid = torch.arange(idx.shape[1])[None, :] < n[s][:, None]  # [e, Q]
        ce = F.cross_entropy(logits.transpose(1, 2), lab[s], reduction="none")  # [e, Q]
        hit = (logits.argmax(-1) == lab[s]).float()
        cnt = valid.sum(1).float()
        accs.append((hit * valid).sum(1) / cnt)
        losses.append((ce * valid).sum(1) / cnt)
    return torch.cat(accs), torch.cat(losses)
