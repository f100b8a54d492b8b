"""Stage `fewshot`: MAML, FOMAML, HyperMAML, HyperTransformer and MetaDiff on K-shot meta-test episodes.

    python -m pipelines.fewshot --preset default --run-dir runs/dev

Reads `<run_dir>/features`. Each of `splits` (random, compositional: recomputed from the features
as the zero-shot stages do; given: the features' own) has its meta-train and meta-test tasks. Every
(split, method, training seed) is one unit: a model meta-trained on meta-train episodes (K shots per
candidate answer, `queries` queries; every K in turn unless `mixed_shots`) and evaluated on
`eval_episodes` seeded meta-test episodes per K, the same episodes for every method and seed. Where
the run has trained zero-shot baselines (pipelines.baselines), their weights fine-tuned on the same
support sets are scored too (pipelines.episodic.finetune). One Ray Train launch runs all units: its `num_workers` single-threaded
workers each train their own share of the units (longest first, to the least-loaded worker), which on
a small machine beats one worker with more threads; each worker keeps its own model, no DDP. Writes
`<run_dir>/results/few_shot.{csv,md,png}`. Rerunning the same config resumes: units already in the
run's checkpoint are kept.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from models.fewshot import METHODS
from pipelines.core.cli import RunContext
from pipelines.core.config import (
    Plan,
    Runtime,
    Seed,
    build,
    build_config,
    config_values,
    result_values,
    stage_config,
)
from pipelines.episodic.settings import (
    FinetuneSettings,
    HyperMamlSettings,
    HyperTransformerSettings,
    MamlSettings,
    MetaDiffSettings,
)

SPLITS = ("random", "compositional", "given")


@stage_config("fewshot")
class FewShotConfig:
    """Which few-shot methods to meta-train, how, and how many meta-test episodes score them.

    The task network is the run's own (the farm's, see `task_net`)."""

    methods: Annotated[tuple[Literal[METHODS], ...], Plan, Field(min_length=1)] = METHODS
    """methods to run, in table order"""
    splits: Annotated[tuple[Literal[SPLITS], ...], Plan, Field(min_length=1)] = ("random", "compositional")
    """task splits (given: the features' own split)"""
    shots: Annotated[tuple[Annotated[int, Field(ge=1, le=100)], ...], Field(min_length=1)] = (1, 5)
    """K: support examples per candidate answer"""
    seeds: Annotated[tuple[Seed, ...], Field(min_length=1)] = (0, 1, 2)
    """training seeds (init, episode draws)"""
    queries: Annotated[int, Field(ge=1)] = 32
    """query examples per episode (train and eval)"""
    mixed_shots: bool = True
    """one model per seed trained on all K in turn (false: one per seed and K, as the papers)"""
    pretrain_steps: Annotated[int, Field(ge=0)] = 1000
    """multitask pretraining of the frozen extractor fc1 that HyperMAML, HyperTransformer and MetaDiff share"""
    maml: MamlSettings = field(default_factory=MamlSettings)
    """MAML's settings, shared by FOMAML"""
    hypermaml: HyperMamlSettings = field(default_factory=HyperMamlSettings)
    """HyperMAML's settings"""
    hypertransformer: HyperTransformerSettings = field(default_factory=HyperTransformerSettings)
    """HyperTransformer's settings"""
    metadiff: MetaDiffSettings = field(default_factory=MetaDiffSettings)
    """MetaDiff's settings"""
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    """the fine-tuned zero-shot rows' settings"""
    eval_episodes: Annotated[int, Field(ge=2)] = 600
    """meta-test episodes per (method, K, seed)"""
    eval_batch: Annotated[int, Field(ge=1)] = 200
    """episodes evaluated at once"""
    num_workers: Annotated[int, Runtime, Field(ge=1)] = 2
    """Ray Train workers (1 CPU, 1 thread each), each training its own share of the units"""
    seed: Seed = 0
    """seeds the evaluation episodes"""

    def settings(self, method: str):
        """The settings of `method` (FOMAML uses MAML's)."""
        return getattr(self, "maml" if method == "fomaml" else method)


CONFIG = FewShotConfig
NEEDS_RAY = True
PRESETS = {
    "smoke": {"methods": METHODS, "splits": ("given",), "seeds": (0,), "eval_episodes": 20, "queries": 8, "pretrain_steps": 20,
              "maml": {"train_steps": 30, "tasks_per_batch": 4}, "hypermaml": {"train_steps": 30, "tasks_per_batch": 4},
              "hypertransformer": {"train_steps": 30, "tasks_per_batch": 4},
              "metadiff": {"train_steps": 30, "tasks_per_batch": 4, "target_steps": 10, "width": 32}},
    "default": {},
}


@dataclass
class FewShotResult:
    """The stage's output: one row per (split, method, K, seed) plus chance, and where they were written."""

    table: object  # pandas DataFrame with RESULT_COLUMNS
    paths: list[Path]
    timings: dict  # seconds: the launch (worker-group start included), each method's train + eval summed over splits and seeds, fine-tuning
    curves: dict = field(default_factory=dict)  # training losses: {`given-seed0/maml_loss`: [[step, loss], ...]}


CURVE_POINTS = 100  # training-loss points kept per trained unit (every step when it has fewer)


def loss_curves(history: list[dict], mixed_shots: bool) -> dict[str, list]:
    """The training-loss curves in a launch's reported history, one per trained unit (per K without mixed shots)."""
    out: dict[str, list] = {}
    for m in history:
        if m.get("kind") == "train":
            shots = "" if mixed_shots else f"_{m['shots']}shot"
            out.setdefault(f"{m['split']}-seed{m['seed']}/{m['method']}{shots}_loss", []).append([m["step"], m["loss"]])
    return out


RESULT_COLUMNS = ["suite", "split", "method", "shots", "seed", "accuracy", "ci95", "episodes", "train_s", "eval_s"]


def split_pools(feats, split: str) -> dict:
    """{meta_train, meta_test: TaskPool} of `split` (pipelines.zeroshot.data.split_assignment) and the meta-test task ids."""
    from models.fewshot.episodes import TaskPool
    from pipelines.zeroshot.data import split_assignment

    assign = split_assignment(feats, split)
    tasks = feats.tasks.assign(split=feats.tasks["id"].map(assign))
    parts = {s: tasks[tasks["split"] == s].reset_index(drop=True) for s in ("meta_train", "meta_test")}
    out = {s: TaskPool.from_tasks(t, feats.text_feats) for s, t in parts.items()}
    out["test_ids"] = list(parts["meta_test"]["id"])
    return out


def split_label(feats, split: str) -> str:
    """The split's name in the table: `given` is the features' own split mode."""
    return feats.info.get("suite_info", {}).get("split_mode", "given") if split == "given" else split


# ----------------------------------------------------------------------------- the Ray Train loop (workers)


# Rough seconds per (step x episode) on one thread, measured on this 2-core machine: only to balance
# the units over workers (longest first), never to decide anything else.
STEP_COST = {"maml": 4.0, "fomaml": 2.0, "hypermaml": 4.0, "hypertransformer": 3.0, "metadiff": 5.0}


def assign(units: list[tuple], costs: list[float], workers: int) -> list[list[tuple]]:
    """Longest-processing-time-first: each unit, costliest first, to the least-loaded worker."""
    load, out = [0.0] * workers, [[] for _ in range(workers)]
    for c, u in sorted(zip(costs, units), key=lambda cu: -cu[0]):
        w = load.index(min(load))
        load[w] += c
        out[w].append(u)
    return out


def unit_name(unit: tuple) -> str:
    """A unit's name on the progress bar and in the training metrics: split/method/seed[/K]."""
    split, method, seed, ks = unit
    return f"{split}/{method}/s{seed}" + ("" if len(ks) != 1 else f"/k{ks[0]}")


def gather(obj) -> list:
    """Every worker's `obj`, in rank order, on every worker ([obj] with one worker)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def fewshot_loop(config: dict) -> None:
    """train_loop_per_worker: restore finished units, train and evaluate this worker's share of the rest."""
    import numpy as np
    import torch

    from models.fewshot import training as T
    from models.task_net import TaskNetSpec
    from orchestrator import train
    from orchestrator.storage.suite_features import SuiteFeatures

    torch.set_num_threads(1)  # tiny models: a second intra-op thread only adds synchronisation
    cfg = build(FewShotConfig, config["config"])
    feats = SuiteFeatures.load(Path(config["features_dir"]))
    img = torch.as_tensor(feats.image_feats)
    spec = TaskNetSpec(**config["spec"])
    shots = list(cfg.shots)
    state, _ = train.restore()
    restored = dict(state or {})
    units = [(sp, m, s, shots) for sp in cfg.splits for m in cfg.methods for s in cfg.seeds] if cfg.mixed_shots else \
        [(sp, m, s, [k]) for sp in cfg.splits for m in cfg.methods for s in cfg.seeds for k in shots]
    todo = [u for u in units if not all(f"acc.{u[0]}.{u[1]}.s{u[2]}.k{k}" in restored for k in u[3])]
    if train.rank() == 0:  # units finished in an earlier launch count as done on the driver's bar
        for u in units:
            if u not in todo:
                train.progress(unit_name(u), cfg.settings(u[1]).train_steps, cfg.settings(u[1]).train_steps)
    if not todo:
        return
    costs = [STEP_COST[m] * cfg.settings(m).train_steps * cfg.settings(m).tasks_per_batch for _, m, _, _ in todo]
    mine = assign(todo, costs, train.world_size())[train.rank()]
    pools = {sp: split_pools(feats, sp) for sp in dict.fromkeys(u[0] for u in mine)}
    episodes = {(sp, k): T.eval_episodes(p["meta_test"], k, cfg.eval_episodes, cfg.queries, cfg.seed)
                for sp, p in pools.items() for k in shots}
    # train.report is a collective with several workers, and the workers' shares differ: each worker
    # keeps its metrics and results here until the end, when all of them are gathered and reported.
    out, log = {}, []
    for split, method, seed, ks in mine:
        train_pool, test_pool = pools[split]["meta_train"], pools[split]["meta_test"]
        s = cfg.settings(method)
        steps = s.train_steps
        t0 = time.perf_counter()
        model = T.build(method, spec, s, seed)
        T.prepare(model, train_pool, img, s, seed, cfg.pretrain_steps)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=s.lr)
        rng = np.random.default_rng([seed, *ks])
        for step in range(steps):
            T.set_progress(model, step, steps, s)
            k = ks[step % len(ks)]  # mixed shots: K alternates from step to step
            loss = T.train_step(model, opt, train_pool.batch(s.tasks_per_batch, k, cfg.queries, rng, img))
            train.progress(unit_name((split, method, seed, ks)), step + 1, steps, loss=loss)
            if step % max(1, steps // CURVE_POINTS) == 0 or step == steps - 1:
                log.append({"kind": "train", "split": split, "method": method, "seed": seed, "shots": k, "step": step, "loss": loss})
        T.set_progress(model, steps, steps, s)  # evaluate the finished schedule (HyperMAML: β = 1)
        train_s = time.perf_counter() - t0
        for k in ks:
            t1 = time.perf_counter()
            acc = T.evaluate(model, episodes[split, k], test_pool, img, cfg.eval_batch, seed)
            key = f"{split}.{method}.s{seed}.k{k}"
            out[f"acc.{key}"] = torch.as_tensor(acc, dtype=torch.float64)
            # Timings travel in the checkpoint: a unit trained on another worker is missing from rank 0's metrics.
            out[f"time.{key}"] = torch.tensor([train_s, time.perf_counter() - t1], dtype=torch.float64)
            mean, ci = T.mean_ci95(acc)
            log.append({"kind": "eval", "split": split, "method": method, "seed": seed, "shots": k, "accuracy": mean,
                        "ci95": ci, "train_s": train_s, "params": T.n_params(model)})
        out.update({f"model.{split}.{method}.s{seed}.{'-'.join(map(str, ks))}.{n}": v.detach().clone()
                    for n, v in model.state_dict().items()})
    for metrics in [m for part in gather(log) for m in part]:
        train.report(metrics)
    # One checkpoint at the end, on every worker at once: every finished unit's accuracies, times and model.
    merged = {k: v for part in gather(out) for k, v in part.items()}
    train.report({"kind": "done", "step": len(units)}, {**restored, **merged}, config)


# ----------------------------------------------------------------------------- driver


def config_hash(cfg: FewShotConfig, inputs: dict) -> str:
    """Identifies the checkpointed units' results: the config's result fields and the inputs (features, network).

    Left out: runtime fields; the plan fields (which methods and splits run: results are keyed by split
    and method, so dropping or adding one reuses the others'); the fine-tuned rows' settings (those
    rows are scored outside the checkpoint, every time)."""
    keep = {k: v for k, v in result_values(cfg, plan=False).items() if k != "finetune"}
    return hashlib.sha256(json.dumps({**keep, **inputs}, sort_keys=True, default=str).encode()).hexdigest()[:10]


def task_net(run, feats, preset: str = "default"):
    """The run's task network, so that few-shot methods adapt the same network its experts use: the one its
    farm trained (the store's manifest); before any farm ran there, the one the farm would train on these
    features with the preset's experts config."""
    from orchestrator.farm import task_net_spec
    from pipelines import experts
    from pipelines.zeroshot.data import ZeroShotError, store_spec

    try:
        return store_spec(run)
    except ZeroShotError:
        return task_net_spec(feats, build_config(experts.ExpertsConfig, experts.PRESETS, preset, []))


def run(cfg: FewShotConfig, ctx: RunContext) -> FewShotResult:
    """Meta-train and evaluate every method on every split; fine-tune the run's zero-shot models; write the results."""
    import pandas as pd

    from models.fewshot import training as T
    from orchestrator import train
    from orchestrator.storage.suite_features import SuiteFeatures
    from pipelines.episodic.finetune import finetune_rows
    from pipelines.episodic.report import write_results

    feats_dir = ctx.run.features
    feats = SuiteFeatures.load(feats_dir)  # fails clearly (FeaturesError) before any Ray work
    suite = feats.info.get("suite", "unknown")
    pools = {sp: split_pools(feats, sp) for sp in cfg.splits}  # fails clearly (ConfigError) for a split the suite lacks
    inputs = {"features_dir": str(feats_dir), "features_hash": feats.info.get("config_hash"), "spec": asdict(task_net(ctx.run, feats, ctx.preset))}
    base = {"config": config_values(cfg), **inputs}
    name = f"fewshot-{config_hash(cfg, inputs)}"  # a changed config never resumes another's results
    group = "warm" if train.on_warm_group(ctx.run.root, cfg.num_workers, 1.0) else "Ray Train"
    ctx.log(f"fewshot: {list(cfg.methods)} x splits {list(cfg.splits)} x {len(cfg.seeds)} seeds x K={list(cfg.shots)} "
            f"on {cfg.num_workers} {group} worker(s), run {name}")
    n_units = len(cfg.splits) * len(cfg.seeds) * (1 if cfg.mixed_shots else len(cfg.shots))
    total_steps = n_units * sum(cfg.settings(m).train_steps for m in cfg.methods)
    res = train.launch(fewshot_loop, base, name=name, run_dir=ctx.run.root, num_workers=cfg.num_workers,
                       stage="fewshot", progress_total=total_steps, show_progress=ctx.progress, log=ctx.log)
    rows, timings = [], {"launch": res.wall_s}
    for split in cfg.splits:
        label = split_label(feats, split)
        for method in cfg.methods:
            for seed in cfg.seeds:
                for k in cfg.shots:
                    key = f"{split}.{method}.s{seed}.k{k}"
                    acc = res.state[f"acc.{key}"].numpy()
                    train_s, eval_s = res.state[f"time.{key}"].tolist()
                    mean, ci = T.mean_ci95(acc)
                    rows.append(dict(split=label, method=method, shots=k, seed=seed, accuracy=mean, ci95=ci,
                                     episodes=len(acc), train_s=train_s, eval_s=eval_s))
                    ctx.log(f"  {label} {method} K={k} seed {seed}: {100 * mean:.1f} % ± {100 * ci:.1f} (95 % CI half-width)")
                    # with mixed shots one training serves every K: count its time once
                    timings[method] = timings.get(method, 0.0) + eval_s + (train_s if k == cfg.shots[0] or not cfg.mixed_shots else 0.0)
        test_pool = pools[split]["meta_test"]
        episodes = {k: T.eval_episodes(test_pool, k, cfg.eval_episodes, cfg.queries, cfg.seed) for k in cfg.shots}
        t0 = time.perf_counter()
        rows += finetune_rows(ctx.run, split, label, feats, pools[split]["test_ids"], test_pool, episodes, cfg, ctx.log)
        timings["finetune"] = timings.get("finetune", 0.0) + time.perf_counter() - t0
        for k in cfg.shots:
            mean, ci = T.mean_ci95(T.chance(episodes[k], test_pool))
            rows.append(dict(split=label, method="chance", shots=k, seed=None, accuracy=mean, ci95=ci,
                             episodes=cfg.eval_episodes, train_s=None, eval_s=None))
    ctx.timings["fewshot_loop_s"] = res.loop_s + timings.get("finetune", 0.0)  # the workers' loop and the fine-tuning
    table = pd.DataFrame([{"suite": suite, **r} for r in rows], columns=RESULT_COLUMNS).astype({"seed": "Int64"})
    return FewShotResult(table, write_results(table, ctx.run.results, cfg), timings, loss_curves(res.metrics, cfg.mixed_shots))


def track(out: FewShotResult, ctx: RunContext):
    """Training-loss curves; mean accuracy (and mean CI) over seeds per split, method and K, times; the three result files."""
    from pipelines.episodic.report import summary

    ctx.tracker.series(out.curves)
    m = {}
    for r in summary(out.table).itertuples():
        m[f"{r.split}_{r.method}_{r.shots}shot_acc"] = float(r.mean)
        m[f"{r.split}_{r.method}_{r.shots}shot_ci95"] = float(r.ci95)
    for what, s in out.timings.items():
        m[f"{what}_s"] = s
    return m, out.paths


def headline(metrics: dict) -> dict[str, float]:
    """For the pipeline's parent run: few-shot accuracy per split, method and K (`few_shot/given_maml_5shot_acc`)."""
    return {f"few_shot/{k}": v for k, v in metrics.items() if k.endswith("shot_acc")}


def main() -> int:
    from pipelines.core.runner import run_stages

    return run_stages("fewshot", __doc__)


if __name__ == "__main__":
    from pipelines.core.cli import guarded

    guarded(main)()
