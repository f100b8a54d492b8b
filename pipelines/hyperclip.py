"""Stage `hyperclip`: HyperCLIP (Nava et al. 2023, §3.2) per route, split and seed.

    python -m pipelines.hyperclip --run-dir runs/default

An MLP maps a task network's normalised weights to the text-embedding space, trained with CLIP's
symmetric InfoNCE against the meta-train tasks' description embeddings. One model per route. The HVAE
route's is trained on the meta-train experts themselves (the weight dataset, as in the paper); the
HNet route has no experts in its space, so its HyperCLIP sees the HNet's decoded task weights.
Reads `models/generators/` and the weight store, writes `models/hyperclip/`.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from pipelines.core.config import DataPath, MemoryBudgetMb, Runtime, stage_config
from pipelines.zeroshot.stage import entry_points


@stage_config("hyperclip")
class HyperClipConfig:
    """How HyperCLIP trains."""

    steps: Annotated[int, Field(ge=1)] = 200
    """Adam steps"""
    lr: Annotated[float, Field(ge=1e-7, le=1.0)] = 1e-3
    """learning rate (paper: 1e-3)"""
    hidden: tuple[int, ...] = (128, 128)
    """MLP widths (paper: 128,128)"""
    batch: Annotated[int, Field(ge=2)] = 256
    """(weights, description) pairs per step (all when fewer)"""
    hard_negatives: Annotated[float, Field(ge=0.0, le=100.0)] = 0.0
    """weight of negatives by description similarity, exp(hard_negatives x cosine) normalised per anchor (0: plain InfoNCE)"""
    margin: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """cosine margin subtracted from every matched pair's score in the loss (0: none)"""
    hvae_inputs: Literal["experts", "reconstructions"] = "experts"
    """what the HVAE route's HyperCLIP trains on: the experts (measured better for guidance) or their HVAE reconstructions"""
    data_path: DataPath = "auto"
    """how workers read the weight store: memory (each loads its split's experts whole), stream (Ray Data batches, never the whole store; the minibatch order differs, so results change), auto (memory when the store fits memory_budget_mb)"""
    memory_budget_mb: MemoryBudgetMb = 1024.0
    """auto's limit: the store's committed rows x weights x 4 bytes, in MiB, that may be loaded whole"""
    num_workers: Annotated[int, Runtime, Field(ge=1)] = 2
    """Ray Train workers"""
    ddp: bool = False
    """true: workers share each model (DDP over gloo); false: each trains its own (split, seed) models"""
    log_every: Annotated[int, Runtime, Field(ge=1)] = 100
    """steps between logged losses"""


CONFIG = HyperClipConfig
NEEDS_RAY = True
PRESETS = {"smoke": dict(steps=30, hidden=(32,), log_every=3), "default": dict()}


@torch.no_grad()
def held_out_scores(model, data) -> dict[str, float]:
    """Mean cosine of matched vs mismatched (oracle expert weights, description) pairs on meta-test tasks."""
    from models.zeroshot.hyperclip import score

    e = model.embed(data.norm.encode(data.w_test))  # [M, d]
    cos = e @ torch.nn.functional.normalize(data.test.c, dim=-1).T  # [M, M]
    off = ~torch.eye(len(cos), dtype=torch.bool)
    matched = float(score(model, data.norm.encode(data.w_test), data.test.c).mean())
    return {"test_matched_cos": matched, "test_mismatched_cos": float(cos[off].mean()),
            "test_top1": float((cos.argmax(1) == torch.arange(len(cos))).float().mean())}


@torch.no_grad()
def streamed_held_out_scores(model, data, batch: int) -> dict[str, float]:
    """`held_out_scores` from one streaming pass over the meta-test experts: embeddings [M, d] in memory,
    their [M, M] cosines a block of rows at a time."""
    from pipelines.zeroshot.streamed import per_task

    e = per_task(data.experts["test"], data.test.batch.n, lambda r, w: model.embed(data.norm.encode(w)), batch)  # [M, d]
    cn = torch.nn.functional.normalize(data.test.c, dim=-1)  # [M, d]
    m = len(e)
    matched = (e * cn).sum(-1)  # [M]
    mismatched = (e.sum(0) @ cn.sum(0) - matched.sum()) / max(m * m - m, 1)
    top1 = torch.cat([(e[r] @ cn.T).argmax(1) == r for r in torch.arange(m).split(1024)])
    return {"test_matched_cos": float(matched.mean()), "test_mismatched_cos": float(mismatched),
            "test_top1": float(top1.float().mean())}


def train_one(run, data, seed: int, cfg: HyperClipConfig, hooks):
    """One HyperCLIP per route on (decoded meta-train weights, descriptions); returns (state, metrics)."""
    from models.zeroshot.training import minibatches, train_hyperclip
    from pipelines.zeroshot.trained import TrainedModels

    state, metrics = {}, {}
    settings = dict(steps=cfg.steps, lr=cfg.lr, hidden=cfg.hidden, batch=cfg.batch, hard_negatives=cfg.hard_negatives,
                    margin=cfg.margin)
    for name, route in TrainedModels(run, data, seed).routes.items():
        experts = name == "hvae" and cfg.hvae_inputs == "experts"
        if data.streamed:  # batches of the store, or of decoded latents: never all N x P weights at once
            dims = (data.layout.size, data.train.c.shape[1])
            if experts:
                v = data.experts["train"].source(cfg.batch, seed, lambda r, w: (data.norm.encode(w), data.train.c[r]))
            else:
                v = decoded(minibatches(route.z_train, data.train.c, batch=cfg.batch), route.decode_n)
            model = train_hyperclip(v, None, seed, hooks.prefixed(f"{name}_"), dims=dims, **settings)
            scores = streamed_held_out_scores(model, data, cfg.batch)
        else:
            with torch.no_grad():  # [N, P] normalised weights
                v = data.norm.encode(data.w_train) if experts else route.decode_n(route.z_train)
            model = train_hyperclip(v, data.train.c, seed, hooks.prefixed(f"{name}_"), **settings)
            scores = held_out_scores(model, data)
        state.update({f"{name}.{k}": t for k, t in model.state_dict().items()})
        metrics.update({f"{name}_{k}": x for k, x in scores.items()})
    return state, metrics


def decoded(source, decode_n):
    """A (latent, c) batch source turned into (normalised weights, c), decoded a batch at a time."""

    def gen_batches(gen):
        for z, c in source(gen):
            with torch.no_grad():
                v = decode_n(z)
            yield v, c  # outside no_grad: the loop's step runs while this generator is suspended

    return gen_batches


run, track, main = entry_points("hyperclip", train_one)


if __name__ == "__main__":
    from pipelines.core.cli import guarded

    guarded(main)()
