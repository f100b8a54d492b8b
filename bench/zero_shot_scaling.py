"""Zero-shot accuracy against the number of meta-train tasks, on the procedural suite.

    python bench/zero_shot_scaling.py [--sizes 100,300,1000,3000] [--test-tasks 300] [--seeds 0] [--out DIR]
    python bench/zero_shot_scaling.py --sizes 100,1000 --out DIR --report-only   # tables from the finished sizes

For each size N it runs the pipeline's zero-shot stages (`pipelines.full --until sweep`) on N + `--test-tasks`
procedural tasks with a meta-test set of `--test-tasks` tasks, sharing one encoder cache. Of the N
meta-train tasks, the generators' validation share (15 %) is held out of every model; the γ sweep
chooses each HyperLDM's guidance scale there. With thousands of meta-train tasks a step's task batch
covers a small share of them, so the HNet routes train with 64 tasks per step for 3,000 steps at every size.

Reported per size: every method at the fixed γ 1 and 4 (the evaluate stage), each HyperLDM route at the
γ chosen on validation (the sweep's chosen.csv), and each cell's 95 % CI (a bootstrap over the meta-test
tasks and seeds). Writes `<out>/scaling.csv`, `scaling.md`, `scaling.png` and `runs.json` (each size's
wall time and load average while it ran); the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("hnet_hyperldm", "hvae_hyperldm", "hvae_hybrid", "hnet_hyperclip", "hvae_hyperclip", "text_hnet", "multitask",
           "nearest_task", "chance", "oracle")
FIXED_GAMMAS = (1.0, 4.0)
CHOSEN = "chosen on validation"


def pipeline_command(n: int, a) -> list[str]:
    """The zero-shot stages of the pipeline on N meta-train and `a.test_tasks` meta-test procedural tasks."""
    total = n + a.test_tasks
    cmd = [sys.executable, "-m", "pipelines.full", "--run-dir", str(a.out / f"n{n}"), "--no-progress", "--until", "sweep",
           "--set", "features.suite=procedural", "--set", f"features.n_tasks={total}",
           "--set", f"features.meta_test_fraction={a.test_tasks / total}",
           "--set", f"features.cache_dir={a.out / 'cache'}",
           "--set", "generators.splits=given", "--set", f"generators.seeds={a.seeds}",
           "--set", "generators.tasks_per_step=64", "--set", "generators.hnet_steps=3000",
           "--set", "baselines.tasks_per_step=64", "--set", "baselines.steps=3000"]
    return cmd + (["--address", a.address] if a.address else [])


def run_timed(cmd: list[str], poll_s: float = 15.0) -> tuple[float, dict, subprocess.CompletedProcess]:
    """Run `cmd`; (wall seconds, the 1-minute load average's mean and max while it ran, the finished process)."""
    t0, loads = time.perf_counter(), []
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        # a thread-free poll: communicate() with a timeout returns what was read so far on the next call
        while True:
            loads.append(os.getloadavg()[0])
            try:
                out, err = p.communicate(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                continue
    load = {"mean": round(sum(loads) / len(loads), 2), "max": round(max(loads), 2)}
    return time.perf_counter() - t0, load, subprocess.CompletedProcess(cmd, p.returncode, out, err)


def size_rows(run_dir: Path, n: int):
    """One row per (method, γ) of a finished size: fixed-γ rows from the evaluate stage, chosen-γ rows from the
    sweep, each with its mean and 95 % CI."""
    import pandas as pd

    from pipelines.core.bootstrap import seed_ci, table_ci
    from pipelines.core.names import method_name
    from pipelines.sweeps import results as sweep_results
    from pipelines.sweeps.trial import per_task_table

    zs = pd.read_csv(run_dir / "results" / "zero_shot.csv")
    keep = lambda t: t[t["method"].isin(METHODS) & (t["guidance_scale"].isna() | t["guidance_scale"].isin(FIXED_GAMMAS))]  # noqa: E731
    zs = keep(zs).assign(g=lambda t: t["guidance_scale"].fillna(-1.0))
    tasks_csv = run_dir / "results" / "zero_shot_tasks.csv"
    cis = (table_ci(keep(pd.read_csv(tasks_csv)).assign(g=lambda t: t["guidance_scale"].fillna(-1.0)), ["method", "g"])
           if tasks_csv.exists() else seed_ci(zs, ["method", "g"]))
    rows = []
    for (m, g), grp in zs.groupby(["method", "g"], sort=False):
        ci = cis[(m, g)]
        rows.append(dict(meta_train_tasks=n, method=m, guidance_scale=None if g < 0 else g, gamma=f"{g:g}" if g >= 0 else "-",
                         label=method_name(m, None if g < 0 else g), accuracy=grp["accuracy"].mean(), ci_low=ci.low,
                         ci_high=ci.high, seeds=grp["seed"].nunique(), test_tasks=int(grp["n_tasks"].iloc[0]), val_tasks=None))
    sweep = run_dir / "sweeps" / "gamma"
    trials, chosen = pd.read_csv(sweep / "results.csv"), pd.read_csv(sweep / "chosen.csv")
    done = [sweep / "done" / f"{k}.json" for k in trials["key"]]
    per_task = per_task_table(sweep, list(trials["key"])) if all(p.exists() for p in done) else None
    cis = sweep_results.test_ci(trials, per_task)
    for _, c in chosen[chosen["settings_tried"] > 1].iterrows():  # the swept routes: HyperLDM's γ
        ci = cis[(c["split"], c["method"], c["setting"])]
        n_val = int(trials.loc[trials["method"] == c["method"], "n_val"].iloc[0])
        rows.append(dict(meta_train_tasks=n, method=c["method"], guidance_scale=c["guidance_scale"], gamma=CHOSEN,
                         label=f"{method_name(c['method'])}, γ {CHOSEN}", accuracy=c["test_mean"], ci_low=ci.low,
                         ci_high=ci.high, seeds=int(c["seeds"]), test_tasks=int(trials["n_test"].iloc[0]), val_tasks=n_val))
    return pd.DataFrame(rows)


def order(table):
    """Methods in METHODS order; within one, the fixed γ first, then the chosen one."""
    rank = {m: i for i, m in enumerate(METHODS)}
    return table.assign(_m=table["method"].map(rank), _c=table["gamma"] == CHOSEN,
                        _g=table["guidance_scale"].fillna(-1)).sort_values(["_m", "_c", "_g", "meta_train_tasks"],
                                                                           kind="stable").drop(columns=["_m", "_c", "_g"])


def markdown(table) -> str:
    """Accuracy (%) per method and size, `mean [95 % CI]`; chosen-γ cells name the γ."""
    sizes = sorted(table["meta_train_tasks"].unique())
    cells: dict[str, dict[int, str]] = {}
    for _, r in order(table).iterrows():
        cell = f"{100 * r['accuracy']:.2f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
        if r["gamma"] == CHOSEN:
            cell += f" (γ = {r['guidance_scale']:g})"
        cells.setdefault(r["label"], {})[r["meta_train_tasks"]] = cell
    first = table.drop_duplicates("meta_train_tasks").set_index("meta_train_tasks")
    val = table.dropna(subset=["val_tasks"]).drop_duplicates("meta_train_tasks").set_index("meta_train_tasks")["val_tasks"]
    heads = [f"N={n:,}" for n in sizes]
    seeds = int(table["seeds"].max())
    lines = [f"Query accuracy (%) on {int(first['test_tasks'].iloc[0])} meta-test procedural tasks, {seeds} "
             f"seed{'s' if seeds > 1 else ''}; in brackets the 95 % CI of a bootstrap over tasks and seeds. Validation tasks "
             "(held out of the N meta-train tasks; γ is chosen there): "
             + ", ".join(f"{int(val[n])} at N={n:,}" for n in sizes if n in val.index) + ".", "",
             "| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(sizes)]
    lines += [f"| {lb} | " + " | ".join(row.get(n, "-") for n in sizes) + " |" for lb, row in cells.items()]
    return "\n".join(lines) + "\n"


def plot(table, path: Path) -> None:
    """Accuracy against N (log scale), one line per row label with its CI band; chosen-γ lines solid, the rest dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    colours = plt.get_cmap("tab20").colors  # one colour per row: the default cycle repeats after 10
    for i, (lb, g) in enumerate(order(table).groupby("label", sort=False)):
        g = g.sort_values("meta_train_tasks")
        line, = ax.plot(g["meta_train_tasks"], 100 * g["accuracy"], marker="o", label=lb, color=colours[i % len(colours)],
                        ls="-" if g["gamma"].iloc[0] == CHOSEN or g["guidance_scale"].isna().all() else "--")
        ax.fill_between(g["meta_train_tasks"], 100 * g["ci_low"], 100 * g["ci_high"], color=line.get_color(), alpha=0.12)
    ax.set_xscale("log")
    ax.set_xlabel("meta-train tasks (procedural)")
    ax.set_ylabel("zero-shot query accuracy on meta-test (%)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the curves, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    import pandas as pd

    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--sizes", default="100,300,1000,3000", help="meta-train task counts, run in this order")
    p.add_argument("--test-tasks", type=int, default=300)
    p.add_argument("--seeds", default="0")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "scaling")
    p.add_argument("--address", default=None, help="Ray cluster for the runs (default: the pipeline's; `local`: a private one)")
    p.add_argument("--report-only", action="store_true", help="run nothing: tables from the sizes already finished in --out")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    a.out = a.out.resolve()
    record = a.out / "runs.json"
    runs = json.loads(record.read_text()) if record.exists() else {}
    for n in [] if a.report_only else sizes:
        a.out.mkdir(parents=True, exist_ok=True)
        cmd = pipeline_command(n, a)
        print(f"N={n}: {' '.join(cmd[1:])}", flush=True)
        wall, load, r = run_timed(cmd)
        if r.returncode != 0:
            print(r.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"pipeline failed for N={n} (exit {r.returncode}); its log is in {a.out / f'n{n}' / 'logs'}")
        runs = json.loads(record.read_text()) if record.exists() else {}  # re-read: another size may have run meanwhile
        runs[str(n)] = {"wall_s": round(wall, 1), "load_avg_1min": load}
        record.write_text(json.dumps(runs, indent=1) + "\n")
        print(f"N={n}: done in {wall:.0f}s, 1-minute load average {load['mean']} (max {load['max']})", flush=True)
    done = [n for n in sizes if (a.out / f"n{n}" / "sweeps" / "gamma" / "chosen.csv").exists()]
    missing = [n for n in sizes if n not in done]
    if not done:
        raise SystemExit(f"no size of {sizes} has finished in {a.out} (no n<N>/sweeps/gamma/chosen.csv): run without --report-only first")
    table = pd.concat([size_rows(a.out / f"n{n}", n) for n in done], ignore_index=True)
    table.to_csv(a.out / "scaling.csv", index=False)
    md = markdown(table)
    (a.out / "scaling.md").write_text(md)
    plot(table, a.out / "scaling.png")
    print(md)
    if missing:
        print(f"missing sizes (not run or unfinished): {missing}")
    by = lambda col: {lb: {str(k): v for k, v in g.set_index("meta_train_tasks")[col].items()}  # noqa: E731
                      for lb, g in order(table).groupby("label", sort=False)}
    chosen = table[table["gamma"] == CHOSEN]
    print(json.dumps({"sizes": done, "missing": missing, "test_tasks": a.test_tasks, "seeds": a.seeds,
                      "wall_s": {n: runs.get(str(n), {}).get("wall_s") for n in done},
                      "load_avg_1min": {n: runs.get(str(n), {}).get("load_avg_1min") for n in done},
                      "accuracy": by("accuracy"), "ci_low": by("ci_low"), "ci_high": by("ci_high"),
                      "chosen_gamma": {m: {str(k): float(v) for k, v in g.set_index("meta_train_tasks")["guidance_scale"].items()}
                                       for m, g in chosen.groupby("method", sort=False)},
                      "validation_tasks": {str(k): int(v) for k, v in chosen.drop_duplicates("meta_train_tasks")
                                           .set_index("meta_train_tasks")["val_tasks"].items()}}))


if __name__ == "__main__":
    main()
