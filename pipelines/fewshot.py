"""Stage `fewshot`: MAML, FOMAML, HyperMAML, HyperTransformer and MetaDiff on K-shot meta-test episodes.

    python -m pipelines.fewshot --preset default --run-dir runs/dev

Reads `<run_dir>/features`. Each method is meta-trained on meta-train episodes (K shots per candidate
answer, `queries` queries) through Ray Train, one launch per method whose loop runs every training
seed (and every K, unless `mixed_shots`), then evaluated on `eval_episodes` seeded meta-test
episodes per K: the same episodes for every method and seed. Writes
`<run_dir>/results/few_shot.{csv,md,png}`. Rerunning the same config resumes: (seed, K) results
already in a method's checkpoint are kept.
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
    train_steps: int = 150  # meta-training steps per model
    tasks_per_batch: int = 16  # episodes per meta-training step (split over workers)
    queries: int = 32  # query examples per episode (train and eval)
    lr: float = 1e-3  # Adam learning rate of every method's meta-parameters
    mixed_shots: bool = True  # one model per seed trained on all K in turn (False: one per seed and K, as the papers)
    inner_steps: int = 5  # MAML/FOMAML inner steps; MetaDiff's DDIM steps (same inner-loop length)
    inner_lr: float = 0.5  # MAML/FOMAML inner learning rate
    hypermaml_warmup_steps: int = 5  # HyperMAML's MAML warm-up steps (paper: 5)
    hypermaml_warmup_lr: float = 0.01  # HyperMAML's warm-up learning rate (paper: 0.01)
    hypermaml_warmup_fraction: float = 0.2  # share of training over which the warm-up blends into the hypernetwork
    ht_layers: str = "last"  # HyperTransformer generates the last layer (fc2) or all layers
    metadiff_width: int = 128  # MetaDiff denoiser width
    metadiff_pretrain_steps: int = 300  # multitask pretraining of MetaDiff's frozen fc1
    metadiff_target_steps: int = 100  # fine-tuning steps of each meta-train task's target fc2
    hidden: int = 32  # task network hidden width
    logit_scale: float = 10.0  # fixed scale of the cosine logits
    eval_episodes: int = 600  # meta-test episodes per (method, K, seed)
    eval_batch: int = 200  # episodes evaluated at once
    num_workers: int = 1  # Ray Train workers per method (DDP); 1 is fastest on a small machine
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
        check_range("queries", self.queries, 1)
        check_range("lr", self.lr, 1e-7, 1.0)
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
        if self.tasks_per_batch % self.num_workers:
            raise ConfigError(f"tasks_per_batch={self.tasks_per_batch} must split evenly over num_workers={self.num_workers}")


CONFIG = FewShotConfig
NEEDS_RAY = True
PRESETS = {
    "smoke": dict(methods=METHODS, seeds=(0,), train_steps=30, tasks_per_batch=4, eval_episodes=20, queries=8,
                  metadiff_pretrain_steps=20, metadiff_target_steps=10, metadiff_width=32),
    "default": dict(),
}


@dataclass
class FewShotResult:
    """The stage's output: one row per (method, K, seed) plus chance, and where they were written."""

    table: object  # pandas DataFrame with RESULT_COLUMNS
    paths: list[Path]
    timings: dict  # seconds per method launch (worker-group start included)


RESULT_COLUMNS = ["suite", "split", "method", "shots", "seed", "accuracy", "ci95", "episodes", "train_s", "eval_s"]


# ----------------------------------------------------------------------------- the Ray Train loop (workers)


def fewshot_loop(config: dict) -> None:
    """train_loop_per_worker for one method: restore finished (seed, K), then train and evaluate the rest."""
    import numpy as np
    import torch

    from models.fewshot import training as T
    from models.fewshot.episodes import TaskPool
    from models.task_net import TaskNetSpec
    from orchestrator import train
    from orchestrator.suite_features import SuiteFeatures

    torch.set_num_threads(1)  # tiny models: a second intra-op thread only adds synchronisation
    feats = SuiteFeatures.load(Path(config["features_dir"]))
    img = torch.as_tensor(feats.image_feats)
    tasks = feats.tasks
    pools = {s: TaskPool.from_tasks(tasks[tasks["split"] == s].reset_index(drop=True), feats.text_feats)
             for s in ("meta_train", "meta_test")}
    spec = TaskNetSpec(feats.d_img, config["hidden"], feats.d_txt, config["logit_scale"])
    hp = T.MethodParams.from_dict(config)
    method, steps, shots = config["method"], config["train_steps"], list(config["shots"])
    state, _ = train.restore()
    results = {k: v for k, v in (state or {}).items() if k.startswith("acc.")}
    units = [(s, shots) for s in config["seeds"]] if config["mixed_shots"] else \
        [(s, [k]) for s in config["seeds"] for k in shots]
    episodes = {k: T.eval_episodes(pools["meta_test"], k, config["eval_episodes"], config["queries"], config["seed"])
                for k in shots}
    per_worker = config["tasks_per_batch"] // train.world_size()
    for seed, ks in units:
        if all(f"acc.s{seed}.k{k}" in results for k in ks):
            continue
        t0 = time.perf_counter()
        model = T.build(method, spec, hp, seed)
        T.prepare(model, pools["meta_train"], img, hp, seed)
        opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
        net = train.prepare(model)
        rng = np.random.default_rng([seed, train.rank(), *ks])
        for step in range(steps):
            T.set_progress(model, step, steps, hp)
            k = ks[step % len(ks)]  # mixed shots: K alternates from step to step
            loss = T.train_step(net, opt, pools["meta_train"].batch(per_worker, k, config["queries"], rng, img))
            if step % 25 == 0 or step == steps - 1:
                train.report({"kind": "train", "seed": seed, "shots": k, "step": step, "loss": train.all_mean(loss)})
        T.set_progress(model, steps, steps, hp)  # evaluate the finished schedule (HyperMAML: β = 1)
        train_s = time.perf_counter() - t0
        for k in ks:
            t1 = time.perf_counter()
            acc = T.evaluate(train.unwrap(net), episodes[k], pools["meta_test"], img, config["eval_batch"], seed)
            results[f"acc.s{seed}.k{k}"] = torch.as_tensor(acc, dtype=torch.float64)
            mean, ci = T.mean_ci95(acc)
            metrics = {"kind": "eval", "seed": seed, "shots": k, "accuracy": mean, "ci95": ci,
                       "train_s": train_s, "eval_s": time.perf_counter() - t1, "params": T.n_params(model)}
            last = k == ks[-1]
            # A checkpoint after each unit: every finished accuracy vector plus this unit's model.
            ckpt = {**results, **{f"model.{n}": v for n, v in train.unwrap(net).state_dict().items()}} if last else None
            train.report(metrics, ckpt, config)


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
    rows, timings = [], {}
    for method in cfg.methods:
        conf = {**base, "method": method}
        # A changed config never resumes another's results; the other methods listed do not matter.
        name = f"fewshot-{method}-{config_hash({k: v for k, v in conf.items() if k != 'methods'})}"
        ctx.log(f"fewshot: {method} ({len(cfg.seeds)} seeds x K={list(cfg.shots)}) -> Ray Train run {name}")
        res = train.launch(fewshot_loop, conf, name=name, run_dir=ctx.run_dir, num_workers=cfg.num_workers)
        timings[method] = res.wall_s
        evals = {(m["seed"], m["shots"]): m for m in res.metrics if m.get("kind") == "eval"}
        for seed in cfg.seeds:
            for k in cfg.shots:
                acc = res.state[f"acc.s{seed}.k{k}"].numpy()
                mean, ci = T.mean_ci95(acc)
                m = evals.get((seed, k), {})  # absent when restored from an earlier launch
                rows.append(dict(suite=suite, split=split, method=method, shots=k, seed=seed, accuracy=mean, ci95=ci,
                                 episodes=len(acc), train_s=m.get("train_s"), eval_s=m.get("eval_s")))
                ctx.log(f"  {method} K={k} seed {seed}: {mean:.3f} ± {ci:.3f}")
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
             f"{cfg.train_steps} meta-training steps of {cfg.tasks_per_batch} episodes"
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
    """Mean accuracy (and mean CI) over seeds per method and K, launch times; the three result files."""
    m = {}
    for r in summary(out.table).itertuples():
        m[f"{r.method}_{r.shots}shot_acc"] = float(r.mean)
        m[f"{r.method}_{r.shots}shot_ci95"] = float(r.ci95)
    for method, s in out.timings.items():
        m[f"{method}_launch_s"] = s
    return m, out.paths


def main() -> int:
    from pipelines.runner import run_stages

    return run_stages("fewshot", __doc__)


if __name__ == "__main__":
    from pipelines.cli import guarded

    guarded(main)()
