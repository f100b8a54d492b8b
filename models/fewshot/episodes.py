"""Few-shot episodes: K shots per candidate answer from a task's support pool, queries from its query pool.

Pure numpy/torch. An `Episode` is index arrays into one image-feature matrix; `collate` pads the
episodes of several tasks (2, 3 or 8 candidate answers, shot counts that may differ) into one
`EpisodeBatch` with validity masks, and `task_loss` / `task_accuracy` score a flat weight vector on
one padded episode (both work under torch.func.vmap/grad). Support and query come from the pools the
features stage split per task (disjoint by construction); sampling also drops from the support
candidates any image drawn as a query, so an example can never be on both sides of an episode.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from models.task_net import WeightLayout, adapter_logits, functional_forward, masked_logits


@dataclass(frozen=True)
class Episode:
    """One task's episode: image indices and answer-index labels for support and query."""

    task: int  # row of the task in its TaskPool
    support: np.ndarray  # [n_s] image indices, grouped by answer (answer 0's shots first)
    support_labels: np.ndarray  # [n_s] answer indices
    query: np.ndarray  # [n_q] image indices
    query_labels: np.ndarray  # [n_q] answer indices


def sample_episode(
    task: int,
    support_images: np.ndarray,
    support_labels: np.ndarray,
    query_images: np.ndarray,
    query_labels: np.ndarray,
    n_answers: int,
    shots: int,
    n_query: int,
    rng: np.random.Generator,
) -> Episode:
    """Draw `n_query` queries (all of the pool if smaller) and then `shots` support samples per answer.

    An answer with fewer than `shots` support samples contributes the ones it has (none if it has
    none: it stays a candidate answer, as at test time it would); the episode is then ragged, which
    `collate` pads and masks. Support candidates whose image was drawn as a query are dropped first.
    """
    q_pos = rng.choice(len(query_images), size=min(n_query, len(query_images)), replace=False)
    query, query_lab = query_images[q_pos], query_labels[q_pos]
    usable = ~np.isin(support_images, query)
    chosen = []
    for c in range(n_answers):
        pos = np.flatnonzero(usable & (support_labels == c))
        chosen.append(rng.choice(pos, size=min(shots, len(pos)), replace=False))
    s_pos = np.concatenate(chosen).astype(np.int64)
    return Episode(task, support_images[s_pos], support_labels[s_pos], query, query_lab)


@dataclass
class EpisodeBatch:
    """B episodes padded into tensors; masks mark real rows (m_*) and real candidate answers."""

    x_s: torch.Tensor  # [B, n_s, d_img] support image features (padding rows are zero)
    y_s: torch.Tensor  # [B, n_s] long answer indices (padding: 0)
    m_s: torch.Tensor  # [B, n_s] bool, True for real support rows
    x_q: torch.Tensor  # [B, n_q, d_img] query image features
    y_q: torch.Tensor  # [B, n_q] long
    m_q: torch.Tensor  # [B, n_q] bool
    prompts: torch.Tensor  # [B, a, d_txt] answer-prompt text embeddings, zero-padded
    answer_mask: torch.Tensor  # [B, a] bool, True for real candidate answers
    task: torch.Tensor  # [B] long, each episode's task (row of its TaskPool)

    def __len__(self) -> int:
        return self.x_s.shape[0]

    def rows(self, idx) -> "EpisodeBatch":
        """The episodes at `idx` (a slice or index tensor) as a smaller batch."""
        return EpisodeBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def support(self) -> tuple[torch.Tensor, ...]:
        """(x, y, mask, prompts, answer_mask) of the support sets: the arguments of `task_loss`."""
        return self.x_s, self.y_s, self.m_s, self.prompts, self.answer_mask

    def query(self) -> tuple[torch.Tensor, ...]:
        """(x, y, mask, prompts, answer_mask) of the query sets."""
        return self.x_q, self.y_q, self.m_q, self.prompts, self.answer_mask


def _pad(rows: list[np.ndarray], fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged 1-d int arrays -> ([B, n_max] long, [B, n_max] bool validity)."""
    n = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), n), fill, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return out, mask


def collate(episodes: list[Episode], image_feats: torch.Tensor, prompts: list[torch.Tensor]) -> EpisodeBatch:
    """Pad `episodes` into one EpisodeBatch; image_feats [n_img, d_img], prompts[task] [a_task, d_txt]."""
    s_idx, m_s = _pad([e.support for e in episodes])
    y_s, _ = _pad([e.support_labels for e in episodes])
    q_idx, m_q = _pad([e.query for e in episodes])
    y_q, _ = _pad([e.query_labels for e in episodes])
    task_prompts = [prompts[e.task] for e in episodes]
    a = max(p.shape[0] for p in task_prompts)
    pr = torch.zeros(len(episodes), a, task_prompts[0].shape[1])
    amask = torch.zeros(len(episodes), a, dtype=torch.bool)
    for i, p in enumerate(task_prompts):
        pr[i, : len(p)] = p
        amask[i, : len(p)] = True
    # Padding rows point at image 0 and are masked out of every loss and accuracy.
    return EpisodeBatch(
        x_s=image_feats[s_idx] * m_s[..., None], y_s=y_s, m_s=m_s,
        x_q=image_feats[q_idx] * m_q[..., None], y_q=y_q, m_q=m_q,
        prompts=pr, answer_mask=amask, task=torch.tensor([e.task for e in episodes], dtype=torch.long),
    )


@dataclass
class TaskPool:
    """Per-task support/query pools and answer prompts of a set of tasks (e.g. the meta-test split)."""

    support_images: list[np.ndarray]
    support_labels: list[np.ndarray]
    query_images: list[np.ndarray]
    query_labels: list[np.ndarray]
    prompts: list[torch.Tensor]  # [a_task, d_txt] each

    @classmethod
    def from_tasks(cls, tasks, text_feats: np.ndarray) -> "TaskPool":
        """From a task table with the features stage's columns (prompt_texts index text_feats)."""
        txt = torch.tensor(np.asarray(text_feats), dtype=torch.float32)
        return cls(
            support_images=[np.asarray(a, np.int64) for a in tasks["support_images"]],
            support_labels=[np.asarray(a, np.int64) for a in tasks["support_labels"]],
            query_images=[np.asarray(a, np.int64) for a in tasks["query_images"]],
            query_labels=[np.asarray(a, np.int64) for a in tasks["query_labels"]],
            prompts=[txt[torch.as_tensor(np.array(p, np.int64))] for p in tasks["prompt_texts"]],
        )

    def __len__(self) -> int:
        return len(self.prompts)

    def n_answers(self, task: int) -> int:
        return len(self.prompts[task])

    def episode(self, task: int, shots: int, n_query: int, rng: np.random.Generator) -> Episode:
        """One seeded episode of `task` (see `sample_episode`)."""
        return sample_episode(
            task, self.support_images[task], self.support_labels[task], self.query_images[task],
            self.query_labels[task], self.n_answers(task), shots, n_query, rng,
        )

    def episodes(self, n: int, shots: int, n_query: int, rng: np.random.Generator) -> list[Episode]:
        """`n` episodes of tasks drawn uniformly at random (with replacement)."""
        return [self.episode(int(t), shots, n_query, rng) for t in rng.integers(0, len(self), size=n)]

    def batch(self, n: int, shots: int, n_query: int, rng: np.random.Generator, image_feats: torch.Tensor) -> EpisodeBatch:
        """`n` random episodes collated (a meta-training batch)."""
        return collate(self.episodes(n, shots, n_query, rng), image_feats, self.prompts)


# ----------------------------------------------------------------------------- scoring one episode


def task_logits(
    layout: WeightLayout, w: torch.Tensor | dict[str, torch.Tensor], x: torch.Tensor, prompts: torch.Tensor,
    amask: torch.Tensor,
) -> torch.Tensor:
    """Logits of one episode: w [P] (or its named tensors), x [n, d_img], prompts [a, d_txt], amask [a] -> [n, a].

    Padded answers get -inf. Named tensors let an inner loop differentiate per layer: differentiating
    through the slices of a flat w makes every step's backward build (and add) full-size zero gradients.
    """
    if isinstance(w, dict):
        return masked_logits(adapter_logits(w, x, prompts, layout.spec.logit_scale), amask)
    return masked_logits(functional_forward(layout, w, x, prompts), amask)


def task_loss(
    layout: WeightLayout, w: torch.Tensor | dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, m: torch.Tensor,
    prompts: torch.Tensor, amask: torch.Tensor,
) -> torch.Tensor:
    """Mean cross-entropy over the real rows (m) of one episode's set; 0 for an empty set. Vmappable."""
    ce = F.cross_entropy(task_logits(layout, w, x, prompts, amask), y, reduction="none")  # [n]
    m = m.to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp_min(1.0)


def task_accuracy(
    layout: WeightLayout, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor,
    prompts: torch.Tensor, amask: torch.Tensor,
) -> torch.Tensor:
    """Share of real rows whose arg-max answer is right. Vmappable."""
    hit = (task_logits(layout, w, x, prompts, amask).argmax(-1) == y).to(torch.float32)
    m = m.to(hit.dtype)
    return (hit * m).sum() / m.sum().clamp_min(1.0)


def batch_loss(layout: WeightLayout, w: torch.Tensor, x, y, m, prompts, amask) -> torch.Tensor:
    """`task_loss` of each episode: w [B, P] and padded sets [B, ...] -> [B]."""
    return torch.func.vmap(lambda *a: task_loss(layout, *a))(w, x, y, m, prompts, amask)


def batch_accuracy(layout: WeightLayout, w: torch.Tensor, x, y, m, prompts, amask) -> torch.Tensor:
    """`task_accuracy` of each episode -> [B]."""
    return torch.func.vmap(lambda *a: task_accuracy(layout, *a))(w, x, y, m, prompts, amask)
