"""Trained zero-shot generators as MLflow logged models (models-from-code, weights as safetensors).

Each (split, seed) becomes one logged model of the active MLflow run, `generators-<split>-seed<k>`,
serving every generative method: the code is `generator_model.py`, the one artifact a bundle directory
(pipelines.zeroshot.bundle). Load one back with `mlflow.pyfunc.load_model("models:/<model id>")`;
`predict` takes rows of description and answers, and params `method` and `guidance`, and returns the
task networks' weights.
"""
from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

CODE = Path(__file__).with_name("generator_model.py")


def signature(method: str, guidance: float, n_weights: int) -> ModelSignature:
    """Input rows (description, answers), params method and guidance (γ, default the run's), output weights [rows, P]."""
    import numpy as np

    return ModelSignature(
        inputs=Schema([ColSpec("string", "description"), ColSpec(Array("string"), "answers")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, n_weights))]),
        params=ParamSchema([ParamSpec("method", "string", method), ParamSpec("guidance", "double", float(guidance))]),
    )


def can_log(tracker) -> bool:
    """True when the tracker is an MLflow tracker that is online with a run open (else nothing is logged)."""
    ref = getattr(tracker, "run_id", None)
    return bool(getattr(tracker, "online", False) and ref and not ref.startswith("local-") and mlflow.active_run())


def log_generators(bundle: Path, methods: tuple[str, ...], split: str, seed: int, guidance: float, n_weights: int) -> str:
    """Log one bundle as a models-from-code pyfunc of the active run; returns its `models:/` URI. Its default
    method is the first of `methods`."""
    import importlib.metadata as md
    import warnings

    reqs = [f"{p}=={md.version(p)}" for p in ("mlflow", "torch", "safetensors", "pandas", "pyarrow")]
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # one bar per model would flood the stage's log
    try:
        with warnings.catch_warnings():
            # MLflow asks for an input example; the signature is given, and an example would load the
            # encoders at logging time just to check it.
            warnings.simplefilter("ignore", UserWarning)
            info = mlflow.pyfunc.log_model(
                name=f"generators-{split}-seed{seed}", python_model=str(CODE), artifacts={"run": str(bundle)},
                signature=signature(methods[0], guidance, n_weights), pip_requirements=reqs,
                tags={"methods": ",".join(methods), "split": split, "seed": str(seed)},
            )
    finally:
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar
    return info.model_uri
