"""`MlflowTracker`, the MLflow `Tracker`: one parent run per invocation, one child run per stage; only the driver writes.

Default store: one SQLite file beside the run directories (`runs/mlflow.db`, artifacts in
`runs/mlartifacts`), shared by every run directory there so that one `mlflow ui` compares them;
`MLFLOW_TRACKING_URI` points elsewhere (e.g. an `mlflow server` on the head node). Several pipelines
may log to it at once (orchestrator.tracking.store). Every run is tagged with its run directory.

What a user sees: the experiment is tagged as model training (the UI opens on runs and their charts);
the parent run carries every stage's resolved config as `stage.field` params, the headline results,
system metrics (CPU, memory) and the dataset inputs; each stage's run its config, metrics, curves
(`series`: step series batched with `log_batch`) and artifacts. Tag values follow
orchestrator.tracking.tags (`guidance_scale = '1.0'`).

Outages: tracking must never cost results. When the store cannot be reached (server down, network,
a locked database) the tracker says so once, stops calling it, and appends each write (`_start`,
`_end`, `_send`) to `<run_dir>/mlflow_pending/` (orchestrator.tracking.buffer); the pipeline goes on.
The buffer is replayed in order, each record once, when the invocation ends, when the next one
starts, or with `python -m orchestrator.tracking replay RUN_DIR`. `copy_artifacts` alone is not
buffered: it raises, and its caller still has the files.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow's HTTP defaults retry a dead server for minutes per call; a short retry, then the buffer.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
import mlflow  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from models.errors import UserError  # noqa: E402
from orchestrator.storage.rundir import RunDir  # noqa: E402
from orchestrator.tracking.buffer import REF_TAG, PendingLog, new_ref, now_ms  # noqa: E402
from orchestrator.tracking.store import default_uri, retry_locked, store_lock, tracking_uri  # noqa: E402
from orchestrator.tracking.tags import flat_params, tag_values  # noqa: E402

EXPERIMENT = "weightgen"
OUTAGE_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
# MLflow 3's UI opens an untagged experiment on its GenAI view; this tag makes it a model-training experiment.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
RUN_DIR_TAG = "run_dir"  # every run says which run directory it logged (one store serves many)
MAX_METRICS, MAX_PARAMS = 1000, 100  # log_batch's limits per request


def chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


class TrackingError(UserError):
    """The MLflow store cannot be used as configured (unknown URI scheme, damaged or read-only SQLite file)."""


SCHEMES = ("file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def check_store(uri: str) -> None:
    """Refuse, in one line, a store no retry can help: an unknown URI scheme, or a local SQLite file that is
    not a database or cannot be written. An unreachable server is not refused: it is an outage, buffered."""
    import sqlite3

    scheme = uri.split(":", 1)[0].split("+", 1)[0] if ":" in uri else "file"
    if scheme not in SCHEMES:
        raise TrackingError(f"MLFLOW_TRACKING_URI={uri!r} names no MLflow store (schemes: {', '.join(SCHEMES)}); "
                            "use e.g. http://127.0.0.1:5000 or sqlite:///path/mlflow.db, or unset it")
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):])
    if not path.exists():
        return
    try:
        con = sqlite3.connect(path, timeout=30)
        try:
            con.execute("BEGIN IMMEDIATE")  # a write, rolled back: fails on a read-only file or a non-database
            con.execute("CREATE TABLE weightgen_write_probe (a)")
            con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise TrackingError(f"the MLflow store {path} cannot be used ({e}): if it is damaged, move it aside (a new "
                            "one is created); if it is read-only, make it writable or set MLFLOW_TRACKING_URI") from None


def is_outage(e: BaseException) -> bool:
    """Whether an error means "the store is unreachable now" (worth buffering) rather than a bad request."""
    if isinstance(e, MlflowException):
        return e.error_code in OUTAGE_CODES
    import requests

    return isinstance(e, (requests.RequestException, OSError, TimeoutError)) or type(e).__name__ == "OperationalError"


class MlflowTracker:
    """Logs a pipeline invocation to MLflow, buffering on disk whatever cannot be sent."""

    def __init__(self, run_dir: Path, experiment: str = EXPERIMENT, log=None):
        run = RunDir.of(run_dir)
        self.run_dir = run.root
        user_uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.uri = default_uri(run.mlflow_db)
        check_store(self.uri)
        self.artifact_root = None if user_uri else run.mlflow_artifacts_uri
        self.experiment = experiment
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        with store_lock(self.uri):  # a new SQLite store's tables are created here: by one process at a time
            self.client = MlflowClient(self.uri)
        self.pending = PendingLog(run.mlflow_pending)
        self.online = True
        self.experiment_id: str | None = None  # None only while the store is unreachable
        self.parent_id: str | None = None
        self._runs: list[tuple[str, bool]] = []  # open runs, innermost last: (id or local ref, started through mlflow's fluent API)
        if len(self.pending):
            self.flush()  # older records first, so the server sees every run in order
        if self.online:
            self._try(lambda: setattr(self, "experiment_id", self._experiment_id()), "look up the experiment")

    # -- what the stages call ------------------------------------------------------------------------
    @property
    def run_id(self) -> str | None:
        """The innermost open run: its MLflow id, or a `local-...` reference while the store is unreachable."""
        return self._runs[-1][0] if self._runs else None

    @contextlib.contextmanager
    def pipeline(self, name: str, tags: dict | None = None, params: dict | None = None) -> Iterator[str]:
        """The parent run of one invocation, with system metrics and `params` (e.g. every stage's config as
        `stage.field`); yields its run id. Buffered records are sent when it ends. MLflow's process-wide
        tracking URI points here only for the run's length."""
        try:
            with tracking_uri(self.uri), self._run(name, tags or {}, system_metrics=True) as ref:
                self.parent_id = ref
                if params:
                    self.params(params)
                try:
                    yield ref
                finally:
                    self.parent_id = None
        finally:
            if len(self.pending):
                self.flush()

    @contextlib.contextmanager
    def stage(self, name: str, cfg, tags: dict | None = None) -> Iterator[str]:
        """A child run for one stage, with its config as params (and as a JSON artifact)."""
        with self._run(name, {"stage": name, **(tags or {})}) as ref:
            cfg_dict = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
            self.params(flat_params(cfg))
            self._send({"op": "artifact", "ref": ref, "folder": None},
                       lambda: self.client.log_dict(ref, cfg_dict, "config.json"),
                       keep=lambda r: {**r, "file": self.pending.write_dict(cfg_dict, "config.json")})
            yield ref

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics to the innermost run (non-finite values are skipped: MLflow rejects NaN in some stores)."""
        clean = {k: float(v) for k, v in values.items() if v is not None and float(v) == float(v)}
        ref, t = self.run_id, now_ms()
        if ref is None:  # outside pipeline()/stage(): mlflow's own active run, as before
            return mlflow.log_metrics(clean, step=step)
        self._send({"op": "metrics", "ref": ref, "metrics": clean, "step": step or 0, "t": t},
                   lambda: self.client.log_batch(ref, metrics=[Metric(k, v, t, step or 0) for k, v in clean.items()]))

    def series(self, values: dict[str, list[tuple[int, float]]]) -> None:
        """Log step series (a training curve per metric name: [(step, value), ...]) to the innermost run,
        batched `log_batch` calls of at most 1000 points; non-finite points are skipped."""
        ref, t = self.run_id, now_ms()
        points = [(k, float(v), int(step)) for k, pts in values.items() for step, v in pts
                  if v is not None and float(v) == float(v) and abs(float(v)) != float("inf")]
        if ref is None or not points:
            return
        for part in chunks(points, MAX_METRICS):
            self._send({"op": "series", "ref": ref, "points": part, "t": t},
                       lambda part=part: self.client.log_batch(ref, metrics=[Metric(k, v, t, s) for k, v, s in part]))

    def params(self, values: dict[str, str]) -> None:
        """Log params (text) to the innermost run, at most 100 per `log_batch`."""
        ref = self.run_id
        if ref is None:
            return
        for part in chunks(list(values.items()), MAX_PARAMS):
            params = dict(part)
            self._send({"op": "params", "ref": ref, "params": params},
                       lambda params=params: self.client.log_batch(ref, params=[Param(k, v) for k, v in params.items()]))

    def datasets(self, features: Path, tasks_file: Path | None = None) -> None:
        """Log the features (and the task file they were built from) as dataset inputs of the innermost run. Not
        buffered: while the store is unreachable they are skipped with a note (the run directory keeps the files)."""
        from orchestrator.tracking.datasets import dataset_inputs

        ref = self.run_id
        if ref is None:
            return
        if not self.online or ref.startswith("local-"):
            self._log(f"MLflow unreachable: the dataset inputs of run {ref} are not logged")
            return
        inputs = dataset_inputs(features, tasks_file)
        if inputs:
            self._try(lambda: retry_locked(lambda: self.client.log_inputs(ref, datasets=inputs)), "log dataset inputs")

    def artifact(self, path: Path, folder: str | None = None) -> None:
        """Copy a file into the innermost run's artifacts."""
        ref = self.run_id
        if ref is None:
            return mlflow.log_artifact(str(path), artifact_path=folder)
        self._send({"op": "artifact", "ref": ref, "folder": folder},
                   lambda: self.client.log_artifact(ref, str(path), artifact_path=folder),
                   keep=lambda r: {**r, "file": self.pending.keep_file(Path(path))})

    def copy_artifacts(self, run_id: str, paths: Iterable[Path]) -> None:
        """Copy files into an earlier run's artifacts now; not buffered, so an unreachable store raises."""
        for p in paths:
            self.client.log_artifact(run_id, str(p))

    def ui_command(self) -> str:
        """The command that opens this store in the MLflow UI, bound to loopback."""
        if self.uri.startswith("http"):
            return f"open {self.uri} (through an SSH tunnel when the server is on another machine)"
        return f"mlflow ui --backend-store-uri '{self.uri}' --host 127.0.0.1 --port 5000"

    def flush(self) -> bool:
        """Send buffered records now; True when none are left."""
        sent, left = self.pending.replay(self._replay_one, is_outage, self._log)
        if left:
            self.online = False
            self._log(f"MLflow at {self.uri} is still unreachable: {left} records kept in {self.pending.path}; "
                      f"they are sent by the next run, or now with `python -m orchestrator.tracking replay {self.run_dir}`")
            return False
        if sent:
            self._log(f"MLflow: sent {sent} buffered records to {self.uri}")
        self.online = True
        return True

    # -- runs ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _run(self, name: str, tags: dict, system_metrics: bool = False) -> Iterator[str]:
        parent = self.run_id
        tags = tag_values({**tags, RUN_DIR_TAG: str(self.run_dir)})
        ref, fluent = self._start(name, parent, tags, system_metrics)
        self._runs.append((ref, fluent))
        status = "FAILED"
        try:
            yield ref
            status = "FINISHED"
        finally:
            self._runs.pop()
            self._end(ref, fluent, status)

    def _start(self, name: str, parent: str | None, tags: dict, system_metrics: bool = False) -> tuple[str, bool]:
        if self.online:  # the fluent API keeps mlflow.active_run() right for stages that log through mlflow.*
            try:
                if self.experiment_id is None:
                    self.experiment_id = self._experiment_id()
                run = retry_locked(lambda: mlflow.start_run(
                    experiment_id=self.experiment_id, run_name=name, nested=parent is not None, tags=tags,
                    log_system_metrics=system_metrics or None))
                return run.info.run_id, True
            except Exception as e:  # noqa: BLE001 - an outage is buffered below, anything else re-raised
                self._went_offline(e, f"start run {name!r}")
        ref = new_ref()
        self.pending.append({"op": "start", "ref": ref, "parent": parent, "name": name, "tags": tags,
                             "experiment": self.experiment, "t": now_ms()})
        return ref, False

    def _end(self, ref: str, fluent: bool, status: str) -> None:
        t = now_ms()
        # stop the run's system-metrics thread first: mlflow.end_run stops it only after a successful send
        monitor = mlflow.tracking.fluent.run_id_to_system_metrics_monitor.pop(ref, None) if fluent else None
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()
        if fluent and self.online:
            try:
                try:
                    mlflow.end_run(status)  # pops mlflow's run stack first, then sends: the stack stays right on failure
                except Exception:  # noqa: BLE001 - the stack is popped: a locked store is retried through the client
                    retry_locked(lambda: self.client.set_terminated(ref, status, end_time=t))
                return
            except Exception as e:  # noqa: BLE001
                self._went_offline(e, "end a run")
        elif fluent:
            with contextlib.suppress(Exception):  # offline: pop mlflow's stack without waiting on the server
                mlflow.tracking.fluent._active_run_stack.get().pop()
        self.pending.append({"op": "end", "ref": ref, "status": status, "t": t})

    # -- sending and buffering -----------------------------------------------------------------------
    def _send(self, record: dict, call, keep=None) -> None:
        """Run `call` while online; buffer `record` (through `keep`, which saves its files) when offline."""
        if self.online and not record["ref"].startswith("local-"):
            try:
                retry_locked(call)
                return
            except Exception as e:  # noqa: BLE001
                self._went_offline(e, record["op"])
        self.pending.append(keep(record) if keep else record)

    def _try(self, call, what: str) -> None:
        try:
            call()
        except Exception as e:  # noqa: BLE001
            self._went_offline(e, what)

    def _went_offline(self, e: Exception, what: str) -> None:
        if not is_outage(e):
            raise e
        if self.online:
            self._log(f"warning: MLflow at {self.uri} is unreachable ({what}: {str(e).splitlines()[0][:200]}). "
                      f"The pipeline goes on; what it logs is kept in {self.pending.root} and sent when MLflow is back "
                      f"(end of this run, next run, or `python -m orchestrator.tracking replay {self.run_dir}`)")
        self.online = False

    def _experiment_id(self) -> str:
        """The experiment's id, created (tagged as model training) if missing; under the store's lock, so two
        pipelines starting at once neither create the store's tables twice nor the experiment."""
        with store_lock(self.uri):
            exp = retry_locked(lambda: self.client.get_experiment_by_name(self.experiment))
            if exp is None:
                return self.client.create_experiment(self.experiment, artifact_location=self.artifact_root, tags=EXPERIMENT_KIND)
            for k, v in EXPERIMENT_KIND.items():
                if exp.tags.get(k) != v:  # an experiment made before it was tagged
                    self.client.set_experiment_tag(exp.experiment_id, k, v)
            return exp.experiment_id

    def _replay_one(self, rec: dict, ids: dict[str, str]) -> str | None:
        """Send one buffered record; returns the run id when it created a run."""
        run_id = ids.get(rec["ref"], rec["ref"])
        if rec["op"] == "start":
            found = self.client.search_runs([self._experiment_id()], f"tags.`{REF_TAG}` = '{rec['ref']}'", max_results=1)
            if found:  # created by a replay that was cut short
                return found[0].info.run_id
            tags = {**rec["tags"], REF_TAG: rec["ref"]}
            if rec["parent"]:
                tags["mlflow.parentRunId"] = ids.get(rec["parent"], rec["parent"])
            run = self.client.create_run(self._experiment_id(), start_time=rec["t"], tags=tags, run_name=rec["name"])
            return run.info.run_id
        if run_id.startswith("local-"):
            raise MlflowException(f"buffered {rec['op']} for run {run_id}, whose start record is missing")
        if rec["op"] == "params":
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in rec["params"].items()])
        elif rec["op"] == "metrics":
            self.client.log_batch(run_id, metrics=[Metric(k, v, rec["t"], rec["step"]) for k, v in rec["metrics"].items()])
        elif rec["op"] == "series":
            self.client.log_batch(run_id, metrics=[Metric(k, v, rec["t"], s) for k, v, s in rec["points"]])
        elif rec["op"] == "artifact":
            self.client.log_artifact(run_id, str(self.pending.root / rec["file"]), artifact_path=rec["folder"])
        elif rec["op"] == "end":
            self.client.set_terminated(run_id, rec["status"], end_time=rec["t"])
        return None


def main(argv: list[str] | None = None) -> int:
    """`python -m orchestrator.tracking replay RUN_DIR`: send what a run buffered while MLflow was unreachable."""
    p = argparse.ArgumentParser(prog="python -m orchestrator.tracking", description=main.__doc__)
    p.add_argument("command", choices=["replay"])
    p.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    if not PendingLog(RunDir.of(args.run_dir).mlflow_pending).path.exists():
        print(f"nothing buffered in {args.run_dir}")
        return 0
    return 0 if MlflowTracker(args.run_dir).flush() else 1


if __name__ == "__main__":
    sys.exit(main())
