"""How the data path scales with the number of experts, side by side in one run.

    python bench/store_scale.py                                   # 10k, 50k, 200k experts; farm 1k and 10k
    python bench/store_scale.py --sizes 2000,10000 --farm-sizes 200,1000 --train-batches 10   # a few minutes

1. A synthetic weight store per size: random float32 weights in the real layout and Parquet schema
   (the smoke features' task network, 16,800 weights), real task metadata (the suite's task ids and
   descriptions, one seed per copy), written and committed shard by shard as the farm does.
2. The HVAE training loop fed from each store on the zero-shot stages' streamed path (a Ray Train
   dataset read in batches by the worker), in a fresh worker process per size: one streaming pass for
   the normaliser's statistics, then `--train-batches` Adam steps on batches from a file-shuffled stream. Measured: the worker's peak memory (VmHWM, which also counts object-store
   pages it maps, and its private memory alone) and experts per second. Ray Data reads up to 256 MB
   ahead (stream.IN_FLIGHT_BYTES, about 4,000 experts), so memory levels off only above that size.
3. The real farm (actors training `--farm-steps` steps and writing their shards) for each farm size
   (seeds per task raised until the size is reached): the driver's peak private memory and the bytes
   of results it receives per expert.

The last line is one JSON object: worker_memory_ratio (largest / smallest size; target <= 1.2),
throughput_ratio (largest / smallest; target >= 0.8) and driver_bytes_per_expert (largest farm;
target under 1 KB: no weights reach the driver).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from bench.farm import MemorySampler  # noqa: E402

SHARD_ROWS = 512  # rows per synthetic shard (about 34 MB of weights)


def smoke_features(work: Path):
    """The smoke suite's features (real tasks, real encoders), built once under `work`."""
    from orchestrator.storage.suite_features import SuiteFeatures
    from pipelines import features
    from pipelines.core.cli import RunContext
    from pipelines.core.config import build_config

    run = work / "features-run"
    if not (run / "features").exists():
        cfg = build_config(features.FeaturesConfig, features.PRESETS, "smoke", [f"cache_dir={work / 'cache'}"])
        features.run(cfg, RunContext(run=run, progress=False))
    return SuiteFeatures.load(run / "features")


def synthetic_store(root: Path, n: int, feats, n_weights: int, layout_id: str) -> float:
    """A committed store of n random experts in the real schema; returns the seconds it took."""
    from orchestrator.storage.store import WeightStore

    t0 = time.perf_counter()
    if root.exists():
        shutil.rmtree(root)
    store = WeightStore(root)
    store.set_info(config_hash="synthetic", layout_id=layout_id, n_weights=n_weights)
    tasks = feats.tasks
    rng = np.random.default_rng(n)
    for k, start in enumerate(range(0, n, SHARD_ROWS)):
        idx = np.arange(start, min(start + SHARD_ROWS, n))
        t = tasks.iloc[idx % len(tasks)]
        meta = pd.DataFrame(dict(
            task_id=t["id"].to_numpy(), description=t["description"].to_numpy(), split=t["split"].to_numpy(),
            seed=idx // len(tasks), step=300, final=True, layout_id=layout_id,
            support_acc=1.0, support_loss=0.01, query_acc=0.9, query_loss=0.2, config_hash="synthetic"))
        w = rng.standard_normal((len(idx), n_weights), dtype=np.float32) * 0.05
        written = store.write_shard_file(f"shard-{k:05d}-{n:08x}", meta, w)
        store.commit_shard(f"shard-{k:05d}-{n:08x}", written, {})
    return time.perf_counter() - t0


def hvae_loop(config: dict) -> None:
    """Ray Train loop: the zero-shot stages' streamed path (`ExpertStream` over the dataset this worker receives,
    fed to `train_hvae`); reports this worker's peak memory and experts per second."""
    from bench.farm import MemorySampler
    from models.task_net import TaskNetSpec, WeightLayout
    from models.weight_norm import WeightNormalizer
    from models.zeroshot.tasks import Hooks
    from models.zeroshot.training import train_hvae
    from orchestrator import train as rt
    from pipelines.zeroshot.streamed import ExpertStream

    torch.set_num_threads(1)
    norm = WeightNormalizer(WeightLayout(TaskNetSpec(**config["spec"])))
    norm.load_state_dict(config["norm"])
    stream, done = ExpertStream("store", None), {}
    steps = config["batches"] + 1  # timed from the first step's end: the stream's start-up is not per expert
    with MemorySampler() as mem:  # private memory, apart from object-store pages the worker maps
        hooks = Hooks(log=lambda step, m: done.setdefault(step, time.perf_counter()), log_every=1)
        train_hvae(stream.source(config["batch"], config["seed"], lambda rows, w: norm.encode(w)), config["seed"], hooks,
                   steps=steps, lr=1e-3, batch=config["batch"], beta=1.0, d_latent=128, hidden=(128, 128),
                   n_weights=norm.mean.numel())
    seen = config["batches"] * config["batch"]
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    rt.report(dict(train_experts=seen, train_experts_per_s=round(seen / (done[steps] - done[1]), 1),
                   streamed_peak_rows=stream.peak_rows, worker_peak_mb=round(float(status["VmHWM"].split()[0]) / 1024, 1),
                   worker_peak_private_mb=round(mem.peak_anon, 1)))


def hvae_from_store(root: Path, spec, batches: int, batch: int, seed: int, work: Path) -> dict:
    """The store through the path the HVAE stage streams it on: normaliser statistics in one Ray Data pass on the
    driver, then a Ray Train worker (a fresh process per size: its peak memory is this size's alone) training
    the HVAE on batches of the store handed to it as a Ray Train dataset."""
    from models.task_net import WeightLayout
    from models.weight_norm import WeightNormalizer
    from orchestrator.storage.store import WeightStore
    from orchestrator.storage.stream import store_dataset, stream_moments
    from orchestrator.train import launch
    from pipelines.zeroshot.streamed import COLUMNS

    ray.data.DataContext.get_current().enable_progress_bars = False
    store, layout = WeightStore(root), WeightLayout(spec)
    t0 = time.perf_counter()
    moments = stream_moments(store_dataset(store, columns=("w",)), layout.size, batch_size=batch)
    norm = moments.fit(WeightNormalizer(layout))
    stats_s = time.perf_counter() - t0
    ds = store_dataset(store, columns=COLUMNS, shuffle_files=True, shuffle_seed=seed, ordered=True)
    res = launch(hvae_loop, dict(spec=spec.__dict__, norm=norm.state_dict(), batches=batches, batch=batch, seed=seed),
                 name=f"hvae-{root.name}", run_dir=work / "train", datasets={"store": ds}, log=lambda m: None)
    return dict(experts_in_store=moments.n, stats_seconds=round(stats_s, 2), stats_experts_per_s=round(moments.n / stats_s, 1),
                **res.metrics[-1])


def farm_driver(feats, n: int, work: Path, steps: int) -> dict:
    """The real farm training about n experts (steps cut to `steps`: this measures the data path)."""
    from orchestrator.farm import run_farm
    from orchestrator.storage.store import WeightStore
    from pipelines import experts
    from pipelines.core.config import build_config

    seeds = math.ceil(n / len(feats.tasks))
    cfg = build_config(experts.ExpertsConfig, experts.PRESETS, "smoke",
                       [f"seeds_per_task={seeds}", "sample_fraction=0.5", f"steps={steps}", "num_actors=2", "cpus_per_actor=1"])
    root = work / f"farm-{n}" / "store" / "weights"
    if root.exists():
        shutil.rmtree(root)
    anon0, _ = MemorySampler.read()
    with MemorySampler() as mem:
        summary = run_farm(feats, cfg, WeightStore(root), progress=False, log=lambda m: None)
    return dict(experts=summary.experts_trained, seconds=round(summary.seconds, 1),
                driver_peak_private_mb_over_start=round(mem.peak_anon - anon0, 1),
                driver_bytes_received=summary.result_bytes,
                driver_bytes_per_expert=round(summary.result_bytes / summary.experts_trained, 1),
                store_mb=round(sum(p.stat().st_size for p in root.glob("*.parquet")) / 2**20, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,50000,200000", help="synthetic store sizes (experts)")
    p.add_argument("--farm-sizes", default="1000,10000", help="experts the real farm writes")
    p.add_argument("--train-batches", type=int, default=40, help="HVAE steps per size")
    p.add_argument("--batch", type=int, default=256, help="HVAE batch size")
    p.add_argument("--farm-steps", type=int, default=1, help="training steps per expert in the farm part")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-store-scale", help="where stores go")
    p.add_argument("--keep", action="store_true", help="keep the synthetic stores (several GB at 200k)")
    a = p.parse_args()
    from orchestrator.cluster import connect, shutdown
    from orchestrator.farm import task_net_spec
    from models.task_net import WeightLayout
    from pipelines import experts
    from pipelines.core.config import build_config

    a.work.mkdir(parents=True, exist_ok=True)
    feats = smoke_features(a.work)
    spec = task_net_spec(feats, build_config(experts.ExpertsConfig, experts.PRESETS, "smoke"))
    layout = WeightLayout(spec)
    info = connect(num_cpus=2)
    out: dict = {"n_weights": layout.size, "stores": {}, "farm": {}}
    try:
        for n in [int(x) for x in a.sizes.split(",")]:
            root = a.work / f"store-{n}"
            built = synthetic_store(root, n, feats, layout.size, layout.id)
            r = hvae_from_store(root, spec, a.train_batches, a.batch, 0, a.work)
            r.update(build_seconds=round(built, 1), store_mb=round(sum(f.stat().st_size for f in root.glob("*.parquet")) / 2**20, 1))
            out["stores"][n] = r
            print(json.dumps({"store": n, **r}), flush=True)
            if not a.keep:
                shutil.rmtree(root)
        for n in [int(x) for x in a.farm_sizes.split(",")]:
            out["farm"][n] = farm_driver(feats, n, a.work, a.farm_steps)
            print(json.dumps({"farm": n, **out["farm"][n]}), flush=True)
    finally:
        shutdown(info)
    s, f = out["stores"], out["farm"]
    lo, hi = min(s), max(s)
    print(json.dumps(dict(
        sizes=sorted(s), farm_sizes=sorted(f),
        worker_memory_ratio=round(s[hi]["worker_peak_mb"] / s[lo]["worker_peak_mb"], 3),
        # the same without the object-store pages a worker maps while reading (they are the store's, capped)
        worker_private_memory_ratio=round(s[hi]["worker_peak_private_mb"] / s[lo]["worker_peak_private_mb"], 3),
        throughput_ratio=round(s[hi]["train_experts_per_s"] / s[lo]["train_experts_per_s"], 3),
        driver_bytes_per_expert=f[max(f)]["driver_bytes_per_expert"] if f else None,
        driver_peak_mb={n: f[n]["driver_peak_private_mb_over_start"] for n in f},
        worker_peak_mb={n: s[n]["worker_peak_mb"] for n in s},
        train_experts_per_s={n: s[n]["train_experts_per_s"] for n in s},
    )))


if __name__ == "__main__":
    main()
