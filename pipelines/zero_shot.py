"""Bring your own descriptions: generate task networks for every task of a task file with a trained run.

    python -m pipelines.zero_shot --tasks my_tasks.jsonl --from runs/default --method hnet_hyperldm --guidance 1

Encodes the file's descriptions, answer prompts and images with the run's own encoders, generates
one weight vector per task with the chosen method (trained on the run's meta-train tasks of `--split`,
seed `--seed`), writes them to `<out>/store/weights`, and, where examples carry answers, prints
per-task and mean accuracy over every labelled example (nothing of the task is used to generate it).
The last line is one JSON object: mean_accuracy, tasks, method, guidance, split, seed, store.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipelines.core.config import ConfigError


def parse(argv: list[str] | None):
    from pipelines.zeroshot.methods import GENERATIVE
    from pipelines.zeroshot.sampling import SamplingSettings

    p = argparse.ArgumentParser(prog="python -m pipelines.zero_shot", description=__doc__.strip().splitlines()[0])
    p.add_argument("--tasks", required=True, type=Path, help="JSONL task file (docs/task_file.md)")
    p.add_argument("--from", dest="source", required=True, type=Path, help="run directory of a finished pipelines.full run")
    p.add_argument("--method", default="hnet_hyperldm", choices=GENERATIVE, help="generation method (default hnet_hyperldm)")
    p.add_argument("--guidance", type=float, default=SamplingSettings.guidance_scale,
                   help=f"HyperLDM classifier-free guidance scale γ (default {SamplingSettings.guidance_scale:g})")
    p.add_argument("--split", default=None, help="which split's models to use (default: the run's first)")
    p.add_argument("--seed", type=int, default=None, help="which training seed's models to use (default: the run's first)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder, outside the source run (default: <run>-zero-shot-<task file name> beside it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from models.expert_training import pad_batch
    from models.zeroshot.tasks import TaskData, task_accuracy
    from orchestrator.storage.store import WeightStore
    from pipelines import features
    from orchestrator.storage.rundir import RunDir
    from pipelines.core.cli import RunContext
    from pipelines.core.config import build
    from pipelines.evaluate import EvaluateConfig
    from pipelines.zeroshot.data import load_split, read_plan
    from pipelines.zeroshot.methods import generate
    from pipelines.zeroshot.trained import TrainedModels

    args = parse(argv)
    sampling = dataclasses.replace(EvaluateConfig().sampling, guidance_scale=args.guidance)  # checked before any work
    src = RunDir(args.source)
    if not args.tasks.is_file():
        raise ConfigError(f"--tasks {args.tasks}: no such file; give a JSONL task file (docs/task_file.md)")
    splits, seeds = read_plan(src)
    split = args.split or splits[0]
    seed = seeds[0] if args.seed is None else args.seed
    if split not in splits or seed not in seeds:
        raise ConfigError(f"--split {split} --seed {seed}: the run trained splits {splits} and seeds {seeds}")
    info = json.loads((src.features / "info.json").read_text())
    if "config" not in info:
        raise ConfigError(f"{src.features}/info.json does not record its features config; rerun the features stage of that run")
    out = RunDir(args.out or src.root.parent / f"{src.root.name}-zero-shot-{args.tasks.stem}")
    if out.root == src.root or src.root in out.root.parents or out.root in src.root.parents:
        raise ConfigError(f"--out {out.root} is, holds or lies inside the run it reads ({src.root}); "
                          "choose a folder outside that run")
    # The run's encoder settings, the new task file; every task is a generation target.
    keep = {k: v for k, v in info["config"].items() if k not in ("tasks_file", "export_tasks", "cache_dir")}
    # image_dims=0: encode at full width, then apply the run's own projection (not one refit here).
    fcfg = build(features.FeaturesConfig, keep,
                 {"tasks_file": str(args.tasks.resolve()), "cache_dir": str(src.feature_cache), "image_dims": 0})
    ctx = RunContext(run=out, progress=not args.no_progress)
    feats = features.run(fcfg, ctx)
    projection = src.features / features.PROJECTION_FILE
    if projection.exists():
        feats.image_feats = features.apply_projection(feats.image_feats, projection)
    if feats.d_txt != info["d_txt"] or feats.d_img != info["d_img"]:
        raise ConfigError("the task file's features do not match the run's encoders")

    data = load_split(src, split)
    X, T = torch.tensor(feats.image_feats), torch.tensor(feats.text_feats)
    rows = list(feats.tasks.itertuples())
    every = [(torch.as_tensor(np.concatenate([r.support_images, r.query_images])),
              torch.as_tensor(np.concatenate([r.support_labels, r.query_labels]))) for r in rows]
    batch = pad_batch([T[torch.tensor(r.prompt_texts)] for r in rows], every, every)
    c = T[torch.tensor([int(r.desc_text) for r in rows])]
    w = generate(args.method, TrainedModels(src, data, seed), c, sampling)  # [n_tasks, P]
    labelled = batch.query_n > 0
    acc = task_accuracy(TaskData(data.layout, X, batch, c), w) if labelled.any() else torch.full((len(rows),), float("nan"))

    meta = pd.DataFrame([dict(
        task_id=r.id, description=r.description, split=r.split, seed=seed, step=0, final=True, layout_id=data.layout.id,
        support_acc=float("nan"), support_loss=float("nan"), query_acc=float(a), query_loss=float("nan"),
        config_hash=f"zero-shot:{args.method}:{args.guidance:g}:{split}:{seed}",
    ) for r, a in zip(rows, acc)])
    store = WeightStore(out.store)
    store.write_shard(f"zero-shot-{args.method}", meta, w.numpy(), {"source_run": str(src), "method": args.method})
    store.set_info(layout_id=data.layout.id, n_weights=data.layout.size, spec=asdict(data.layout.spec))
    for r, a, n in zip(rows, acc.tolist(), batch.query_n.tolist()):
        print(f"{r.id}\t{'n/a' if n == 0 else f'{100 * a:.2f}%'}\t{r.description}")
    scored = acc[labelled]
    mean = float(scored.mean()) if len(scored) else None
    print(json.dumps({"mean_accuracy": mean, "tasks": len(rows), "tasks_scored": int(labelled.sum()),
                      "method": args.method, "guidance": args.guidance, "split": split, "seed": seed,
                      "store": str(out.store)}))
    return 0


if __name__ == "__main__":
    from pipelines.core.cli import guarded

    guarded(main)()
