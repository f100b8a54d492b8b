"""What bounds the expert farm's speed: a profile of its training step, by kind of operation.

    python bench/farm_profile.py --tasks 1000        # a few minutes on one core

Trains `--shards` of the farm's real shards (the default experts config on procedural tasks, the
workload of `bench/farm.py`) in this process on one thread under `torch.profiler`, and splits the CPU
time into matrix products, the optimiser, the loss and the rest. The matrix products' own GFLOP/s
against the machine's (measured in the same run, one thread) says how far they are from the peak;
their share of the time says how much the farm could gain if they ran at the peak and nothing else
changed. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.farm import build_features, matmul_gflops  # noqa: E402

# Profiler op names by kind (aten names; a vmapped step runs batched variants of the same ops).
KINDS = {
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::dot"),
    "optimiser": ("aten::_fused_adam_", "aten::_foreach"),
    "loss": ("aten::_log_softmax", "aten::nll_loss", "aten::_softmax", "aten::log_softmax", "aten::cross_entropy"),
    "gather/copy": ("aten::index", "aten::gather", "aten::copy_", "aten::clone", "aten::cat", "aten::stack",
                    "aten::contiguous", "aten::_to_copy", "aten::index_select"),
}


def kind_of(name: str) -> str:
    for kind, prefixes in KINDS.items():
        if name.startswith(prefixes):
            return kind
    return "elementwise/other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--tasks", type=int, default=1000, help="procedural tasks (the features are shared with bench/farm.py)")
    p.add_argument("--shards", type=int, default=4, help="shards to profile, spread over the support sizes")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-farm")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    from orchestrator.shards import config_hash, feature_tensors, plan_shards, train_shard
    from pipelines import experts
    from pipelines.core.config import build_config

    torch.set_num_threads(1)
    feats = build_features(a.tasks, a.work, a.seed)
    cfg = build_config(experts.ExpertsConfig, experts.PRESETS, "default", [], a.seed)
    shards = plan_shards(feats.tasks, cfg, config_hash(cfg, feats.info.get("config_hash", "")))
    picked = [shards[round(i * (len(shards) - 1) / max(1, a.shards - 1))] for i in range(min(a.shards, len(shards)))]
    tensors = feature_tensors(feats)
    peak = matmul_gflops(reps=5)

    self_us: dict[str, float] = defaultdict(float)
    flops = wall = 0.0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for shard in picked:
            t0 = time.perf_counter()
            out = train_shard(feats, shard, cfg, tensors)
            wall += time.perf_counter() - t0
            flops += out["flops"]
    ops = sorted(prof.key_averages(), key=lambda ev: -ev.self_cpu_time_total)
    for ev in ops:
        self_us[kind_of(ev.key)] += ev.self_cpu_time_total
    total = sum(self_us.values())
    share = {k: v / total for k, v in sorted(self_us.items(), key=lambda kv: -kv[1])}
    matmul_s = self_us["matmul"] / 1e6
    # Profiling adds overhead per op; the GFLOP/s figures use the profiled times, so they are lower bounds.
    result = dict(
        tasks=a.tasks, seed=a.seed, shards=len(picked), experts=sum(len(s.members) for s in picked), steps=cfg.steps,
        threads=1, machine_gflops_1_thread=round(peak, 1),
        step_gflops=round(flops / wall / 1e9, 2), step_peak_fraction=round(flops / wall / 1e9 / peak, 3),
        matmul_gflops=round(flops / matmul_s / 1e9, 2), matmul_peak_fraction=round(flops / matmul_s / 1e9 / peak, 3),
        time_share={k: round(v, 3) for k, v in share.items()},
        top_ops={ev.key: round(ev.self_cpu_time_total / total, 3) for ev in ops[:10]},
        peak_fraction_if_matmuls_at_peak=round((flops / peak / 1e9) / (flops / peak / 1e9 + (1 - share["matmul"]) * wall), 3),
        load=[round(x, 2) for x in os.getloadavg()],
    )
    for k, v in result.items():
        print(f"{k:>34}: {v}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
