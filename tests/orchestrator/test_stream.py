"""The weight store through Ray Data on a real local Ray: every committed row once, nothing uncommitted,
batches instead of the whole store, and normaliser statistics from one streaming pass equal to a fit on all rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.task_net import TaskNetSpec, WeightLayout
from models.weight_norm import WeightNormalizer
from orchestrator.storage.store import StoreError, WeightStore
from tests.orchestrator.test_store import make_rows

pytestmark = [pytest.mark.ray]

LAYOUT = WeightLayout(TaskNetSpec(d_img=4, hidden=3, d_txt=5))  # 35 weights in 4 layers


def fill(store: WeightStore, shards: int) -> None:
    for k in range(shards):
        m, w = make_rows("train", [f"t{k}-{i}" for i in range(5)], [0, 1], [5, 10], seed=k)
        w = w[:, :1] * 0.01 + 0.3 + np.random.default_rng(k).standard_normal((len(w), LAYOUT.size)).astype(np.float32) * 0.05
        store.write_shard(f"shard-{k:05d}-aa", m, w.astype(np.float32), {})


def test_dataset_streams_every_committed_final_row_once(ray_cluster, tmp_path):
    from orchestrator.storage.stream import store_dataset, weights_of

    store = WeightStore(tmp_path / "weights")
    with pytest.raises(StoreError, match="no weights"):
        store_dataset(store)
    fill(store, 3)
    m, w = make_rows("train", ["stale"], [0], [10], seed=9)
    store.write_shard_file("shard-00009-zz", m, np.zeros((1, LAYOUT.size), np.float32))  # never committed
    want = store.read()
    got = {}
    sizes = []
    for batch in store_dataset(store, shuffle_files=True).iter_batches(batch_size=4, batch_format="numpy"):
        w = weights_of(batch)
        sizes.append(len(w))
        for t, s, row in zip(batch["task_id"], batch["seed"], w):
            assert (t, int(s)) not in got
            got[(t, int(s))] = row
    assert max(sizes) == 4 and len(got) == len(want.meta) == 30
    for t, s, row in zip(want.meta["task_id"], want.meta["seed"], want.w):
        assert torch.equal(got[(t, int(s))], row)


def test_one_streaming_pass_fits_the_normaliser_as_a_fit_on_all_rows(ray_cluster, tmp_path):
    from orchestrator.storage.stream import store_dataset, stream_moments

    store = WeightStore(tmp_path / "weights")
    fill(store, 3)
    whole = WeightNormalizer(LAYOUT).fit(store.read().w)
    streamed = stream_moments(store_dataset(store), LAYOUT.size, batch_size=7).fit(WeightNormalizer(LAYOUT))
    assert torch.allclose(streamed.mean, whole.mean, rtol=0, atol=1e-12)
    assert torch.allclose(streamed.std, whole.std, rtol=1e-10, atol=0)
    assert not torch.equal(whole.std, torch.ones_like(whole.std))


def test_seed_and_task_filters_read_exactly_the_rows_the_store_read_returns(ray_cluster, tmp_path):
    from orchestrator.storage.stream import store_dataset, weights_of

    store = WeightStore(tmp_path / "weights")
    fill(store, 3)
    ids = ["t0-1", "t2-3", "t1-0"]
    want = store.read(task_ids=ids, seeds=[0])
    got = [(t, row) for b in store_dataset(store, seeds=[0], task_ids=ids, ordered=True).iter_batches(batch_size=2, batch_format="numpy")
           for t, row in zip(b["task_id"], weights_of(b))]
    assert sorted(t for t, _ in got) == sorted(want.meta["task_id"]) and len(got) == 3
    where = dict(zip(want.meta["task_id"], want.w))
    assert all(torch.equal(row, where[t]) for t, row in got)


def test_a_streamed_row_that_does_not_match_its_checksum_is_refused():
    from orchestrator.storage.store import weights_checksum
    from orchestrator.storage.stream import weights_of

    w = np.ones((2, 3), np.float32)
    good = {"task_id": np.array(["a", "b"]), "w": w, "checksum": np.array([weights_checksum(w[0])] * 2)}
    assert torch.equal(weights_of(good), torch.ones(2, 3))
    bad = dict(good, checksum=np.array([weights_checksum(w[0]), "0" * 32]))
    with pytest.raises(StoreError, match="1 streamed expert.*task b"):
        weights_of(bad)
