"""What the pipeline asks of a tracker, and a tracker that records nothing.

`Tracker` is the interface the stages and the runner use through `ctx.tracker`; `MlflowTracker`
(orchestrator.tracking.tracker) implements it with MLflow and an outage buffer. `NoopTracker`
implements it with no store at all, for library use and tests, and imports no MLflow.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tracker(Protocol):
    """One parent run per pipeline invocation, one child run per stage; metrics and artifacts go to the innermost run."""

    uri: str  # where runs are stored, shown to the user
    experiment_id: str | None  # None while the store is unreachable (or when there is none)

    @property
    def run_id(self) -> str | None:
        """The innermost open run's id; None outside any run."""
        ...

    def pipeline(self, name: str, tags: dict | None = None, params: dict | None = None) -> AbstractContextManager[str | None]:
        """The parent run of one invocation, with `params`; yields its id."""
        ...

    def stage(self, name: str, cfg, tags: dict | None = None) -> AbstractContextManager[str | None]:
        """A child run for one stage, with its config as params; yields its id."""
        ...

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics to the innermost run."""
        ...

    def series(self, values: dict[str, list[tuple[int, float]]]) -> None:
        """Log step series (training curves: name -> [(step, value), ...]) to the innermost run."""
        ...

    def params(self, values: dict[str, str]) -> None:
        """Log params to the innermost run."""
        ...

    def datasets(self, features: Path, tasks_file: Path | None = None) -> None:
        """Log the features folder (and its task file) as dataset inputs of the innermost run."""
        ...

    def artifact(self, path: Path, folder: str | None = None) -> None:
        """Copy a file into the innermost run's artifacts."""
        ...

    def copy_artifacts(self, run_id: str, paths: Iterable[Path]) -> None:
        """Copy files into the artifacts of another, earlier run (e.g. the run that started a resumed sweep)."""
        ...

    def ui_command(self) -> str:
        """How to look at the runs, as one line for the user."""
        ...

    def flush(self) -> bool:
        """Send whatever is buffered; True when nothing is left."""
        ...


class NoopTracker:
    """A Tracker that records nothing: no store, no files, no runs (run ids are None)."""

    uri = "none"
    experiment_id = None
    run_id = None

    @contextlib.contextmanager
    def pipeline(self, name: str, tags: dict | None = None, params: dict | None = None) -> Iterator[None]:
        """Yields None: there is no run."""
        yield None

    @contextlib.contextmanager
    def stage(self, name: str, cfg, tags: dict | None = None) -> Iterator[None]:
        """Yields None: there is no run."""
        yield None

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        """Drops the metrics."""

    def series(self, values: dict[str, list[tuple[int, float]]]) -> None:
        """Drops the curves."""

    def params(self, values: dict[str, str]) -> None:
        """Drops the params."""

    def datasets(self, features: Path, tasks_file: Path | None = None) -> None:
        """Drops the dataset inputs."""

    def artifact(self, path: Path, folder: str | None = None) -> None:
        """Drops the file."""

    def copy_artifacts(self, run_id: str, paths: Iterable[Path]) -> None:
        """Drops the files."""

    def ui_command(self) -> str:
        """Says that nothing is tracked."""
        return "nothing is tracked (NoopTracker)"

    def flush(self) -> bool:
        """Nothing is ever buffered."""
        return True
