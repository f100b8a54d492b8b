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


def markdown(table, cfg) -> str:
    """The few-shot tables, one per split: mean ± std over seeds per K, then each seed's accuracy ± 95% CI."""
    import pandas as pd

    s = summary(table)
    ks = list(cfg.shots)
    lines = [f"# Few-shot query accuracy: {table['suite'].iloc[0]}", "",
             f"Meta-test episodes per (split, method, K, seed): {cfg.eval_episodes}, {cfg.queries} queries each; "
             "meta-training steps x episodes: " + ", ".join(
                 f"{s.train_steps} x {s.tasks_per_batch} for {name} (lr {s.lr:g})" for name, s in (
                     ("HyperMAML", cfg.hypermaml), ("HyperTransformer", cfg.hypertransformer), ("MetaDiff", cfg.metadiff),
                     ("MAML and FOMAML", cfg.maml)))
             + f"{' (one model per seed for all K)' if cfg.mixed_shots else ''}; seeds {list(cfg.seeds)}. "
             f"finetune_*: a zero-shot model's weights for the task, then {cfg.finetune.steps} gradient steps "
             f"(lr {cfg.finetune.lr:g}) on the support set; hnet_hyperldm: HyperLDM from the description (γ 1, "
             f"{cfg.finetune.ldm_steps} DDIM steps), _support_guided: plus support-loss guidance (scale {cfg.finetune.ldm_support_scale:g}). "
             "Mean ± std over seeds; per seed: mean ± 95% CI (1.96 std/sqrt(n)) over episodes.", ""]
    for split in dict.fromkeys(table["split"]):
        t_split = table[table["split"] == split]
        lines += [f"## {split} split", "",
                  "| method | " + " | ".join(f"{k}-shot" for k in ks) + " | " + " | ".join(f"{k}-shot per seed" for k in ks) + " |",
                  "|---" * (1 + 2 * len(ks)) + "|"]
        for method in dict.fromkeys(t_split["method"]):
            cells, seeds = [], []
            for k in ks:
                r = s[(s["split"] == split) & (s["method"] == method) & (s["shots"] == k)].iloc[0]
                cells.append(f"{r['mean']:.3f} ± {r['std']:.3f}" if r["n"] > 1 else f"{r['mean']:.3f}")
                t = t_split[(t_split["method"] == method) & (t_split["shots"] == k)]
                seeds.append(", ".join(("" if pd.isna(x.seed) else f"s{x.seed}: ") + f"{x.accuracy:.3f} ± {x.ci95:.3f}"
                                       for x in t.itertuples()))
            lines.append(f"| {method} | " + " | ".join(cells) + " | " + " | ".join(seeds) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(table, path: Path, cfg) -> None:
    """Grouped bars per split: mean accuracy per method and K, error bars = std over seeds (chance: its CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    s = summary(table)
    splits = list(dict.fromkeys(table["split"]))
    methods = list(dict.fromkeys(table["method"]))
    fig, axes = plt.subplots(len(splits), 1, figsize=(1.2 * len(methods) + 2, 3.4 * len(splits)), squeeze=False)
    width = 0.8 / len(cfg.shots)
    for ax, split in zip(axes[:, 0], splits):
        here = [m for m in methods if ((s["split"] == split) & (s["method"] == m)).any()]
        for i, k in enumerate(cfg.shots):
            r = s[(s["split"] == split) & (s["shots"] == k)].set_index("method").loc[here]
            err = np.where(r["n"] > 1, r["std"].fillna(0), r["ci95"])
            ax.bar(np.arange(len(here)) + (i - (len(cfg.shots) - 1) / 2) * width, r["mean"], width, yerr=err,
                   capsize=3, label=f"{k}-shot")
        ax.set_xticks(np.arange(len(here)), here, rotation=25, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("query accuracy")
        ax.set_title(f"few-shot, {table['suite'].iloc[0]} ({split} split)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
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
