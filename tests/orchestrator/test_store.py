"""Parquet weight store on real files: round trips, filters, manifest, corruption detection, atomic writes."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.storage.atomic import atomic_path, write_json
from orchestrator.storage.store import (
    MANIFEST,
    MANIFEST_LOCK,
    META_COLUMNS,
    StoreError,
    WeightStore,
    file_sha256,
    weights_checksum,
)

P = 96  # weight vector length; the store does not care about the layout


def make_rows(split: str, tasks: list[str], seeds: list[int], steps: list[int], seed: int = 0):
    """Metadata rows (every task x seed x checkpoint step, last step final) and random weights [n, P]."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in tasks:
        for s in seeds:
            for st in steps:
                rows.append({
                    "task_id": t, "description": f"what is {t}?", "split": split, "seed": s, "step": st,
                    "final": st == steps[-1], "layout_id": "adapter-test",
                    "support_acc": float(rng.random()), "support_loss": float(rng.random()),
                    "query_acc": float("nan") if t.endswith("0") else float(rng.random()),
                    "query_loss": float(rng.random()), "config_hash": "cfg1",
                })
    meta = pd.DataFrame(rows)
    return meta, rng.standard_normal((len(meta), P)).astype(np.float32)


@pytest.fixture
def store(tmp_path):
    """Two shards: train tasks t0, t1 and val task v0; seeds 0 and 1; checkpoints at steps 5 and 10."""
    st = WeightStore(tmp_path / "weights")
    m1, w1 = make_rows("train", ["t0", "t1"], [0, 1], [5, 10], seed=1)
    m2, w2 = make_rows("val", ["v0"], [0, 1], [5, 10], seed=2)
    st.write_shard("shard-00000-aa", m1, w1, {"n_experts": 4})
    st.write_shard("shard-00001-bb", m2, w2, {"n_experts": 2})
    st.expected = {
        (r.task_id, r.seed, r.step): (r, w)
        for m, ws in ((m1, w1), (m2, w2)) for r, w in zip(m.itertuples(), ws)
    }
    return st


def keys(meta: pd.DataFrame) -> set[tuple]:
    return {(r.task_id, int(r.seed), int(r.step)) for r in meta.itertuples()}


def test_round_trip_weights_exact_and_metadata(store):
    got = store.read(final_only=False)
    assert got.w.shape == (12, P) and str(got.w.dtype) == "torch.float32"
    assert len(got.meta) == 12 and "w" not in got.meta.columns
    assert keys(got.meta) == set(store.expected)
    for i, r in enumerate(got.meta.itertuples()):
        want_row, want_w = store.expected[(r.task_id, r.seed, r.step)]
        assert np.array_equal(got.w[i].numpy(), want_w)  # bit-exact
        assert r.checksum == weights_checksum(want_w)
        assert r.shard_id == ("shard-00000-aa" if r.split == "train" else "shard-00001-bb")
        for c in ("description", "split", "final", "layout_id", "config_hash"):
            assert getattr(r, c) == getattr(want_row, c)
        for c in ("support_acc", "support_loss", "query_acc", "query_loss"):  # stored as float32
            np.testing.assert_equal(np.float32(getattr(r, c)), np.float32(getattr(want_row, c)))
    assert got.meta["query_acc"].isna().sum() == 8  # NaN metrics (tasks t0, v0: no query set) survive


def test_filters_split_tasks_seeds_and_final_only(store):
    default = store.read()
    assert keys(default.meta) == {k for k in store.expected if k[2] == 10}
    assert default.meta["final"].all()

    train = store.read(split="train")
    assert set(train.meta["split"]) == {"train"} and len(train.meta) == 4

    sel = store.read(task_ids=["t1", "v0"], seeds=[1])
    assert keys(sel.meta) == {("t1", 1, 10), ("v0", 1, 10)}
    for i, r in enumerate(sel.meta.itertuples()):  # weights stay aligned with their rows after filtering
        assert np.array_equal(sel.w[i].numpy(), store.expected[(r.task_id, r.seed, r.step)][1])

    both = store.read(split="val", seeds=[0], final_only=False)
    assert keys(both.meta) == {("v0", 0, 5), ("v0", 0, 10)}

    none = store.read(split="train", task_ids=["v0"])
    assert none.w.shape == (0, P) and len(none.meta) == 0


def test_read_meta_without_weights(store):
    meta = store.read_meta()
    assert list(meta.columns) == META_COLUMNS
    assert len(meta) == 6 and meta["final"].all()
    assert keys(meta) == {k for k in store.expected if k[2] == 10}
    full = store.read_meta(final_only=False)
    assert len(full) == 12 and set(full["step"]) == {5, 10}


def test_manifest_lists_shards_with_rows_hash_and_info(store):
    assert store.completed_shards() == ["shard-00000-aa", "shard-00001-bb"]
    man = json.loads((store.root / MANIFEST).read_text())
    assert man == store.manifest()
    e = man["shards"]["shard-00000-aa"]
    assert e["rows"] == 8 and e["n_experts"] == 4
    assert e["file_sha256"] == file_sha256(store.root / "shard-00000-aa.parquet")
    assert man["shards"]["shard-00001-bb"]["rows"] == 4
    store.set_info(layout_id="adapter-test")
    assert store.manifest()["layout_id"] == "adapter-test"
    assert store.completed_shards() == ["shard-00000-aa", "shard-00001-bb"]  # set_info keeps shards


def test_verify_intact_and_byte_flip(store):
    assert store.verify_shard("shard-00000-aa") is None
    assert store.verify_shard("shard-00001-bb") is None
    path = store.root / "shard-00000-aa.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    reason = store.verify_shard("shard-00000-aa")
    assert reason is not None and "sha256" in reason and path.name in reason
    assert store.verify_shard("shard-00001-bb") is None


def test_verify_missing_file_and_missing_manifest_entry(store):
    (store.root / "shard-00001-bb.parquet").unlink()
    reason = store.verify_shard("shard-00001-bb")
    assert reason is not None and "missing" in reason and "shard-00001-bb.parquet" in reason
    assert store.verify_shard("shard-00002-cc") == "not in manifest"
    # a file on disk that the manifest does not list (a write that crashed before the manifest) is not trusted
    man = store.manifest()
    del man["shards"]["shard-00000-aa"]
    write_json(store.root / MANIFEST, man)
    assert store.verify_shard("shard-00000-aa") == "not in manifest"
    assert (store.root / "shard-00000-aa.parquet").exists()
    with pytest.raises(StoreError, match="shard-00001-bb"):
        store.read()  # the listed shard's file is gone


def test_row_checksum_catches_valid_parquet_with_altered_weights(store):
    """A well-formed file whose manifest hash matches but whose weights differ from the row checksums."""
    sid = "shard-00000-aa"
    path = store.root / f"{sid}.parquet"
    table = pq.read_table(path)
    w = table.column("w").combine_chunks().flatten().to_numpy().reshape(-1, P).copy()
    w[3, 7] += 1e-3
    new_w = pa.FixedSizeListArray.from_arrays(pa.array(w.reshape(-1), type=pa.float32()), P)
    bad = table.set_column(table.schema.get_field_index("w"), table.schema.field("w"), new_w)
    assert bad.schema == table.schema
    pq.write_table(bad, path, compression="zstd")
    man = store.manifest()
    man["shards"][sid]["file_sha256"] = file_sha256(path)  # so only the row checksum can catch it
    write_json(store.root / MANIFEST, man)

    reason = store.verify_shard(sid)
    assert reason is not None and "checksum" in reason and "row 3" in reason
    with pytest.raises(StoreError, match=sid):
        store.read(final_only=False)
    # the intact shard alone is still readable
    assert len(store.read(split="val", final_only=False).meta) == 4


def test_nan_weights_refused_and_nothing_written(tmp_path):
    st = WeightStore(tmp_path)
    meta, w = make_rows("train", ["t0"], [0], [10])
    w[0, 5] = np.nan
    with pytest.raises(StoreError, match="shard-nan"):
        st.write_shard("shard-nan", meta, w, {})
    assert not (tmp_path / "shard-nan.parquet").exists()
    assert st.completed_shards() == []
    assert os.listdir(tmp_path) == []
    w[0, 5] = np.inf
    with pytest.raises(StoreError):
        st.write_shard("shard-nan", meta, w, {})
    assert os.listdir(tmp_path) == []


def test_no_temporary_files_after_writes(store):
    m, w = make_rows("train", ["t9"], [0], [10], seed=9)
    store.write_shard("shard-00000-aa", m, w, {})  # overwrite an existing shard
    assert sorted(os.listdir(store.root)) == [MANIFEST_LOCK, MANIFEST, "shard-00000-aa.parquet", "shard-00001-bb.parquet"]
    assert store.verify_shard("shard-00000-aa") is None
    assert keys(store.read(split="train").meta) == {("t9", 0, 10)}


def test_atomic_path_success_and_failure(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("old")
        assert not target.exists()  # nothing visible until the body succeeds
    assert target.read_text() == "old"

    seen = {}
    with pytest.raises(ValueError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("new, half written")
            seen["tmp"] = tmp
            raise ValueError("boom")
    assert not seen["tmp"].exists()
    assert target.read_text() == "old"
    assert os.listdir(target.parent) == ["file.txt"]


def test_empty_store_says_run_the_experts_stage(tmp_path):
    st = WeightStore(tmp_path / "nothing-here")
    assert st.manifest() == {"shards": {}}
    for call in (st.read, st.read_meta):
        with pytest.raises(StoreError) as e:
            call()
        msg = str(e.value)
        assert "pipelines.experts" in msg and "run" in msg
        assert str(tmp_path / "nothing-here") in msg


def test_corrupt_manifest_is_an_error_not_an_empty_store(store):
    (store.root / MANIFEST).write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        store.completed_shards()


def test_read_rejects_shard_whose_metadata_changed_after_write(store):
    sid = "shard-00001-bb"
    path = store.root / f"{sid}.parquet"
    table = pq.read_table(path)
    i = table.schema.get_field_index("split")
    pq.write_table(table.set_column(i, table.schema.field(i), pa.array(["train"] * table.num_rows)), path)
    assert store.verify_shard(sid) is not None  # verify_shard sees it...
    with pytest.raises(StoreError, match=sid):  # ...read() should too
        store.read(split="train")


def test_shard_of_another_config_is_refused_and_nothing_written(store):
    m, w = make_rows("train", ["t9"], [0], [10], seed=9)
    before = json.loads((store.root / MANIFEST).read_text())
    with pytest.raises(StoreError, match="config hash differs"):
        store.write_shard("shard-00002-cc", m.assign(config_hash="cfg2"), w, {})
    assert not (store.root / "shard-00002-cc.parquet").exists()
    assert json.loads((store.root / MANIFEST).read_text()) == before
    with pytest.raises(StoreError, match="holds experts of config"):
        store.set_info(config_hash="cfg2")


def test_rows_of_two_configs_are_reported_as_damaged_never_returned(store):
    """A shard written behind the store's back with another config hash: reads refuse the whole store."""
    m, w = make_rows("train", ["t9"], [0], [10], seed=9)
    other = WeightStore(store.root.parent / "other")
    other.write_shard("shard-00002-cc", m.assign(config_hash="cfg2"), w, {})
    os.replace(other.root / "shard-00002-cc.parquet", store.root / "shard-00002-cc.parquet")
    manifest = json.loads((store.root / MANIFEST).read_text())
    manifest["shards"]["shard-00002-cc"] = json.loads((other.root / MANIFEST).read_text())["shards"]["shard-00002-cc"]
    write_json(store.root / MANIFEST, manifest)
    for read in (store.read, store.read_meta):
        with pytest.raises(StoreError, match="damaged: it holds experts of 2 configs"):
            read()


def test_lost_manifest_is_rebuilt_from_the_shards_that_verify(store):
    """Deleting manifest.json loses nothing: every intact shard is listed again; a damaged one is left out."""
    want = store.read()
    (store.root / MANIFEST).unlink()
    assert store.verify_shard("shard-00000-aa") is None and store.verify_shard("shard-00001-bb") is None
    got = store.read()
    assert np.array_equal(got.w.numpy(), want.w.numpy()) and keys(got.meta) == keys(want.meta)
    assert store.manifest()["config_hash"] == "cfg1"

    (store.root / MANIFEST).unlink()
    table = pq.read_table(store.root / "shard-00001-bb.parquet")
    w = table.column("w").to_pylist()
    w[0][0] += 1.0  # a valid Parquet file whose weights no longer match their checksum
    cols = {n: table.column(n) for n in table.column_names if n != "w"}
    pq.write_table(pa.Table.from_pydict({**cols, "w": pa.array(w, type=table.schema.field("w").type)}, schema=table.schema),
                   store.root / "shard-00001-bb.parquet")
    assert store.completed_shards() == ["shard-00000-aa"]


def test_shard_file_written_elsewhere_exists_only_once_committed(store):
    """The farm's split: a worker writes the file, the driver commits it; until then no read sees it."""
    m, w = make_rows("train", ["t9"], [0], [10], seed=9)
    written = store.write_shard_file("shard-00002-cc", m, w)
    assert written == {"rows": 1, "file_sha256": file_sha256(store.root / "shard-00002-cc.parquet"), "config_hashes": ["cfg1"]}
    assert "t9" not in set(store.read().meta["task_id"]) and store.verify_shard("shard-00002-cc") == "not in manifest"
    again = store.write_shard_file("shard-00002-cc", m, w)  # a presumed-lost worker finishing too: same bytes
    assert again == written and not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]
    store.commit_shard("shard-00002-cc", written, {"seconds": 1.0})
    meta = store.read().meta
    assert (meta["task_id"] == "t9").sum() == 1 and store.verify_shard("shard-00002-cc") is None


def test_commit_refuses_a_missing_file_or_another_config(store):
    m, w = make_rows("train", ["t9"], [0], [10], seed=9)
    before = json.loads((store.root / MANIFEST).read_text())
    with pytest.raises(StoreError, match="missing at commit"):
        store.commit_shard("shard-00003-dd", {"rows": 1, "file_sha256": "0" * 64, "config_hashes": ["cfg1"]}, {})
    written = store.write_shard_file("shard-00002-cc", m.assign(config_hash="cfg2"), w)
    with pytest.raises(StoreError, match="config hash differs"):
        store.commit_shard("shard-00002-cc", written, {})
    assert json.loads((store.root / MANIFEST).read_text()) == before
