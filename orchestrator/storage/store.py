"""The weight store: Parquet shards of flat expert weights with metadata, checksums and a manifest.

Layout under `root`: `shard-XXXXX-<hash>.parquet` files (one row per expert and checkpoint step) and
`manifest.json`, which lists completed shards with their row count and file sha256. Every write is a
temporary file renamed into place, so a crash leaves either the old state or the new one. Shard files
are written by whoever trained them (farm actors); a shard exists once the manifest lists it, and every
manifest update is a read-modify-write under a file lock, so two writers cannot lose each other's shards.
A shard is trusted only when its file hash matches the manifest and every row's weight checksum
matches its weights. All rows share one config hash: a shard of another config is refused
when written, and a store holding two is reported as damaged when read, never returned mixed. A lost
manifest is rebuilt from the shard files whose row checksums verify.

In a run on object storage (orchestrator.storage.remote) each file is also put to the store once it is
complete: a shard object by the actor that wrote it, the manifest by the driver after the shard it lists.
A shard file this node lacks (another node wrote it) is fetched from the store before it is read.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from models.errors import UserError
from orchestrator.storage.arrow_vectors import to_column, to_matrix
from orchestrator.storage import remote
from orchestrator.storage.atomic import atomic_path, write_json

MANIFEST = "manifest.json"
MANIFEST_LOCK = ".manifest.lock"
META_COLUMNS = [
    "task_id", "description", "split", "seed", "step", "final", "layout_id",
    "support_acc", "support_loss", "query_acc", "query_loss", "config_hash", "shard_id", "checksum",
]


class StoreError(UserError, RuntimeError):
    """The store is missing, corrupt or inconsistent; the message says which shard and how to repair it."""


def weights_checksum(w: np.ndarray) -> str:
    """sha256 of one float32 weight vector's bytes (hex, 32 chars are plenty to catch corruption)."""
    return hashlib.sha256(np.ascontiguousarray(w, dtype=np.float32).tobytes()).hexdigest()[:32]


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _schema(n_weights: int) -> pa.Schema:
    return pa.schema([
        ("task_id", pa.string()), ("description", pa.string()), ("split", pa.string()),
        ("seed", pa.int32()), ("step", pa.int32()), ("final", pa.bool_()), ("layout_id", pa.string()),
        ("support_acc", pa.float32()), ("support_loss", pa.float32()),
        ("query_acc", pa.float32()), ("query_loss", pa.float32()),
        ("config_hash", pa.string()), ("shard_id", pa.string()), ("checksum", pa.string()),
        ("w", pa.list_(pa.float32(), n_weights)),
    ])


@dataclass
class StoredWeights:
    """Weights read back from the store: `w` [n, P] float32 and one metadata row per weight vector."""

    w: torch.Tensor
    meta: pd.DataFrame


class WeightStore:
    """Read and write expert weights under one folder."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # -- manifest -------------------------------------------------------------------------------
    def _lock(self):
        """The lock every manifest read-modify-write holds (a file lock: other processes too)."""
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / MANIFEST_LOCK))

    def manifest(self, locked: bool = False) -> dict:
        """The manifest (empty when the store is new; rebuilt from the shard files when it was lost).

        `locked`: the caller holds the manifest lock already. A corrupt manifest is an error, not an empty store."""
        path = self.root / MANIFEST
        if not path.exists():
            if not any(self.root.glob("shard-*.parquet")):
                return {"shards": {}}
            if locked:
                self._save_manifest(self._rebuilt_manifest())
            else:
                with self._lock():
                    if not path.exists():
                        self._save_manifest(self._rebuilt_manifest())
        import json

        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(
                f"{path} is not valid JSON ({e}); move it aside and rerun the experts stage, "
                "which re-verifies every shard file against its row checksums"
            ) from e

    def _save_manifest(self, manifest: dict) -> None:
        write_json(self.root / MANIFEST, manifest)

    def _rebuilt_manifest(self) -> dict:
        """A manifest of the shard files whose rows all verify (the others are left for the farm to retrain)."""
        shards, hashes = {}, set()
        for path in sorted(self.root.glob("shard-*.parquet")):
            try:
                table = pq.read_table(path)
            except Exception:  # noqa: BLE001 - unreadable: not listed, so the farm retrains it
                continue
            if _bad_rows(to_matrix(table.column("w")), table.column("checksum").to_pylist(), path.name):
                continue
            hashes.update(table.column("config_hash").to_pylist())
            shards[path.stem] = {"rows": table.num_rows, "file_sha256": file_sha256(path), "rebuilt": True}
        if len(hashes) > 1:
            raise StoreError(f"{self.root} holds shards of {len(hashes)} configs ({', '.join(sorted(hashes))}) and no "
                             "manifest; move the store aside and rerun the experts stage")
        return {"shards": shards, **({"config_hash": hashes.pop()} if hashes else {})}

    # -- writing --------------------------------------------------------------------------------
    def write_shard(self, shard_id: str, meta: pd.DataFrame, w: np.ndarray, info: dict) -> Path:
        """Atomically write one shard (metadata rows + weights [n, P]) and record it in the manifest."""
        self.check_config(shard_id, set(meta["config_hash"]))  # refuse before writing, not only at commit
        written = self.write_shard_file(shard_id, meta, w)
        self.commit_shard(shard_id, written, info)
        return self.root / f"{shard_id}.parquet"

    def write_shard_file(self, shard_id: str, meta: pd.DataFrame, w: np.ndarray) -> dict:
        """Atomically write one shard's file, without touching the manifest; returns what `commit_shard` needs.

        Farm actors call this where they trained the shard, so weights never travel to the driver. The file
        name is the shard id and the bytes depend only on the shard's inputs, so a shard written twice (an
        actor presumed lost that still finished) is replaced by identical bytes: never a duplicate."""
        w = np.ascontiguousarray(w, dtype=np.float32)
        if not np.isfinite(w).all():
            raise StoreError(f"shard {shard_id}: refusing to store non-finite weights (training diverged?)")
        meta = meta.assign(shard_id=shard_id, checksum=[weights_checksum(r) for r in w])
        schema = _schema(w.shape[1])
        cols = {c: pa.array(meta[c].tolist(), type=schema.field(c).type) for c in META_COLUMNS}
        cols["w"] = to_column(w)
        table = pa.Table.from_pydict(cols, schema=schema)
        path = self.root / f"{shard_id}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
            sha = file_sha256(tmp)  # of the bytes being published, before any other writer can replace them
        return {"rows": len(meta), "file_sha256": sha, "config_hashes": sorted(set(meta["config_hash"]))}

    def check_config(self, shard_id: str, hashes: set[str], manifest: dict | None = None) -> None:
        """Refuse a shard whose config hash differs from the store's: experts of two configs are never mixed."""
        manifest = manifest or self.manifest()
        hashes = set(hashes) | ({manifest["config_hash"]} if manifest.get("config_hash") else set())
        if len(hashes) > 1:
            raise StoreError(f"shard {shard_id}: its config hash differs from the store's ({', '.join(sorted(hashes))}); "
                             "experts of two configs are never mixed: use a new --run-dir or delete the store")

    def commit_shard(self, shard_id: str, written: dict, info: dict) -> None:
        """Record a shard file written by `write_shard_file` (here or by a farm actor) in the manifest.

        The manifest is the commit: a file not listed is never read, and the farm retrains it."""
        with self._lock():
            manifest = self.manifest(locked=True)
            self.check_config(shard_id, set(written["config_hashes"]), manifest)
            path = self.root / f"{shard_id}.parquet"
            if not remote.exists(path):  # in a run on object storage, an actor on another node put it there
                raise StoreError(f"shard {shard_id}: its file {path} is missing at commit (written to another file system?); "
                                 "every farm node must see the run directory")
            manifest["shards"][shard_id] = {"rows": written["rows"], "file_sha256": written["file_sha256"], **info}
            if written["config_hashes"]:
                manifest.setdefault("config_hash", written["config_hashes"][0])
            self._save_manifest(manifest)

    def set_info(self, **info) -> None:
        """Record store-wide facts (layout id, config hash) in the manifest."""
        with self._lock():
            manifest = self.manifest(locked=True)
            if manifest["shards"] and "config_hash" in info and manifest.get("config_hash") not in (None, info["config_hash"]):
                raise StoreError(f"{self.root} holds experts of config {manifest['config_hash']}, not {info['config_hash']}; "
                                 "use a new --run-dir or delete the store")
            manifest.update(info)
            self._save_manifest(manifest)

    # -- verifying ------------------------------------------------------------------------------
    def verify_shard(self, shard_id: str, manifest: dict | None = None) -> str | None:
        """None when the shard is complete and intact, else why not (missing, hash or checksum mismatch).

        Pass `manifest` when checking many shards, so it is read once, not once per shard.
        """
        entry = (manifest or self.manifest())["shards"].get(shard_id)
        path = self.root / f"{shard_id}.parquet"
        if entry is None:
            return "not in manifest"
        remote.fetch(path)  # a run on object storage: a shard another node wrote
        if not path.exists():
            return f"file {path.name} missing"
        if file_sha256(path) != entry["file_sha256"]:
            return f"file {path.name} does not match its manifest sha256"
        try:
            table = pq.read_table(path)
        except Exception as e:  # a truncated or garbled Parquet file
            return f"file {path.name} unreadable: {e}"
        if table.num_rows != entry["rows"]:
            return f"file {path.name} has {table.num_rows} rows, manifest says {entry['rows']}"
        return _bad_rows(to_matrix(table.column("w")), table.column("checksum").to_pylist(), path.name)

    def completed_shards(self) -> list[str]:
        """Shard ids listed in the manifest."""
        return sorted(self.manifest()["shards"])

    # -- reading --------------------------------------------------------------------------------
    def read_meta(self, final_only: bool = True) -> pd.DataFrame:
        """Metadata of every stored expert, without loading weights (cheap at any store size)."""
        shards = self.completed_shards()
        if not shards:
            raise StoreError(f"no weights in {self.root}: run `python -m pipelines.experts` first")
        meta = pd.concat([self._read_table(s, columns=META_COLUMNS).to_pandas() for s in shards])
        self._check_one_config(meta)
        return meta[meta["final"]].reset_index(drop=True) if final_only else meta.reset_index(drop=True)

    def _read_table(self, shard_id: str, **kw) -> pa.Table:
        """One shard's table; a truncated or garbled file is a StoreError naming it and the fix."""
        path = remote.fetch(self.root / f"{shard_id}.parquet")
        try:
            return pq.read_table(path, **kw)
        except Exception as e:
            raise StoreError(
                f"shard {path} is unreadable ({e}); rerun `python -m pipelines.experts` with the same "
                "run directory to retrain it"
            ) from e

    def read(
        self,
        split: str | None = None,
        task_ids: list[str] | None = None,
        seeds: list[int] | None = None,
        final_only: bool = True,
    ) -> StoredWeights:
        """All matching weights as one tensor plus metadata, every row's checksum verified."""
        shards = self.completed_shards()
        if not shards:
            raise StoreError(f"no weights in {self.root}: run `python -m pipelines.experts` first")
        filters = []
        if split is not None:
            filters.append(("split", "=", split))
        if task_ids is not None:
            filters.append(("task_id", "in", list(task_ids)))
        if seeds is not None:
            filters.append(("seed", "in", [int(s) for s in seeds]))
        if final_only:
            filters.append(("final", "=", True))
        weights, metas = [], []
        entries = self.manifest()["shards"]
        for sid in shards:
            path = remote.fetch(self.root / f"{sid}.parquet")
            if not path.exists() or file_sha256(path) != entries[sid]["file_sha256"]:
                raise StoreError(
                    f"shard {path} is missing or does not match its manifest sha256 (corrupted or replaced); "
                    "rerun `python -m pipelines.experts` with the same run directory to retrain it"
                )
            t = self._read_table(sid, filters=filters or None)
            w = to_matrix(t.column("w"))  # converted once: checked here, returned below
            bad = _bad_rows(w, t.column("checksum").to_pylist(), path.name)
            if bad:
                raise StoreError(f"{bad}; rerun `python -m pipelines.experts` with the same run directory to retrain it")
            weights.append(w)
            metas.append(t.drop_columns(["w"]).to_pandas())
        meta = pd.concat(metas, ignore_index=True)
        self._check_one_config(meta)
        return StoredWeights(w=torch.from_numpy(np.concatenate(weights)), meta=meta)

    def _check_one_config(self, meta: pd.DataFrame) -> None:
        """Refuse rows of several configs, or of a config the manifest does not name: a damaged store."""
        want = self.manifest().get("config_hash")
        hashes = set(meta["config_hash"]) | ({want} if want else set())
        if len(hashes) > 1:
            raise StoreError(f"{self.root} is damaged: it holds experts of {len(hashes)} configs ({', '.join(sorted(hashes))}); "
                             "move it aside and rerun the experts stage")


def _bad_rows(w: np.ndarray, checksums: list[str], name: str) -> str | None:
    """Why a shard's weights [n, P] cannot be trusted (checksum mismatch, NaN/inf), or None."""
    for i, (row, want) in enumerate(zip(w, checksums)):
        if weights_checksum(row) != want:
            return f"shard {name} row {i}: weight checksum mismatch (corrupted)"
    if not np.isfinite(w).all():
        return f"shard {name}: contains NaN/inf weights"
    return None
