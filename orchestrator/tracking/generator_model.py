"""An MLflow pyfunc over a run's trained zero-shot generators for one split and seed, in MLflow's
models-from-code form.

MLflow stores this file as the model's code and runs it at load time, so nothing is pickled. The
model's one artifact, `run`, is a bundle (pipelines.zeroshot.bundle): a small run directory with the
trained models as safetensors, which `pipelines.load_run` opens offline; its `bundle.json` names the
methods, split and seed. Input: rows of `description` and `answers` (the candidate answers); params
`method` (which generator) and `guidance` (HyperLDM's γ). Output: the task networks' flat weights,
float32 [rows, P].
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class GeneratorModel(PythonModel):
    """Descriptions and candidate answers in, task-network weights out."""

    # predict has no type hints: the logged signature describes its input (MLflow would otherwise warn
    # and wrap predict to infer and enforce a second schema from hints).
    _skip_type_hint_validation = True

    def load_context(self, context):
        from pipelines.zeroshot.api import load_run

        root = Path(context.artifacts["run"])
        cfg = json.loads((root / "bundle.json").read_text())
        self.methods, self.split, self.seed = tuple(cfg["methods"]), cfg["split"], int(cfg["seed"])
        self.run = load_run(root)

    def predict(self, context, model_input, params=None):
        params = params or {}
        method = params.get("method") or self.methods[0]
        if method not in self.methods:
            raise ValueError(f"method {method!r} is not in this model; choose one of {', '.join(self.methods)}")
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        nets = self.run.generate([r["description"] for r in rows], answers=[list(r["answers"]) for r in rows],
                                 method=method, guidance=params.get("guidance"), split=self.split, seed=self.seed)
        return np.stack([n.w.numpy() for n in nets])  # [rows, P]


mlflow.models.set_model(GeneratorModel())
