"""Experiment tracking behind one interface: the `Tracker` protocol, `MlflowTracker` and `NoopTracker`.

`python -m orchestrator.tracking replay RUN_DIR` sends what a run buffered while MLflow was unreachable.
"""
from orchestrator.tracking.base import NoopTracker, Tracker

__all__ = ["MlflowTracker", "NoopTracker", "Tracker"]


def __getattr__(name: str):
    # MlflowTracker imports mlflow (seconds, and heavy): loaded on first use, so that the protocol and
    # NoopTracker cost nothing, e.g. for a CLI that fails on bad input before any tracking starts.
    if name == "MlflowTracker":
        from orchestrator.tracking.tracker import MlflowTracker

        return MlflowTracker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
