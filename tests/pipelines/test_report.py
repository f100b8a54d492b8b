"""`python -m pipelines.report` redraws a run's tables and figures from its CSVs alone and writes its results page.

The run here is written by hand in the pipeline's own CSV formats (what evaluate, the sweep and the
few-shot stage write), so the test needs no training; the full pipeline test covers the stages' own files.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(root, seeds=(0, 1, 2)):
    """A finished run's results: zero-shot per seed and per task, a γ sweep and few-shot, as the stages write them."""
    rng = np.random.default_rng(0)
    rows, tasks = [], []
    methods = [("chance", None), ("oracle", None), ("text_hnet", None), ("hnet_hyperldm", 1.0), ("hvae_hyperldm", 1.0)]
    for split, n in (("random", 6), ("compositional", 5)):
        for m, g in methods:
            for s in seeds:
                acc = np.clip(0.5 + 0.4 * (m == "oracle") + 0.2 * (m == "text_hnet") + rng.normal(0, 0.05, n), 0, 1)
                key = dict(suite="easyvqa", split=split, method=m, guidance_scale=g, seed=s)
                rows.append(dict(**key, accuracy=acc.mean(), n_tasks=n))
                tasks += [dict(**key, task=f"{split}-{t}", accuracy=a) for t, a in enumerate(acc)]
    (root / "results").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "results" / "zero_shot.csv", index=False)
    pd.DataFrame(tasks).to_csv(root / "results" / "zero_shot_tasks.csv", index=False)
    sweep = [dict(method=m, split=sp, seed=s, guidance_scale=g, val_accuracy=0.5 + 0.01 * (g or 0), test_accuracy=0.55 + 0.01 * (g or 0) + 0.01 * s,
                  n_val=3, n_test=6, key=f"{m}{sp}{s}{g}")
             for sp in ("random",) for s in seeds for m, gs in (("chance", [None]), ("hnet_hyperldm", [0.0, 1.0, 7.5])) for g in gs]
    (root / "sweeps" / "gamma" / "done").mkdir(parents=True)
    pd.DataFrame(sweep).to_csv(root / "sweeps" / "gamma" / "results.csv", index=False)
    if len(seeds) > 1:  # the trials' records with their per-task accuracies, as a sweep now keeps them
        for t in sweep:
            acc = {f"random-{i}": t["test_accuracy"] + d for i, d in enumerate((-0.1, 0, 0, 0, 0, 0.1))}
            (root / "sweeps" / "gamma" / "done" / f"{t['key']}.json").write_text(json.dumps({"test_tasks": acc}))
    few = [dict(suite="easyvqa", split="random", method=m, shots=k, seed=s if m != "chance" else None, accuracy=0.6 + 0.05 * k / 5,
                ci95=0.02, episodes=20, train_s=1.0, eval_s=0.1) for m in ("maml", "hypermaml", "chance") for k in (1, 5)
           for s in (seeds if m != "chance" else (None,))]
    pd.DataFrame(few).to_csv(root / "results" / "few_shot.csv", index=False)
    memo = [dict(suite="easyvqa", split="random", method=m, guidance_scale=g, seed=s, measure=k, value=v + 0.01 * s, n_tasks=6)
            for m, g, v in (("hnet_hyperldm", 1.0, 0.8), ("train_experts", None, 0.6)) for s in seeds
            for k in ("cos_nearest_train", "l2_nearest_train")]
    pd.DataFrame(memo).to_csv(root / "results" / "memorisation.csv", index=False)
    (root / "command.txt").write_text("python -m pipelines.full --preset default --run-dir /home/someone/runs/x\n")
    return root


def report(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.report", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_report_redraws_tables_and_figures_and_writes_the_page(tmp_path):
    run = make_run(tmp_path / "run")
    csvs = {p: p.read_bytes() for p in run.rglob("*.csv")}
    r = report("--run-dir", run)
    assert r.returncode == 0, r.stderr
    assert {p: p.read_bytes() for p in run.rglob("*.csv")} == csvs  # the numbers are never rewritten
    for png in ("results/zero_shot.png", "results/few_shot.png", "sweeps/gamma/curve.png"):
        assert (run / png).read_bytes()[:8] == PNG
    zs = (run / "results" / "zero_shot.md").read_text()
    assert "tasks per split: 6 (random split), 5 (compositional split)" in zs and "3 seeds (0, 1, 2)" in zs
    assert "bootstrap over tasks and seeds" in zs
    row = next(line for line in zs.splitlines() if line.startswith("| Baselines | Text-conditioned HNet |"))
    mean, low, high = (float(x) for x in (row.split("|")[3].split()[0], *row.split("[")[1].split("]")[0].split(", ")))
    assert low < mean < high and 60 < mean < 80  # percentages, the mean inside its CI
    assert "| HNet route | HNet + HyperLDM (γ = 1) |" in zs and "| HVAE route | HVAE + HyperLDM (γ = 1) |" in zs
    assert "bootstrap over tasks and seeds" in (run / "sweeps" / "gamma" / "results.md").read_text()
    page = (run / "results.md").read_text()
    assert page.startswith("# Results") and "](results/zero_shot.png)" in page and "](sweeps/gamma/curve.png)" in page
    assert "## Few-shot" in page and "| Baselines | MAML |" in page and "random split" in page
    assert "made with `python -m pipelines.full --preset default`" in page and "/home/someone" not in page
    assert "## Memorisation" in page and "| Meta-train experts (reference) |" in page
    assert "| HNet + HyperLDM (γ = 1) | 0.810 ± 0.010 |" in (run / "results" / "memorisation.md").read_text()
    assert "Sweep `gamma`" not in page  # the tables' own titles give way to the page's headings


def test_one_seed_says_so_instead_of_a_zero_std(tmp_path):
    run = make_run(tmp_path / "run", seeds=(0,))
    docs = tmp_path / "docs"
    r = report("--run-dir", run, "--out", docs)
    assert r.returncode == 0, r.stderr
    zs = (run / "results" / "zero_shot.md").read_text()
    assert "± 0.0" not in zs and "(1 seed) [" in zs and "the value of 1 seed (0)" in zs
    sweep_md = (run / "sweeps" / "gamma" / "results.md").read_text()
    assert "(1 seed)" in sweep_md and "bootstrap over the seed means" in sweep_md  # no per-task records here
    page = (docs / "results.md").read_text()
    assert "](figures/zero_shot.png)" in page and "](figures/sweep-gamma-curve.png)" in page
    assert (docs / "figures" / "few_shot.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p])
def test_a_run_without_results_is_a_clear_error_and_writes_nothing(tmp_path, make):
    target = make(tmp_path)
    r = report("--run-dir", target)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert not (tmp_path / "results.md").exists()
