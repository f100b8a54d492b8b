"""Zero-shot stages' inputs and outputs: splits as tensors, the run's plan, and trained-model files.

Splits. The features stage assigns tasks to meta-train/meta-test with its `split_mode`; the zero-shot
stages can evaluate other split modes on the same features and experts (an expert depends only on its
own task), so one farm serves the random and the compositional split of easyvqa. A seeded share of
the meta-train tasks (the plan's `val_fraction`) is held out of training as a validation split: sweeps
choose the guidance scale and other sampling settings there, never on meta-test.

Model files live where the run's `RunDir.model(kind, split, seed)` says, with a JSON sidecar (the config
that made them). Tensors only: nothing read back is unpickled.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.errors import UserError
from models.task_net import TaskNetSpec, WeightLayout
from models.weight_norm import WeightNormalizer
from models.zeroshot.tasks import TaskData
from orchestrator.storage.atomic import atomic_path, write_json
from orchestrator.storage.rundir import RunDir
from pipelines.core.config import ConfigError
from pipelines.suites.base import META_TEST, META_TRAIN
from pipelines.suites.splits import assign_splits

VAL_SEED = 0  # one validation split per (split, fraction), the same for every training seed


class ZeroShotError(UserError, RuntimeError):
    """A zero-shot stage's input is missing; the message says which stage to run first."""


def split_assignment(feats, mode: str) -> dict[str, str]:
    """{task_id: meta_train|meta_test} for `mode`: the features' own split, or one recomputed from its settings."""
    info = feats.info.get("suite_info", {})
    if mode == info.get("split_mode", "random") or mode == "given":
        return dict(zip(feats.tasks["id"], feats.tasks["split"]))
    if mode not in ("random", "compositional"):
        raise ConfigError(f"split {mode!r} is not valid; choose random, compositional or given")
    concepts = {t: list(c) for t, c in zip(feats.tasks["id"], feats.tasks["concepts"])}
    if mode == "compositional" and not any(concepts.values()):
        raise ConfigError("split 'compositional' needs task concepts, and these tasks have none; use splits=random")
    return assign_splits(
        concepts, mode, tuple(info.get("holdout", ())), float(info.get("meta_test_fraction", 0.3)), int(info.get("seed", 0))
    )


@dataclass
class SplitData:
    """One split of a run: meta-train and meta-test tasks as tensors, their experts and a fitted normaliser.

    On the streamed data path (`streamed`) no expert is in memory: the w_* fields are None and `experts`
    gives batches of them (pipelines.zeroshot.streamed), the normaliser fit in one streaming pass."""

    name: str
    layout: WeightLayout
    train: TaskData  # meta-train tasks the models train on (validation tasks excluded)
    test: TaskData
    train_ids: list[str]
    test_ids: list[str]
    test_descriptions: list[str]
    w_train: torch.Tensor | None  # [N_train, P] meta-train experts (seed 0 of each task)
    w_test: torch.Tensor | None  # [N_test, P] meta-test experts: the oracle, never used for training
    norm: WeightNormalizer  # fit on the meta-train experts only
    val: TaskData | None = None  # held-out meta-train tasks for choosing sampling settings (None: no validation split)
    val_ids: list[str] | None = None
    w_val: torch.Tensor | None = None  # [N_val, P] their experts (the validation oracle)
    experts: dict | None = None  # streamed path: {"train"|"test": ExpertStream} in the order of train_ids/test_ids

    @property
    def streamed(self) -> bool:
        """True when the experts are read in batches (`experts`), not held as tensors."""
        return self.experts is not None


def validation_ids(train_ids: list[str], fraction: float) -> set[str]:
    """A seeded `fraction` of the meta-train task ids, at least one and never all of them (empty for 0)."""
    if fraction <= 0 or len(train_ids) < 2:
        return set()
    n = min(max(round(len(train_ids) * fraction), 1), len(train_ids) - 1)
    order = np.random.default_rng(VAL_SEED).permutation(sorted(train_ids))
    return set(order[:n].tolist())


def store_spec(run: RunDir | Path) -> TaskNetSpec:
    """The task network the farm trained (recorded in the store's manifest)."""
    from orchestrator.storage.store import WeightStore

    run = RunDir.of(run)
    spec = WeightStore(run.store).manifest().get("spec")
    if spec is None:
        raise ZeroShotError(f"no experts in {run.store}: run `python -m pipelines.experts --run-dir {run.root}` first")
    return TaskNetSpec(**spec)


def split_tasks(run: RunDir | Path, mode: str, feats=None, val_fraction: float | None = None):
    """(features, rows, meta-train rows, meta-test rows, validation rows) of one split: task-table rows
    (itertuples) of the tasks that have an expert; `val_fraction` defaults to the plan's."""
    from orchestrator.storage.store import WeightStore
    from orchestrator.storage.suite_features import SuiteFeatures

    run = RunDir.of(run)
    feats = feats if feats is not None else SuiteFeatures.load(run.features)
    assign = split_assignment(feats, mode)
    skipped = WeightStore(run.store).manifest().get("skipped_tasks", {})  # no expert: no support or no query examples
    rows = [r for r in feats.tasks.itertuples() if r.id not in skipped]
    tr = [r for r in rows if assign[r.id] == META_TRAIN]
    te = [r for r in rows if assign[r.id] == META_TEST]
    val_ids = validation_ids([r.id for r in tr], read_val_fraction(run) if val_fraction is None else val_fraction)
    va = [r for r in tr if r.id in val_ids]
    tr = [r for r in tr if r.id not in val_ids]
    if not tr or not te:
        raise ZeroShotError(f"split {mode!r} has {len(tr)} meta-train and {len(te)} meta-test tasks; both must be non-empty")
    return feats, rows, tr, te, va


def missing_experts(run: RunDir, rows, have) -> None:
    """Refuse tasks without a stored expert (`have`: the task ids that have one)."""
    missing = [r.id for r in rows if r.id not in have]
    if missing:
        raise ZeroShotError(f"{len(missing)} tasks have no expert (e.g. {missing[0]!r}): rerun the experts stage on {run.root}")


def load_split(run: RunDir | Path, mode: str, feats=None, val_fraction: float | None = None,
               norm_state: dict | None = None) -> SplitData:
    """Tensors of one split of the run (features + experts); `val_fraction` defaults to the plan's.

    With `norm_state` (the normaliser's state fit by a streaming pass) no expert is read: the streamed
    data path, whose stages read them through `SplitData.experts`."""
    from orchestrator.storage.store import WeightStore
    from orchestrator.storage.suite_features import task_batch

    run = RunDir.of(run)
    layout = WeightLayout(store_spec(run))
    feats, rows, tr, te, va = split_tasks(run, mode, feats, val_fraction)
    X, T = torch.tensor(feats.image_feats), torch.tensor(feats.text_feats)
    desc = lambda rs: T[torch.tensor([int(r.desc_text) for r in rs])]  # noqa: E731
    tasks = dict(
        name=mode, layout=layout,
        train=TaskData(layout, X, task_batch(tr, T), desc(tr)),
        test=TaskData(layout, X, task_batch(te, T), desc(te)),
        train_ids=[r.id for r in tr], test_ids=[r.id for r in te], test_descriptions=[r.description for r in te],
    )
    if va:
        tasks.update(val=TaskData(layout, X, task_batch(va, T), desc(va)), val_ids=[r.id for r in va])
    if norm_state is not None:
        norm = WeightNormalizer(layout)
        norm.load_state_dict(norm_state)
        return SplitData(**tasks, w_train=None, w_test=None, norm=norm)
    stored = WeightStore(run.store).read(seeds=[0])
    where = {t: i for i, t in enumerate(stored.meta["task_id"])}
    missing_experts(run, rows, where)
    w_tr = stored.w[[where[r.id] for r in tr]]
    w_te = stored.w[[where[r.id] for r in te]]
    w_va = dict(w_val=stored.w[[where[r.id] for r in va]]) if va else {}
    return SplitData(**tasks, w_train=w_tr, w_test=w_te, norm=WeightNormalizer(layout).fit(w_tr), **w_va)


# ----------------------------------------------------------------------------- plan and model files


def write_plan(run: RunDir | Path, splits: tuple[str, ...], seeds: tuple[int, ...], val_fraction: float = 0.0) -> None:
    """Record which (split, seed) pairs this run's zero-shot stages cover and how much meta-train they hold out."""
    write_json(RunDir.of(run).plan, {"splits": list(splits), "seeds": list(seeds), "val_fraction": val_fraction})


def read_plan(run: RunDir | Path) -> tuple[list[str], list[int]]:
    """(splits, seeds) of the run's zero-shot stages."""
    run = RunDir.of(run)
    if not run.plan.exists():
        raise ZeroShotError(f"no trained generators in {run.root}: run `python -m pipelines.generators --run-dir {run.root}` first")
    plan = json.loads(run.plan.read_text())
    return plan["splits"], plan["seeds"]


def read_val_fraction(run: RunDir | Path) -> float:
    """The plan's validation share of meta-train tasks (0 without a plan, or for plans made before it existed)."""
    path = RunDir.of(run).plan
    return float(json.loads(path.read_text()).get("val_fraction", 0.0)) if path.exists() else 0.0


def save_model(path: Path, state: dict[str, torch.Tensor], config: dict) -> None:
    """State as safetensors plus its config as JSON, each written atomically (sidecar first)."""
    write_json(path.with_suffix(".json"), config)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(tmp))


def load_model(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state, config) saved by `save_model`."""
    if not path.exists():
        raise ZeroShotError(f"missing model {path}: run the stage that trains it (see docs/methods.md, 'Zero-shot weight generation')")
    return load_file(str(path)), json.loads(path.with_suffix(".json").read_text())
