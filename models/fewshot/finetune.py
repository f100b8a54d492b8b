"""Fine-tuning baseline: given weights for each episode's task, a few gradient steps on its support set.

The zero-shot models (multitask network, text-conditioned hypernetwork, ...) produce weights without
seeing any example; given the same K-shot support set as the few-shot methods, the fair comparison
(Nava et al. 2023, §5 "fine-tuning") is to fine-tune those weights on it. Plain gradient descent on
every layer, vmapped over episodes with torch.func (MAML's inner loop, with nothing meta-learned).
"""
from __future__ import annotations

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
