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

from pipelines.core.config import Runtime, stage_config
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
    hvae_inputs: Literal["experts", "reconstructions"] = "experts"
    """what the HVAE route's HyperCLIP trains on: the experts (measured better for guidance) or their HVAE reconstructions"""
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


def train_one(run, data, seed: int, cfg: HyperClipConfig, hooks):
    """One HyperCLIP per route on (decoded meta-train weights, descriptions); returns (state, metrics)."""
    from models.zeroshot.training import train_hyperclip
    from pipelines.zeroshot.trained import TrainedModels

    state, metrics = {}, {}
    for name, route in TrainedModels(run, data, seed).routes.items():
        with torch.no_grad():  # [N, P] normalised weights
            experts = name == "hvae" and cfg.hvae_inputs == "experts"
            v = data.norm.encode(data.w_train) if experts else route.decode_n(route.z_train)
        model = train_hyperclip(v, data.train.c, seed, hooks.prefixed(f"{name}_"), steps=cfg.steps, lr=cfg.lr,
                                hidden=cfg.hidden, batch=cfg.batch)
        state.update({f"{name}.{k}": t for k, t in model.state_dict().items()})
        metrics.update({f"{name}_{k}": x for k, x in held_out_scores(model, data).items()})
    return state, metrics


run, track, main = entry_points("hyperclip", train_one)


if __name__ == "__main__":
    from pipelines.core.cli import guarded

    guarded(main)()
