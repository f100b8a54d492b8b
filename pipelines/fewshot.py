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

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.core.cli import ConfigError, RunContext, check_choice, check_range

METHODS = ("maml", "fomaml", "hypermaml", "hypertransformer", "metadiff")  # models.fewshot.training.METHODS
SPLITS = ("random", "compositional", "given")


@dataclass(frozen=True)
class FewShotConfig:
    """Which few-shot methods to meta-train, how, and how many meta-test episodes score them."""

    methods: tuple[str, ...] = METHODS  # methods to run, in table order
    splits: tuple[str, ...] = ("random", "compositional")  # task splits (given: the features' own split)
    shots: tuple[int, ...] = (1, 5)  # K: support examples per candidate answer
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds (init, episode draws)
    train_steps: int = 150  # meta-training steps of MAML and FOMAML
    metadiff_train_steps: int = 400  # meta-training steps of MetaDiff (at 150 its accuracy swung 0.65-0.84 between seeds)
    tasks_per_batch: int = 16  # episodes per meta-training step of MAML, FOMAML and MetaDiff
    hyper_train_steps: int = 300  # meta-training steps of HyperMAML and HyperTransformer (600 measured no better)
    hyper_tasks_per_batch: int = 8  # episodes per meta-training step of HyperMAML and HyperTransformer
    queries: int = 32  # query examples per episode (train and eval)
    lr: float = 1e-3  # Adam learning rate of MAML's, FOMAML's and MetaDiff's meta-parameters
    hypermaml_lr: float = 1e-3  # Adam learning rate of HyperMAML
    ht_lr: float = 1e-3  # Adam learning rate of HyperTransformer
    mixed_shots: bool = True  # one model per seed trained on all K in turn (False: one per seed and K, as the papers)
    inner_steps: int = 5  # MAML/FOMAML inner steps; MetaDiff's DDIM steps (same inner-loop length)
    inner_lr: float = 0.5  # MAML/FOMAML inner learning rate
    hypermaml_warmup_steps: int = 5  # HyperMAML's MAML warm-up steps (paper: 5)
    hypermaml_warmup_lr: float = 0.01  # HyperMAML's warm-up learning rate (paper: 0.01)
    hypermaml_warmup_fraction: float = 0.2  # share of training over which the warm-up blends into the hypernetwork
    ht_layers: str = "last"  # HyperTransformer generates the last layer (fc2) or all layers
    ht_init_gain: float = 0.3  # HyperTransformer's initial gain of its transformer-made class rows
    rotate_views: bool = True  # HyperMAML/HyperTransformer see h in a random basis per training episode (False: overfit the meta-train concepts)
    metadiff_width: int = 128  # MetaDiff denoiser width
    pretrain_steps: int = 1000  # multitask pretraining of the frozen extractor fc1 (MetaDiff, HyperMAML, HyperTransformer)
    metadiff_target_steps: int = 100  # fine-tuning steps of each meta-train task's target fc2
    hidden: int = 32  # task network hidden width
    logit_scale: float = 10.0  # fixed scale of the cosine logits
    eval_episodes: int = 600  # meta-test episodes per (method, K, seed)
    eval_batch: int = 200  # episodes evaluated at once
    finetune_steps: int = 10  # fine-tuning baselines: gradient steps on the support set
    finetune_lr: float = 0.1  # fine-tuning baselines: their learning rate
    ldm_steps: int = 20  # HyperLDM rows: DDIM steps
    ldm_support_scale: float = 1.0  # HyperLDM rows: support-loss guidance scale, in units of the noise (untuned)
    num_workers: int = 2  # Ray Train workers (1 CPU, 1 thread each), each training its own share of the units
    seed: int = 0  # seeds the evaluation episodes

    def __post_init__(self):
        if not self.methods:
            raise ConfigError("methods is empty; choose from " + ", ".join(METHODS))
        for m in self.methods:
            check_choice("methods", m, METHODS)
        if not self.splits:
            raise ConfigError("splits is empty; choose from " + ", ".join(SPLITS))
        for sp in self.splits:
            check_choice("splits", sp, SPLITS)
        if not self.shots or not self.seeds:
            raise ConfigError("shots and seeds must each list at least one value")
        for k in self.shots:
            check_range("shots", k, 1, 100)
        check_choice("ht_layers", self.ht_layers, ("last", "all"))
        check_range("train_steps", self.train_steps, 1)
        check_range("metadiff_train_steps", self.metadiff_train_steps, 1)
        check_range("tasks_per_batch", self.tasks_per_batch, 1)
        check_range("hyper_train_steps", self.hyper_train_steps, 1)
        check_range("hyper_tasks_per_batch", self.hyper_tasks_per_batch, 1)
        check_range("queries", self.queries, 1)
        for name in ("lr", "hypermaml_lr", "ht_lr"):
            check_range(name, getattr(self, name), 1e-7, 1.0)
        check_range("ht_init_gain", self.ht_init_gain, 0.0, 100.0)
        check_range("inner_steps", self.inner_steps, 1, 1000)
        check_range("inner_lr", self.inner_lr, 1e-6, 100.0)
        check_range("hypermaml_warmup_steps", self.hypermaml_warmup_steps, 0)
        check_range("hypermaml_warmup_fraction", self.hypermaml_warmup_fraction, 0.0, 1.0)
        check_range("metadiff_width", self.metadiff_width, 8)
        check_range("pretrain_steps", self.pretrain_steps, 0)
        check_range("metadiff_target_steps", self.metadiff_target_steps, 1)
        check_range("hidden", self.hidden, 1)
        check_range("eval_episodes", self.eval_episodes, 2)
        check_range("eval_batch", self.eval_batch, 1)
        check_range("num_workers", self.num_workers, 1)
        check_range("finetune_steps", self.finetune_steps, 0)
        check_range("finetune_lr", self.finetune_lr, 1e-6, 100.0)
        check_range("ldm_steps", self.ldm_steps, 1, 1000)
        check_range("ldm_support_scale", self.ldm_support_scale, 0.0, 100.0)

    def schedule(self, method: str) -> tuple[int, int, float]:
        """(train steps, episodes per step, Adam learning rate) of `method`."""
        if method == "hypermaml":
            return self.hyper_train_steps, self.hyper_tasks_per_batch, self.hypermaml_lr
        if method == "hypertransformer":
            return self.hyper_train_steps, self.hyper_tasks_per_batch, self.ht_lr
        if method == "metadiff":
            return self.metadiff_train_steps, self.tasks_per_batch, self.lr
        return self.train_steps, self.tasks_per_batch, self.lr


CONFIG = FewShotConfig
NEEDS_RAY = True
PRESETS = {
    "smoke": dict(methods=METHODS, splits=("given",), seeds=(0,), train_steps=30, tasks_per_batch=4, hyper_train_steps=30, metadiff_train_steps=30,
                  hyper_tasks_per_batch=4, eval_episodes=20, queries=8, pretrain_steps=20,
                  metadiff_target_steps=10, metadiff_width=32),
    "default": dict(),
}


@dataclass
class FewShotResult:
    """The stage's output: one row per (split, method, K, seed) plus chance, and where they were written."""

    table: object  # pandas DataFrame with RESULT_COLUMNS
    paths: list[Path]
    timings: dict  # seconds: the launch (worker-group start included), each method's train + eval summed over splits and seeds, fine-tuning


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
    cfg = FewShotConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()
                           if k in FewShotConfig.__dataclass_fields__})
    feats = SuiteFeatures.load(Path(config["features_dir"]))
    img = torch.as_tensor(feats.image_feats)
    spec = TaskNetSpec(feats.d_img, cfg.hidden, feats.d_txt, cfg.logit_scale)
    hp = T.MethodParams.from_dict(config)
    shots = list(cfg.shots)
    state, _ = train.restore()
    restored = dict(state or {})
    units = [(sp, m, s, shots) for sp in cfg.splits for m in cfg.methods for s in cfg.seeds] if cfg.mixed_shots else \
        [(sp, m, s, [k]) for sp in cfg.splits for m in cfg.methods for s in cfg.seeds for k in shots]
    todo = [u for u in units if not all(f"acc.{u[0]}.{u[1]}.s{u[2]}.k{k}" in restored for k in u[3])]
    if train.rank() == 0:  # units finished in an earlier launch count as done on the driver's bar
        for u in units:
            if u not in todo:
                train.progress(unit_name(u), cfg.schedule(u[1])[0], cfg.schedule(u[1])[0])
    if not todo:
        return
    costs = [STEP_COST[m] * cfg.schedule(m)[0] * cfg.schedule(m)[1] for _, m, _, _ in todo]
    mine = assign(todo, costs, train.world_size())[train.rank()]
    pools = {sp: split_pools(feats, sp) for sp in dict.fromkeys(u[0] for u in mine)}
    episodes = {(sp, k): T.eval_episodes(p["meta_test"], k, cfg.eval_episodes, cfg.queries, cfg.seed)
                for sp, p in pools.items() for k in shots}
    # train.report is a collective with several workers, and the workers' shares differ: each worker
    # keeps its metrics and results here until the end, when all of them are gathered and reported.
    out, log = {}, []
    for split, method, seed, ks in mine:
        train_pool, test_pool = pools[split]["meta_train"], pools[split]["meta_test"]
        steps, per_step, lr = cfg.schedule(method)
        t0 = time.perf_counter()
        model = T.build(method, spec, hp, seed)
        T.prepare(model, train_pool, img, hp, seed)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        rng = np.random.default_rng([seed, *ks])
        for step in range(steps):
            T.set_progress(model, step, steps, hp)
            k = ks[step % len(ks)]  # mixed shots: K alternates from step to step
            loss = T.train_step(model, opt, train_pool.batch(per_step, k, cfg.queries, rng, img))
            train.progress(unit_name((split, method, seed, ks)), step + 1, steps, loss=loss)
            if step % 100 == 0 or step == steps - 1:
                log.append({"kind": "train", "split": split, "method": method, "seed": seed, "shots": k, "step": step, "loss": loss})
        T.set_progress(model, steps, steps, hp)  # evaluate the finished schedule (HyperMAML: β = 1)
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


def config_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


# Fields that change neither training nor evaluation of the few-shot methods: a change keeps the checkpoint.
RESUME_NEUTRAL = ("methods", "splits", "finetune_steps", "finetune_lr", "ldm_steps", "ldm_support_scale")


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
    base = {**dataclasses.asdict(cfg), "features_dir": str(feats_dir), "features_hash": feats.info.get("config_hash")}
    # A changed config never resumes another's results; which methods and splits are listed does not
    # matter (results are keyed by split and method, so dropping or adding one reuses the others').
    name = f"fewshot-{config_hash({k: v for k, v in base.items() if k not in RESUME_NEUTRAL})}"
    ctx.log(f"fewshot: {list(cfg.methods)} x splits {list(cfg.splits)} x {len(cfg.seeds)} seeds x K={list(cfg.shots)} "
            f"on {cfg.num_workers} workers -> Ray Train run {name}")
    n_units = len(cfg.splits) * len(cfg.seeds) * (1 if cfg.mixed_shots else len(cfg.shots))
    total_steps = n_units * sum(cfg.schedule(m)[0] for m in cfg.methods)
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
                    ctx.log(f"  {label} {method} K={k} seed {seed}: {mean:.3f} ± {ci:.3f}")
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
    table = pd.DataFrame([{"suite": suite, **r} for r in rows], columns=RESULT_COLUMNS).astype({"seed": "Int64"})
    return FewShotResult(table, write_results(table, ctx.run.results, cfg), timings)


def track(out: FewShotResult, ctx: RunContext):
    """Mean accuracy (and mean CI) over seeds per split, method and K, times; the three result files."""
    from pipelines.episodic.report import summary

    m = {}
    for r in summary(out.table).itertuples():
        m[f"{r.split}_{r.method}_{r.shots}shot_acc"] = float(r.mean)
        m[f"{r.split}_{r.method}_{r.shots}shot_ci95"] = float(r.ci95)
    for what, s in out.timings.items():
        m[f"{what}_s"] = s
    return m, out.paths


def main() -> int:
    from pipelines.core.runner import run_stages

    return run_stages("fewshot", __doc__)


if __name__ == "__main__":
    from pipelines.core.cli import guarded

    guarded(main)()
