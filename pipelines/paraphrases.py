"""Descriptions in a user's own words: every conditioned method on rephrased meta-test descriptions.

    python -m pipelines.paraphrases --run-dir runs/default
    python -m pipelines.paraphrases --run-dir runs/default --out /tmp/paraphrases --guidance 1,7.5

Reads a finished run (nothing is trained) and a rephrasing file (default: configs/paraphrases/easyvqa.jsonl,
71 rephrasings of 51 easyvqa meta-test tasks; docs/trust.md). For every split and seed of the run, every
method that reads the description (HyperLDM once per γ of the run's evaluate stage, γ = 0 left out)
generates each meta-test task from its own description and from each of its rephrasings, with the same
sampler noise. Tasks that are meta-train in a split are not scored there. Writes `paraphrases.csv`,
`paraphrases_tasks.csv` and `paraphrases.md` to `<run>/results` (or `--out`), with the majority-answer
accuracy and 95 % bootstrap CIs over tasks and seeds. The last line is one JSON object: per split, the
best method on the rephrased open questions (majority answer ≤ 50 %), and the files written.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines.core.config import ConfigError


def parse(argv: list[str] | None):
    from pipelines.zeroshot.methods import CONDITIONED
    from pipelines.zeroshot.paraphrases import DEFAULT_FILE

    p = argparse.ArgumentParser(prog="python -m pipelines.paraphrases", description=__doc__.strip().splitlines()[0])
    p.add_argument("--run-dir", required=True, type=Path, help="run directory of a finished pipelines.full run (only read)")
    p.add_argument("--rephrased", type=Path, default=DEFAULT_FILE,
                   help="JSONL file, one task a line: {task_id, description, rephrased: [...]} (default: the easyvqa set)")
    p.add_argument("--out", type=Path, default=None, help="folder for the tables (default: <run-dir>/results)")
    p.add_argument("--guidance", default=None,
                   help="HyperLDM γ values, comma-separated (default: the run's evaluate grid without 0)")
    p.add_argument("--methods", default=",".join(CONDITIONED),
                   help=f"conditioned methods to score, comma-separated (default: all: {', '.join(CONDITIONED)})")
    return p.parse_args(argv)


def guidance_grid(run, arg: str | None) -> list[float]:
    """HyperLDM's γ values: `--guidance`, else the run's evaluate grid; γ = 0 ignores the description."""
    import yaml

    if arg is not None:
        try:
            grid = [float(x) for x in arg.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--guidance {arg!r}: give comma-separated numbers such as 1,4,7.5") from None
    else:
        cfg = yaml.safe_load(run.dir.config_file.read_text()) if run.dir.config_file.is_file() else None
        grid = [float(g) for g in ((cfg or {}).get("evaluate") or {}).get("guidance_scales") or [run.sampling().guidance_scale]]
    grid = [g for g in grid if g > 0]
    if not grid or any(g > 100 for g in grid):
        raise ConfigError(f"--guidance {arg!r}: give at least one γ in (0, 100]")
    return grid


def check_methods(arg: str) -> list[str]:
    from pipelines.zeroshot.methods import CONDITIONED

    names = [m.strip() for m in arg.split(",") if m.strip()]
    bad = [m for m in names if m not in CONDITIONED]
    if not names or bad:
        raise ConfigError(f"--methods {arg!r}: choose among the conditioned methods {', '.join(CONDITIONED)}")
    return names


def main(argv: list[str] | None = None) -> int:
    import dataclasses

    import pandas as pd

    from orchestrator.storage.suite_features import TASKS_FILE
    from pipelines.zeroshot import paraphrases as para
    from pipelines.zeroshot.api import load_run
    from pipelines.zeroshot.methods import METHODS

    args = parse(argv)
    methods = check_methods(args.methods)
    items = para.read_rephrasings(args.rephrased)
    run = load_run(args.run_dir)
    grid = guidance_grid(run, args.guidance)
    tasks = pd.read_parquet(run.dir.features / TASKS_FILE, columns=["id", "description"])
    para.check_tasks(items, tasks, args.rephrased)
    sampling = run.sampling()
    texts = sorted({t for r in items for t in r.rephrased})
    emb = run.encode_texts(texts)  # [n, d_txt], every rephrasing in one batch
    at = {t: i for i, t in enumerate(texts)}
    suite = run.info.get("suite", "tasks")
    rows, scored = [], set()
    for split in run.splits:
        data = run.models(split, run.seeds[0]).data
        slot_c = [(r, emb[[at[t] for t in ts]]) for r, ts in para.slots(items, data.test_ids)]
        if not slot_c:
            print(f"paraphrases: {split}: no task of {args.rephrased} is meta-test here; skipped", file=sys.stderr)
            continue
        n_rephrased = {r.task_id: len(r.rephrased) for r in items if r.task_id in set(data.test_ids)}
        scored |= set(n_rephrased)
        majority = para.majority_accuracy(data.test.batch)
        for seed in run.seeds:
            models = run.models(split, seed)
            for name in (*para.REFERENCES, *methods):
                scales = grid if "guidance_scale" in METHODS[name].uses else (None,)
                for g in scales:
                    s = sampling if g is None else dataclasses.replace(sampling, guidance_scale=g)
                    own, rephrased = para.score(name, models, data, s, slot_c)
                    key = dict(suite=suite, split=split, method=name, guidance_scale=g, seed=seed)
                    rows += para.task_rows(key, data, own, rephrased, majority, n_rephrased)
            print(f"paraphrases: {split} seed {seed}: {len(n_rephrased)} tasks, "
                  f"{sum(n_rephrased.values())} rephrasings scored", file=sys.stderr)
    if not rows:
        raise ConfigError(f"no task of {args.rephrased} is a meta-test task of any split of {run.dir.root} ({', '.join(run.splits)})")
    unscored = [r.task_id for r in items if r.task_id not in scored]
    if unscored:
        print(f"paraphrases: {len(unscored)} task(s) of the file are meta-train in every split and were not scored "
              f"(e.g. {unscored[0]})", file=sys.stderr)
    out = (args.out or run.dir.results).resolve()
    summary, paths = para.write(pd.DataFrame(rows), out, args.rephrased.name)
    print(paths[2].read_text())
    print(json.dumps({"best": para.best(summary), "files": [str(p) for p in paths]}))
    return 0


if __name__ == "__main__":
    from pipelines.core.cli import guarded

    guarded(main)()
