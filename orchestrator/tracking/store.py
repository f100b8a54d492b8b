"""Where runs are logged, and how several pipelines share one SQLite store without failing or losing a record.

Default: one store for every run directory beside them (`runs/mlflow.db`, artifacts in `runs/mlartifacts`),
so `mlflow ui` compares runs across run directories; `MLFLOW_TRACKING_URI` overrides it.

Two pipelines writing one SQLite file at once: MLflow's sessions already wait up to 20 s on a lock
(`PRAGMA busy_timeout`), which was enough for every write measured here, but two pipelines that
start on a store that does not exist yet both create its tables and one of them crashes (measured:
2 of 3). So a store and the experiment are created under an OS file lock (`mlflow.db.lock`), and a
write SQLite still refuses because the database is locked (it refuses at once, without waiting, a
write that could deadlock) is retried with backoff before it counts as an outage and is buffered.
The journal stays SQLite's default: WAL needs shared memory, which a network file system lacks.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import random
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
LOCKED_RETRIES = 8  # ~25 s of backoff in all, on top of SQLite's own 20 s busy wait per statement


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local SQLite URI, else None."""
    return Path(uri[len("sqlite:///"):].split("?", 1)[0]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An OS lock beside a local SQLite store (`mlflow.db.lock`), held while a store and its experiment are set up."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_locked(e: BaseException) -> bool:
    """Whether an error is SQLite refusing a write because another process holds the database."""
    text = str(e).lower()
    return "database is locked" in text or "database table is locked" in text or "sqlite_busy" in text


def retry_locked(call: Callable[[], T], retries: int = LOCKED_RETRIES) -> T:
    """`call()`, retried with jittered exponential backoff while the SQLite store is locked by another writer."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - only a lock is retried; anything else goes to the caller as it was
            if attempt == retries or not is_locked(e):
                raise
            time.sleep(min(8.0, 0.1 * 2 ** attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def default_uri(db: Path) -> str:
    """The tracking URI: MLFLOW_TRACKING_URI when set, else the shared SQLite store `db`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{db}"


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """Make `uri` MLflow's process-wide tracking URI for a block, then put back the global and the environment
    as they were: `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI, which would otherwise send every
    later tracker in this process (tests, a notebook) to this store."""
    from mlflow.tracking import _tracking_service

    utils = _tracking_service.utils
    before_global, before_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    utils.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils.set_tracking_uri(before_global)
        if before_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before_env
