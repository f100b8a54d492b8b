"""A self-contained copy of what the zero-shot generators need from a run, for one split and seed.

A bundle is itself a run directory that `pipelines.load_run` opens: the features (encoder settings,
answer prompts, image projection), the experts (the weight normaliser is fit on them, nearest-task
retrieval reads them), a plan naming only this split and seed, the recorded configuration (sampling
settings), and the trained models the methods use, as safetensors with their JSON sidecars. It is what
an MLflow logged model carries, so that model loads and generates with no access to the source run.
One bundle serves every method of its (split, seed): the features and experts, most of its bytes, are
stored once rather than once per method.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from orchestrator.storage.rundir import RunDir
from pipelines.zeroshot.data import read_plan, read_val_fraction, write_plan
from pipelines.zeroshot.methods import method


def write_bundle(run: RunDir | Path | str, methods: tuple[str, ...], split: str, seed: int, dest: Path) -> Path:
    """Write the bundle of `methods` for (split, seed) of `run` to the new folder `dest`; returns `dest`."""
    run, dest = RunDir.of(run), RunDir(Path(dest))
    splits, seeds = read_plan(run)
    if split not in splits or seed not in seeds:
        raise ValueError(f"{run.root} trained splits {splits} and seeds {seeds}, not ({split}, {seed})")
    dest.root.mkdir(parents=True, exist_ok=False)
    shutil.copytree(run.features, dest.features)
    shutil.copytree(run.store, dest.store, ignore=shutil.ignore_patterns(".*"))  # lock files stay behind
    write_plan(dest, (split,), (seed,), read_val_fraction(run))
    if run.config_file.is_file():
        shutil.copy2(run.config_file, dest.config_file)
    for kind in sorted({k for name in methods for k in method(name).stages}):
        src = run.model(kind, split, seed)
        dest.model_dir(kind).mkdir(parents=True, exist_ok=True)
        for f in (src, src.with_suffix(".json")):
            shutil.copy2(f, dest.model(kind, split, seed).with_suffix(f.suffix))
    (dest.root / "bundle.json").write_text(json.dumps({"methods": list(methods), "split": split, "seed": seed,
                                                       "source_run": str(run.root)}, indent=1))
    return dest.root
