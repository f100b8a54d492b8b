"""A sweep's results: per-trial CSV, settings chosen on the validation tasks, a Markdown table, a γ-curve plot.

Settings are chosen per (split, method) by mean *validation* accuracy over seeds (held-out meta-train
tasks); the meta-test accuracy at the chosen setting is what gets reported. Ties go to the first
setting in sorted order (e.g. the smaller γ).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.storage.atomic import atomic_path, write_text
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
    if pd.isna(m):
        return "n/a"
    return f"{100 * m:.2f}" + ("" if s is None else f" ± {100 * (0 if pd.isna(s) else s):.2f}")


def markdown(table: pd.DataFrame, chosen: pd.DataFrame, name: str) -> str:
    """The chosen settings first (what to report), then every setting's validation and meta-test accuracy."""
    seeds = ", ".join(map(str, sorted(table["seed"].unique())))
    lines = [f"# Sweep `{name}`", "", f"Query accuracy (%), mean ± std over seeds {seeds}. `val`: held-out meta-train "
             "tasks (settings are chosen there); `test`: meta-test tasks.", "",
             "## Chosen on the validation tasks", "",
             "| split | method | chosen setting | val | meta-test at chosen | seeds | best on meta-test (not a fair choice) |",
             "|---|---|---|---|---|---|---|"]
    for _, r in chosen.iterrows():
        best = f"{r['best_test_setting']}: {pct(r['best_test_mean'])}" if r["settings_tried"] > 1 else "-"
        lines.append(f"| {r['split']} | {r['method']} | {r['setting']} | {pct(r['val_mean'])} | "
                     f"**{pct(r['test_mean'], r['test_std'])}** | {r['seeds']} | {best} |")
    lines += ["", "## Every setting", "", "| split | method | setting | val | meta-test | seeds |", "|---|---|---|---|---|---|"]
    for _, r in settings_summary(table).iterrows():
        lines.append(f"| {r['split']} | {r['method']} | {r['setting']} | {pct(r['val_mean'], r['val_std'])} | "
                     f"{pct(r['test_mean'], r['test_std'])} | {r['seeds']} |")
    return "\n".join(lines) + "\n"


def curve_plot(table: pd.DataFrame, chosen: pd.DataFrame, path: Path, name: str) -> bool:
    """Accuracy vs the swept parameter (γ first) per split: mean line, ±std seed band, chosen point; baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = setting_columns(table)
    varying = [c for c in X_ORDER if c in cols and table[c].dropna().nunique() > 1]
    varying += [c for c in cols if c.startswith("train.") and table[c].dropna().nunique() > 1]
    if not varying:
        return False
    x = varying[0]
    splits = list(dict.fromkeys(table["split"]))
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits) + 2.5, 4.5), squeeze=False)
    colors = iter(plt.cm.tab10.colors + plt.cm.Dark2.colors * 4)
    color = {m: next(colors) for m in dict.fromkeys(table["method"])}  # one colour per method on every panel
    for ax, split in zip(axes[0], splits):
        t = table[table["split"] == split]
        for method, g in t.groupby("method", sort=False):
            if g[x].notna().any():
                s = g.groupby(x)[["test_accuracy", "val_accuracy"]].agg(["mean", "std"]).sort_index()
                xs = s.index.to_numpy(dtype=float)
                m, sd = 100 * s[("test_accuracy", "mean")], 100 * s[("test_accuracy", "std")].fillna(0)
                line, = ax.plot(xs, m, marker="o", color=color[method], label=f"{method} (meta-test)")
                ax.fill_between(xs, m - sd, m + sd, color=line.get_color(), alpha=0.2)
                ax.plot(xs, 100 * s[("val_accuracy", "mean")], ls=":", color=line.get_color(), label=f"{method} (val)")
                c = chosen[(chosen["split"] == split) & (chosen["method"] == method)]
                if len(c) and x == "guidance_scale" and pd.notna(c["guidance_scale"].iloc[0]):
                    ax.plot([c["guidance_scale"].iloc[0]], [100 * c["test_mean"].iloc[0]], marker="*", ms=14,
                            color=line.get_color(), ls="none")
            else:
                ax.axhline(100 * g["test_accuracy"].mean(), ls="--", lw=1.2, color=color[method], label=f"{method} (meta-test)")
        if x == "guidance_scale":
            ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel(x + ("  (★ chosen on val)" if x == "guidance_scale" else ""))
        ax.set_ylabel("query accuracy (%)")
        ax.set_title(f"{name}: {split}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / fig.get_figwidth(), 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True


def write(table: pd.DataFrame, folder: Path, name: str) -> tuple[pd.DataFrame, list[Path]]:
    """results.csv, results.md and curve.png under `folder`; returns (chosen, paths)."""
    chosen = choose(table)
    csv, md, png = folder / "results.csv", folder / "results.md", folder / "curve.png"
    with atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(folder / "chosen.csv") as tmp:
        chosen.to_csv(tmp, index=False)
    write_text(md, markdown(table, chosen, name))
    paths = [csv, folder / "chosen.csv", md]
    if curve_plot(table, chosen, png, name):
        paths.append(png)
    return chosen, paths
