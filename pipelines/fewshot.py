"""Stage `fewshot`: MAML, FOMAML, HyperMAML, HyperTransformer and MetaDiff on K-shot meta-test episodes.

    python -m pipelines.fewshot --preset default --run-dir runs/dev

Reads `<run_dir>/features`. Every (method, training seed) is one unit: a model meta-trained on
meta-train episodes (K shots per candidate answer, `queries` queries; every K in turn unless
`mixed_shots`) and evaluated on `eval_episodes` seeded meta-test episodes per K, the same episodes
for every method and seed. One Ray Train launch runs all units: its `num_workers` single-threaded
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

from pipelines.cli import ConfigError, RunContext, check_choice, check_range

METHODS = ("maml", "fomaml", "hypermaml", "hypertransformer", "metadiff")  # models.fewshot.training.METHODS


@dataclass(frozen=True)
class FewShotConfig:
    """Which few-shot methods to meta-train, how, and how many meta-test episodes score them."""

    methods: tuple[str, ...] = METHODS  # methods to run, in table order
    shots: tuple[int, ...] = (1, 5)  # K: support examples per candidate answer
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds (init, episode draws)
    train_steps: int = 150  # meta-training steps of MAML, FOMAML and MetaDiff
    tasks_per_batch: int = 16  # episodes per meta-training step of MAML, FOMAML and MetaDiff
    hyper_train_steps: int = 600  # meta-training steps of HyperMAML and HyperTransformer (cheap steps, slow to learn)
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
    ht_init_gain: float = 1.0  # HyperTransformer's initial output gain (its generated residual's scale)
    metadiff_width: int = 128  # MetaDiff denoiser width
    metadiff_pretrain_steps: int = 300  # multitask pretraining of MetaDiff's frozen fc1
    metadiff_target_steps: int = 100  # fine-tuning steps of each meta-train task's target fc2
    hidden: int = 32  # task network hidden width
    logit_scale: float = 10.0  # fixed scale of the cosine logits
    eval_episodes: int = 600  # meta-test episodes per (method, K, seed)
    eval_batch: int = 200  # episodes evaluated at once
    num_workers: int = 2  # Ray Train workers (1 CPU, 1 thread each), each training its own share of the units
    seed: int = 0  # seeds the evaluation episodes

    def __post_init__(self):
        if not self.methods:
            raise ConfigError("methods is empty; choose from " + ", ".join(METHODS))
        for m in self.methods:
            check_choice("methods", m, METHODS)
        if not self.shots or not self.seeds:
            raise ConfigError("shots and seeds must each list at least one value")
        for k in self.shots:
            check_range("shots", k, 1, 100)
        check_choice("ht_layers", self.ht_layers, ("last", "all"))
        check_range("train_steps", self.train_steps, 1)
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
        check_range("metadiff_pretrain_steps", self.metadiff_pretrain_steps, 0)
        check_range("metadiff_target_steps", self.metadiff_target_steps, 1)
        check_range("hidden", self.hidden, 1)
        check_range("eval_episodes", self.eval_episodes, 2)
        check_range("eval_batch", self.eval_batch, 1)
        check_range("num_workers", self.num_workers, 1)

    def schedule(self, method: str) -> tuple[int, int, float]:
        """(train steps, episodes per step, Adam learning rate) of `method`."""
        if method == "hypermaml":
            return self.hyper_train_steps, self.hyper_tasks_per_batch, self.hypermaml_lr
        if method == "hypertransformer":
            return self.hyper_train_steps, self.hyper_tasks_per_batch, self.ht_lr
        return self.train_steps, self.tasks_per_batch, self.lr


CONFIG = FewShotConfig
NEEDS_RAY = True
PRESETS = {
    "smoke": dict(methods=METHODS, seeds=(0,), train_steps=30, tasks_per_batch=4, hyper_train_steps=30,
                  hyper_tasks_per_batch=4, eval_episodes=20, queries=8, metadiff_pretrain_steps=20,
                  metadiff_target_steps=10, metadiff_width=32),
    "default": dict(),
}


@dataclass
class FewShotResult:
    """The stage's output: one row per (method, K, seed) plus chance, and where they were written."""

    table: object  # pandas DataFrame with RESULT_COLUMNS
    paths: list[Path]
    timings: dict  # seconds: the launch (worker-group start included) and each method's train + eval summed over seeds


RESULT_COLUMNS = ["suite", "split", "method", "shots", "seed", "accuracy", "ci95", "episodes", "train_s", "eval_s"]


# ----------------------------------------------------------------------------- the Ray Train loop (workers)


# Rough seconds per (step x episode) on one thread, measured on this 2-core machine: only to balance
# the units over workers (longest first), never to decide anything else.
STEP_COST = {"maml": 6.0, "fomaml": 3.0, "hypermaml": 3.0, "hypertransformer": 2.5, "metadiff": 5.5}


def assign(units: list[tuple], costs: list[float], workers: int) -> list[list[tuple]]:
    """Longest-processing-time-first: each unit, costliest first, to the least-loaded worker."""
    load, out = [0.0] * workers, [[] for _ in range(workers)]
    for c, u in sorted(zip(costs, units), key=lambda cu: -cu[0]):
        w = load.index(min(load))
        load[w] += c
        out[w].append(u)
    return out


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
    from models.fewshot.episodes import TaskPool
    from models.task_net import TaskNetSpec
    from orchestrator import train
    from orchestrator.suite_features import SuiteFeatures

    torch.set_num_threads(1)  # tiny models: a second intra-op thread only adds synchronisation
    cfg = FewShotConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()
                           if k in FewShotConfig.__dataclass_fields__})
    feats = SuiteFeatures.load(Path(config["features_dir"]))
    img = torch.as_tensor(feats.image_feats)
    tasks = feats.tasks
    pools = {s: TaskPool.from_tasks(tasks[tasks["split"] == s].reset_index(drop=True), feats.text_feats)
             for s in ("meta_train", "meta_test")}
    spec = TaskNetSpec(feats.d_img, cfg.hidden, feats.d_txt, cfg.logit_scale)
    hp = T.MethodParams.from_dict(config)
    shots = list(cfg.shots)
    state, _ = train.restore()
    restored = dict(state or {})
    units = [(m, s, shots) for m in cfg.methods for s in cfg.seeds] if cfg.mixed_shots else \
        [(m, s, [k]) for m in cfg.methods for s in cfg.seeds for k in shots]
    todo = [u for u in units if not all(f"acc.{u[0]}.s{u[1]}.k{k}" in restored for k in u[2])]
    if not todo:
        return
    costs = [STEP_COST[m] * cfg.schedule(m)[0] * cfg.schedule(m)[1] for m, _, _ in todo]
    mine = assign(todo, costs, train.world_size())[train.rank()]
    episodes = {k: T.eval_episodes(pools["meta_test"], k, cfg.eval_episodes, cfg.queries, cfg.seed) for k in shots}
    # train.report is a collective with several workers, and the workers' shares differ: each worker
    # keeps its metrics and results here until the end, when all of them are gathered and reported.
    out, log = {}, []
    for method, seed, ks in mine:
        steps, per_step, lr = cfg.schedule(method)
        t0 = time.perf_counter()
        model = T.build(method, spec, hp, seed)
        T.prepare(model, pools["meta_train"], img, hp, seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        rng = np.random.default_rng([seed, *ks])
        for step in range(steps):
            T.set_progress(model, step, steps, hp)
            k = ks[step % len(ks)]  # mixed shots: K alternates from step to step
            loss = T.train_step(model, opt, pools["meta_train"].batch(per_step, k, cfg.queries, rng, img))
            if step % 100 == 0 or step == steps - 1:
                log.append({"kind": "train", "method": method, "seed": seed, "shots": k, "step": step, "loss": loss})
        T.set_progress(model, steps, steps, hp)  # evaluate the finished schedule (HyperMAML: β = 1)
        train_s = time.perf_counter() - t0
        for k in ks:
            t1 = time.perf_counter()
            acc = T.evaluate(model, episodes[k], pools["meta_test"], img, cfg.eval_batch, seed)
            key = f"{method}.s{seed}.k{k}"
            out[f"acc.{key}"] = torch.as_tensor(acc, dtype=torch.float64)
            # Timings travel in the checkpoint: a unit trained on another worker is missing from rank 0's metrics.
            out[f"time.{key}"] = torch.tensor([train_s, time.perf_counter() - t1], dtype=torch.float64)
            mean, ci = T.mean_ci95(acc)
            log.append({"kind": "eval", "method": method, "seed": seed, "shots": k, "accuracy": mean, "ci95": ci,
                          "train_s": train_s, "params": T.n_params(model)})
        out.update({f"model.{method}.s{seed}.{'-'.join(map(str, ks))}.{n}": v.detach().clone()
                    for n, v in model.state_dict().items()})
    for metrics in [m for part in gather(log) for m in part]:
        train.report(metrics)
    # One checkpoint at the end, on every worker at once: every finished unit's accuracies, times and model.
    merged = {k: v for part in gather(out) for k, v in part.items()}
    train.report({"kind": "done", "step": len(units)}, {**restored, **merged}, config)


# ----------------------------------------------------------------------------- driver


def config_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run(cfg: FewShotConfig, ctx: RunContext) -> FewShotResult:
    """Meta-train and evaluate every method; write the results table, Markdown and plot."""
    import pandas as pd

    from models.fewshot import training as T
    from models.fewshot.episodes import TaskPool
    from orchestrator import train
    from orchestrator.suite_features import SuiteFeatures

    feats_dir = (Path(ctx.run_dir) / "features").resolve()
    feats = SuiteFeatures.load(feats_dir)  # fails clearly (FeaturesError) before any Ray work
    suite = feats.info.get("suite", "unknown")
    split = feats.info.get("suite_info", {}).get("split_mode", "unknown")
    test_pool = TaskPool.from_tasks(feats.tasks[feats.tasks["split"] == "meta_test"].reset_index(drop=True), feats.text_feats)
    base = {**dataclasses.asdict(cfg), "features_dir": str(feats_dir), "features_hash": feats.info.get("config_hash")}
    # A changed config never resumes another's results; which methods are listed does not matter
    # (results are keyed by method, so dropping or adding one reuses the others').
    name = f"fewshot-{config_hash({k: v for k, v in base.items() if k != 'methods'})}"
    ctx.log(f"fewshot: {list(cfg.methods)} x {len(cfg.seeds)} seeds x K={list(cfg.shots)} on {cfg.num_workers} "
            f"workers -> Ray Train run {name}")
    res = train.launch(fewshot_loop, base, name=name, run_dir=ctx.run_dir, num_workers=cfg.num_workers)
    rows, timings = [], {"launch": res.wall_s}
    for method in cfg.methods:
        for seed in cfg.seeds:
            for k in cfg.shots:
                key = f"{method}.s{seed}.k{k}"
                acc = res.state[f"acc.{key}"].numpy()
                train_s, eval_s = res.state[f"time.{key}"].tolist()
                mean, ci = T.mean_ci95(acc)
                rows.append(dict(suite=suite, split=split, method=method, shots=k, seed=seed, accuracy=mean, ci95=ci,
                                 episodes=len(acc), train_s=train_s, eval_s=eval_s))
                ctx.log(f"  {method} K={k} seed {seed}: {mean:.3f} ± {ci:.3f}")
                # with mixed shots one training serves every K: count its time once
                timings[method] = timings.get(method, 0.0) + eval_s + (train_s if k == cfg.shots[0] or not cfg.mixed_shots else 0.0)
    for k in cfg.shots:
        mean, ci = T.mean_ci95(T.chance(T.eval_episodes(test_pool, k, cfg.eval_episodes, cfg.queries, cfg.seed), test_pool))
        rows.append(dict(suite=suite, split=split, method="chance", shots=k, seed=None, accuracy=mean, ci95=ci,
                         episodes=cfg.eval_episodes, train_s=None, eval_s=None))
    table = pd.DataFrame(rows, columns=RESULT_COLUMNS).astype({"seed": "Int64"})
    return FewShotResult(table, write_results(table, Path(ctx.run_dir) / "results", cfg), timings)


def summary(table):
    """Per (method, K): mean and std over seeds of the accuracy, mean per-seed CI, number of seeds."""
    g = table.groupby(["method", "shots"], sort=False)["accuracy"]
    out = g.agg(mean="mean", std="std", n="count").reset_index()
    out["ci95"] = table.groupby(["method", "shots"], sort=False)["ci95"].mean().values
    return out


def markdown(table, cfg: FewShotConfig) -> str:
    """The few-shot table: mean ± std over seeds per K, then each seed's accuracy ± 95% CI."""
    import pandas as pd

    s = summary(table)
    suite, split = table["suite"].iloc[0], table["split"].iloc[0]
    ks = list(cfg.shots)
    lines = [f"# Few-shot query accuracy: {suite}, {split} split", "",
             f"Meta-test episodes per (method, K, seed): {cfg.eval_episodes}, {cfg.queries} queries each; "
             f"meta-training steps x episodes: {cfg.hyper_train_steps} x {cfg.hyper_tasks_per_batch} for HyperMAML "
             f"(lr {cfg.hypermaml_lr:g}) and HyperTransformer (lr {cfg.ht_lr:g}), {cfg.train_steps} x {cfg.tasks_per_batch} "
             f"for the others (lr {cfg.lr:g})"
             f"{' (one model per seed for all K)' if cfg.mixed_shots else ''}; seeds {list(cfg.seeds)}. "
             "Mean ± std over seeds; per seed: mean ± 95% CI (1.96 std/sqrt(n)) over episodes.", "",
             "| method | " + " | ".join(f"{k}-shot" for k in ks) + " | " + " | ".join(f"{k}-shot per seed" for k in ks) + " |",
             "|---" * (1 + 2 * len(ks)) + "|"]
    for method in dict.fromkeys(table["method"]):
        cells, seeds = [], []
        for k in ks:
            r = s[(s["method"] == method) & (s["shots"] == k)].iloc[0]
            cells.append(f"{r['mean']:.3f} ± {r['std']:.3f}" if r["n"] > 1 else f"{r['mean']:.3f}")
            t = table[(table["method"] == method) & (table["shots"] == k)]
            seeds.append(", ".join(("" if pd.isna(x.seed) else f"s{x.seed}: ") + f"{x.accuracy:.3f} ± {x.ci95:.3f}"
                                   for x in t.itertuples()))
        lines.append(f"| {method} | " + " | ".join(cells) + " | " + " | ".join(seeds) + " |")
    return "\n".join(lines) + "\n"


def plot(table, path: Path, cfg: FewShotConfig) -> None:
    """Grouped bars: mean accuracy per method and K, error bars = std over seeds (chance: its CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    s = summary(table)
    methods = list(dict.fromkeys(table["method"]))
    fig, ax = plt.subplots(figsize=(1.4 * len(methods) + 2, 3.6))
    width = 0.8 / len(cfg.shots)
    for i, k in enumerate(cfg.shots):
        r = s[s["shots"] == k].set_index("method").loc[methods]
        err = np.where(r["n"] > 1, r["std"].fillna(0), r["ci95"])
        ax.bar(np.arange(len(methods)) + (i - (len(cfg.shots) - 1) / 2) * width, r["mean"], width, yerr=err,
               capsize=3, label=f"{k}-shot")
    ax.set_xticks(np.arange(len(methods)), methods, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("query accuracy")
    ax.set_title(f"few-shot, {table['suite'].iloc[0]} ({table['split'].iloc[0]} split)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write_results(table, folder: Path, cfg: FewShotConfig) -> list[Path]:
    """few_shot.csv, few_shot.md and few_shot.png, each written atomically."""
    from orchestrator.atomic import atomic_path, write_text

    paths = [folder / "few_shot.csv", folder / "few_shot.md", folder / "few_shot.png"]
    with atomic_path(paths[0]) as tmp:
        table.to_csv(tmp, index=False)
    write_text(paths[1], markdown(table, cfg))
    with atomic_path(paths[2]) as tmp:
        plot(table, tmp, cfg)
    return paths


def track(out: FewShotResult, ctx: RunContext):
    """Mean accuracy (and mean CI) over seeds per method and K, times; the three result files."""
    m = {}
    for r in summary(out.table).itertuples():
        m[f"{r.method}_{r.shots}shot_acc"] = float(r.mean)
        m[f"{r.method}_{r.shots}shot_ci95"] = float(r.ci95)
    for what, s in out.timings.items():
        m[f"{what}_s"] = s
    return m, out.paths


def main() -> int:
    from pipelines.runner import run_stages

    return run_stages("fewshot", __doc__)


if __name__ == "__main__":
    from pipelines.cli import guarded

    guarded(main)()
