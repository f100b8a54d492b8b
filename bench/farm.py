"""Benchmark the expert farm against a naive one-expert-at-a-time loop, side by side in one run.

    python bench/farm.py --tasks 1000            # speed-up, peak fraction, accuracies
    python bench/farm.py --scaling               # cost per expert and driver memory, 100..2000 tasks

Measures, on procedural tasks with the real encoders: the machine's matmul GFLOP/s (large square
fp32 matmul); the farm's executed matmul GFLOP/s through real Ray actors and its fraction of that
peak; experts/s of the farm and of a plain PyTorch loop (TaskNetwork + torch.optim.Adam, one expert
after another in this process, same steps, same shared init) on a sample of the same tasks; and both
methods' query accuracy on that sample. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    """Best-of-3 fp32 GFLOP/s of an n x n matmul: the machine's practical peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, reps * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


class MemorySampler:
    """Peak of this process's private (anonymous) memory and of its RSS, sampled every 50 ms.

    RSS alone also counts Ray object-store pages the driver touched while reading results; those
    belong to the store (bounded by its own size), so the private peak is the driver's own memory.
    """

    def __init__(self):
        import threading

        self.peak_anon = self.peak_rss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> tuple[float, float]:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        mb = lambda k: float(fields.get(k, "0 kB").split()[0]) / 1024
        return mb("RssAnon"), mb("VmRSS")

    def _run(self) -> None:
        while not self._stop.is_set():
            anon, rss = self.read()
            self.peak_anon, self.peak_rss = max(self.peak_anon, anon), max(self.peak_rss, rss)
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def build_features(n_tasks: int, work: Path, seed: int):
    """Procedural features for n_tasks through the real features stage (encoder cache shared across sizes)."""
    from pipelines import features
    from pipelines.core.cli import RunContext
    from pipelines.core.config import build_config

    cfg = build_config(features.FeaturesConfig, features.PRESETS, "default",
                       # Full 1,280-d image features (no projection): the workload the README's figures measure.
                       ["suite=procedural", f"n_tasks={n_tasks}", f"cache_dir={work / 'cache'}", "image_dims=0"], seed)
    return features.run(cfg, RunContext(run=work / f"n{n_tasks}-s{seed}", progress=False))


def naive_experts(feats, rows: list[int], cfg) -> tuple[float, list[float]]:
    """Train the given tasks one at a time with a textbook loop; returns (seconds, query accuracies)."""
    from models.task_net import TaskNetwork, WeightLayout, init_weights
    from orchestrator.farm import task_net_spec

    spec = task_net_spec(feats, cfg)
    w0 = WeightLayout(spec).unflatten(init_weights(spec, cfg.init_seed))
    x_all, t_all = torch.tensor(feats.image_feats), torch.tensor(feats.text_feats)
    accs = []
    t0 = time.perf_counter()
    for i in rows:
        r = feats.tasks.iloc[i]
        net = TaskNetwork(spec)
        net.load_state_dict({k: v.clone() for k, v in w0.items()})
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        prompts = t_all[torch.tensor(r.prompt_texts)]
        x, y = x_all[torch.tensor(r.support_images)], torch.tensor(r.support_labels)
        for _ in range(cfg.steps):
            loss = F.cross_entropy(net(x, prompts), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = net(x_all[torch.tensor(r.query_images)], prompts).argmax(-1)
            accs.append(float((pred == torch.tensor(r.query_labels)).float().mean()))
    return time.perf_counter() - t0, accs


def measure(n_tasks: int, naive_sample: int, work: Path, seed: int, threads: int, actors: int) -> dict:
    """One side-by-side measurement at n_tasks."""
    from orchestrator.cluster import connect, shutdown
    from orchestrator.farm import run_farm
    from orchestrator.storage.store import WeightStore
    from pipelines import experts
    from pipelines.core.config import build_config

    torch.set_num_threads(threads)
    feats = build_features(n_tasks, work, seed)
    per_actor = max(1, threads // actors)  # the farm gets the same cores as the naive loop
    cfg = build_config(experts.ExpertsConfig, experts.PRESETS, "default",
                       [f"num_actors={actors}", f"cpus_per_actor={per_actor}"], seed)
    peak = matmul_gflops()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store_dir = work / f"n{n_tasks}-s{seed}" / "store" / "weights"
    for f in store_dir.glob("*"):  # always train from scratch: this measures the farm, not the resume
        f.unlink()
    info = connect(num_cpus=threads)
    anon0, _ = MemorySampler.read()
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        summary = run_farm(feats, cfg, WeightStore(store_dir), progress=False, log=lambda m: None)
        farm_wall = time.perf_counter() - t0
    shutdown(info)
    driver_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    meta = WeightStore(store_dir).read_meta().set_index("task_id")
    rng = np.random.default_rng(seed)
    sample = sorted(rng.choice(len(feats.tasks), size=min(naive_sample, len(feats.tasks)), replace=False).tolist())
    naive_s, naive_acc = (naive_experts(feats, sample, cfg) if naive_sample else (float("nan"), []))
    farm_sample_acc = [float(meta.loc[feats.tasks["id"].iat[i], "query_acc"]) for i in sample]
    farm_rate = summary.experts_trained / farm_wall
    naive_rate = len(sample) / naive_s if naive_sample else float("nan")
    gflops = summary.flops / farm_wall / 1e9
    return dict(
        tasks=n_tasks, seed=seed, threads=threads, actors=actors, threads_per_actor=per_actor, steps=cfg.steps,
        machine_gflops=round(peak, 1), farm_gflops=round(gflops, 1), peak_fraction=round(gflops / peak, 3),
        farm_train_gflops=round(summary.flops / summary.train_seconds / 1e9, 1),
        farm_experts_per_s=round(farm_rate, 3), naive_experts_per_s=round(naive_rate, 3),
        speedup_vs_naive=round(farm_rate / naive_rate, 2) if naive_sample else None,
        farm_seconds=round(farm_wall, 2), farm_train_seconds=round(summary.train_seconds, 2),
        seconds_per_expert=round(farm_wall / summary.experts_trained, 4),
        train_seconds_per_expert=round(summary.train_seconds / summary.experts_trained, 4),
        expert_accuracy=round(float(meta["query_acc"].mean()), 4),
        naive_sample=len(sample) if naive_sample else 0,
        farm_accuracy_on_sample=round(float(np.mean(farm_sample_acc)), 4) if naive_sample else None,
        naive_accuracy=round(float(np.mean(naive_acc)), 4) if naive_sample else None,
        driver_peak_rss_mb_before_farm=round(rss0 / 1024, 1), driver_peak_rss_mb=round(driver_peak_mb, 1),
        driver_private_mb_before_farm=round(anon0, 1), driver_peak_private_mb=round(mem.peak_anon, 1),
        driver_peak_rss_mb_during_farm=round(mem.peak_rss, 1),
    )


def scaling(sizes: list[int], work: Path, seed: int, threads: int, actors: int) -> dict:
    """Each size in its own process, so each driver's peak memory is its own."""
    rows = []
    for n in sizes:
        # Features first, in a separate process: encoders are not part of the farm driver's memory.
        subprocess.run([sys.executable, __file__, "--features-only", "--tasks", str(n), "--work", str(work),
                        "--seed", str(seed)], check=True)
        out = subprocess.run([sys.executable, __file__, "--tasks", str(n), "--naive-sample", "0", "--work", str(work),
                              "--seed", str(seed), "--threads", str(threads), "--actors", str(actors)], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{n:>6} tasks: {r['seconds_per_expert']*1000:7.1f} ms/expert wall, "
              f"{r['train_seconds_per_expert']*1000:7.1f} ms/expert in actors, driver peak private "
              f"{r['driver_peak_private_mb']:.0f} MB (RSS {r['driver_peak_rss_mb']:.0f} MB)",
              flush=True)
    wall = [r["seconds_per_expert"] for r in rows]
    train = [r["train_seconds_per_expert"] for r in rows]
    rss = [r["driver_peak_rss_mb"] for r in rows]
    private = [r["driver_peak_private_mb"] for r in rows]
    return dict(
        sizes=sizes, seconds_per_expert=wall, train_seconds_per_expert=train,
        driver_peak_private_mb=private, driver_peak_rss_mb=rss,
        cost_spread_wall=round(max(wall) / min(wall) - 1, 3), cost_spread_train=round(max(train) / min(train) - 1, 3),
        private_memory_growth=round(private[-1] / private[0] - 1, 3), rss_growth=round(rss[-1] / rss[0] - 1, 3),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=1000, help="procedural tasks to train")
    p.add_argument("--naive-sample", type=int, default=48, help="tasks the naive loop trains (0: skip it)")
    p.add_argument("--scaling", action="store_true", help="cost per expert and driver memory from 100 to 2,000 tasks")
    p.add_argument("--sizes", default="100,300,1000,2000", help="task counts for --scaling")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-farm", help="where features and stores go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (and actor CPUs)")
    p.add_argument("--actors", type=int, default=os.cpu_count() or 1, help="farm actors; each gets threads/actors torch threads")
    p.add_argument("--features-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.features_only:
        build_features(a.tasks, a.work, a.seed)
        return
    if a.scaling:
        result = scaling([int(s) for s in a.sizes.split(",")], a.work, a.seed, a.threads, a.actors)
    else:
        result = measure(a.tasks, a.naive_sample, a.work, a.seed, a.threads, a.actors)
        for k, v in result.items():
            print(f"{k:>32}: {v}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
