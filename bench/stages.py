"""Benchmark the model-training stages against a plain one-model-at-a-time loop, side by side in one run.

    python bench/stages.py --run runs/default                       # HyperLDM on a finished default run's data
    python bench/stages.py --run runs/default --set steps=300       # shorter: the rates are per step
    python bench/stages.py --overhead-run runs/smoke --overhead-default-run runs/default   # overhead figures only

For the HyperLDM stage, on the given run's features, experts, plan and generators (read only: the stage
writes its models into overlays under --work): the machine's matmul GFLOP/s (a large square fp32
matmul, as bench/farm.py measures it); the stage as the pipeline runs it (Ray Train workers), once
with each worker training its denoisers as one batched program and once one after another; a plain
loop training the first --plain-models denoisers one at a time in this process (`train_hyperldm`,
--plain-threads threads); models/s and executed matmul GFLOP/s of each, the latter as a share of the peak;
how far the batched stage's weights and meta-test accuracies (γ = 1 DDIM samples, decoded by the
route) are from the plain loop's and from the run's own models. The load average is printed before
and after: the machine may be shared.

The pipeline's orchestration overhead, from finished runs' timings.json (--overhead-run: a smoke run,
--overhead-default-run: a default one): the wall time minus the time spent inside the stages' training,
encoding and evaluation loops (each stage's `<stage>_loop_s`), as a fraction of the wall time.
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.farm import matmul_gflops  # noqa: E402


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def stage(base, work: Path, cfg, threads: int, label: str) -> tuple[float, object]:
    """The HyperLDM stage through Ray Train into a fresh overlay of `base` (Ray start not timed); (wall s, overlay)."""
    from orchestrator.cluster import connect, shutdown
    from pipelines import hyperldm
    from pipelines.core.cli import RunContext

    overlay = base.overlay(work / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}", {"hyperldm"})
    overlay.root.mkdir(parents=True)
    info = connect(address="local", num_cpus=threads)
    try:
        t0 = time.perf_counter()
        hyperldm.run(cfg, RunContext(run=overlay, progress=False, ray=info))
        wall = time.perf_counter() - t0
    finally:
        shutdown(info)
    return wall, overlay


def plain_loop(base, units, cfg, threads: int, limit: int) -> tuple[float, dict]:
    """`train_hyperldm` for the first `limit` denoisers (routes of units), one after another in this process;
    (training s, models)."""
    from models.zeroshot.training import train_hyperldm
    from pipelines.hyperldm import settings
    from pipelines.zeroshot.data import load_split
    from pipelines.zeroshot.trained import TrainedModels

    torch.set_num_threads(threads)
    seconds, out = 0.0, {}
    for split, seed in units:
        data = load_split(base, split)
        for name, route in TrainedModels(base, data, seed).routes.items():
            if len(out) == limit:
                return seconds, out
            t0 = time.perf_counter()
            out[(split, seed, name)] = train_hyperldm(route.z_train, data.train.c, seed, **settings(cfg))
            seconds += time.perf_counter() - t0
            print(f"  plain {split}-seed{seed} {name}: {time.perf_counter() - t0:.1f}s", flush=True)
    return seconds, out


def compare(base, overlay, units, plain: dict, steps: int) -> dict:
    """How far the stage's denoisers are from the plain loop's (and from the base run's own, when trained as long):
    largest |Δw|, and largest gap in mean meta-test accuracy of weights sampled from them (γ = 1, 50 DDIM
    steps, the sampler seeded by the training seed, as `evaluate` samples)."""
    from models.zeroshot.tasks import task_accuracy
    from pipelines.zeroshot.data import load_split
    from pipelines.zeroshot.trained import TrainedModels

    def accuracy(ldm, route, data, seed) -> float:
        z = ldm.sample(data.test.c, 1.0, steps=50, generator=torch.Generator().manual_seed(seed))
        return task_accuracy(data.test, route.decode(z)).mean().item()

    def max_dw(a, b) -> float:
        sa, sb = a.denoiser.state_dict(), b.denoiser.state_dict()
        return max((sa[k] - sb[k]).abs().max().item() for k in sb)

    gap: dict[str, float] = {}
    pairs: dict[str, list[tuple[float, float]]] = {}  # who -> [(stage's accuracy, theirs)] on the same models
    for split, seed in units:
        data = load_split(base, split)
        stage = TrainedModels(overlay, data, seed)
        side = base.model("hyperldm", split, seed).with_suffix(".json")
        same = side.exists() and json.loads(side.read_text())["stage_config"]["steps"] == steps
        ref = TrainedModels(base, data, seed) if same else None
        for name, route in stage.routes.items():
            others = {"plain": plain[(split, seed, name)]} if (split, seed, name) in plain else {}
            if ref is not None:  # the run's own models: its stage trained them one at a time
                others["run"] = ref.hyperldms[name]
            mine = accuracy(stage.hyperldms[name], route, data, seed)
            line = f"  {split}-seed{seed} {name}: meta-test accuracy stage {mine:.4f}"
            for who, ldm in others.items():
                acc = accuracy(ldm, route, data, seed)
                pairs.setdefault(who, []).append((mine, acc))
                gap[f"max_abs_weight_diff_vs_{who}"] = max(gap.get(f"max_abs_weight_diff_vs_{who}", 0.0), max_dw(stage.hyperldms[name], ldm))
                gap[f"max_accuracy_diff_vs_{who}"] = max(gap.get(f"max_accuracy_diff_vs_{who}", 0.0), abs(mine - acc))
                line += f", {who} {acc:.4f}"
            print(line, flush=True)
    means = {}
    for who, v in pairs.items():
        means[f"mean_accuracy_stage_on_{who}_models"] = round(sum(p[0] for p in v) / len(v), 4)
        means[f"mean_accuracy_{who}"] = round(sum(p[1] for p in v) / len(v), 4)
    return {**{k: round(v, 6) for k, v in gap.items()}, **means}


def overhead(run_dir: Path) -> dict:
    """The run's wall time, the part of it inside its stages' loops, and the rest (orchestration) per stage and as a
    fraction of the wall time; a stage without `<stage>_loop_s` counts whole as overhead (None: the run has none)."""
    from orchestrator.storage.rundir import RunDir
    from pipelines.core.stages import STAGES

    t = json.loads(RunDir(run_dir).timings.read_text())
    stages = [s for s in STAGES if f"{s}_s" in t]
    if not any(f"{s}_loop_s" in t for s in stages):
        return {"run": str(run_dir), "overhead_fraction": None, "why": "its timings.json predates loop timings"}
    loop = {s: min(t.get(f"{s}_loop_s", 0.0), t[f"{s}_s"]) for s in stages}
    wall = t["total_s"]
    return {"run": str(run_dir), "wall_s": round(wall, 1), "loop_s": round(sum(loop.values()), 1),
            "overhead_fraction": round(1 - sum(loop.values()) / wall, 3),
            "stage_overhead_s": {s: round(t[f"{s}_s"] - loop[s], 1) for s in stages},
            "stage_loop_s": {s: round(v, 1) for s, v in loop.items()}, "ray_start_s": round(t.get("ray_start_s", 0.0), 1)}


def overhead_figures(smoke: Path | None, default: Path | None) -> dict:
    """overhead_fraction_{smoke,default} (None for a run not given), printed with their breakdown."""
    out = {}
    for label, run in (("smoke", smoke), ("default", default)):
        o = overhead(run) if run is not None else None
        if o is not None:
            for k, v in o.items():
                print(f"{'overhead ' + label + ' ' + k:>44}: {v}", flush=True)
        out[f"overhead_fraction_{label}"] = o["overhead_fraction"] if o else None
    return out


def main() -> None:
    from models.zeroshot.batched_ldm import ldm_step_flops
    from orchestrator.storage.rundir import RunDir
    from pipelines import hyperldm
    from pipelines.core.config import build_config
    from pipelines.zeroshot.data import read_plan

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=None, help="a finished run directory (read only): its data and generators "
                   "(without it, only the overhead figures)")
    p.add_argument("--overhead-run", type=Path, default=None, help="a finished smoke run: its orchestration overhead")
    p.add_argument("--overhead-default-run", type=Path, default=None, help="a finished default run: its orchestration overhead")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-stages", help="where the stages' models go")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPUs for the stage's workers and the plain loop")
    p.add_argument("--plain-models", type=int, default=0, help="denoisers the plain loop trains (0: all)")
    # One thread by default: with a second intra-op thread, one denoiser step took 280 ms instead of 15 ms
    # at a load average of 2-3 on the 2-core machine (threads wait for each other on every small op).
    p.add_argument("--plain-threads", type=int, default=1, help="torch threads of the plain loop")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="HyperLDM config overrides (e.g. steps=300)")
    a = p.parse_args()
    over = overhead_figures(a.overhead_run, a.overhead_default_run)
    if a.run is None:
        print(json.dumps(over))
        return
    base = RunDir(a.run)
    splits, seeds = read_plan(base)
    units = [(s, k) for s in splits for k in seeds]
    cfg = build_config(hyperldm.HyperLdmConfig, hyperldm.PRESETS, "default", a.set + ["batched=true"])
    one_by_one = build_config(hyperldm.HyperLdmConfig, hyperldm.PRESETS, "default", a.set + ["batched=false"])
    n_models = 2 * len(units)
    n_plain = a.plain_models or n_models
    print(f"load average before: {load()}", flush=True)
    peak = matmul_gflops()
    print(f"matmul peak: {peak:.1f} GFLOP/s", flush=True)
    batched_s, overlay = stage(base, a.work, cfg, a.threads, "batched")
    print(f"batched stage: {n_models} denoisers in {batched_s:.1f}s; load {load()}", flush=True)
    single_s, _ = stage(base, a.work, one_by_one, a.threads, "one-by-one")
    print(f"one-at-a-time stage: {n_models} denoisers in {single_s:.1f}s; load {load()}", flush=True)
    plain_s, plain = plain_loop(base, units, cfg, a.plain_threads, n_plain)
    print(f"plain loop: {n_plain} denoisers in {plain_s:.1f}s; load {load()}", flush=True)
    gap = compare(base, overlay, units, plain, cfg.steps)

    some = next(iter(plain.values()))
    per_model = cfg.steps * ldm_step_flops(some.standardizer.mean.numel(), some.denoiser.d_c, cfg.hidden, 128, cfg.batch)
    rate = lambda n, s: n / s  # noqa: E731
    gflops = lambda n, s: n * per_model / s / 1e9  # noqa: E731
    result = dict(
        run=str(base.root), models=n_models, plain_models=n_plain, steps=cfg.steps, batch=cfg.batch, hidden=cfg.hidden,
        threads=a.threads, plain_threads=a.plain_threads, machine_gflops=round(peak, 1),
        hyperldm_stage_seconds=round(batched_s, 1), hyperldm_one_at_a_time_stage_seconds=round(single_s, 1),
        hyperldm_plain_seconds=round(plain_s, 1),
        hyperldm_models_per_s=round(rate(n_models, batched_s), 4),
        hyperldm_one_at_a_time_stage_models_per_s=round(rate(n_models, single_s), 4),
        hyperldm_plain_models_per_s=round(rate(n_plain, plain_s), 4),
        hyperldm_speedup_vs_plain=round(rate(n_models, batched_s) / rate(n_plain, plain_s), 2),
        hyperldm_speedup_vs_one_at_a_time_stage=round(single_s / batched_s, 2),
        hyperldm_gflops=round(gflops(n_models, batched_s), 1),
        hyperldm_one_at_a_time_stage_gflops=round(gflops(n_models, single_s), 1),
        hyperldm_plain_gflops=round(gflops(n_plain, plain_s), 1),
        hyperldm_peak_fraction=round(gflops(n_models, batched_s) / peak, 3),
        hyperldm_one_at_a_time_stage_peak_fraction=round(gflops(n_models, single_s) / peak, 3),
        hyperldm_plain_peak_fraction=round(gflops(n_plain, plain_s) / peak, 3),
        **gap, load_after=load(), **over,
    )
    for k, v in result.items():
        print(f"{k:>44}: {v}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
