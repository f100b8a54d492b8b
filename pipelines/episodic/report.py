"""The few-shot stage's results: summary per (split, method, K), the Markdown table, the plot, the files."""
from __future__ import annotations

from pathlib import Path


def summary(table):
    """Per (split, method, K): mean and std over seeds of the accuracy, mean per-seed CI, number of seeds."""
    keys = ["split", "method", "shots"]
    g = table.groupby(keys, sort=False)["accuracy"]
    out = g.agg(mean="mean", std="std", n="count").reset_index()
    out["ci95"] = table.groupby(keys, sort=False)["ci95"].mean().values
    return out


def seed_cis(table) -> dict:
    """{(split, method, K): CI} of the mean over seeds: seeds resampled, each seed's mean redrawn within its episode CI."""
    from pipelines.core.bootstrap import bootstrap_ci_se

    return {k: bootstrap_ci_se(g["accuracy"].to_numpy(), g["ci95"].to_numpy() / 1.96)
            for k, g in table.groupby(["split", "method", "shots"], sort=False)}


def setup_text(cfg) -> str:
    """How the numbers were made: episodes, meta-training budgets, fine-tuning (empty without the stage's config)."""
    if cfg is None:
        return ""
    return (f"Meta-test episodes per (split, method, K, seed): {cfg.eval_episodes}, {cfg.queries} queries each; "
            "meta-training steps x episodes: " + ", ".join(
                f"{s.train_steps} x {s.tasks_per_batch} for {name} (lr {s.lr:g})" for name, s in (
                    ("HyperMAML", cfg.hypermaml), ("HyperTransformer", cfg.hypertransformer), ("MetaDiff", cfg.metadiff),
                    ("MAML and FOMAML", cfg.maml)))
            + f"{' (one model per seed for all K)' if cfg.mixed_shots else ''}. "
            f"Fine-tuning: a zero-shot model's weights for the task, then {cfg.finetune.steps} gradient steps "
            f"(lr {cfg.finetune.lr:g}) on the support set; HNet + HyperLDM: from the description (γ 1, "
            f"{cfg.finetune.ldm_steps} DDIM steps), support-guided: plus support-loss guidance (scale {cfg.finetune.ldm_support_scale:g}). ")


def markdown(table, cfg=None) -> str:
    """The few-shot tables, one per split, in percent: mean ± std over seeds [95 % CI], then each seed ± its episode CI."""
    import pandas as pd

    from pipelines.core import names
    from pipelines.core.results import spread_text

    s, cis = summary(table), seed_cis(table)
    ks = sorted(table["shots"].unique())
    episodes = int(table["episodes"].iloc[0]) if "episodes" in table else 0
    lines = [f"# Few-shot query accuracy: {table['suite'].iloc[0]}", "",
             setup_text(cfg) + f"Query accuracy (%) over {episodes} meta-test episodes (tasks drawn from the meta-test "
             f"tasks) per seed. Cells: {spread_text(table)}, the 95 % CI of a bootstrap over seeds and "
             "episodes in brackets; per seed: mean ± 95 % CI (1.96 std/sqrt(n)) over episodes. "
             "Chance has no seed: its cell is the episodes' CI.", ""]
    for split in dict.fromkeys(table["split"]):
        t_split = table[table["split"] == split]
        lines += [f"## {names.split_name(split)}", "",
                  "| route | method | " + " | ".join(f"{k}-shot" for k in ks) + " | " + " | ".join(f"{k}-shot per seed" for k in ks) + " |",
                  "|---" * (2 + 2 * len(ks)) + "|"]
        for method in names.route_order(dict.fromkeys(t_split["method"])):
            cells, seeds = [], []
            for k in ks:
                r = s[(s["split"] == split) & (s["method"] == method) & (s["shots"] == k)].iloc[0]
                ci = cis[(split, method, k)]
                if r["n"] > 1:
                    cells.append(f"{names.mean_spread(r['mean'], r['std'], r['n'])} {names.interval(ci.low, ci.high)}")
                elif method == "chance":
                    cells.append(f"{names.pct(r['mean'])} ± {names.pct(r['ci95'])}")
                else:
                    cells.append(f"{names.pct(r['mean'])} (1 seed) {names.interval(ci.low, ci.high)}")
                t = t_split[(t_split["method"] == method) & (t_split["shots"] == k)]
                seeds.append(", ".join(("" if pd.isna(x.seed) else f"s{x.seed}: ") + f"{names.pct(x.accuracy)} ± {names.pct(x.ci95)}"
                                       for x in t.itertuples()))
            route = names.ROUTES[names.route(method)][0]
            lines.append(f"| {route} | {names.method_name(method)} | " + " | ".join(cells) + " | " + " | ".join(seeds) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(table, path: Path, cfg=None) -> None:
    """One panel per split: a bar per (method, K), one colour per route (K = 1 hatched), 95 % CI error bars, chance line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from pipelines.core import names
    from pipelines.core.results import seeds_text

    s, cis = summary(table), seed_cis(table)
    ks = sorted(table["shots"].unique())
    splits = list(dict.fromkeys(table["split"]))
    methods = [m for m in names.route_order(dict.fromkeys(table["method"])) if m != "chance"]
    fig, axes = plt.subplots(len(splits), 1, figsize=(max(0.9 * len(methods) + 3, 9), 3.6 * len(splits) + 1.2), squeeze=False)
    width = 0.8 / len(ks)
    hatches = ["//", "", "..", "xx"]
    for ax, split in zip(axes[:, 0], splits):
        here = [m for m in methods if ((s["split"] == split) & (s["method"] == m)).any()]
        for i, k in enumerate(ks):
            r = s[(s["split"] == split) & (s["shots"] == k)].set_index("method").reindex(here)
            lo, hi = np.array([cis[(split, m, k)].low for m in here]), np.array([cis[(split, m, k)].high for m in here])
            err = [100 * (r["mean"] - lo), 100 * (hi - r["mean"])]
            ax.bar(np.arange(len(here)) + (i - (len(ks) - 1) / 2) * width, 100 * r["mean"], width, yerr=err, capsize=2,
                   color=[names.route_colour(m) for m in here], edgecolor="white", hatch=hatches[i % len(hatches)])
        chance = s[(s["split"] == split) & (s["method"] == "chance")]["mean"]
        if len(chance):
            ax.axhline(100 * chance.mean(), color="black", ls="--", lw=1.2)
        ax.set_xticks(np.arange(len(here)), [names.method_name(m) for m in here], rotation=25, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("query accuracy (%)")
        ax.set_title(names.split_name(split), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    used = [r for r in names.ROUTES if r != "reference" and any(names.route(m) == r for m in methods)]
    handles = [Patch(color=names.ROUTES[r][1], label=names.ROUTES[r][0]) for r in used]
    handles += [Patch(facecolor="lightgray", edgecolor="white", hatch=hatches[i % len(hatches)], label=f"{k}-shot") for i, k in enumerate(ks)]
    handles.append(Line2D([], [], color="black", ls="--", label="chance"))
    height = fig.get_figheight()
    fig.suptitle(f"Few-shot query accuracy, {table['suite'].iloc[0]}", y=1 - 0.08 / height, va="top", fontsize=11)
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1 - 0.3 / height))
    episodes = int(table["episodes"].iloc[0])
    fig.text(0.01, 0.005, f"Bars: mean over {seeds_text(table)} of the accuracy over {episodes} meta-test episodes. Error bars: "
             "95 % bootstrap CI over seeds and episodes. Dashed: chance.", fontsize=7)
    fig.tight_layout(rect=(0, 0.2 / height, 1, 1 - 0.6 / height))
    fig.savefig(path, dpi=150, format="png")
    plt.close(fig)


def write_results(table, folder: Path, cfg) -> list[Path]:
    """few_shot.csv, few_shot.md and few_shot.png, each written atomically."""
    from orchestrator.storage.atomic import atomic_path, write_text

    paths = [folder / "few_shot.csv", folder / "few_shot.md", folder / "few_shot.png"]
    with atomic_path(paths[0]) as tmp:
        table.to_csv(tmp, index=False)
    write_text(paths[1], markdown(table, cfg))
    with atomic_path(paths[2]) as tmp:
        plot(table, tmp, cfg)
    return paths
