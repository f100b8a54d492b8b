"""Bring your own descriptions: generate task networks for every task of a task file with a trained run.

    python -m pipelines.zero_shot --tasks my_tasks.jsonl --from runs/default --method hnet_hyperldm --guidance 1

A thin command over the Python API (`pipelines.load_run`): generates one weight vector per task with the
chosen method (trained on the run's meta-train tasks of `--split`, seed `--seed`) from the task's
description and candidate answers, in one batch, and writes them to `<out>/store/weights`. Where
examples carry answers it prints, per task, the network's accuracy over every labelled example beside
the accuracy of always giving that task's most common answer (nothing of the task but its description
and answers is used to generate it), and writes both to `<out>/results.csv`. The source run is only read.
The last line is one JSON object: mean_accuracy, mean_majority_accuracy, tasks, method, guidance, split, seed, store.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.core.config import ConfigError


def parse(argv: list[str] | None):
    from pipelines.zeroshot.methods import GENERATIVE

    p = argparse.ArgumentParser(prog="python -m pipelines.zero_shot", description=__doc__.strip().splitlines()[0])
    p.add_argument("--tasks", required=True, type=Path, help="JSONL task file (docs/task_file.md)")
    p.add_argument("--from", dest="source", required=True, type=Path, help="run directory of a finished pipelines.full run")
    p.add_argument("--method", default="hnet_hyperldm", choices=GENERATIVE, help="generation method (default hnet_hyperldm)")
    p.add_argument("--guidance", type=float, default=None,
                   help="HyperLDM classifier-free guidance scale γ (default: the one the run's evaluate stage sampled with)")
    p.add_argument("--split", default=None, help="which split's models to use (default: the run's first)")
    p.add_argument("--seed", type=int, default=None, help="which training seed's models to use (default: the run's first)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder, outside the source run (default: a new folder runs/<run>-zero-shot-<task file name>[-N])")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def default_out(source: Path, tasks: Path) -> Path:
    """A folder under runs/ that does not exist yet: runs/<run>-zero-shot-<tasks>, then -2, -3, ..."""
    base = Path("runs") / f"{source.resolve().name}-zero-shot-{tasks.stem}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def check_outside(out: Path, source: Path) -> None:
    """A ConfigError unless `out` and the source run are disjoint folders."""
    out, source = out.resolve(), source.resolve()
    if out == source or source in out.parents or out in source.parents:
        raise ConfigError(f"--out {out} is, holds or lies inside the run it reads ({source}); choose a folder outside that run")


def score(run, nets, suite, progress: bool):
    """(accuracy, majority-answer accuracy, labelled examples) per task over all its support and query examples."""
    import numpy as np
    import torch

    labelled = [np.concatenate([t.support_images, t.query_images]) for t in suite.tasks]
    used = sorted({int(i) for idx in labelled for i in idx})
    x = run.encode_images([suite.images[i] for i in used], progress=progress) if used else None
    row = {i: k for k, i in enumerate(used)}
    out = []
    for t, net, idx in zip(suite.tasks, nets, labelled):
        lab = torch.as_tensor(np.concatenate([t.support_labels, t.query_labels]))
        if len(idx) == 0:
            out.append((float("nan"), float("nan"), 0))
            continue
        pred = net.logits(x[[row[int(i)] for i in idx]]).argmax(1)
        majority = torch.bincount(lab, minlength=len(t.answers)).max() / len(lab)
        out.append((float((pred == lab).float().mean()), float(majority), len(lab)))
    return out


def main(argv: list[str] | None = None) -> int:
    import dataclasses

    import pandas as pd
    import torch

    from orchestrator.storage.atomic import write_text
    from orchestrator.storage.rundir import RunDir
    from orchestrator.storage.store import WeightStore
    from pipelines.zeroshot.api import load_run
    from pipelines.suites.taskfile import read_task_file
    from pipelines.zeroshot.sampling import SamplingSettings

    args = parse(argv)
    if args.guidance is not None:
        dataclasses.replace(SamplingSettings(), guidance_scale=args.guidance)  # a bad γ fails before any work
    if not args.tasks.is_file():
        raise ConfigError(f"--tasks {args.tasks}: no such file; give a JSONL task file (docs/task_file.md)")
    run = load_run(args.source)
    out = (args.out or default_out(args.source, args.tasks)).resolve()
    check_outside(out, args.source)
    suite = read_task_file(str(args.tasks))
    split = args.split or run.splits[0]
    seed = run.seeds[0] if args.seed is None else args.seed
    sampling = run.sampling()
    guidance = sampling.guidance_scale if args.guidance is None else args.guidance
    nets = run.generate([t.description for t in suite.tasks], answers=[t.answers for t in suite.tasks],
                        answer_prompts=[t.answer_prompts for t in suite.tasks], method=args.method,
                        guidance=guidance, split=split, seed=seed, sampling=sampling)
    scores = score(run, nets, suite, progress=not args.no_progress)

    # Everything is computed: only now is the output folder written.
    table = pd.DataFrame([dict(task_id=t.id, description=t.description, accuracy=a, majority_accuracy=m, examples=n)
                          for t, (a, m, n) in zip(suite.tasks, scores)])
    meta = pd.DataFrame([dict(
        task_id=t.id, description=t.description, split=t.split, seed=seed, step=0, final=True, layout_id=run.layout.id,
        support_acc=float("nan"), support_loss=float("nan"), query_acc=a, query_loss=float("nan"),
        config_hash=f"zero-shot:{args.method}:{guidance:g}:{split}:{seed}",
    ) for t, (a, _, _) in zip(suite.tasks, scores)])
    store = WeightStore(RunDir(out).store)  # the output folder keeps a run directory's store layout
    w = torch.stack([n.w for n in nets])  # [n_tasks, P]
    store.write_shard(f"zero-shot-{args.method}", meta, w.numpy(),
                      {"source_run": str(run.dir.root), "method": args.method})
    store.set_info(layout_id=run.layout.id, n_weights=run.layout.size, spec=dataclasses.asdict(run.layout.spec))
    write_text(out / "results.csv", table.to_csv(index=False))

    print("task\taccuracy\tmajority\tdescription")
    fmt = lambda v, n: "n/a" if n == 0 else f"{100 * v:.2f}%"  # noqa: E731
    for t, (a, m, n) in zip(suite.tasks, scores):
        print(f"{t.id}\t{fmt(a, n)}\t{fmt(m, n)}\t{t.description}")
    scored = table[table["examples"] > 0]
    mean = lambda col: float(scored[col].mean()) if len(scored) else None  # noqa: E731
    print(json.dumps({"mean_accuracy": mean("accuracy"), "mean_majority_accuracy": mean("majority_accuracy"),
                      "tasks": len(table), "tasks_scored": len(scored), "method": args.method, "guidance": guidance,
                      "split": split, "seed": seed, "store": str(store.root), "results": str(out / "results.csv")}))
    return 0


if __name__ == "__main__":
    from pipelines.core.cli import guarded

    guarded(main)()
