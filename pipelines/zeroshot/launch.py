"""Train one kind of zero-shot model for every (split, seed) of the run's plan in one Ray Train job.

A stage provides `train_one(run, data: SplitData, seed, cfg, hooks) -> (state, metrics)`; this module
runs it inside `orchestrator.train.launch` (one worker group per stage: starting one costs ~16 s, so
not one per model). A model whose file exists with the same result fields is skipped, so rerunning a
stage resumes where it stopped and retrains only what changed (not what only moved, like num_workers).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from models.zeroshot.tasks import Hooks
from orchestrator.storage.rundir import RunDir
from pipelines.core.cli import RunContext
from pipelines.core.config import ConfigError, build, config_values, result_values
from pipelines.zeroshot.data import load_split, read_plan, read_val_fraction, save_model, store_spec
from pipelines.zeroshot.streamed import attach_streams, resolve_data_path, stream_inputs


def up_to_date(path: Path, cfg, val_fraction: float = 0.0) -> bool:
    """True when `path` exists and was trained on the same tasks with the same result fields as `cfg` (seed and
    split are in the name; runtime fields such as num_workers and the plan's other units do not matter)."""
    side = path.with_suffix(".json")
    if not (path.exists() and side.exists()):
        return False
    saved = json.loads(side.read_text())
    try:
        same = result_values(build(type(cfg), saved.get("stage_config") or {}), plan=False) == result_values(cfg, plan=False)
    except ConfigError:  # a sidecar from a config this code no longer accepts: retrain
        return False
    return same and saved.get("val_fraction", 0.0) == val_fraction


def _loop(config: dict) -> None:
    """train_loop_per_worker: the pending (split, seed) models, one after another or all at once.

    With `ddp` every worker takes part in every model (DDP over gloo, a global batch split between
    workers) and rank 0 writes each model file. Without it, worker r trains models r, r + n, ... on
    its own (no gradient exchange): on a small machine several small models at once use the cores
    better than one model split across them. A stage with `train_many` (config `batched`) trains a
    worker's models as one batched program instead of one after another. Either way each model file
    is written atomically, so a rerun skips what finished.
    """
    from orchestrator import train as rt

    torch.set_num_threads(config["threads"])
    cfg = config["cfg"]
    run = RunDir.from_dict(config["run"])
    ddp = cfg.ddp or rt.world_size() == 1
    combos = config["combos"] if ddp else config["combos"][rt.rank()::rt.world_size()]
    if not combos:
        return
    norms = config.get("norms")  # streamed path: the normaliser per split, fit by the driver's streaming pass

    def split_data(split: str):
        if norms is None:
            return load_split(run, split)
        return attach_streams(load_split(run, split, norm_state=norms[split]))

    if config.get("train_many") is not None:
        data = {split: split_data(split) for split in dict.fromkeys(s for s, _ in combos)}
        units = [_Unit(config, split, seed, ddp) for split, seed in combos]
        t0 = time.perf_counter()
        results = config["train_many"](run, [(data[u.split], u.seed) for u in units], cfg, [u.hooks for u in units])
        share = (time.perf_counter() - t0) / len(units)  # the batch's wall time, split evenly over its models
        for u, (state, extra) in zip(units, results):
            u.finish(run, data[u.split], state, {**extra, "seconds": share})
        return
    data = {}
    for split, seed in combos:
        if split not in data:
            data = {split: split_data(split)}  # one split in memory at a time
        unit = _Unit(config, split, seed, ddp)
        t0 = time.perf_counter()
        state, extra = config["train_one"](run, data[split], seed, cfg, unit.hooks)
        unit.finish(run, data[split], state, {**extra, "seconds": time.perf_counter() - t0})


class _Unit:
    """One (split, seed) model inside `_loop`: its hooks (metrics, curves, progress) and how it is saved."""

    def __init__(self, config: dict, split: str, seed: int, ddp: bool):
        from orchestrator import train as rt

        self.config, self.split, self.seed, self.ddp, self.rt = config, split, seed, ddp, rt
        self.tag = {"split": split, "seed": seed}
        self.metrics: dict = {}  # the latest value of every metric: the model's summary
        self.series: dict[str, list] = {}  # every logged value, [step, value] per metric: the model's training curves
        self.name = f"{split}-seed{seed}"
        self.part = {"keys": None, "done": 0, "last": 0}  # the model part (prefix) being trained, and the steps before it
        self.total = config.get("model_steps") or 0  # optimiser steps of one model, all its parts (0: unknown)
        self.hooks = Hooks(wrap=rt.prepare if ddp else (lambda m: m), part=rt.shard if ddp else (lambda n: slice(0, n)),
                           log=self.log, log_every=config["log_every"])

    def log(self, step: int, m: dict) -> None:
        rt, ddp, part = self.rt, self.ddp, self.part
        now = {k: (rt.all_mean(v) if ddp else float(torch.as_tensor(v).detach())) for k, v in m.items()}
        self.metrics.update(now)
        for k, v in now.items():
            self.series.setdefault(k, []).append([step, v])
        if ddp:  # report() is collective; without DDP workers run different models at different times
            rt.report({"step": step, **self.tag, **now})
        if set(m) != part["keys"] or step < part["last"]:  # the next part of the model (e.g. HNet, then HVAE)
            part["done"] += part["last"]
            part["keys"] = set(m)
        part["last"] = step
        if rt.rank() == 0 or not ddp:
            loss = next((v for k, v in now.items() if k.endswith("loss")), None)
            done = part["done"] + step
            rt.progress(self.name, min(done, self.total - 1) if self.total else done, self.total or done, loss=loss)

    def finish(self, run: RunDir, data, state: dict, extra: dict) -> None:
        """Save the trained model (and, under DDP, checkpoint it with Ray Train)."""
        rt, ddp, config = self.rt, self.ddp, self.config
        summary = {**self.tag, **self.metrics, **extra}
        if data.streamed:  # the most experts one streamed batch brought into this worker
            summary["streamed_peak_rows"] = max(s.peak_rows for s in data.experts.values())
        sidecar = {"kind": config["kind"], **self.tag, "stage_config": config_values(config["cfg"]),
                   "val_fraction": config.get("val_fraction", 0.0), "train_tasks": len(data.train_ids),
                   "metrics": summary, "series": self.series}
        if rt.rank() == 0 or not ddp:
            save_model(run.model(config["kind"], self.split, self.seed), state, sidecar)
        if ddp:  # a Ray Train checkpoint per model, with its config
            rt.report({"step": 0, **summary}, state=state, config=sidecar)
        if (rt.rank() == 0 or not ddp) and self.total:
            rt.progress(self.name, self.total, self.total)  # the model is saved: all its steps count


def train_stage(kind: str, train_one: Callable, cfg, ctx: RunContext, only: list[tuple[str, int]] | None = None,
                train_many: Callable | None = None) -> dict:
    """Train `kind` for every (split, seed) of the plan (or `only` these) not up to date; returns {combo: summary metrics}.

    `train_many(run, [(data, seed), ...], cfg, [hooks, ...]) -> [(state, metrics), ...]`, when the stage has
    one and its config asks for it (`batched`, without `ddp`), trains each worker's models at once.
    """
    run = ctx.run
    splits, seeds = read_plan(run)
    val_fraction = read_val_fraction(run)
    store_spec(run)  # fail here, with the fix in the message, not inside a Ray Train worker
    combos = [(s, k) for s in splits for k in seeds if only is None or (s, k) in only]
    todo = [c for c in combos if not up_to_date(run.model(kind, *c), cfg, val_fraction)]
    if len(todo) < len(combos):
        ctx.log(f"{kind}: {len(combos) - len(todo)} of {len(combos)} models up to date, {len(todo)} to train")
    if todo:
        from orchestrator.train import launch, on_warm_group

        cpus = int(ctx.ray.cpus) if ctx.ray is not None else 1
        workers = cfg.num_workers if cfg.ddp else min(cfg.num_workers, len(todo))
        threads = max(1, cpus // workers)
        many = train_many if batched(cfg) else None
        how = "sharing each model (DDP)" if cfg.ddp else "each training its own models" + (" at once" if many else "")
        steps = model_steps(kind, cfg)
        datasets, norms = {}, None
        if resolve_data_path(run, cfg) == "stream":
            ctx.log(f"{kind}: streaming the weight store through Ray Data (data_path={cfg.data_path})")
            datasets, norms = stream_inputs(run, sorted({s for s, _ in todo}), val_fraction, log=ctx.log)
        group = "warm" if on_warm_group(run, workers, threads, datasets) else "Ray Train"
        ctx.log(f"{kind}: training {len(todo)} model(s) on {workers} {group} worker(s) x {threads} thread(s), {how}")
        result = launch(
            _loop,
            {"train_one": train_one, "train_many": many, "kind": kind, "cfg": cfg, "run": run.to_dict(),
             "combos": todo, "threads": threads, "log_every": cfg.log_every, "val_fraction": val_fraction,
             "model_steps": steps, "norms": norms},
            name=kind, run_dir=run, num_workers=workers, cpus_per_worker=threads,
            # the progress display belongs to a pipeline's driver (ctx.ray set), not to a sweep trial's worker
            stage=kind, progress_total=(steps * len(todo) or None) if ctx.ray is not None else None,
            show_progress=ctx.progress, log=ctx.log, datasets=datasets,
        )
        ctx.timings[f"{kind}_ray_train_s"] = result.wall_s
        ctx.timings[f"{kind}_loop_s"] = result.loop_s  # inside the workers' loop; the rest of the launch is overhead
    out = {}
    for split, seed in combos:
        side = run.model(kind, split, seed).with_suffix(".json")
        out[f"{split}-seed{seed}"] = json.loads(side.read_text())["metrics"]
    return out


ROUTES = 2  # HyperCLIP and HyperLDM train one model per route: HNet and HVAE


def batched(cfg) -> bool:
    """True when a stage config asks for its models to be trained as one batched program (never under DDP)."""
    return bool(getattr(cfg, "batched", False)) and not cfg.ddp


def model_steps(kind: str, cfg) -> int:
    """Optimiser steps of one (split, seed) model of `kind`, all its parts: the unit of the stage's progress bar
    (0 when unknown: the bar then counts steps without an ETA). Batched, a model's routes train side by side."""
    parts = {
        "generators": lambda c: c.hnet_steps + c.hvae_steps,
        "hyperclip": lambda c: ROUTES * c.steps,
        "hyperldm": lambda c: (1 if batched(c) else ROUTES) * c.steps,
        "baselines": lambda c: 2 * c.steps + c.maml_steps,  # multitask, text-conditioned HNet, MAML
    }
    try:
        return int(parts[kind](cfg))
    except (KeyError, AttributeError, TypeError):
        return 0


def stage_series(run: RunDir, kind: str, combos) -> dict[str, list]:
    """The training curves of `kind`'s models, read from their sidecars: {`random-seed0/hnet_loss`: [[step, value], ...]}.
    The workers that trained them wrote them there, so they reach the driver in every execution mode."""
    out = {}
    for combo in combos:
        split, seed = combo.rsplit("-seed", 1)
        side = json.loads(run.model(kind, split, int(seed)).with_suffix(".json").read_text())
        out.update({f"{combo}/{k}": pts for k, pts in (side.get("series") or {}).items()})
    return out


def stage_metrics(summaries: dict, curves: dict | None = None) -> dict[str, float]:
    """Flatten {combo: metrics} to MLflow metric names like `random-seed0/loss`; names that are `curves` are left
    to them (their last point is the final value)."""
    return {f"{combo}/{k}": v for combo, m in summaries.items() for k, v in m.items()
            if isinstance(v, (int, float)) and f"{combo}/{k}" not in (curves or {})}
