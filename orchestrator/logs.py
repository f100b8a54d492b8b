"""A quiet console and full logs: the console shows the pipeline's own lines and the warnings that
matter; `<run_dir>/logs/` keeps everything.

    <run_dir>/logs/
      driver.log      Python logging of the driver at INFO: Ray, Ray Train/Tune, MLflow (written once the run
                      has its Ray, or when a run without Ray finishes: a run that fails before it starts
                      leaves its run directory as it was)
      workers.log     every line Ray's workers and actors printed (Ray's own helpers included)
      ray.json        which cluster the run used: address, session folder, dashboard, how it was reached
      ray-session/    a private Ray's own logs (raylet, GCS, dashboard, each worker), copied when it stops

What stays on the console from Ray's workers: lines printed by the pipeline's own actors (the farm's
actors, Ray Train workers, sweep trials) other than Ray's logging inside them, the raylet's error
messages (an actor killed for memory, say) and the autoscaler's events. Ray's helpers (Ray Train's
controller, placement-group cleaner, preemption watcher, ...), Ray's C++ logs and Ray Train's per-report
lines go to workers.log only.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import logging.handlers
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

DRIVER_LOG = "driver.log"
WORKERS_LOG = "workers.log"
RAY_JSON = "ray.json"
SESSION_COPY = "ray-session"

# Ray's own actors: everything they print is an internal of Ray (Train's controller, its helpers, Data, Tune's
# internals, autoscaling) and goes to workers.log only.
RAY_INTERNAL_ACTORS = (
    "TrainController", "PlacementGroupCleaner", "PreemptionWatcher", "DatasetManager", "SynchronizationActor",
    "_AutoscalingCoordinatorActor", "AutoscalingCoordinator", "TrainStateActor", "_StatsActor", "ProgressHub",
    "_QueueActor", "StatsActor",
)
# Lines Ray itself writes inside any worker: its C++ logs ("[2026-.. E 123 456] core_worker.cc:..") and its
# Python logging ("2026-.. WARNING file.py:12 -- ..."), and Ray Train's lines about each worker and report.
RAY_LINE = re.compile(
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] \S+\.(cc|h):\d+"
    r"|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\t(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+\.py:\d+ -- "
    r"|^(Setting up process group for|Moving model to device|Wrapping provided model in|Checkpoint successfully created at"
    r"|Reporting training result|Started training worker group|Attempting to start training worker group|Requesting resources)"
)


class DeferredFile(logging.handlers.MemoryHandler):
    """driver.log, written only once the run is under way (`open`): a run that stops before it starts
    (bad config, unreachable cluster) leaves its run directory as it found it. Until then records wait
    in memory (the first 10,000)."""

    def __init__(self, path: Path):
        super().__init__(capacity=10_000, flushLevel=logging.CRITICAL + 1, target=None, flushOnClose=False)
        self.path = path
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.setLevel(logging.INFO)

    def open(self) -> None:
        if self.target is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            target = logging.FileHandler(self.path, encoding="utf-8")
            target.setFormatter(self.formatter)
            self.setTarget(target)
            self.capacity = 1  # from now on, straight through
            self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        if self.target is None and len(self.buffer) >= 10_000:
            return
        super().emit(record)

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        return self.target is not None

    def close(self) -> None:
        if self.target is not None:
            self.flush()
            self.target.close()
        super().close()


_handler: DeferredFile | None = None  # driver.log of the current run
ROUTED = ("mlflow", "alembic", "ray")  # loggers whose INFO goes to driver.log and only warnings to the console


def setup(run_dir) -> Path:
    """Send the driver's Python logging to `<run_dir>/logs/driver.log` (console: warnings and up), from the
    moment the run has its Ray (`capture_ray`) or ends normally with a logs folder. Returns the folder."""
    from orchestrator.storage.rundir import RunDir

    global _timings
    run = RunDir.of(run_dir)
    logs, _timings = run.logs, run.timings
    _file_handler(logs)
    # MLflow logs its store set-up at INFO on the console ("Creating initial MLflow database tables...").
    import orchestrator.tracking.tracker  # noqa: F401 - sets MLflow's environment, then imports it

    for name in ROUTED:
        _route(logging.getLogger(name))
    return logs


def _file_handler(logs: Path) -> DeferredFile:
    """The driver.log handler for `logs` (one per process; moving to another run replaces it everywhere)."""
    global _handler
    path = (Path(logs) / DRIVER_LOG).resolve()
    if _handler is not None and _handler.path == path:
        return _handler
    old, _handler = _handler, DeferredFile(path)
    if old is not None:
        for name in ROUTED:
            logging.getLogger(name).removeHandler(old)
        old.close()
    return _handler


_STARTED = time.time()
_timings: Path | None = None  # the run's timings.json, set by `setup`


@atexit.register
def _at_exit() -> None:
    """A run without Ray that finished (it wrote timings.json) keeps its driver log too."""
    if _handler is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        if _handler.target is None and _timings.stat().st_mtime >= _STARTED:
            _handler.open()
    _handler.close()
    if _handler.path.exists():  # a run on object storage: its complete log goes there too
        from orchestrator.storage import remote

        with contextlib.suppress(Exception):
            remote.published(_handler.path)


def _route(logger: logging.Logger, console_level: int = logging.WARNING) -> None:
    """INFO and up to driver.log, only `console_level` and up to the logger's console handlers."""
    for h in logger.handlers:
        if not isinstance(h, logging.FileHandler):
            h.setLevel(max(h.level, console_level))
    if _handler is not None and _handler not in logger.handlers:
        logger.addHandler(_handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


def console_worthy(data: dict, line: str) -> bool:
    """Whether a line a Ray worker printed belongs on the console (see the module doc)."""
    if data.get("pid") in ("raylet", "autoscaler"):
        return True
    source = data.get("actor_name") or data.get("task_name") or ""
    if any(source.startswith(a) for a in RAY_INTERNAL_ACTORS):
        return False
    return not RAY_LINE.match(line.lstrip())


class WorkerLogRouter:
    """Replaces Ray's printer of worker output on the driver: all of it to workers.log, the rest to the console."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - open for the run

    def __call__(self, data: dict) -> None:
        source = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({source} pid={data.get('pid')}, ip={data.get('ip')}{', stderr' if data.get('is_err') else ''}) "
        lines = data.get("lines") or []
        from ray._private.worker import RAY_TQDM_MAGIC

        with self.lock:
            for line in lines:
                if RAY_TQDM_MAGIC not in line:
                    self.file.write(prefix + line + "\n")
        keep = [ln for ln in lines if RAY_TQDM_MAGIC in ln or console_worthy(data, ln)]
        if keep:
            from ray._private.worker import print_to_stdstream

            print_to_stdstream({**data, "lines": keep}, ignore_prefix=False)

    def close(self) -> None:
        with self.lock:
            self.file.close()


_router: WorkerLogRouter | None = None


def capture_ray(info) -> None:
    """After ray.init: Ray's driver logging to driver.log (console: warnings), worker output through
    `WorkerLogRouter`, and `ray.json` saying which cluster this run used."""
    global _router
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    logs = Path(info.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    _file_handler(logs).open()
    _route(logging.getLogger("ray"))
    if _router is not None:
        _router.close()
    _router = WorkerLogRouter(logs / WORKERS_LOG)
    global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    global_worker_stdstream_dispatcher.remove_handler("weightgen_logs")
    global_worker_stdstream_dispatcher.add_handler("weightgen_logs", _router)
    session = Path(info.session_dir) if info.session_dir else None
    (logs / RAY_JSON).write_text(json.dumps({
        "address": info.address, "how": info.how, "started_here": info.started_here, "pid": os.getpid(),
        "session_dir": str(session) if session else None, "dashboard_url": info.dashboard_url,
        "prometheus_config": str(session / "metrics" / "prometheus" / "prometheus.yml") if session else None,
        "grafana_config": str(session / "metrics" / "grafana") if session else None,
    }, indent=2) + "\n")


def keep_session_logs(session_dir: Path, logs: Path) -> None:
    """Copy a stopped private Ray's session logs into `<run_dir>/logs/ray-session/` (replacing an older copy)."""
    src = Path(session_dir) / "logs"
    if not src.is_dir():
        return
    dst = Path(logs) / SESSION_COPY
    shutil.rmtree(dst, ignore_errors=True)
    try:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.sock", "events"), ignore_dangling_symlinks=True)
    except (OSError, shutil.Error) as e:
        print(f"note: could not copy Ray's logs from {src} to {dst}: {e}", file=sys.stderr)
