"""Re-render a finished run's tables and figures from its CSV files, and write its results page. Trains nothing.

    python -m pipelines.report --run-dir runs/default                 # <run>/results.md, tables and figures redrawn
    python -m pipelines.report --run-dir runs/default --out docs      # docs/results.md with figures in docs/figures/

Reads `results/zero_shot.csv` (and `zero_shot_tasks.csv` where the run has it: the CIs then resample
tasks and seeds), `results/memorisation.csv` and `results/description_ablation.csv` (tables
without figures), `results/few_shot.csv` and every `sweeps/<name>/results.csv` (with its trials' per-task
accuracies from `done/` where they were recorded), rewrites their `.md`
and `.png` beside them, and writes one results page linking the figures. `pipelines.full` writes the
page at the end of a run.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from models.errors import UserError
from orchestrator.storage.rundir import RunDir

PAGE = "results.md"


class ReportError(UserError, ValueError):
    """The run directory has no results to report."""


def demote(md: str) -> str:
    """A table file's headings one level down, so that it nests under the page's sections."""
    return "\n".join("#" + line if line.startswith("#") else line for line in md.splitlines())


def few_shot_config(run_root: Path):
    """The run's few-shot config from its config.yaml (None when absent: the table then omits the training budgets)."""
    from pipelines.core.config import ConfigError, build, read_yaml_mapping
    from pipelines.fewshot import FewShotConfig

    path = RunDir(run_root).config_file
    if not path.exists():
        return None
    try:
        return build(FewShotConfig, read_yaml_mapping(path, "config.yaml", "rerun the pipeline").get("fewshot") or {})
    except ConfigError:
        return None


def features_info(root: Path) -> dict | None:
    """The run's features info (None when absent): it names the split `given`."""
    from orchestrator.storage.suite_features import read_info

    return read_info(RunDir(root).features)


def render_run(root: Path) -> list[tuple[str, Path, str]]:
    """Redraw every table and figure of the run from its CSVs; returns (section, figure, table Markdown) per result."""
    import pandas as pd

    from orchestrator.storage.atomic import atomic_path, write_text
    from pipelines.core import names, results
    from pipelines.episodic import report as fewshot_report
    from pipelines.evaluate import TITLE
    from pipelines.sweeps import results as sweep_results
    from pipelines.sweeps.trial import DONE, per_task_table
    from pipelines.zeroshot import description_ablation, memorisation

    out, info, run = [], features_info(root), RunDir(root)
    zs = run.results / "zero_shot.csv"
    if zs.exists():
        tasks = zs.with_name("zero_shot" + results.TASKS_SUFFIX + ".csv")
        per_task = pd.read_csv(tasks) if tasks.exists() else None
        md, png = results.render(pd.read_csv(zs), zs.parent, "zero_shot", TITLE, per_task, features_info=info)
        out.append(("Zero-shot", png, md.read_text()))
    for section, module in (("Memorisation", memorisation), ("Description ablation", description_ablation)):
        csv = run.results / f"{module.STEM}.csv"
        if csv.exists():  # tables beside the zero-shot one, from the same generated networks
            md, = module.write(pd.read_csv(csv), csv.parent, csv=False, features_info=info)
            out.append((section, None, md.read_text()))
    for csv in sorted(run.sweeps.glob("*/results.csv")):
        table, name, png = pd.read_csv(csv), csv.parent.name, csv.parent / "curve.png"
        table = names.resolve_given(table, info)  # for display only: the CSVs are not rewritten
        done = [csv.parent / DONE / f"{k}.json" for k in table["key"]]
        per_task = per_task_table(csv.parent, list(table["key"])) if all(p.exists() for p in done) else None
        chosen = sweep_results.choose(table)  # the CSVs stay as the sweep wrote them
        md = sweep_results.markdown(table, chosen, name, per_task)
        write_text(csv.parent / "results.md", md)
        out.append((f"Sweep {name}", png if sweep_results.curve_plot(table, chosen, png, name, per_task) else None, md))
    fs = run.results / "few_shot.csv"
    if fs.exists():
        table, cfg = pd.read_csv(fs).astype({"seed": "Int64"}), few_shot_config(root)
        md = fewshot_report.markdown(table, cfg)
        write_text(fs.parent / "few_shot.md", md)
        with atomic_path(fs.parent / "few_shot.png") as tmp:
            fewshot_report.plot(table, tmp, cfg)
        out.append(("Few-shot", fs.parent / "few_shot.png", md))
    if not out:
        raise ReportError(f"{root} has no results/zero_shot.csv, results/few_shot.csv or sweeps/*/results.csv: "
                          "run the pipeline (python -m pipelines.full) first")
    return out


def highlights(root: Path) -> list[str]:
    """One line per split: the best zero-shot method, and the best generative route with γ chosen on validation."""
    import pandas as pd

    from pipelines.core import names
    from pipelines.zeroshot.methods import METHODS

    from pipelines.sweeps.results import choose

    run = RunDir(root)
    zs, sweep = run.results / "zero_shot.csv", run.sweep("gamma") / "results.csv"
    if not zs.exists():
        return []
    info = features_info(root)
    t = names.resolve_given(pd.read_csv(zs), info)
    c = names.resolve_given(choose(pd.read_csv(sweep)), info) if sweep.exists() else None
    lines = []
    for split, g in t[~t["method"].isin(["chance", "oracle"])].groupby("split", sort=False):
        means = g.groupby(["method", g["guidance_scale"].fillna(-1)])["accuracy"].mean()
        (m, gs), best = means.idxmax(), means.max()
        line = (f"- {names.split_name(split).capitalize()}: best zero-shot method {names.method_name(m, None if gs < 0 else gs)}, "
                f"{names.pct(best)} %")
        if c is not None:
            routes = c[(c["split"] == split) & c["method"].map(lambda x: METHODS[x].group in ("hnet", "hvae") if x in METHODS else False)]
            if len(routes):
                r = routes.loc[routes["test_mean"].idxmax()]
                setting = "" if r["setting"] == "-" else f" ({r['setting'].replace('guidance_scale=', 'γ = ')})"
                line += (f"; best generative route with its setting chosen on validation {names.method_name(r['method'])}"
                         f"{setting}, {names.pct(r['test_mean'])} %")
        lines.append(line + ".")
    return lines


def without_run_dir(command: str) -> str:
    """A recorded command line without its `--run-dir PATH`: the page names the run, and a path of the machine
    that made it means nothing to a reader."""
    import shlex

    words, out = shlex.split(command), []
    skip = False
    for w in words:
        if skip:
            skip = False
        elif w == "--run-dir":
            skip = True
        elif not w.startswith("--run-dir="):
            out.append(w)
    return shlex.join(out)


def page(root: Path, parts: list[tuple[str, Path, str]], out: Path) -> str:
    """The results page: how the run was made, then each result's figure and table."""
    from pipelines.core import names
    from pipelines.core.config import read_yaml_mapping

    run = RunDir(root)
    cfg = read_yaml_mapping(run.config_file, "config.yaml", "rerun the pipeline") if run.config_file.exists() else {}
    feats, gen = cfg.get("features", {}), cfg.get("generators", {})
    own = names.given_as(features_info(root) or {})
    split_names = [names.split_name(own if s == "given" else s) for s in gen.get("splits", [])]
    made = run.command_file.read_text().strip().splitlines() if run.command_file.exists() else []
    command = without_run_dir(made[0]) if made else "python -m pipelines.full"  # the first made the run; later ones resumed
    lines = ["# Results", "",
             f"Generated by `python -m pipelines.report` from the run `{root.name}`, made with `{command}`"
             + (f" (task suite `{feats['suite']}`, splits {', '.join(split_names)}, "
                f"seeds {', '.join(map(str, gen.get('seeds', [])))})" if feats else "") + ".", "",
             "All accuracies are query accuracies in percent on held-out meta-test tasks. Each table says how many "
             "tasks and seeds it averages; 95 % confidence intervals come from a bootstrap over tasks and seeds "
             "(over seed means where a run kept no per-task accuracies), beside the std over seeds.", ""]
    glance = highlights(root)
    if glance:
        lines += ["At a glance (mean over seeds):", "", *glance, ""]
    for title, png, md in parts:
        lines += [f"## {title}", ""]
        if png is not None:
            lines += [f"![{title}]({os.path.relpath(png, out)})", ""]
        body = "\n".join(line for line in demote(md).splitlines() if not line.startswith("## "))  # the page's heading replaces the table's
        lines += [body.strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_page(root: Path, out: Path | None = None) -> Path:
    """Redraw the run's results and write `<out>/results.md` (default: in the run); figures go to `<out>/figures/` when
    `out` is not the run."""
    from orchestrator.storage.atomic import write_text

    root = Path(root).resolve()
    out = (Path(out) if out is not None else root).resolve()
    parts = render_run(root)
    if out != root:
        (out / "figures").mkdir(parents=True, exist_ok=True)
        moved = []
        for title, png, md in parts:
            dest = None
            if png is not None:
                dest = out / "figures" / (png.name if png.parent == RunDir(root).results else f"sweep-{png.parent.name}-{png.name}")
                shutil.copyfile(png, dest)
            moved.append((title, dest, md))
        parts = moved
    path = out / PAGE
    write_text(path, page(root, parts, out))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished run directory")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.md and figures/ (default: the run directory)")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        raise ReportError(f"--run-dir {args.run_dir}: no such directory")
    print(f"wrote {write_page(args.run_dir, args.out)}")
    return 0


if __name__ == "__main__":
    from pipelines.core.cli import guarded

    guarded(main)()
