"""Zero-shot training data and the task loss, pure torch: tasks as tensors, hooks to meet a runtime.

`Hooks.wrap` may wrap a model (Ray Train passes DDP's `prepare_model`), `Hooks.part` picks this
worker's rows of a global batch, `Hooks.log` receives metrics. With the default hooks the training
loops run in a plain process, which is how the tests call them. Every global batch is drawn from one
seeded generator, the same on every worker, so a run's trajectory does not depend on how many workers
share it (up to float reduction order).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.expert_training import ExpertBatch, evaluate_experts
from models.task_net import WeightLayout, functional_forward, masked_logits


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

    def rows(self, rows: torch.Tensor) -> "TaskData":
        """The tasks `rows` [B] only (e.g. the tasks of one streamed batch of experts)."""
        b = self.batch
        sub = ExpertBatch(**{f.name: getattr(b, f.name)[rows] for f in fields(b)})
        return TaskData(self.layout, self.X, sub, self.c[rows])


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
