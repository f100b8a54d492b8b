"""Parquet feature cache on real files: computes only what is missing, survives corrupt parts."""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.storage.feature_cache import (
    FeatureCache,
    FeatureCacheError,
    encode_images_cached,
    encode_texts_cached,
    hash_file,
    hash_text,
)

DIM = 8
ENC = "fake-encoder/v1"


def vec(key: str, dim: int = DIM) -> np.ndarray:
    """A deterministic vector per key, so any two computations of a key agree."""
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


class Counter:
    """compute() that records every call's positions."""

    def __init__(self, keys: list[str], dim: int = DIM):
        self.keys, self.dim, self.calls = keys, dim, []

    def __call__(self, positions: list[int]) -> np.ndarray:
        self.calls.append(list(positions))
        return np.stack([vec(self.keys[i], self.dim) for i in positions])


def parts(cache: FeatureCache, encoder_id: str = ENC) -> list:
    return sorted(cache.folder(encoder_id).glob("part-*.parquet"))


def test_hashes_are_sha256_of_content(tmp_path):
    assert hash_text("abc") == hashlib.sha256(b"abc").hexdigest()
    assert hash_text("é") == hashlib.sha256("é".encode("utf-8")).hexdigest()
    f = tmp_path / "x.bin"
    f.write_bytes(b"\x00\x01abc")
    assert hash_file(f) == hashlib.sha256(b"\x00\x01abc").hexdigest()


def test_second_call_computes_nothing_and_returns_the_same(tmp_path):
    keys = [f"k{i}" for i in range(20)]
    cache = FeatureCache(tmp_path)
    first = Counter(keys)
    a = cache.get_or_compute(ENC, keys, first)
    assert first.calls == [list(range(20))]
    assert a.shape == (20, DIM) and a.dtype == np.float32
    np.testing.assert_array_equal(a, np.stack([vec(k) for k in keys]))

    again = Counter(keys)
    np.testing.assert_array_equal(cache.get_or_compute(ENC, keys, again), a)
    fresh_process = Counter(keys)  # a new cache object reads the parts from disk
    np.testing.assert_array_equal(FeatureCache(tmp_path).get_or_compute(ENC, keys, fresh_process), a)
    assert again.calls == [] and fresh_process.calls == []
    assert len(parts(cache)) == 1


def test_partial_overlap_computes_only_missing_and_keeps_order(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.get_or_compute(ENC, ["a", "b", "c"], Counter(["a", "b", "c"]))
    keys = ["d", "b", "e", "d", "a", "e"]
    c = Counter(keys)
    out = FeatureCache(tmp_path).get_or_compute(ENC, keys, c)
    assert c.calls == [[0, 2]]  # first occurrences of the missing keys d and e
    np.testing.assert_array_equal(out, np.stack([vec(k) for k in keys]))
    assert len(parts(cache)) == 2


def test_part_files_have_the_documented_schema_and_no_temporaries(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.get_or_compute(ENC, ["a", "b"], Counter(["a", "b"]))
    names = sorted(p.name for p in cache.folder(ENC).iterdir())
    assert len(names) == 2 and names[0] == "ENCODER_ID" and names[1].startswith("part-")
    table = pq.read_table(parts(cache)[0])
    assert table.schema.field("key").type == pa.string()
    assert table.schema.field("vector").type == pa.list_(pa.float32(), DIM)
    assert table.column("key").to_pylist() == ["a", "b"]


def test_encoder_ids_do_not_share_vectors(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.get_or_compute("enc/a", ["k"], Counter(["k"]))
    c = Counter(["k"], dim=3)
    assert cache.get_or_compute("enc/b", ["k"], c).shape == (1, 3) and c.calls == [[0]]
    assert cache.folder("enc/a") != cache.folder("enc/b")


def test_truncated_part_is_reported_and_recomputed(tmp_path):
    keys = [f"k{i}" for i in range(50)]
    cache = FeatureCache(tmp_path)
    good = cache.get_or_compute(ENC, keys, Counter(keys))
    (part,) = parts(cache)
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])

    c = Counter(keys)
    with pytest.warns(RuntimeWarning, match=part.name):
        out = FeatureCache(tmp_path).get_or_compute(ENC, keys, c)
    assert c.calls == [list(range(50))]
    np.testing.assert_array_equal(out, good)


def test_dimension_mismatch_between_parts_is_an_error(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.get_or_compute(ENC, ["a"], Counter(["a"]))
    odd = pa.table({"key": ["z"], "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(5, np.float32)), 5)})
    pq.write_table(odd, cache.folder(ENC) / "part-9-odd.parquet")
    with pytest.raises(FeatureCacheError, match="dimensions"):
        FeatureCache(tmp_path).get_or_compute(ENC, ["a"], Counter(["a"]))


def test_bad_compute_results_are_rejected_and_not_written(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.get_or_compute(ENC, ["a"], Counter(["a"]))
    with pytest.raises(FeatureCacheError, match="8-d"):
        cache.get_or_compute(ENC, ["b"], Counter(["b"], dim=5))
    with pytest.raises(FeatureCacheError, match="one row per"):
        cache.get_or_compute(ENC, ["b", "c"], lambda pos: np.zeros((1, DIM)))
    with pytest.raises(FeatureCacheError, match="NaN"):
        cache.get_or_compute(ENC, ["b"], lambda pos: np.full((1, DIM), np.nan))
    assert len(parts(cache)) == 1


def test_empty_keys(tmp_path):
    out = FeatureCache(tmp_path).get_or_compute(ENC, [], Counter([]))
    assert out.shape[0] == 0 and out.dtype == np.float32


# --- with the real encoders -----------------------------------------------------------------------


class CountingEncoder:
    """Wraps a real encoder and counts the items it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.id, self.dim, self.seen = inner, inner.id, inner.dim, 0

    def encode(self, items, batch_size=64, progress=False):
        self.seen += len(items)
        return self.inner.encode(items, batch_size=batch_size, progress=progress)


def test_encode_texts_cached_with_minilm(tmp_path):
    from models.encoders import make_text_encoder

    enc = CountingEncoder(make_text_encoder("minilm"))
    texts = ["is the shape red?", "what shape is it?", "is the shape red?"]
    out = encode_texts_cached(enc, texts, FeatureCache(tmp_path))
    assert enc.seen == 2 and out.shape == (3, 384)
    np.testing.assert_allclose(out, enc.inner.encode(texts).numpy(), atol=1e-5)
    np.testing.assert_array_equal(out[0], out[2])
    again = encode_texts_cached(enc, texts + ["new text"], FeatureCache(tmp_path))
    assert enc.seen == 3
    np.testing.assert_array_equal(again[:3], out)


def test_encode_images_cached_with_efficientnet(tmp_path):
    import easy_vqa

    from models.encoders import EncoderError, make_image_encoder

    paths = easy_vqa.get_train_image_paths()
    images = [paths[i] for i in sorted(paths)[:4]]
    enc = CountingEncoder(make_image_encoder("efficientnet_lite0"))
    cache = FeatureCache(tmp_path)
    out = encode_images_cached(enc, images, cache)
    assert enc.seen == 4 and out.shape == (4, 1280)
    np.testing.assert_array_equal(encode_images_cached(enc, images[::-1], cache), out[::-1])
    assert enc.seen == 4
    with pytest.raises(EncoderError, match="missing.png"):
        encode_images_cached(enc, [str(tmp_path / "missing.png")], cache)
