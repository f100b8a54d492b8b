"""A sweep's results: per-trial CSV, settings chosen on the validation tasks, a Markdown table, a γ-curve plot.

Settings are chosen per (split, method) by mean *validation* accuracy over seeds (held-out meta-train
tasks); the meta-test accuracy at the chosen setting is what gets reported. Ties go to the first
setting in sorted order (e.g. the smaller γ).
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.storage.atomic import atomic_path, write_text
from pipelines.core import names
from pipelines.core.bootstrap import seed_ci, table_ci
from pipelines.core.results import seeds_text, spread_text
from pipelines.sweeps.spec import SAMPLING

X_ORDER = ("guidance_scale", "guidance_steps", "guidance_lr", "guidance_l2", "sampler_steps", "sampler")


def setting_columns(table: pd.DataFrame) -> list[str]:
    """The parameter columns of the table (sampling parameters, then train.* overrides)."""
    return [c for c in SAMPLING if c in table.columns] + sorted(c for c in table.columns if c.startswith("train."))


def setting_label(row: pd.Series, cols: list[str]) -> str:
    vals = [f"{c}={row[c]:g}" if isinstance(row[c], float) else f"{c}={row[c]}" for c in cols if pd.notna(row[c])]
    return ", ".join(vals) or "-"


def settings_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean/std over seeds of val and test accuracy per (split, method, setting); settings name only what varies."""
    cols = setting_columns(table)
    swept = [c for c in cols if table[c].dropna().nunique() > 1]
    t = table.assign(setting=[setting_label(r, swept) for _, r in table.iterrows()])
    keys = ["split", "method", "setting"]
    s = t.groupby(keys, sort=False).agg(
        val_mean=("val_accuracy", "mean"), val_std=("val_accuracy", "std"),
        test_mean=("test_accuracy", "mean"), test_std=("test_accuracy", "std"), seeds=("seed", "nunique"),
        **{c: (c, "first") for c in cols},
    ).reset_index()
    return s.sort_values(["split", "method"] + cols, kind="stable", na_position="first").reset_index(drop=True)


def choose(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (split, method): the setting with the best mean validation accuracy, and its test accuracy.

    `best_test_setting` (the setting meta-test would have picked) is shown for reference only.
    """
    s = settings_summary(table)
    rows = []
    for (split, method), g in s.groupby(["split", "method"], sort=False):
        chosen = g.loc[g["val_mean"].fillna(-1).idxmax()]
        peek = g.loc[g["test_mean"].idxmax()]
        rows.append({"split": split, "method": method, "setting": chosen["setting"],
                     "guidance_scale": chosen.get("guidance_scale", np.nan), "settings_tried": len(g),
                     "val_mean": chosen["val_mean"], "test_mean": chosen["test_mean"], "test_std": chosen["test_std"],
                     "seeds": chosen["seeds"], "best_test_setting": peek["setting"], "best_test_mean": peek["test_mean"]})
    return pd.DataFrame(rows)


def pct(m, s=None) -> str:
    """`73.2` or `73.2 ± 1.3` (percent)."""
    return names.pct(m) + ("" if s is None or pd.isna(m) else f" ± {names.pct(0 if pd.isna(s) else s)}")


def test_ci(table: pd.DataFrame, per_task: pd.DataFrame | None = None) -> dict:
    """{(split, method, setting): CI} of the meta-test accuracy: a bootstrap over tasks and seeds with the trials'
    per-task accuracies (`per_task`: key, task, test_accuracy), over the seed means without them."""
    cols = setting_columns(table)
    swept = [c for c in cols if table[c].dropna().nunique() > 1]
    t = table.assign(setting=[setting_label(r, swept) for _, r in table.iterrows()])
    keys = ["split", "method", "setting"]
    if per_task is None:
        return seed_ci(t.rename(columns={"test_accuracy": "accuracy"}), keys)
    long = per_task.merge(t[["key", "seed", *keys]], on="key").rename(columns={"test_accuracy": "accuracy"})
    return table_ci(long, keys)


def cell(mean, std, seeds, ci) -> str:
    """`94.06 ± 2.13 [91.2, 96.5]`, or `94.06 (1 seed) [...]`, in percent."""
    spread = f"{pct(mean)} (1 seed)" if seeds <= 1 else pct(mean, std)
    return f"{spread} {names.interval(ci.low, ci.high)}"


def display_order(df: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Rows by split as the sweep ran them, then methods route by route (the CSVs keep their own order)."""
    split_rank = {s: i for i, s in enumerate(dict.fromkeys(table["split"]))}
    method_rank = {m: i for i, m in enumerate(names.route_order(dict.fromkeys(table["method"])))}
    keys = df.assign(_s=df["split"].map(split_rank), _m=df["method"].map(method_rank))
    return df.loc[keys.sort_values(["_s", "_m"], kind="stable").index]


def shown(setting: str) -> str:
    return setting.replace("guidance_scale=", "γ = ")


def markdown(table: pd.DataFrame, chosen: pd.DataFrame, name: str, per_task: pd.DataFrame | None = None) -> str:
    """The chosen settings first (what to report), then every setting's validation and meta-test accuracy."""
    cis = test_ci(table, per_task)
    over = "tasks and seeds" if per_task is not None else "the seed means"
    tasks = "; ".join(f"{names.split_name(sp)}: {int(g['n_val'].iloc[0])} validation and {int(g['n_test'].iloc[0])} meta-test tasks"
                      for sp, g in table.groupby("split", sort=False))
    lines = [f"# Sweep `{name}`", "", f"Query accuracy (%), {spread_text(table)}, averaged over "
             f"the tasks of each split ({tasks}). `val`: held-out meta-train tasks (settings are chosen there); "
             f"`meta-test`: meta-test tasks, with the 95 % CI of a bootstrap over {over} in brackets.", "",
             "## Chosen on the validation tasks", "",
             "| split | method | chosen setting | val | meta-test at chosen | seeds | best on meta-test (not a fair choice) |",
             "|---|---|---|---|---|---|---|"]
    for _, r in display_order(chosen, table).iterrows():
        best = f"{shown(r['best_test_setting'])}: {pct(r['best_test_mean'])}" if r["settings_tried"] > 1 else "-"
        ci = cis[(r["split"], r["method"], r["setting"])]
        lines.append(f"| {names.split_name(r['split'])} | {names.method_name(r['method'])} | {shown(r['setting'])} | {pct(r['val_mean'])} | "
                     f"**{cell(r['test_mean'], r['test_std'], r['seeds'], ci)}** | {r['seeds']} | {best} |")
    lines += ["", "## Every setting", "", "| split | method | setting | val | meta-test | seeds |", "|---|---|---|---|---|---|"]
    for _, r in display_order(settings_summary(table), table).iterrows():
        ci = cis[(r["split"], r["method"], r["setting"])]
        val = f"{pct(r['val_mean'])} (1 seed)" if r["seeds"] <= 1 else pct(r["val_mean"], r["val_std"])
        lines.append(f"| {names.split_name(r['split'])} | {names.method_name(r['method'])} | {shown(r['setting'])} | {val} | "
                     f"{cell(r['test_mean'], r['test_std'], r['seeds'], ci)} | {r['seeds']} |")
    return "\n".join(lines) + "\n"


GAMMA = "guidance_scale"


def curve_plot(table: pd.DataFrame, chosen: pd.DataFrame, path: Path, name: str, per_task: pd.DataFrame | None = None) -> bool:
    """Meta-test accuracy vs the swept parameter (γ first), one panel per split, one colour per route.

    Swept methods are lines with a 95 % CI band (`test_ci`) and their validation curve dotted;
    methods the parameter does not affect are horizontal lines in their route's colour; chance and
    oracle are black reference lines. The legend sits under the panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    cols = setting_columns(table)
    varying = [c for c in X_ORDER if c in cols and table[c].dropna().nunique() > 1]
    varying += [c for c in cols if c.startswith("train.") and table[c].dropna().nunique() > 1]
    if not varying:
        return False
    x = varying[0]
    splits = list(dict.fromkeys(table["split"]))
    cis = test_ci(table, per_task)
    swept = [c for c in cols if table[c].dropna().nunique() > 1]
    methods = names.route_order(dict.fromkeys(table["method"]))
    # methods the parameter does not change: flat lines, told apart by dash pattern within their route's colour
    dashes = ["--", "-.", (0, (6, 2, 1, 2, 1, 2)), (0, (12, 3)), (0, (3, 1, 3, 4))]
    flat = [m for m in methods if names.route(m) != "reference" and not table.loc[table["method"] == m, x].notna().any()]
    style = {m: dashes[[f for f in flat if names.route(f) == names.route(m)].index(m) % len(dashes)] for m in flat}
    # swept methods of one route (e.g. HVAE + HyperLDM and its hybrid): told apart by marker within the colour
    markers = ["o", "s", "^", "D", "v"]
    curved = [m for m in methods if names.route(m) != "reference" and m not in flat]
    mark = {m: markers[[f for f in curved if names.route(f) == names.route(m)].index(m) % len(markers)] for m in curved}
    fig, axes = plt.subplots(1, len(splits), figsize=(max(5 * len(splits) + 0.5, 9.5), 5.2), squeeze=False, sharey=True)
    for ax, split in zip(axes[0], splits):
        t = table[table["split"] == split]
        for method in methods:
            g, colour, label = t[t["method"] == method], names.route_colour(method), names.method_name(method)
            if g.empty:
                continue
            if names.route(method) == "reference":
                ax.axhline(100 * g["test_accuracy"].mean(), color="black", lw=1.2, ls="--" if method == "chance" else ":", label=label)
            elif g[x].notna().any():
                s = g.groupby(x)[["test_accuracy", "val_accuracy"]].agg(["mean"]).sort_index()
                xs = s.index.to_numpy(dtype=float)
                ci = [cis[(split, method, setting_label(g[g[x] == v].iloc[0], swept))] for v in s.index]
                ax.plot(xs, 100 * s[("test_accuracy", "mean")], marker=mark[method], color=colour, lw=2, label=f"{label} (meta-test)")
                ax.fill_between(xs, [100 * c.low for c in ci], [100 * c.high for c in ci], color=colour, alpha=0.18)
                ax.plot(xs, 100 * s[("val_accuracy", "mean")], ls=":", marker=mark[method], ms=4, fillstyle="none", color=colour,
                        lw=1.2, label=f"{label} (validation)")
                c = chosen[(chosen["split"] == split) & (chosen["method"] == method)]
                if len(c) and x == GAMMA and pd.notna(c[GAMMA].iloc[0]):
                    ax.plot([c[GAMMA].iloc[0]], [100 * c["test_mean"].iloc[0]], marker="*", ms=15, color=colour,
                            markeredgecolor="black", ls="none")
            else:
                ax.axhline(100 * g["test_accuracy"].mean(), ls=style[method], lw=1.4, color=colour, label=label)
        grid = sorted(table[x].dropna().unique())
        if x == GAMMA:
            ax.set_xscale("symlog", linthresh=1.0, linscale=0.6)
            ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_locator(FixedLocator(grid))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("guidance scale γ (★ chosen on validation)" if x == GAMMA else x)
        ax.set_ylabel("query accuracy (%)")
        ax.set_title(names.split_name(split), fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    n_test = " and ".join(f"{int(g['n_test'].iloc[0])} ({names.split_name(sp)})" for sp, g in table.groupby("split", sort=False))
    fig.legend(handles, labels, fontsize=7.5, loc="lower center", ncol=3, frameon=False, bbox_to_anchor=(0.5, 0.04))
    fig.suptitle(f"Sweep {name}: accuracy on {n_test} meta-test tasks, {seeds_text(table)}", fontsize=11)
    over = "tasks and seeds" if per_task is not None else "the seed means"
    fig.text(0.01, 0.005, textwrap.fill(f"Lines: mean over seeds; bands: 95 % bootstrap CI over {over}. Colour = route "
             "(blue HNet, orange HVAE, grey baselines); black dashed: chance, black dotted: oracle.",
                                        width=int(17 * fig.get_figwidth())), fontsize=7)
    rows = -(-len(labels) // 3)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * rows, 1, 0.97))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)
    return True


def write(table: pd.DataFrame, folder: Path, name: str, per_task: pd.DataFrame | None = None,
          features_info: dict | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """results.csv, results.md and curve.png under `folder` (CIs over tasks and seeds with `per_task`); returns (chosen, paths).

    `features_info` (the features' info.json) names the split `given` in the Markdown and the plot; the CSVs keep it."""
    chosen = choose(table)
    csv, md, png = folder / "results.csv", folder / "results.md", folder / "curve.png"
    with atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(folder / "chosen.csv") as tmp:
        chosen.to_csv(tmp, index=False)
    shown, shown_chosen = names.resolve_given(table, features_info), names.resolve_given(chosen, features_info)
    write_text(md, markdown(shown, shown_chosen, name, per_task))
    paths = [csv, folder / "chosen.csv", md]
    if curve_plot(shown, shown_chosen, png, name, per_task):
        paths.append(png)
    return chosen, paths
