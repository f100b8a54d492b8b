"""Benchmark HyperLDM sampling: DDIM at several step counts against DDPM with all T steps, a paired test over tasks.

    python bench/sampling.py --run-dir runs/procedural [--route hnet] [--split given] [--seed 0] [--draws 5]
    python bench/sampling.py --run-dir runs/default --ddim-steps 25,50 --draws 2 --max-tasks 16   # shrunk

Uses the trained HyperLDM of a finished run. For every meta-test description of the split it samples
latents with each sampler (same guidance scale, `--draws` independent draws; draw d starts both
samplers from the same seeded noise), decodes them to task networks and measures each task's query
accuracy. Per task, the mean over draws of DDIM's accuracy minus DDPM's is one paired difference; the
mean difference (in points) has a 95 % CI from a seeded bootstrap over tasks. DDIM is "within 1
point" of DDPM only when the whole CI lies within ±1. Enough tasks for a narrow CI (>= 300) need
the procedural suite, e.g. `python -m pipelines.full --preset default --set features.suite=procedural
--set features.n_tasks=1000 --set generators.splits=given`; the easyvqa run has 32 meta-test tasks.
Wall time covers sampling alone (the denoiser calls), best of the draws' per-draw times.

The last line is one JSON object: `speedup` (DDPM time / DDIM time), `ddim_accuracy`, `ddpm_accuracy`
for `--ddim-steps`' first entry, `ddim_minus_ddpm`, `ci_low`, `ci_high` (points) and `tasks` for it too,
`steps_within_1_point` (the fewest DDIM steps whose CI lies within ±1, null if none) and `by_steps`.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

BOOTSTRAP = 10_000


def paired_ci(diff: np.ndarray, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of per-task differences [T]: percentile bootstrap over tasks."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (BOOTSTRAP, len(diff)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(diff.mean()), float(lo), float(hi)


def sample_accuracy(ldm, route, data, c, guidance, draws, **kw) -> tuple[np.ndarray, float]:
    """(per-task query accuracy [draws, T], best per-draw sampling seconds) of one sampler setting."""
    from models.zeroshot.tasks import task_accuracy

    accs, times = [], []
    for d in range(draws):
        gen = torch.Generator().manual_seed(1000 + d)
        t0 = time.perf_counter()
        z = ldm.sample(c, guidance, generator=gen, **kw)
        times.append(time.perf_counter() - t0)
        with torch.no_grad():
            accs.append(task_accuracy(data.test, route.decode(z)).numpy())
    return np.stack(accs), min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "default")
    p.add_argument("--route", default="hnet", choices=("hnet", "hvae"))
    p.add_argument("--split", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--ddim-steps", default="50,25,100,200", help="comma-separated DDIM step counts; the first is the headline")
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--max-tasks", type=int, default=0, help="use only the first N meta-test tasks (0: all)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    steps = [int(s) for s in a.ddim_steps.split(",")]

    from models.zeroshot.tasks import TaskData
    from pipelines.zeroshot.data import load_split, read_plan
    from pipelines.zeroshot.trained import TrainedModels

    splits, seeds = read_plan(a.run_dir)
    split, seed = a.split or splits[0], seeds[0] if a.seed is None else a.seed
    data = load_split(a.run_dir, split)
    if a.max_tasks:
        keep = slice(0, a.max_tasks)
        b = data.test.batch
        b = type(b)(**{k: v[keep] if torch.is_tensor(v) and len(v) == b.n else v for k, v in vars(b).items()})
        data.test = TaskData(data.layout, data.test.X, b, data.test.c[keep])
    models = TrainedModels(a.run_dir, data, seed)
    route, ldm = models.routes[a.route], models.hyperldms[a.route]
    c = data.test.c
    ddpm, ddpm_s = sample_accuracy(ldm, route, data, c, a.guidance, a.draws, sampler="ddpm")
    print(f"ddpm  {ldm.diffusion.T:5d} steps: {ddpm_s * 1000:8.1f} ms for {len(c)} tasks, accuracy {100 * ddpm.mean():.2f}% "
          f"(draws: {', '.join(f'{100 * x:.1f}' for x in ddpm.mean(1))})", flush=True)
    by_steps = []
    for n in steps:
        ddim, ddim_s = sample_accuracy(ldm, route, data, c, a.guidance, a.draws, sampler="ddim", steps=n)
        mean, lo, hi = paired_ci(100 * (ddim.mean(0) - ddpm.mean(0)))
        by_steps.append(dict(ddim_steps=n, ddim_accuracy=float(ddim.mean()), ddim_seconds=ddim_s, ddim_minus_ddpm=mean,
                             ci_low=lo, ci_high=hi, within_1_point=bool(-1 <= lo and hi <= 1)))
        print(f"ddim  {n:5d} steps: {ddim_s * 1000:8.1f} ms, accuracy {100 * ddim.mean():.2f}% "
              f"(draws: {', '.join(f'{100 * x:.1f}' for x in ddim.mean(1))}); DDIM - DDPM {mean:+.2f} points, "
              f"95% CI [{lo:+.2f}, {hi:+.2f}] over {len(c)} tasks{' (within ±1)' if by_steps[-1]['within_1_point'] else ''}",
              flush=True)
    head = by_steps[0]
    within = sorted(r["ddim_steps"] for r in by_steps if r["within_1_point"])
    out = dict(
        speedup=ddpm_s / head["ddim_seconds"], ddim_accuracy=head["ddim_accuracy"], ddpm_accuracy=float(ddpm.mean()),
        accuracy_gap_points=100 * (head["ddim_accuracy"] - float(ddpm.mean())),
        ddim_seconds=head["ddim_seconds"], ddpm_seconds=ddpm_s, ddim_steps=head["ddim_steps"],
        ddim_minus_ddpm=head["ddim_minus_ddpm"], ci_low=head["ci_low"], ci_high=head["ci_high"], tasks=len(c),
        steps_within_1_point=within[0] if within else None, by_steps=by_steps,
        route=a.route, split=split, seed=seed, guidance=a.guidance, draws=a.draws,
    )
    print(f"speedup {out['speedup']:.1f}x at {head['ddim_steps']} DDIM steps; DDIM within ±1 point of DDPM from "
          f"{out['steps_within_1_point'] or 'none of'} {'steps' if within else str(steps) + ' steps'}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
