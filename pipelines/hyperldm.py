"""Stage `hyperldm`: HyperLDM (Nava et al. 2023, §3.4), a latent diffusion model per route, split and seed.

    python -m pipelines.hyperldm --run-dir runs/default --set steps=4000

An ε-predictor over the route's standardised latents, conditioned on description embeddings, 20 % of
conditions dropped to a learned null embedding so classifier-free guidance can mix ε(z, c) and
ε(z, ∅) at sampling time; EMA weights are what is saved. Reads `models/generators/`, writes
`models/hyperldm/`.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from pipelines.core.config import DataPath, MemoryBudgetMb, Runtime, stage_config
from pipelines.zeroshot.stage import entry_points


@stage_config("hyperldm")
class HyperLdmConfig:
    """How HyperLDM trains."""

    steps: Annotated[int, Field(ge=1)] = 3000
    """Adam steps"""
    lr: Annotated[float, Field(ge=1e-7, le=1.0)] = 1e-3
    """learning rate"""
    batch: Annotated[int, Field(ge=1)] = 600
    """(latent, t, noise) draws per step"""
    hidden: Annotated[int, Field(ge=1)] = 512
    """width of the ε-MLP's two [Linear+LayerNorm+ReLU] blocks"""
    timesteps: Annotated[int, Field(ge=1)] = 1000
    """diffusion steps T (paper: 1000)"""
    schedule: Literal["cosine", "linear"] = "cosine"
    """noise schedule (paper: cosine)"""
    ema_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.999
    """EMA of the denoiser's weights (the EMA weights are what is saved)"""
    drop_prob: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2
    """share of conditions dropped to ∅ in training, for classifier-free guidance (paper: 20 %)"""
    rephrasings: Annotated[int, Field(ge=0, le=3)] = 0
    """training-time rephrasings per meta-train task (easyvqa questions only), each paired with the task's latent; 0: the suite's descriptions alone"""
    data_path: DataPath = "auto"
    """how workers get the weight normaliser: memory (each loads its split's experts whole to fit it), stream (fit in one Ray Data pass on the driver; workers read no expert; equal up to float rounding, so results may change in the last digits), auto (memory when the store fits memory_budget_mb)"""
    memory_budget_mb: MemoryBudgetMb = 1024.0
    """auto's limit: the store's committed rows x weights x 4 bytes, in MiB, that may be loaded whole"""
    num_workers: Annotated[int, Runtime, Field(ge=1)] = 2
    """Ray Train workers"""
    ddp: bool = False
    """true: workers share each model (DDP over gloo); false: each trains its own (split, seed) models"""
    batched: bool = False
    """without ddp, true: each worker trains its denoisers as one vmapped program (same inits and random draws as
    one at a time, weights equal to float rounding; measured slower on CPU, where one denoiser's step is already
    large matmuls); false: one after another"""
    log_every: Annotated[int, Runtime, Field(ge=1)] = 500
    """steps between logged losses"""


CONFIG = HyperLdmConfig
NEEDS_RAY = True
PRESETS = {"smoke": dict(steps=60, batch=64, hidden=64, log_every=6), "default": dict()}


def settings(cfg: HyperLdmConfig) -> dict:
    """The training loop's keyword settings from the stage config."""
    return dict(steps=cfg.steps, lr=cfg.lr, batch=cfg.batch, hidden=cfg.hidden, timesteps=cfg.timesteps,
                schedule=cfg.schedule, ema_decay=cfg.ema_decay, drop_prob=cfg.drop_prob)


def route_state(name: str, ldm) -> dict:
    """One route's HyperLDM as named tensors: `{route}.denoiser.*` and `{route}.standardizer.*`."""
    state = {f"{name}.denoiser.{k}": t for k, t in ldm.denoiser.state_dict().items()}
    state.update({f"{name}.standardizer.{k}": t for k, t in ldm.standardizer.state_dict().items()})
    return state


def train_one(run, data, seed: int, cfg: HyperLdmConfig, hooks):
    """One HyperLDM per route on (meta-train latents, descriptions and any rephrasings); returns (state, metrics)."""
    from models.zeroshot.training import train_hyperldm
    from pipelines.zeroshot.augment import augmented_pairs, rephrased_conditions
    from pipelines.zeroshot.trained import TrainedModels

    state = {}
    c_rephrased = rephrased_conditions(run, data, cfg.rephrasings)  # [N n, d_c] or None
    for name, route in TrainedModels(run, data, seed).routes.items():
        z, c = augmented_pairs(route.z_train, data.train.c, c_rephrased, cfg.rephrasings)
        ldm = train_hyperldm(z, c, seed, hooks.prefixed(f"{name}_"), **settings(cfg))
        state.update(route_state(name, ldm))
    return state, {}


def train_many(run, units: list, cfg: HyperLdmConfig, hooks: list) -> list[tuple[dict, dict]]:
    """Every route of every (data, seed) unit as one batched program; [(state, metrics)] per unit, as `train_one`'s."""
    from models.zeroshot.batched_ldm import LdmJob, train_hyperldms
    from pipelines.zeroshot.augment import augmented_pairs, rephrased_conditions
    from pipelines.zeroshot.trained import TrainedModels

    jobs, owners = [], []  # owners[i] = (unit index, route name) of jobs[i]
    for u, (data, seed) in enumerate(units):
        c_rephrased = rephrased_conditions(run, data, cfg.rephrasings)
        for name, route in TrainedModels(run, data, seed).routes.items():
            jobs.append(LdmJob(*augmented_pairs(route.z_train, data.train.c, c_rephrased, cfg.rephrasings), seed))
            owners.append((u, name))

    def on_log(step: int, losses):
        per_unit: dict[int, dict] = {}
        for (u, name), loss in zip(owners, losses):
            per_unit.setdefault(u, {})[f"{name}_loss"] = loss
        for u, m in per_unit.items():
            hooks[u].log(step, m)

    ldms = train_hyperldms(jobs, on_log, log_every=hooks[0].log_every, **settings(cfg))
    states: list[dict] = [{} for _ in units]
    for (u, name), ldm in zip(owners, ldms):
        states[u].update(route_state(name, ldm))
    return [(state, {}) for state in states]


def check_rephrasings(cfg: HyperLdmConfig, ctx) -> None:
    """Refuse `rephrasings` on a suite whose descriptions have no training-time rephrasings, before training starts."""
    from pipelines.zeroshot.augment import check_run

    check_run(ctx.run, cfg.rephrasings)


run, track, main = entry_points("hyperldm", train_one, prepare=check_rephrasings, train_many=train_many)


if __name__ == "__main__":
    from pipelines.core.cli import guarded

    guarded(main)()
