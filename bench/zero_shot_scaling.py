"""Zero-shot accuracy against the number of meta-train tasks, on the procedural suite.

    python bench/zero_shot_scaling.py [--sizes 100,300,1000,3000] [--test-tasks 300] [--seeds 0]

For each size N it runs the whole pipeline (`pipelines.full`) on N + `--test-tasks` procedural tasks with
a meta-test set of `--test-tasks` tasks, sharing one encoder cache, and collects the evaluate stage's
results. With thousands of meta-train tasks a step's task batch covers a small share of them, so the
HNet routes train with 64 tasks per step for 3,000 steps at every size (the same settings at every N).
Writes `<out>/scaling.csv`, `scaling.md` and `scaling.png`; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("hnet_hyperldm", "hvae_hyperldm", "hnet_hyperclip", "hvae_hyperclip", "text_hnet", "multitask", "chance", "oracle")


def main() -> None:
    import pandas as pd

    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--sizes", default="100,300,1000,3000")
    p.add_argument("--test-tasks", type=int, default=300)
    p.add_argument("--seeds", default="0")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "scaling")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    tables, walls = [], {}
    for n in sizes:
        run_dir = a.out / f"n{n}"
        total = n + a.test_tasks
        cmd = [sys.executable, "-m", "pipelines.full", "--run-dir", str(run_dir), "--no-progress",
               "--set", "features.suite=procedural", "--set", f"features.n_tasks={total}",
               "--set", f"features.meta_test_fraction={a.test_tasks / total}",
               "--set", f"features.cache_dir={a.out / 'cache'}",
               "--set", "generators.splits=given", "--set", f"generators.seeds={a.seeds}",
               "--set", "generators.tasks_per_step=64", "--set", "generators.hnet_steps=3000",
               "--set", "baselines.tasks_per_step=64", "--set", "baselines.steps=3000"]
        t0 = time.perf_counter()
        print(f"N={n}: {' '.join(cmd[1:])}", flush=True)
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        walls[n] = time.perf_counter() - t0
        if r.returncode != 0:
            print(r.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"pipeline failed for N={n}")
        t = pd.read_csv(run_dir / "results" / "zero_shot.csv")
        t = t[t["method"].isin(METHODS) & (t["guidance_scale"].isna() | t["guidance_scale"].isin([1.0, 4.0]))]
        tables.append(t.assign(meta_train_tasks=n))
        print(f"N={n}: done in {walls[n]:.0f}s", flush=True)
    table = pd.concat(tables, ignore_index=True)
    from pipelines.core.results import method_label

    table["label"] = [method_label(m, g, pretty=True) for m, g in zip(table["method"], table["guidance_scale"])]
    piv = table.groupby(["label", "meta_train_tasks"], sort=False)["accuracy"].mean().unstack("meta_train_tasks")
    a.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(a.out / "scaling.csv", index=False)
    md = ["| method | " + " | ".join(f"N={n}" for n in piv.columns) + " |", "|---|" + "---|" * len(piv.columns)]
    md += [f"| {lb} | " + " | ".join(f"{100 * v:.2f}" for v in row) + " |" for lb, row in piv.iterrows()]
    (a.out / "scaling.md").write_text("\n".join(md) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for lb, row in piv.iterrows():
        ax.plot(piv.columns, 100 * row.values, marker="o", label=lb)
    ax.set_xscale("log")
    ax.set_xlabel("meta-train tasks (procedural)")
    ax.set_ylabel("zero-shot query accuracy on meta-test (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out / "scaling.png", dpi=120)
    print("\n".join(md))
    print(json.dumps({"sizes": sizes, "test_tasks": a.test_tasks, "wall_s": walls,
                      "accuracy": {lb: {str(k): float(v) for k, v in row.items()} for lb, row in piv.iterrows()}}))


if __name__ == "__main__":
    main()
