"""The zero-shot stages' streamed data path: the weight store read through Ray Data in batches, never whole.

Driver (`stream_inputs`): per split, a dataset of its meta-train and one of its meta-test experts (seed 0,
final checkpoints; the filters pushed into the Parquet read), handed to Ray Train as datasets, and the
weight normaliser's statistics from one streaming pass over the meta-train experts. Workers
(`ExpertStream`): the dataset a worker receives, as batches of (rows of the split's tasks, weights) for the
pure-torch loops, which never see more than a batch (plus a bounded shuffle buffer) of the store.
The memory path (`SplitData` with every expert as one tensor) stays for stores that fit (`data_path`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import torch

from models.task_net import WeightLayout
from models.weight_norm import WeightNormalizer
from orchestrator.storage.rundir import RunDir
from pipelines.zeroshot.data import SplitData, missing_experts, split_tasks, store_spec

SHUFFLE_BATCHES = 4  # a worker's local shuffle buffer, in batches: bounds its memory, mixes rows within a window
COLUMNS = ("task_id", "w", "checksum")  # every streamed row is checked against its checksum, as the memory path does


def store_bytes(run: RunDir | Path) -> int:
    """Bytes of every committed row's weights as float32: what the memory path could hold at most."""
    from orchestrator.storage.store import WeightStore

    manifest = WeightStore(RunDir.of(run).store).manifest()
    return sum(e["rows"] for e in manifest.get("shards", {}).values()) * int(manifest.get("n_weights") or 0) * 4


def resolve_data_path(run: RunDir | Path, cfg) -> str:
    """`memory` or `stream` for a stage config's `data_path` (auto: memory when the store fits its budget)."""
    if cfg.data_path != "auto":
        return cfg.data_path
    return "memory" if store_bytes(run) <= cfg.memory_budget_mb * 2**20 else "stream"


def dataset_name(split: str, part: str) -> str:
    """The Ray Train dataset of one split's `part` (train: meta-train, test: meta-test) experts."""
    return f"{split}-{part}"


def stream_inputs(run: RunDir | Path, splits: list[str], val_fraction: float, log: Callable[[str], None] = print):
    """({dataset name: Ray Data dataset}, {split: normaliser state}) for the streamed path; on the driver."""
    from orchestrator.storage.store import WeightStore
    from orchestrator.storage.stream import store_dataset, stream_moments

    run = RunDir.of(run)
    store = WeightStore(run.store)
    have = set(store.read_meta()["task_id"])  # metadata columns only: cheap at any store size
    datasets, norms, feats = {}, {}, None
    layout = WeightLayout(store_spec(run))
    for split in splits:
        feats, rows, tr, te, _ = split_tasks(run, split, feats, val_fraction)
        missing_experts(run, rows, have)
        for part, ids in (("train", [r.id for r in tr]), ("test", [r.id for r in te])):
            datasets[dataset_name(split, part)] = store_dataset(
                store, columns=COLUMNS, seeds=[0], task_ids=ids, shuffle_files=part == "train", shuffle_seed=0, ordered=True)
        moments = stream_moments(datasets[dataset_name(split, "train")], layout.size)
        if moments.n != len(tr):
            raise RuntimeError(f"split {split!r}: streamed {moments.n} meta-train experts, expected {len(tr)}")
        norms[split] = moments.fit(WeightNormalizer(layout)).state_dict()
        log(f"split {split}: normaliser fit in one streaming pass over {moments.n} meta-train experts")
    return datasets, norms


class ExpertStream:
    """One split's experts as this Ray Train worker receives them: batches of (rows [B] into the split's task
    list `ids` (None: rows count the stream's rows), raw weights w [B, P]). `peak_rows` is the most experts one
    batch brought into the worker."""

    def __init__(self, name: str, ids: list[str] | None):
        self.name, self.index, self.peak_rows = name, None if ids is None else pd.Index(ids), 0

    def batches(self, batch: int, seed: int = 0, shuffle: bool = False, drop_last: bool = False) -> Iterator:
        """One pass over the split's experts (mixed in a seeded buffer of SHUFFLE_BATCHES batches when `shuffle`)."""
        from orchestrator.storage.stream import weights_of, worker_batches

        batch = max(1, batch if self.index is None else min(batch, len(self.index)))
        seen = 0
        for b in worker_batches(self.name, batch, seed, SHUFFLE_BATCHES * batch if shuffle else None, drop_last):
            n = len(b["w"])
            rows = torch.arange(seen, seen + n) if self.index is None else torch.as_tensor(self.index.get_indexer(b["task_id"]))
            seen += n
            self.peak_rows = max(self.peak_rows, n)
            yield rows, weights_of(b)

    def source(self, batch: int, seed: int, fn: Callable):
        """A `BatchSource` for the training loops: `fn(rows, w)` of shuffled batches, epoch after epoch, each
        epoch's order seeded by (seed, epoch), full batches only (`batch` rows, all of them when fewer)."""

        def gen_batches(_gen: torch.Generator) -> Iterator:
            epoch = 0
            while True:
                for rows, w in self.batches(batch, seed * 10_000 + epoch, shuffle=True, drop_last=True):
                    yield fn(rows, w)
                epoch += 1

        return gen_batches


def attach_streams(data: SplitData) -> SplitData:
    """`data` (loaded with a normaliser state, no experts) with its train and test ExpertStreams."""
    data.experts = {"train": ExpertStream(dataset_name(data.name, "train"), data.train_ids),
                    "test": ExpertStream(dataset_name(data.name, "test"), data.test_ids)}
    return data


@torch.no_grad()
def per_task(stream: ExpertStream, n: int, fn: Callable, batch: int) -> torch.Tensor:
    """fn(rows, w) -> [B, ...] for every expert of `stream`, `batch` at a time, gathered in task order: [n, ...]
    (small per task, e.g. a latent or an accuracy)."""
    out, seen = None, 0
    for rows, w in stream.batches(batch):
        y = fn(rows, w)
        out = y.new_zeros((n, *y.shape[1:])) if out is None else out
        out[rows] = y
        seen += len(rows)
    if seen != n:
        raise RuntimeError(f"{stream.name}: streamed {seen} experts, expected {n}")
    return out
