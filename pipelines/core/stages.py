"""The pipeline's stages, in order: each is a `python -m pipelines.<name>` module (see pipelines.core.runner)."""
from __future__ import annotations

import importlib

STAGES = ("features", "experts", "generators", "hyperclip", "hyperldm", "baselines", "evaluate", "sweep", "fewshot")
# The stages that train through orchestrator.train.launch: a chain of two or more shares one warm worker group.
LAUNCHING_STAGES = ("generators", "hyperclip", "hyperldm", "baselines", "fewshot")


def stage_module(name: str):
    """The stage module `pipelines.<name>`: CONFIG, PRESETS, NEEDS_RAY, run, track."""
    return importlib.import_module(f"pipelines.{name}")
