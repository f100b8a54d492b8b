"""Benchmark HyperLDM sampling: DDIM with 50 steps against DDPM with all 1000, side by side in one run.

    python bench/sampling.py --run-dir runs/default [--route hnet] [--split random] [--seed 0] [--draws 5]

Uses the trained HyperLDM of a finished run (`make run` makes runs/default). For every meta-test
description of the split it samples latents with each sampler (same guidance scale, `--draws`
independent draws), decodes them to task networks and measures query accuracy; wall time covers
sampling alone (the denoiser calls), best of the draws' per-draw times. The last line is one JSON
object with `speedup` (DDPM time / DDIM time), `ddim_accuracy` and `ddpm_accuracy`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "default")
    p.add_argument("--route", default="hnet", choices=("hnet", "hvae"))
    p.add_argument("--split", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from models.zeroshot.tasks import task_accuracy
    from pipelines.zeroshot.data import load_split, read_plan
    from pipelines.zeroshot.trained import TrainedModels

    splits, seeds = read_plan(a.run_dir)
    split, seed = a.split or splits[0], seeds[0] if a.seed is None else a.seed
    data = load_split(a.run_dir, split)
    models = TrainedModels(a.run_dir, data, seed)
    route, ldm = models.routes[a.route], models.hyperldms[a.route]
    c = data.test.c
    res = {}
    for name, kw in (("ddim", dict(sampler="ddim", steps=a.ddim_steps)), ("ddpm", dict(sampler="ddpm"))):
        times, accs = [], []
        for d in range(a.draws):
            gen = torch.Generator().manual_seed(1000 + d)
            t0 = time.perf_counter()
            z = ldm.sample(c, a.guidance, generator=gen, **kw)
            times.append(time.perf_counter() - t0)
            with torch.no_grad():
                accs.append(float(task_accuracy(data.test, route.decode(z)).mean()))
        res[name] = dict(seconds=min(times), accuracy=sum(accs) / len(accs), accuracies=accs)
        print(f"{name:5s} {kw.get('steps', ldm.diffusion.T):5d} steps: {min(times) * 1000:8.1f} ms for {len(c)} tasks, "
              f"accuracy {100 * res[name]['accuracy']:.2f}% (draws: {', '.join(f'{100 * x:.1f}' for x in accs)})", flush=True)
    out = dict(
        speedup=res["ddpm"]["seconds"] / res["ddim"]["seconds"],
        ddim_accuracy=res["ddim"]["accuracy"], ddpm_accuracy=res["ddpm"]["accuracy"],
        accuracy_gap_points=100 * (res["ddim"]["accuracy"] - res["ddpm"]["accuracy"]),
        ddim_seconds=res["ddim"]["seconds"], ddpm_seconds=res["ddpm"]["seconds"], ddim_steps=a.ddim_steps,
        route=a.route, split=split, seed=seed, guidance=a.guidance, draws=a.draws, tasks=len(c),
    )
    print(f"speedup {out['speedup']:.1f}x, accuracy DDIM {100 * out['ddim_accuracy']:.2f}% vs DDPM {100 * out['ddpm_accuracy']:.2f}%")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
