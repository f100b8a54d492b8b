"""Stage `generators`: the unconditional weight generators of Nava et al. (2023), per split and seed.

    python -m pipelines.generators --run-dir runs/default --set seeds=0,1,2

HNet route: one hypernetwork decodes a 128-d latent into task-network weights; every meta-train task's
latent starts at a shared, learned meta latent and both are trained on the tasks' support losses
(§3.1). HVAE route: a VAE over the meta-train experts of the weight store, in per-layer normalised
weight space (§3.4). Reads `features/` and `store/weights`, writes `models/generators/` and the
plan (splits x seeds) every later zero-shot stage follows.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from pipelines.core.cli import RunContext
from pipelines.core.config import DataPath, MemoryBudgetMb, Plan, Runtime, Seed, stage_config
from pipelines.zeroshot.stage import entry_points

SPLITS = ("random", "compositional", "given")


@stage_config("generators")
class GeneratorsConfig:
    """Which splits and seeds the zero-shot stages cover, and how HNet and HVAE train."""

    splits: Annotated[tuple[Literal[SPLITS], ...], Plan, Field(min_length=1)] = ("random", "compositional")
    """split modes to evaluate on the same farm (given: the features' own split)"""
    seeds: Annotated[tuple[Seed, ...], Plan, Field(min_length=1)] = (0, 1, 2)
    """training seeds of every zero-shot model (the table's mean ± std)"""
    val_fraction: Annotated[float, Plan, Field(ge=0.0, le=0.5)] = 0.15
    """share of meta-train tasks held out of every zero-shot model (seeded, the same for all seeds) as the validation split sweeps choose settings on"""
    d_latent: Annotated[int, Field(ge=1)] = 128
    """latent size of HNet and HVAE (paper: 128)"""
    hidden: tuple[int, ...] = (128, 128)
    """MLP widths of HNet and the HVAE encoder/decoder (paper: 128,128)"""
    hnet_steps: Annotated[int, Field(ge=1)] = 1000
    """Adam steps of HNet + latents on the meta-train support losses"""
    hnet_lr: Annotated[float, Field(ge=1e-7, le=1.0)] = 1e-3
    """HNet learning rate"""
    tasks_per_step: Annotated[int, Field(ge=1)] = 16
    """tasks in each HNet step"""
    samples_per_task: Annotated[int, Field(ge=1)] = 32
    """support samples per task in each HNet step"""
    hvae_steps: Annotated[int, Field(ge=1)] = 400
    """Adam steps of the HVAE on the normalised meta-train experts"""
    hvae_lr: Annotated[float, Field(ge=1e-7, le=1.0)] = 1e-3
    """HVAE learning rate"""
    hvae_batch: Annotated[int, Field(ge=1)] = 32
    """experts per HVAE step"""
    hvae_beta: Annotated[float, Field(ge=0.0)] = 1.0
    """KL weight of the HVAE's ELBO"""
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


CONFIG = GeneratorsConfig
NEEDS_RAY = True
PRESETS = {
    "smoke": dict(splits=("given",), seeds=(0,), hnet_steps=40, hvae_steps=40, d_latent=16, hidden=(32, 32), log_every=4),
    "default": dict(),
}


def train_one(run, data, seed: int, cfg: GeneratorsConfig, hooks):
    """Train HNet (+ latents) and HVAE for one split and seed; returns (state, metrics)."""
    from models.zeroshot.tasks import task_accuracy
    from models.zeroshot.task_models import LatentHNet, fit_task_model
    from models.zeroshot.training import train_hvae

    torch.manual_seed(seed)
    hnet = LatentHNet(data.norm, data.train.batch.n, cfg.d_latent, cfg.hidden, torch.Generator().manual_seed(seed))
    fit_task_model(hnet, data.train, seed, hooks.prefixed("hnet_"), steps=cfg.hnet_steps, lr=cfg.hnet_lr,
                   tasks_per_step=cfg.tasks_per_step, samples_per_task=cfg.samples_per_task)
    hvae = dict(steps=cfg.hvae_steps, lr=cfg.hvae_lr, batch=cfg.hvae_batch, beta=cfg.hvae_beta, d_latent=cfg.d_latent,
                hidden=cfg.hidden)
    rows = torch.arange(data.train.batch.n)
    if data.streamed:
        vae = train_hvae(data.experts["train"].source(cfg.hvae_batch, seed, lambda r, w: data.norm.encode(w)), seed,
                         hooks.prefixed("hvae_"), n_weights=data.layout.size, **hvae)
        mu, metrics = streamed_summary(data, vae, cfg.hvae_batch)
    else:
        wn = data.norm.encode(data.w_train)
        vae = train_hvae(wn, seed, hooks.prefixed("hvae_"), **hvae)
        with torch.no_grad():
            mu = vae.encode(wn)[0]  # [N, d] the HVAE latents of the meta-train experts
            metrics = {
                "expert_train_query_acc": float(task_accuracy(data.train, data.w_train).mean()),
                "hvae_recon_train_query_acc": float(task_accuracy(data.train, data.norm.decode(vae.decode(mu))).mean()),
                "hvae_recon_test_query_acc": float(task_accuracy(
                    data.test, data.norm.decode(vae.decode(vae.encode(data.norm.encode(data.w_test))[0]))).mean()),
            }
    with torch.no_grad():
        metrics = {"hnet_train_query_acc": float(task_accuracy(data.train, hnet(rows, data.train.c)).mean()), **metrics}
    state = {**{f"hnet.{k}": v for k, v in hnet.state_dict().items()},
             **{f"hvae.{k}": v for k, v in vae.state_dict().items()}, "hvae_latents": mu}
    return state, metrics


def streamed_summary(data, vae, batch: int) -> tuple[torch.Tensor, dict]:
    """The HVAE latents [N, d] of the meta-train experts and the memory path's summary metrics, from one
    streaming pass over the meta-train and one over the meta-test experts (a batch at a time)."""
    from models.zeroshot.tasks import task_accuracy
    from pipelines.zeroshot.streamed import per_task

    norm, train, test = data.norm, data.train, data.test
    both = per_task(data.experts["train"], train.batch.n,  # [N, d + 1]: latent and the expert's own accuracy, one pass
                    lambda r, w: torch.cat([vae.encode(norm.encode(w))[0], task_accuracy(train.rows(r), w)[:, None]], 1), batch)
    mu, expert = both[:, :-1].contiguous(), both[:, -1]
    chunks = torch.arange(train.batch.n).split(batch)
    recon = torch.cat([task_accuracy(train.rows(r), norm.decode(vae.decode(mu[r]))) for r in chunks])
    recon_test = per_task(data.experts["test"], test.batch.n,
                          lambda r, w: task_accuracy(test.rows(r), norm.decode(vae.decode(vae.encode(norm.encode(w))[0]))), batch)
    return mu, {"expert_train_query_acc": float(expert.mean()), "hvae_recon_train_query_acc": float(recon.mean()),
                "hvae_recon_test_query_acc": float(recon_test.mean())}


def record_plan(cfg: GeneratorsConfig, ctx: RunContext) -> None:
    """The (split, seed) pairs and validation share every later zero-shot stage follows."""
    from pipelines.zeroshot.data import write_plan

    write_plan(ctx.run, cfg.splits, cfg.seeds, cfg.val_fraction)


run, track, main = entry_points("generators", train_one, prepare=record_plan)


if __name__ == "__main__":
    from pipelines.core.cli import guarded

    guarded(main)()
