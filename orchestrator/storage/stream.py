"""The weight store as a Ray Data dataset: batches streamed from the committed shards, never the whole store.

A stage that learns from many experts reads `store_dataset(store)` in its Ray Train workers (through
`ray.train.get_dataset_shard`) one batch at a time, so a worker's memory is a few batches whatever the
store's size. `LayerMoments` gives the weight normaliser's statistics in one streaming pass.
"""
from __future__ import annotations

import numpy as np
import ray.data
import torch

from orchestrator.storage import remote
from orchestrator.storage.store import StoreError, WeightStore, weights_checksum


def committed_files(store: WeightStore) -> list[str]:
    """Paths of the shards the manifest lists: only committed shards are ever read (an uncommitted file may be stale)."""
    shards = store.completed_shards()
    if not shards:
        raise StoreError(f"no weights in {store.root}: run `python -m pipelines.experts` first")
    return [str(remote.fetch(store.root / f"{s}.parquet").resolve()) for s in shards]


IN_FLIGHT_BYTES = 256 * 2**20  # blocks read ahead of the consumer: bounds its memory whatever the store's size
READ_TASKS = 2  # Parquet reads at once: a read task that reserves no CPU is otherwise not limited by the CPUs


def store_dataset(store: WeightStore, columns: tuple[str, ...] = ("task_id", "seed", "w"), final_only: bool = True,
                  shuffle_files: bool = False, in_flight_bytes: int = IN_FLIGHT_BYTES, seeds: list[int] | None = None,
                  task_ids: list[str] | None = None, ordered: bool = False,
                  shuffle_seed: int | None = None) -> ray.data.Dataset:
    """A lazy dataset of the store's rows (`columns`), final checkpoints only by default, optionally only
    some `seeds` and `task_ids` (both filters are pushed down into the Parquet read).

    `shuffle_files` reads the shards in a random order each epoch (with a local shuffle buffer in the
    consumer, the usual Ray Data substitute for a global shuffle that would need the whole store);
    `shuffle_seed` fixes that order. `ordered` keeps blocks in file order whatever finishes first, so
    a seeded consumer sees the same batches in every run.
    `in_flight_bytes` caps the object-store bytes read ahead (by default Ray Data may fill a share of the
    whole object store, and a consumer maps every block it reads: its memory then grows with the store)."""
    from ray.data import FileShuffleConfig
    from ray.data.expressions import col

    shuffle = (FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else "files") if shuffle_files else None
    # Read tasks reserve no CPU: a stage's Ray Train workers may hold every CPU of the cluster, and reads that
    # waited for a free one would never run; they share the workers' cores, like a data-loader thread.
    # (Ray Data's newer read path lists files in a separate task that always asks for a CPU: use the
    # single-operator read, whose tasks take the CPU request given here.) Without a CPU to bound them, the
    # number of reads at once must be bounded: each holds a shard's decoded columns in its own process, and
    # a 50k-expert store otherwise started dozens of them and ran the node out of memory.
    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(committed_files(store), shuffle=shuffle, num_cpus=0, concurrency=READ_TASKS)
    finally:
        ctx.use_datasource_v2 = v2
    keep = col("final") == True if final_only else None  # noqa: E712 - an expression, pushed down into the Parquet read
    if seeds is not None:
        keep = _and(keep, col("seed").is_in([int(s) for s in seeds]))
    if task_ids is not None:
        keep = _and(keep, col("task_id").is_in(list(task_ids)))
    if keep is not None:
        ds = ds.filter(expr=keep)
    ds = ds.select_columns(list(columns))  # pushed down too: unread columns are never decoded
    options = ds.context.execution_options
    options.resource_limits = options.resource_limits.copy(object_store_memory=in_flight_bytes)
    options.preserve_order = ordered
    return ds


def _and(a, b):
    return b if a is None else a & b


def worker_batches(name: str, batch_size: int, seed: int, shuffle_buffer: int | None = None, drop_last: bool = False):
    """Numpy batches of dataset `name` as this Ray Train worker receives it (`ray.train.get_dataset_shard`): one
    pass, rows mixed in a seeded local buffer of `shuffle_buffer` rows (None: in stored order)."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    return shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last,
                              local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=seed if shuffle_buffer else None)


def weights_of(batch: dict) -> torch.Tensor:
    """w [B, P] float32 from a Ray Data batch (numpy format) of the store's `w` column; when the batch has the
    `checksum` column, every row is checked against it as `WeightStore.read` does (a StoreError if one differs)."""
    w = batch["w"]
    if w.dtype == object:  # fixed-size lists may arrive as an array of arrays
        w = np.stack(w)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if "checksum" in batch:
        bad = [i for i, (row, want) in enumerate(zip(w, batch["checksum"])) if weights_checksum(row) != want]
        if bad:
            who = f" (task {batch['task_id'][bad[0]]})" if "task_id" in batch else ""
            raise StoreError(f"{len(bad)} streamed expert(s) do not match their checksum{who}; rerun "
                             "`python -m pipelines.experts` with the same run directory to retrain them")
    return torch.as_tensor(w)


class LayerMoments:
    """Running per-coordinate mean and sum of squared deviations (Chan et al.'s parallel update, float64),
    so the normaliser's mean and per-layer std come from one pass over batches, equal to a fit on all rows."""

    def __init__(self, n_weights: int):
        self.n = 0
        self.mean = torch.zeros(n_weights, dtype=torch.float64)
        self.m2 = torch.zeros(n_weights, dtype=torch.float64)

    def update(self, w: torch.Tensor) -> None:
        """Add a batch w [B, P]."""
        w = w.double()
        nb = w.shape[0]
        if nb == 0:
            return
        mb = w.mean(0)
        m2b = (w - mb).pow(2).sum(0)
        delta = mb - self.mean
        total = self.n + nb
        self.mean += delta * (nb / total)
        self.m2 += m2b + delta.pow(2) * (self.n * nb / total)
        self.n = total

    def fit(self, norm):
        """Set a `WeightNormalizer`'s mean [P] and per-layer std [L] from the moments; returns it."""
        if self.n == 0:
            raise StoreError("no experts to fit the weight normaliser on")
        with torch.no_grad():
            norm.mean.copy_(self.mean)
            for i, k in enumerate(norm.names):
                a, b = norm.layout.offsets[k]
                # population std over all N x layer coordinates, as WeightNormalizer.fit
                norm.std[i] = (self.m2[a:b].sum() / (self.n * (b - a))).sqrt().clamp_min(norm.eps)
        return norm


def stream_moments(ds: ray.data.Dataset, n_weights: int, batch_size: int = 256) -> LayerMoments:
    """One streaming pass over `ds` (a `store_dataset` or a worker's shard of it)."""
    moments = LayerMoments(n_weights)
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        moments.update(weights_of(batch))
    return moments
