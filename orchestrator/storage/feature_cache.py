"""Parquet cache of frozen-encoder features, keyed by encoder id and content hash.

Layout: root/<safe encoder id>/part-*.parquet, each part a table (key: string, vector:
fixed_size_list<float32>[dim]). Parts are only ever added, each written under a temporary name and
renamed into place, so readers (other processes, Ray workers) never see half a file.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.errors import UserError
from orchestrator.storage.arrow_vectors import to_column, to_matrix
from orchestrator.storage.atomic import atomic_path

PART_GLOB = "part-*.parquet"
ID_FILE = "ENCODER_ID"


class FeatureCacheError(UserError, ValueError):
    """Inconsistent cache content or compute result; the message says how to fix it."""


def hash_text(text: str) -> str:
    """sha256 hex digest of the text's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of the file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def safe_dir_name(encoder_id: str) -> str:
    """A folder name for `encoder_id`: readable prefix plus a hash, so distinct ids never share a folder."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder_id).strip("._")[:80]
    return f"{readable}-{hashlib.sha256(encoder_id.encode('utf-8')).hexdigest()[:12]}"


class _Index:
    """Vectors of one encoder id loaded so far, and which part files they came from."""

    def __init__(self) -> None:
        self.rows: dict[str, np.ndarray] = {}  # key -> float32 [dim] (a view into its part's array)
        self.seen: set[str] = set()  # part file names already read (or reported corrupt)
        self.dim: int | None = None
        self.dim_source: str | None = None


class FeatureCache:
    """Feature store under `root`: looks vectors up by (encoder id, key) and computes only what is missing."""

    def __init__(self, root: str | os.PathLike):
        """Use (and create on first write) the folder `root`."""
        self.root = Path(root)
        self._indexes: dict[str, _Index] = {}

    def folder(self, encoder_id: str) -> Path:
        """The folder holding `encoder_id`'s part files."""
        return self.root / safe_dir_name(encoder_id)

    def get_or_compute(
        self,
        encoder_id: str,
        keys: list[str],
        compute: Callable[[list[int]], np.ndarray],
    ) -> np.ndarray:
        """Vectors for `keys` as float32 [len(keys), dim], calling compute(positions) only for missing keys.

        `positions` index `keys`: the first occurrence of each distinct missing key. compute must
        return one row per position, in that order.
        """
        keys = list(keys)
        folder = self.folder(encoder_id)
        index = self._refresh(encoder_id, folder)
        positions, pending = [], set()
        for i, k in enumerate(keys):
            if k not in index.rows and k not in pending:
                pending.add(k)
                positions.append(i)
        if positions:
            fresh = self._check_computed(compute(positions), len(positions), index, folder)
            new_keys = [keys[i] for i in positions]
            index.seen.add(self._write_part(encoder_id, folder, new_keys, fresh).name)
            for k, row in zip(new_keys, fresh):
                index.rows[k] = row
            if index.dim is None:
                index.dim, index.dim_source = fresh.shape[1], "newly computed vectors"
        if not keys:
            return np.zeros((0, index.dim or 0), dtype=np.float32)
        return np.stack([index.rows[k] for k in keys]).astype(np.float32, copy=False)

    def _refresh(self, encoder_id: str, folder: Path) -> _Index:
        """Read part files not seen before (others may have added some since the last call)."""
        index = self._indexes.setdefault(encoder_id, _Index())
        if not folder.is_dir():
            return index
        for path in sorted(folder.glob(PART_GLOB)):
            if path.name in index.seen:
                continue
            index.seen.add(path.name)
            try:
                part_keys, vectors = _read_part(path)
            except Exception as e:  # truncated, garbled or foreign file: never trust it
                warnings.warn(
                    f"feature cache: ignoring unreadable part file {path} ({type(e).__name__}: {e}); "
                    "its vectors will be recomputed. Delete the file to silence this warning.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            if index.dim is None:
                index.dim, index.dim_source = vectors.shape[1], str(path)
            elif vectors.shape[1] != index.dim:
                raise FeatureCacheError(
                    f"feature cache for encoder {encoder_id!r} mixes dimensions: {path} has {vectors.shape[1]}-d "
                    f"vectors but {index.dim_source} has {index.dim}-d. An encoder id must name everything that "
                    f"changes its outputs; delete {folder} to rebuild this cache"
                )
            for k, row in zip(part_keys, vectors):
                index.rows.setdefault(k, row)  # duplicates (two writers raced) hold the same vector
        return index

    @staticmethod
    def _check_computed(result, n: int, index: _Index, folder: Path) -> np.ndarray:
        arr = np.asarray(result, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] != n:
            raise FeatureCacheError(
                f"compute() returned shape {arr.shape} for {n} missing keys; it must return one row per "
                "position it was given, shape [len(positions), dim]"
            )
        if index.dim is not None and arr.shape[1] != index.dim:
            raise FeatureCacheError(
                f"compute() returned {arr.shape[1]}-d vectors but the cache in {folder} holds {index.dim}-d "
                f"vectors ({index.dim_source}); the encoder id must change when its output changes. "
                f"Delete {folder} to rebuild"
            )
        if not np.isfinite(arr).all():
            raise FeatureCacheError("compute() returned NaN or infinite values; refusing to cache them")
        return arr

    @staticmethod
    def _write_part(encoder_id: str, folder: Path, keys: list[str], vectors: np.ndarray) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / ID_FILE
        if not id_file.exists():  # for people browsing the folder; the code never reads it
            id_file.write_text(encoder_id + "\n", encoding="utf-8")
        table = pa.table({"key": pa.array(keys, type=pa.string()), "vector": to_column(vectors)})
        path = folder / f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
        with atomic_path(path) as tmp:  # its temporary name starts with '.', so readers skip it
            pq.write_table(table, tmp)
        return path


def _read_part(path: Path) -> tuple[list[str], np.ndarray]:
    """Keys and float32 [n, dim] vectors of one part file; raises on anything malformed."""
    table = pq.read_table(path)
    if table.column_names != ["key", "vector"]:
        raise ValueError(f"columns are {table.column_names}, expected ['key', 'vector']")
    vtype = table.schema.field("vector").type
    if not pa.types.is_fixed_size_list(vtype) or vtype.value_type != pa.float32():
        raise ValueError(f"column 'vector' has type {vtype}, expected fixed_size_list<float32>")
    if not pa.types.is_string(table.schema.field("key").type) and not pa.types.is_large_string(
        table.schema.field("key").type
    ):
        raise ValueError(f"column 'key' has type {table.schema.field('key').type}, expected string")
    keys_col, vec_col = table.column("key"), table.column("vector").combine_chunks()
    if keys_col.null_count or vec_col.null_count or vec_col.flatten().null_count:
        raise ValueError("null keys or vectors")
    vectors = to_matrix(vec_col)
    if not np.isfinite(vectors).all():
        raise ValueError("NaN or infinite values")
    return keys_col.to_pylist(), vectors


def encode_texts_cached(encoder, texts: list[str], cache: FeatureCache, progress: bool = False) -> np.ndarray:
    """encoder.encode(texts) through the cache, keyed by text content: float32 [len(texts), encoder.dim]."""
    texts = list(texts)
    keys = [hash_text(t) for t in texts]
    return cache.get_or_compute(
        encoder.id, keys, lambda pos: encoder.encode([texts[i] for i in pos], progress=progress).numpy()
    )


def encode_images_cached(encoder, paths: list[str], cache: FeatureCache, progress: bool = False) -> np.ndarray:
    """encoder.encode(paths) through the cache, keyed by file content: float32 [len(paths), encoder.dim]."""
    paths = [os.fspath(p) for p in paths]
    from models.encoders.base import check_image_files

    check_image_files(paths)
    keys = [hash_file(p) for p in paths]
    return cache.get_or_compute(
        encoder.id, keys, lambda pos: encoder.encode([paths[i] for i in pos], progress=progress).numpy()
    )
