"""`RunDir`: every path of a run, in one place.

    <root>/
      config.yaml  command.txt  timings.json     the resolved configuration of every stage run here, the command
                                                  lines (one per invocation), stage times
      features/                                   task suite embedded by the frozen encoders (+ image projection)
      cache/features/                             encoder outputs keyed by content (shareable between runs)
      store/weights/                              the expert farm's weight store (Parquet shards + manifest)
      models/plan.json                            which (split, seed) pairs the zero-shot stages cover
      models/<kind>/<split>-seed<k>.safetensors   trained zero-shot models (+ .json sidecar with their config)
      results/                                    tables and figures (zero_shot.*, few_shot.*)
      sweeps/<name>/                              one folder per sweep (done/, tune/, results)
      ray_train/<name>/                           Ray Train checkpoints of each training launch (resume)
      mlflow_pending/                             what could not be sent to MLflow yet (the outage buffer)
      logs/                                       full logs
    <root>/../mlflow.db  <root>/../mlartifacts/   the MLflow store every run directory beside this one shares

A run directory may live on object storage (`RunDir.at("s3://bucket/runs/x")`): `root` is then its
local working copy and `uri` the store it is written through to (orchestrator.storage.remote); every
path below is the working copy's.

An *overlay* is a run directory that holds only some model kinds of its own (a sweep trial that
retrains HyperLDM, say) and reads everything else (features, store, plan, the other models) from its
base run: nothing is copied or linked, and the base run is never written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """The paths of one run; with `base`, an overlay that owns only the model kinds in `own_models`."""

    root: Path
    base: "RunDir | None" = None
    own_models: frozenset[str] = frozenset()
    uri: str | None = None  # the object store this run is written through to; None: a local run

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).resolve())
        if self.uri is not None:  # this process now puts every file completed under root to the store
            from orchestrator.storage import remote

            remote.register(self.root, self.uri)

    @classmethod
    def of(cls, run: "RunDir | Path | str") -> "RunDir":
        """`run` itself, or the run directory at that path or URI (library callers and tests pass paths)."""
        return run if isinstance(run, RunDir) else cls.at(run)

    @classmethod
    def at(cls, location: "Path | str") -> "RunDir":
        """The run at a local path, or at an object-store URI (`s3://bucket/runs/x`) through its working copy."""
        from orchestrator.storage import remote

        if remote.is_uri(location):
            uri = str(location).rstrip("/")
            return cls(remote.working_copy(uri), uri=uri)
        return cls(Path(location))

    @property
    def location(self) -> str:
        """Where the run lives, for messages: its URI, or its folder."""
        return self.uri or str(self.root)

    def overlay(self, root: Path, own_models) -> "RunDir":
        """A run at `root` that trains and holds `own_models` itself and reads the rest from this run."""
        return RunDir(root, base=self, own_models=frozenset(own_models))

    def to_dict(self) -> dict:
        """JSON-plain form, to ship a run to Ray workers (`from_dict` reads it back)."""
        return {"root": str(self.root), "base": self.base.to_dict() if self.base else None,
                "own_models": sorted(self.own_models), "uri": self.uri}

    @classmethod
    def from_dict(cls, d: dict) -> "RunDir":
        """The run `to_dict` shipped; on a node without its working copy, what the store holds is fetched first."""
        run = cls(Path(d["root"]), cls.from_dict(d["base"]) if d["base"] else None, frozenset(d["own_models"]), d.get("uri"))
        if run.uri is not None:
            from orchestrator.storage import remote

            remote.fetch_missing(run.root)
        return run

    def __reduce__(self):  # a RunDir sent to a Ray worker arrives through from_dict: its store mirror comes with it
        return (RunDir.from_dict, (self.to_dict(),))

    def _inputs(self) -> "RunDir":
        """Where shared inputs (features, store, plan) are read from: the base run of an overlay."""
        return self.base._inputs() if self.base is not None else self

    def __str__(self) -> str:
        return str(self.root)

    # ---------------------------------------------------------------- inputs every stage shares
    @property
    def features(self) -> Path:
        return self._inputs().root / "features"

    @property
    def features_info(self) -> Path:
        """The features' `info.json` (encoders, dims, the config hash that made them)."""
        from orchestrator.storage.suite_features import info_path

        return info_path(self.features)

    @property
    def feature_cache(self) -> Path:
        """The default encoder cache (`features.cache_dir` moves it)."""
        return self._inputs().root / "cache" / "features"

    @property
    def store(self) -> Path:
        return self._inputs().root / "store" / "weights"

    @property
    def plan(self) -> Path:
        return self._inputs().root / "models" / "plan.json"

    # ---------------------------------------------------------------- trained models
    def model_dir(self, kind: str) -> Path:
        """The folder of one kind of zero-shot model (an overlay's own kinds live in the overlay)."""
        if self.base is not None and kind not in self.own_models:
            return self.base.model_dir(kind)
        return self.root / "models" / kind

    def model(self, kind: str, split: str, seed: int) -> Path:
        """The safetensors file of a trained model of `kind` for (split, seed); its sidecar is `.json` beside it."""
        return self.model_dir(kind) / f"{split}-seed{seed}.safetensors"

    def model_files(self, kind: str) -> list[Path]:
        return sorted(self.model_dir(kind).glob("*.safetensors"))

    # ---------------------------------------------------------------- outputs of this run
    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def sweeps(self) -> Path:
        return self.root / "sweeps"

    def sweep(self, name: str) -> Path:
        return self.sweeps / name

    @property
    def ray_train(self) -> Path:
        """Ray Train's storage_path: one folder per launch name, checkpoints to resume from."""
        return self.root / "ray_train"

    def ray_train_storage(self) -> tuple[str, object]:
        """(storage_path, storage_filesystem) for Ray Train: the working copy's folder for a local run;
        for a run on object storage, its key on the store and the store's pyarrow filesystem, so
        checkpoints are written straight there (a resume on another machine finds them)."""
        from orchestrator.storage import remote

        m = remote.mirror_of(self.ray_train)  # an overlay inside a run on the store is mirrored with it
        if m is None:
            return str(self.ray_train), None
        return m[0].key(m[1]), m[0].fs

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def command_file(self) -> Path:
        return self.root / "command.txt"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def mlflow_db(self) -> Path:
        """The default MLflow store, shared by the run directories beside this one (`runs/mlflow.db`)."""
        return self.root.parent / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        """The shared store's artifacts (`runs/mlartifacts`)."""
        return self.root.parent / "mlartifacts"

    @property
    def mlflow_artifacts_uri(self) -> str:
        """Where a new MLflow experiment keeps its artifacts: beside the run on its object store, else `mlflow_artifacts`."""
        if self.uri is not None:
            return self.uri.rsplit("/", 1)[0] + "/mlartifacts"
        return self.mlflow_artifacts.as_uri()

    @property
    def mlflow_pending(self) -> Path:
        return self.root / "mlflow_pending"
