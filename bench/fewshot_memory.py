"""Peak memory and step time of second-order MAML vs MetaDiff meta-training at the same inner-loop length.

    python bench/fewshot_memory.py                    # 1, 5, 10, 20 inner steps
    python bench/fewshot_memory.py --steps 1 5 --reps 3

MetaDiff's claim (Zhang et al. 2024, §1, §4.3): a gradient-based meta-learner backpropagates through
its inner loop, so its training memory grows with the number of inner steps; MetaDiff trains its
denoiser with the ε-MSE loss at one random timestep, so its training step does not depend on how many
denoising steps sampling later takes. Both run on the real task network (the default features:
128 -> 32 -> 384, 16,800 weights; `--d-img 1280` for unprojected image features, 53,664) with a
realistic episode batch: 4 tasks x 8 answers x 5 shots, 64 queries each
(random features: cost does not depend on the values). MetaDiff's denoising steps = MAML's inner
steps; its training step is measured anyway (one denoiser call), and both methods' test-time
adaptation (MAML's inner loop without the outer graph, MetaDiff's DDIM sampling) is timed too.

Each (method, steps) runs in a fresh subprocess with one torch thread, so peaks never mix: the
peak is `resource.getrusage(RUSAGE_SELF).ru_maxrss` after the timed steps, and the step's own
memory is that peak minus the RSS just before the first step (torch, model and data already
resident). The last line printed is one JSON object with every figure and the MAML/MetaDiff ratios.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    """Current resident set size of this process (MB), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(method: str, steps: int, reps: int, d_img: int) -> dict:
    """Build the method, time `reps` training steps and one adaptation; report memory (runs in a subprocess)."""
    import numpy as np
    import torch

    from models.fewshot.episodes import Episode, collate
    from models.fewshot.maml import MAML
    from models.fewshot.metadiff import MetaDiff, head_slice
    from models.task_net import TaskNetSpec, init_weights

    torch.set_num_threads(1)
    spec = TaskNetSpec(d_img=d_img)
    B, A, K, Q = 4, 8, 5, 64
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(B * (A * K + Q), spec.d_img, generator=g).abs()  # post-ReLU-like image features
    prompts = [torch.randn(A, spec.d_txt, generator=g) for _ in range(B)]
    rng = np.random.default_rng(0)
    eps, n = [], A * K + Q
    for b in range(B):
        idx = np.arange(b * n, (b + 1) * n)
        eps.append(Episode(b, idx[: A * K], np.repeat(np.arange(A), K), idx[A * K:], rng.integers(0, A, Q)))
    batch = collate(eps, feats, prompts)
    torch.manual_seed(0)
    if method == "maml":
        model = MAML(spec, steps=steps, lr=0.5)
    else:
        model = MetaDiff(spec, steps=steps, width=128)
        d = head_slice(model.layout)
        model.prepare(init_weights(spec, 0), 0.1 * torch.randn(B, d.stop - d.start, generator=g))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = rss_mb()
    times = []
    for _ in range(reps + 1):  # the first step is a warm-up (allocator, lazy init) and is not timed
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(batch).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    t0 = time.perf_counter()
    with torch.no_grad():
        model.adapt(batch)
    adapt_s = time.perf_counter() - t0
    return {
        "method": method, "inner_steps": steps, "step_ms": 1000 * statistics.median(times[1:]),
        "peak_rss_mb": peak, "step_mem_mb": peak - before, "adapt_ms": 1000 * adapt_s,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 20], help="inner-loop lengths")
    p.add_argument("--reps", type=int, default=5, help="timed training steps per configuration")
    p.add_argument("--d-img", type=int, default=128, help="image feature width (the features stage's image_dims)")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.reps, args.d_img)))
        return
    rows = []
    for steps in args.steps:
        for method in ("maml", "metadiff"):
            out = subprocess.run([sys.executable, __file__, "--child", method, str(steps), "--reps", str(args.reps),
                                  "--d-img", str(args.d_img)],
                                 capture_output=True, text=True, check=True, cwd=ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    by = {(r["method"], r["inner_steps"]): r for r in rows}
    print(f"{'inner steps':>11} | {'MAML-2nd step ms':>16} {'peak MB':>8} {'step MB':>8} | "
          f"{'MetaDiff step ms':>16} {'peak MB':>8} {'step MB':>8} | {'mem ratio':>9} | {'adapt ms M/MD':>14}")
    ratios = {}
    for s in args.steps:
        m, d = by[("maml", s)], by[("metadiff", s)]
        ratios[s] = m["step_mem_mb"] / max(d["step_mem_mb"], 1e-9)
        print(f"{s:>11} | {m['step_ms']:>16.1f} {m['peak_rss_mb']:>8.0f} {m['step_mem_mb']:>8.1f} | "
              f"{d['step_ms']:>16.1f} {d['peak_rss_mb']:>8.0f} {d['step_mem_mb']:>8.1f} | {ratios[s]:>9.2f} | "
              f"{m['adapt_ms']:>6.0f}/{d['adapt_ms']:<6.0f}")
    print(json.dumps({
        "episode": {"tasks": 4, "answers": 8, "shots": 5, "queries": 64}, "d_img": args.d_img,
        "rows": rows,
        "maml_over_metadiff_step_mem": {str(s): r for s, r in ratios.items()},
        "maml_over_metadiff_step_time": {str(s): by[("maml", s)]["step_ms"] / by[("metadiff", s)]["step_ms"] for s in args.steps},
        "maml_step_mem_growth_mb_per_inner_step": (by[("maml", args.steps[-1])]["step_mem_mb"] - by[("maml", args.steps[0])]["step_mem_mb"])
        / max(1, args.steps[-1] - args.steps[0]),
    }))


if __name__ == "__main__":
    main()
