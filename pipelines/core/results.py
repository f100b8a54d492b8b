"""Results tables: per-seed CSV, a mean ± std Markdown table and a grouped bar chart, written atomically."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from orchestrator.storage.atomic import atomic_path, write_text


def method_label(method: str, guidance_scale: float | None, pretty: bool = False) -> str:
    """A method's name with its guidance scale: `hnet_hyperldm_g1.5` (metric-safe) or `hnet_hyperldm (γ=1.5)`."""
    if guidance_scale is None or pd.isna(guidance_scale):
        return method
    return f"{method} (γ={guidance_scale:g})" if pretty else f"{method}_g{guidance_scale:g}"


def summary(table: pd.DataFrame, group: str = "split", value: str = "accuracy") -> pd.DataFrame:
    """Mean and std of `value` over seeds for every (method label, `group` value), methods in first-seen order."""
    t = table.assign(label=[method_label(m, g, pretty=True) for m, g in zip(table["method"], table["guidance_scale"])])
    order = list(dict.fromkeys(t["label"]))
    s = t.groupby(["label", group], sort=False)[value].agg(["mean", "std", "count"]).reset_index()
    s["label"] = pd.Categorical(s["label"], order, ordered=True)
    return s.sort_values(["label", group]).reset_index(drop=True)


def markdown(table: pd.DataFrame, title: str, group: str = "split", value: str = "accuracy",
             unit: str = "query accuracy, %", scale: float = 100.0) -> str:
    """Methods as rows, `group` values as columns, cells `mean ± std` of `value` times `scale` (n seeds)."""
    s = summary(table, group, value)
    cols = list(dict.fromkeys(table[group]))
    seeds = sorted(table["seed"].unique())
    lines = [f"# {title}", "", f"Mean ± std over seeds {', '.join(map(str, seeds))} ({unit}).", "",
             "| method | " + " | ".join(map(str, cols)) + " |", "|---|" + "---|" * len(cols)]
    for label, g in s.groupby("label", sort=False, observed=True):
        cell = {r[group]: f"{scale * r['mean']:.2f} ± {scale * (0 if pd.isna(r['std']) else r['std']):.2f}" for _, r in g.iterrows()}
        lines.append(f"| {label} | " + " | ".join(cell.get(c, "") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(table: pd.DataFrame, path: Path, title: str, group: str = "split") -> None:
    """Grouped bars (one group per method, one bar per `group` value) with ±std error bars, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    s = summary(table, group)
    labels = list(dict.fromkeys(s["label"].astype(str)))
    cols = list(dict.fromkeys(table[group]))
    x, width = np.arange(len(labels)), 0.8 / max(1, len(cols))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(labels)), 4))
    for i, col in enumerate(cols):
        g = s[s[group] == col].set_index(s[s[group] == col]["label"].astype(str))
        ax.bar(x + i * width, [100 * g["mean"].get(lb, np.nan) for lb in labels], width,
               yerr=[100 * np.nan_to_num(g["std"].get(lb, 0.0)) for lb in labels], label=str(col), capsize=2)
    ax.set_xticks(x + width * (len(cols) - 1) / 2, labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("query accuracy (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_results(table: pd.DataFrame, folder: Path, stem: str, title: str, group: str = "split",
                  value: str = "accuracy", unit: str = "query accuracy, %", scale: float = 100.0) -> list[Path]:
    """`<stem>.csv`, `<stem>.md` and `<stem>.png` (accuracy tables only) under `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    csv, md, png = (folder / f"{stem}.{ext}" for ext in ("csv", "md", "png"))
    with atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False)
    write_text(md, markdown(table, title, group, value, unit, scale))
    if value != "accuracy":
        return [csv, md]
    bar_chart(table, png, title, group)
    return [csv, md, png]
