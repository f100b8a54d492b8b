"""Shards of the expert farm, in plain torch (no Ray): which experts train together, from which
start, and `train_shard`, which trains one shard at once; tests and benchmarks call it directly.
A shard's id and contents follow from the tasks and the config alone, so a rerun finds what is done.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from models.errors import UserError
from models.expert_training import LossCurve, evaluate_experts, step_flops, train_experts
from models.task_net import TaskNetSpec, WeightLayout, init_weights
from orchestrator.storage.suite_features import SuiteFeatures, task_batch


@dataclass(frozen=True)
class ShardSpec:
    """One unit of farm work: (task row, seed) pairs trained together."""

    shard_id: str
    members: tuple[tuple[int, int], ...]


class FarmError(UserError, RuntimeError):
    """The farm cannot start (e.g. a bad init_from file); the message says what to fix."""


def config_hash(cfg, features_id: str = "") -> str:
    """Hash of what decides the trained weights: the experts config's result fields (its runtime fields,
    where and how fast experts train, left out; shard layout counts, as it fixes shard ids and
    minibatch streams) and the features they train on. An init_from file counts by its bytes, so
    replacing the file, or rebuilding the features with another suite, is a new config, never a silent mix.
    """
    from pipelines.core.config import result_values

    keep = result_values(cfg)
    keep["features"] = features_id
    if cfg.init_from:
        with open(cfg.init_from, "rb") as f:
            keep["init_from"] = hashlib.file_digest(f, "sha256").hexdigest()
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def task_net_spec(data: SuiteFeatures, cfg) -> TaskNetSpec:
    """The task network the farm trains on these features with this experts config (the one derivation;
    later stages read it back from the store's manifest)."""
    return TaskNetSpec(d_img=data.d_img, hidden=cfg.hidden, d_txt=data.d_txt, logit_scale=cfg.logit_scale)


def untrainable_tasks(tasks: pd.DataFrame) -> dict[str, str]:
    """{task id: why} for tasks no expert can be trained and scored on: no support or no query examples."""
    out = {}
    for t in tasks.itertuples():
        if len(t.support_images) == 0 or len(t.query_images) == 0:
            out[t.id] = "no support examples" if len(t.support_images) == 0 else "no query examples"
    return out


def plan_shards(tasks: pd.DataFrame, cfg, chash: str) -> list[ShardSpec]:
    """Deterministic shards of experts sorted by support size, cut at `shard_size` experts or when the
    padded work (experts x largest support set) would pass `shard_samples`: big tasks go in small
    shards, so padding wastes little and resident features stay cache-friendly."""
    sizes = tasks["support_images"].map(len).to_numpy()
    skip = untrainable_tasks(tasks)  # never an untrained "expert" in the store
    order = sorted((i for i in range(len(tasks)) if tasks["id"].iat[i] not in skip), key=lambda i: (sizes[i], tasks["id"].iat[i]))
    members = [(i, s) for i in order for s in range(cfg.seeds_per_task)]
    chunks: list[list[tuple[int, int]]] = [[]]
    for m in members:
        c = chunks[-1]
        if c and (len(c) >= cfg.shard_size or (len(c) + 1) * sizes[m[0]] > cfg.shard_samples):
            chunks.append(c := [])
        c.append(m)
    shards = []
    for k, chunk in enumerate(chunks):
        key = chash + "|" + ";".join(f"{tasks['id'].iat[i]}:{s}" for i, s in chunk)
        shards.append(ShardSpec(f"shard-{k:05d}-{hashlib.sha256(key.encode()).hexdigest()[:8]}", tuple(chunk)))
    return shards


def load_base(path: str, layout: WeightLayout) -> torch.Tensor:
    """The flat 'w' [P] of a safetensors file, checked against the layout."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as e:
        raise FarmError(f"init_from {path}: not a readable safetensors file ({e})") from None
    if "w" not in tensors or tensors["w"].shape != (layout.size,):
        got = tuple(tensors["w"].shape) if "w" in tensors else f"no 'w' among {sorted(tensors)}"
        raise FarmError(f"init_from {path}: needs a flat tensor 'w' of shape ({layout.size},) for layout {layout.id}, got {got}")
    return tensors["w"].float()


def start_weights(layout: WeightLayout, cfg, members, task_ids: list[str]) -> torch.Tensor:
    """w0 [E, P]: one shared init (a seed or a base file, so experts stay aligned) or one init per expert."""
    if cfg.init_from:
        return load_base(cfg.init_from, layout).expand(len(members), -1).contiguous()
    if cfg.init == "shared":
        return init_weights(layout.spec, cfg.init_seed).expand(len(members), -1).contiguous()
    seeds = [int(hashlib.sha256(f"{cfg.init_seed}:{task_ids[i]}:{s}".encode()).hexdigest()[:8], 16) for i, s in members]
    return torch.stack([init_weights(layout.spec, s) for s in seeds])


def feature_tensors(data: SuiteFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, text) features as tensors; copied once, since arrays from Ray's object store are read-only."""
    return torch.tensor(data.image_feats), torch.tensor(data.text_feats)


def train_shard(data: SuiteFeatures, shard: ShardSpec, cfg, tensors=None, on_step=None) -> dict:
    """Train one shard's experts; returns weights [R, P] (R = experts x checkpoints) and their metadata rows.
    `on_step(step)` is called after every training step (progress); `curve` holds the shard's mean support loss."""
    t0 = time.perf_counter()
    spec = task_net_spec(data, cfg)
    layout = WeightLayout(spec)
    rows = [data.tasks.iloc[i] for i, _ in shard.members]
    feats, text = tensors if tensors is not None else feature_tensors(data)
    batch = task_batch(rows, text)
    w0 = start_weights(layout, cfg, shard.members, list(data.tasks["id"]))
    gen = torch.Generator().manual_seed(int(shard.shard_id.rsplit("-", 1)[1], 16) ^ cfg.seed)
    out_w, meta = [], []
    curve = LossCurve(cfg.steps)

    def stepped(step: int, losses: torch.Tensor) -> None:
        curve.add(step, losses)
        if on_step is not None:
            on_step(step)

    for step, w in train_experts(layout, feats, batch, w0, cfg.steps, cfg.lr, cfg.checkpoint_every, cfg.sample_fraction, gen,
                                 on_step=stepped):
        s_acc, s_loss = evaluate_experts(layout, feats, w, batch.prompts, batch.answer_mask, batch.support_idx, batch.support_lab, batch.support_n)
        q_acc, q_loss = evaluate_experts(layout, feats, w, batch.prompts, batch.answer_mask, batch.query_idx, batch.query_lab, batch.query_n)
        out_w.append(w.numpy())
        for e, ((_, seed), r) in enumerate(zip(shard.members, rows)):
            meta.append(dict(
                task_id=r.id, description=r.description, split=r.split, seed=seed, step=step,
                final=step == cfg.steps, layout_id=layout.id,
                support_acc=float(s_acc[e]), support_loss=float(s_loss[e]),
                query_acc=float(q_acc[e]), query_loss=float(q_loss[e]),
            ))
    a = int(batch.answer_mask.shape[1])
    flops = cfg.steps * batch.n * step_flops(spec.d_img, spec.hidden, spec.d_txt, int(batch.support_idx.shape[1]), a)
    return dict(shard_id=shard.shard_id, w=np.concatenate(out_w), meta=meta, seconds=time.perf_counter() - t0, flops=flops,
                curve=curve.sums)
