"""Results tables: per-seed CSV, per-task CSV, a Markdown table with seed std and 95 % CI, a bar chart.

Every file is written atomically. Accuracies are fractions in the CSVs and percentages wherever a
reader looks (Markdown, figures). The CI is the two-level bootstrap of `pipelines.core.bootstrap`,
over tasks and seeds when the per-task accuracies are there, over seed means otherwise.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd

from orchestrator.storage.atomic import atomic_path, write_text
from pipelines.core import names
from pipelines.core.bootstrap import seed_ci, table_ci

TASKS_SUFFIX = "_tasks"  # <stem>_tasks.csv: one row per (split, method, γ, seed, task)


def method_label(method: str, guidance_scale: float | None, pretty: bool = False) -> str:
    """A method's name with its guidance scale: `hnet_hyperldm_g1.5` (metric-safe) or `hnet_hyperldm (γ=1.5)`."""
    if guidance_scale is None or pd.isna(guidance_scale):
        return method
    return f"{method} (γ={guidance_scale:g})" if pretty else f"{method}_g{guidance_scale:g}"


def _gamma(t: pd.DataFrame) -> pd.Series:
    return t["guidance_scale"].fillna(-1.0)  # a groupable key: -1 for methods without γ


def summary(table: pd.DataFrame, per_task: pd.DataFrame | None = None, group: str = "split") -> pd.DataFrame:
    """One row per (method, γ, `group`) in route order: mean, std and count of seeds, tasks, 95 % CI."""
    t = table.assign(g=_gamma(table))
    keys = ["method", "g", group]
    s = t.groupby(keys, sort=False).agg(mean=("accuracy", "mean"), std=("accuracy", "std"), seeds=("seed", "nunique"),
                                        tasks=("n_tasks", "first") if "n_tasks" in t else ("seed", "size")).reset_index()
    if per_task is not None:
        cis = table_ci(per_task.assign(g=_gamma(per_task)), keys)
    else:
        cis = seed_ci(t, keys)
    ci = [cis[(r.method, r.g, getattr(r, group))] for r in s.itertuples()]
    s["ci_low"], s["ci_high"], s["ci_over"] = [c.low for c in ci], [c.high for c in ci], [c.over for c in ci]
    s["guidance_scale"] = s["g"].where(s["g"] >= 0)
    s["name"] = [names.method_name(m, g) for m, g in zip(s["method"], s["guidance_scale"])]
    s["route"] = s["method"].map(names.route)
    order = {m: i for i, m in enumerate(names.route_order(dict.fromkeys(s["method"])))}
    return s.sort_values(["method", "g"], key=lambda c: c.map(order) if c.name == "method" else c, kind="stable") \
        .drop(columns="g").reset_index(drop=True)


def seeds_text(table: pd.DataFrame) -> str:
    """`3 seeds (0, 1, 2)` or `1 seed (0)`."""
    seeds = sorted(table["seed"].dropna().unique())
    listed = ", ".join(str(int(x)) for x in seeds)
    return f"1 seed ({listed})" if len(seeds) == 1 else f"{len(seeds)} seeds ({listed})"


def spread_text(table: pd.DataFrame) -> str:
    """How a cell's mean and spread were taken: `mean over 3 seeds (0, 1, 2) ± std over seeds`, or one seed's value."""
    if table["seed"].dropna().nunique() <= 1:
        return f"the value of {seeds_text(table)} (no std over seeds)"
    return f"mean over {seeds_text(table)} ± std over seeds"


def markdown(table: pd.DataFrame, title: str, per_task: pd.DataFrame | None = None, group: str = "split") -> str:
    """Methods as rows (grouped by route), splits as columns; cells `mean ± std [95 % CI]` in percent."""
    s = summary(table, per_task, group)
    cols = list(dict.fromkeys(table[group]))
    tasks = ", ".join(f"{int(s.loc[s[group] == c, 'tasks'].iloc[0])} ({names.split_name(c)})" for c in cols)
    over = "tasks and seeds" if per_task is not None else "seed means (this run saved no per-task accuracies)"
    lines = [f"# {title}", "",
             f"Query accuracy (%) averaged over each split's meta-test tasks; tasks per split: {tasks}. "
             f"Cells: {spread_text(table)}; in brackets the 95 % CI from a bootstrap over {over}.", "",
             "| route | method | " + " | ".join(names.split_name(c) for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for (_, name), g in s.groupby(["method", "name"], sort=False):
        cell = {r[group]: f"{names.mean_spread(r['mean'], r['std'], r['seeds'])} {names.interval(r['ci_low'], r['ci_high'])}"
                for _, r in g.iterrows()}
        route = names.ROUTES[g["route"].iloc[0]][0]
        lines.append(f"| {route} | {name} | " + " | ".join(cell.get(c, "") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(table: pd.DataFrame, path: Path, title: str, per_task: pd.DataFrame | None = None, group: str = "split") -> None:
    """One panel per split: a horizontal bar per method, one colour per route, 95 % CI error bars, chance and oracle lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    s = summary(table, per_task, group)
    cols = list(dict.fromkeys(table[group]))
    bars = s[s["route"] != "reference"]
    rows = list(dict.fromkeys(bars["name"]))
    route_of = dict(zip(bars["name"], bars["route"]))
    y, at = {}, 0.0  # a half-row gap between routes
    for i, name in enumerate(rows):
        at += 0.6 if i and route_of[name] != route_of[rows[i - 1]] else 0.0
        y[name], at = at, at + 1
    height = 0.28 * (at + 1) + 2.0
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols) + 2.4, height), squeeze=False, sharey=True)
    for ax, col in zip(axes[0], cols):
        b = bars[bars[group] == col].set_index("name").reindex(rows)
        err = [100 * (b["mean"] - b["ci_low"]).fillna(0), 100 * (b["ci_high"] - b["mean"]).fillna(0)]
        ax.barh([y[r] for r in rows], 100 * b["mean"], xerr=err, color=[names.ROUTES[route_of[r]][1] for r in rows],
                capsize=2, height=0.75, error_kw={"lw": 1})
        ref = s[(s[group] == col) & (s["route"] == "reference")].set_index("method")["mean"]
        for m, style in (("chance", "--"), ("oracle", ":")):
            if m in ref:
                ax.axvline(100 * ref[m], color="black", ls=style, lw=1.3)
        ax.set_xlim(0, 100)
        ax.set_xlabel("query accuracy (%)")
        ax.set_title(names.split_name(col), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks([y[r] for r in rows], rows, fontsize=8)
    axes[0][0].set_ylim(at - 0.4, -0.6)  # first method on top (the axes are shared: set once)
    used = [r for r in names.ROUTES if r != "reference" and r in set(bars["route"])]
    handles = [Patch(color=names.ROUTES[r][1], label=names.ROUTES[r][0]) for r in used]
    handles += [Line2D([], [], color="black", ls="--", label="chance"), Line2D([], [], color="black", ls=":", label="oracle")]
    fig.suptitle(title, y=1 - 0.08 / height, va="top", fontsize=11)
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1 - 0.3 / height))
    text = textwrap.fill(caption(s, table, per_task is not None, group), width=int(17 * fig.get_figwidth()))
    fig.text(0.01, 0.01, text, fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, (0.15 + 0.13 * text.count(chr(10))) / height + 0.01, 1, 1 - 0.6 / height))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)


def caption(s: pd.DataFrame, table: pd.DataFrame, by_task: bool, group: str = "split") -> str:
    """What a bar and an error bar are, with the number of tasks and seeds."""
    tasks = ", ".join(f"{int(g['tasks'].iloc[0])} ({names.split_name(c)})" for c, g in s.groupby(group, sort=False))
    over = "tasks and seeds" if by_task else "the seed means"
    return (f"Bars: mean query accuracy over the meta-test tasks, {tasks}, and {seeds_text(table)}. "
            f"Error bars: 95 % bootstrap CI over {over}. Dashed: chance; dotted: oracle (per-task expert).")


def write_results(table: pd.DataFrame, folder: Path, stem: str, title: str, per_task: pd.DataFrame | None = None,
                  group: str = "split", features_info: dict | None = None) -> list[Path]:
    """`<stem>.csv`, `<stem>_tasks.csv` (with per-task accuracies), `<stem>.md` and `<stem>.png`; returns their paths.

    `features_info` (the features' info.json) names the split `given` in the Markdown and the chart."""
    folder.mkdir(parents=True, exist_ok=True)
    csv, md, png = (folder / f"{stem}.{ext}" for ext in ("csv", "md", "png"))
    with atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False)
    paths = [csv, md, png]
    if per_task is not None:
        paths.append(folder / f"{stem}{TASKS_SUFFIX}.csv")
        with atomic_path(paths[-1]) as tmp:
            per_task.to_csv(tmp, index=False)
    render(table, folder, stem, title, per_task, group, features_info)
    return paths


def render(table: pd.DataFrame, folder: Path, stem: str, title: str, per_task: pd.DataFrame | None = None,
           group: str = "split", features_info: dict | None = None) -> list[Path]:
    """The Markdown table and the chart from the CSV data alone (no training): `<stem>.md`, `<stem>.png`."""
    md, png = folder / f"{stem}.md", folder / f"{stem}.png"
    table = names.resolve_given(table, features_info)
    per_task = None if per_task is None else names.resolve_given(per_task, features_info)
    write_text(md, markdown(table, title, per_task, group))
    bar_chart(table, png, title, per_task, group)
    return [md, png]


def measure_table(table: pd.DataFrame, folder: Path, stem: str, title: str, group: str, unit: str,
                  scale: float = 100.0, csv: bool = True) -> list[Path]:
    """`<stem>.csv` and `<stem>.md` for a table of measures that are not one accuracy (column `value`):
    methods as rows, `group` values as columns, cells `mean ± std` over seeds times `scale`. With `csv`
    False only the Markdown is (re)written, from a table read back from its CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / f"{stem}.md"
    if csv:
        with atomic_path(folder / f"{stem}.csv") as tmp:
            table.to_csv(tmp, index=False)
    t = table.assign(label=[names.method_name(m, g) for m, g in zip(table["method"], table["guidance_scale"])])
    cols = list(dict.fromkeys(t[group]))
    s = t.groupby(["label", group], sort=False)["value"].agg(["mean", "std", "count"]).reset_index()
    lines = [f"# {title}", "", f"{spread_text(table).capitalize()} ({unit}).", "",
             "| method | " + " | ".join(map(str, cols)) + " |", "|---|" + "---|" * len(cols)]
    digits = 1 if scale == 100.0 else 3  # points to one decimal, raw measures (cosine, L2) to three

    def spread(r) -> str:
        one = f"{scale * r['mean']:.{digits}f}"
        return f"{one} (1 seed)" if r["count"] <= 1 or pd.isna(r["std"]) else f"{one} ± {scale * r['std']:.{digits}f}"

    for label, g in s.groupby("label", sort=False):
        cell = {r[group]: spread(r) for _, r in g.iterrows()}
        lines.append(f"| {label} | " + " | ".join(cell.get(c, "") for c in cols) + " |")
    write_text(md, "\n".join(lines) + "\n")
    return [folder / f"{stem}.csv", md] if csv else [md]
