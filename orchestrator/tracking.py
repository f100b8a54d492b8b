"""MLflow tracking: one parent run per pipeline invocation, one child run per stage; only the driver writes.

Default store: SQLite under the run directory with artifacts beside it, so a run directory is
self-contained; `MLFLOW_TRACKING_URI` points elsewhere (e.g. an `mlflow server` on the head node).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Iterator

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

EXPERIMENT = "weightgen"


def flat_params(cfg) -> dict[str, str]:
    """A stage config as MLflow params (values stringified, long ones cut to MLflow's limit)."""
    d = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return {k: str(v)[:6000] for k, v in d.items()}


class Tracker:
    """Logs a pipeline invocation to MLflow."""

    def __init__(self, run_dir: Path, experiment: str = EXPERIMENT):
        self.run_dir = Path(run_dir).resolve()
        user_uri = os.environ.get("MLFLOW_TRACKING_URI")  # read first: set_tracking_uri writes this variable
        self.uri = user_uri or f"sqlite:///{self.run_dir / 'mlflow.db'}"
        mlflow.set_tracking_uri(self.uri)
        client = MlflowClient(self.uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            artifacts = None if user_uri else (self.run_dir / "mlartifacts").as_uri()
            exp_id = client.create_experiment(experiment, artifact_location=artifacts)
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id
        self.parent_id: str | None = None

    @contextlib.contextmanager
    def pipeline(self, name: str, tags: dict | None = None) -> Iterator[str]:
        """The parent run of one invocation; yields its run id."""
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=name, tags=tags or {}) as run:
            self.parent_id = run.info.run_id
            try:
                yield run.info.run_id
            finally:
                self.parent_id = None

    @contextlib.contextmanager
    def stage(self, name: str, cfg, tags: dict | None = None) -> Iterator[str]:
        """A child run for one stage, with its config as params (and as a JSON artifact)."""
        with mlflow.start_run(
            experiment_id=self.experiment_id, run_name=name, nested=self.parent_id is not None,
            tags={"stage": name, **(tags or {})},
        ) as run:
            mlflow.log_params(flat_params(cfg))
            mlflow.log_dict(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg), "config.json")
            yield run.info.run_id

    @staticmethod
    def metrics(values: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics to the active run (non-finite values are skipped: MLflow rejects NaN in some stores)."""
        clean = {k: float(v) for k, v in values.items() if v is not None and float(v) == float(v)}
        mlflow.log_metrics(clean, step=step)

    @staticmethod
    def artifact(path: Path, folder: str | None = None) -> None:
        """Copy a file into the active run's artifacts."""
        mlflow.log_artifact(str(path), artifact_path=folder)

    def ui_command(self) -> str:
        """The command that opens this store in the MLflow UI, bound to loopback."""
        return f"mlflow ui --backend-store-uri '{self.uri}' --host 127.0.0.1 --port 5000"
