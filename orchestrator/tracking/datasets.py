"""A run's inputs as MLflow datasets: the features folder (one row per task) and the JSONL task file, if any.

The UI shows them in the runs table's Datasets column and on each run's page (name, digest, source,
row count, schema), so two runs on different features are told apart at a glance. Only the task
table is read (ids, descriptions, splits); the embeddings stay in the run directory.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

TASK_COLUMNS = ["id", "description", "split"]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def dataset_inputs(features: Path, tasks_file: Path | None = None) -> list:
    """`DatasetInput`s for `features` (context `features`) and `tasks_file` (context `tasks`); [] without features."""
    import mlflow.data
    import pandas as pd
    import pyarrow.parquet as pq
    from mlflow.entities import DatasetInput, InputTag

    from orchestrator.storage.suite_features import TASKS_FILE, read_info

    # a local path matches MLflow's `file` and `local` sources alike, and it warns about that on every dataset
    warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
    features = Path(features)
    tasks = features / TASKS_FILE
    if not tasks.exists():
        return []
    info = read_info(features) or {}
    suite = (info.get("config") or {}).get("suite", "features")
    df = pq.read_table(tasks, columns=TASK_COLUMNS).to_pandas()
    made = [(mlflow.data.from_pandas(df, source=str(features), name=f"features ({suite})",
                                     digest=str(info.get("config_hash") or file_digest(tasks))[:16]), "features")]
    if tasks_file is not None and Path(tasks_file).exists():
        lines = [json.loads(x) for x in Path(tasks_file).read_text().splitlines() if x.strip()]
        rows = pd.DataFrame([{"id": str(r.get("id", "")), "description": str(r.get("description", ""))} for r in lines])
        made.append((mlflow.data.from_pandas(rows, source=str(Path(tasks_file).resolve()), name=Path(tasks_file).name,
                                             digest=file_digest(Path(tasks_file))), "tasks"))
    return [DatasetInput(d._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", ctx)]) for d, ctx in made]
