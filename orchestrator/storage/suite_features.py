"""A task suite with its frozen-encoder features, as arrays: the features stage's output on disk.

Folder layout: `images.parquet` (path, vector), `texts.parquet` (text, vector), `tasks.parquet`
(one row per task; prompts and descriptions point into the text table, samples into the image
table) and `info.json` (suite, encoders, dims, the config hash that made it). Parquet and JSON only:
nothing read back is unpickled.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from models.errors import UserError
from models.expert_training import ExpertBatch, pad_batch
from orchestrator.storage.arrow_vectors import to_column, to_matrix
from orchestrator.storage.atomic import atomic_path, write_json

INFO_FILE = "info.json"  # written last: its presence means the folder is complete
TASKS_FILE = "tasks.parquet"


def info_path(folder: Path) -> Path:
    """The features folder's `info.json`."""
    return Path(folder) / INFO_FILE


def read_info(folder: Path) -> dict | None:
    """A features folder's info (None when the folder has none yet); a damaged file raises FeaturesError."""
    path = info_path(folder)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FeaturesError(f"{path} is unreadable ({e}); delete {path.parent} and rerun the features stage") from e


TASK_COLUMNS = [
    "id", "description", "split", "answers", "answer_prompts", "concepts",
    "desc_text", "prompt_texts", "support_images", "support_labels", "query_images", "query_labels",
]


class FeaturesError(UserError, RuntimeError):
    """The features folder is missing or unreadable; the message says how to rebuild it."""


def vectors_table(names: list[str], key: str, vecs: np.ndarray) -> pa.Table:
    """A (name, fixed-size float32 vector) table."""
    return pa.table({key: pa.array(names, pa.string()), "vector": to_column(vecs)})


def read_vectors(path: Path, key: str) -> tuple[list[str], np.ndarray]:
    """Inverse of `vectors_table` read from a Parquet file."""
    t = pq.read_table(path)
    return t.column(key).to_pylist(), to_matrix(t.column("vector"))


@dataclass
class SuiteFeatures:
    """Image and text features plus the task table of one suite."""

    image_paths: list[str]
    image_feats: np.ndarray  # [n_img, d_img] float32
    texts: list[str]
    text_feats: np.ndarray  # [n_txt, d_txt] float32
    tasks: pd.DataFrame  # TASK_COLUMNS
    info: dict = field(default_factory=dict)

    @property
    def d_img(self) -> int:
        return self.image_feats.shape[1]

    @property
    def d_txt(self) -> int:
        return self.text_feats.shape[1]

    def save(self, folder: Path) -> None:
        """Write every file atomically; `info.json` last, so its presence means the folder is complete."""
        folder = Path(folder)
        for name, table in [
            ("images.parquet", vectors_table(self.image_paths, "path", self.image_feats)),
            ("texts.parquet", vectors_table(self.texts, "text", self.text_feats)),
            (TASKS_FILE, pa.Table.from_pandas(self.tasks[TASK_COLUMNS], preserve_index=False)),
        ]:
            with atomic_path(folder / name) as tmp:
                pq.write_table(table, tmp)
        write_json(info_path(folder), self.info)

    @classmethod
    def load(cls, folder: Path) -> "SuiteFeatures":
        """Read a folder written by `save`."""
        folder = Path(folder)
        if not info_path(folder).exists():
            raise FeaturesError(
                f"no features in {folder}: run `python -m pipelines.features --run-dir {folder.parent}` first"
            )
        try:
            paths, img = read_vectors(folder / "images.parquet", "path")
            texts, txt = read_vectors(folder / "texts.parquet", "text")
            tasks = pq.read_table(folder / TASKS_FILE).to_pandas()
            info = json.loads(info_path(folder).read_text())
        except Exception as e:
            raise FeaturesError(f"features in {folder} are unreadable ({e}); delete the folder and rerun the features stage") from e
        for col in ("support_images", "support_labels", "query_images", "query_labels", "prompt_texts"):
            tasks[col] = tasks[col].map(lambda a: np.asarray(a, dtype=np.int64))
        return cls(paths, img, texts, txt, tasks, info)


def task_batch(rows, text_feats: torch.Tensor) -> ExpertBatch:
    """Task-table rows (itertuples) as one padded ExpertBatch: answer prompts, support and query sets."""
    return pad_batch(
        [text_feats[torch.tensor(r.prompt_texts)] for r in rows],
        [(torch.tensor(r.support_images), torch.tensor(r.support_labels)) for r in rows],
        [(torch.tensor(r.query_images), torch.tensor(r.query_labels)) for r in rows],
    )
