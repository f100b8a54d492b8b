"""The command line every stage shares: presets, --set overrides, run directory, seed, Ray address.

A stage module defines a frozen config (pipelines.core.config), a dict of presets (`smoke`,
`default`) and `run(cfg, ctx)`; `pipelines.core.runner.run_stages` turns that into
`python -m pipelines.<stage>`. Config errors are raised before any work starts, one line each.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from orchestrator.storage.rundir import RunDir

from models.errors import UserError
from pipelines.core.config import ConfigError
from orchestrator.tracking.base import NoopTracker, Tracker

PRESETS = ("smoke", "default")


@dataclass
class RunContext:
    """What a stage needs besides its config: where to write, how to reach Ray and MLflow."""

    run: "RunDir"  # every path of the run (orchestrator.storage.rundir)
    address: str | None = None
    preset: str = "default"  # the invocation's preset (a stage that needs another stage's settings builds them alike)
    progress: bool = True
    tracker: Tracker = field(default_factory=NoopTracker)  # the runner sets an MlflowTracker
    ray: Any = None
    timings: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)  # in-memory outputs of the stages run so far

    def __post_init__(self):
        from orchestrator.storage.rundir import RunDir

        self.run = RunDir.of(self.run)  # callers may pass a path

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Arguments shared by every stage."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--preset", default="default", help=f"config preset: {', '.join(PRESETS)} (smoke is small enough for tests)")
    p.add_argument("--run-dir", type=run_location, default=None,
                   help="everything this run writes goes here (default runs/<name>): a folder, or an object-store URI "
                        "such as s3://bucket/runs/x (endpoint and credentials from the AWS_* environment variables)")
    p.add_argument("--name", default=None, help="run name, used for the default run directory (default: the preset)")
    p.add_argument("--seed", type=int, default=None,
                   help="global seed: sets each stage's seed field (features, experts, fewshot: seed; sweep: search_seed)")
    p.add_argument("--config", type=Path, default=None, metavar="FILE.yaml",
                   help="load settings from a YAML file shaped like --print-config's output (stage: {field: value})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field (nested: sampling.sampler=ddpm; a comma list fills a list field); "
                        "repeatable; wins over --config and the preset; an unknown field fails before any work starts")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration of every stage of this command as YAML and exit")
    p.add_argument("--address", default=None, help="Ray cluster to join (default $RAY_ADDRESS, else the one `ray start` runs on this machine, "
                   "else a private Ray on 127.0.0.1; `local` forces a private one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("--wait", action="store_true",
                   help="when another invocation holds the run directory, wait for it instead of stopping")
    return p


def run_location(text: str) -> "Path | str":
    """--run-dir: a URI stays a string (a Path would fold its `//`), anything else is a folder."""
    from orchestrator.storage.remote import is_uri

    return text if is_uri(text) else Path(text)


def prepare_run_dir(location: "Path | str") -> "RunDir":
    """The run directory, created and proven writable before any work starts (one clear error otherwise).

    On object storage the bucket, the credentials and a test write are checked first, before anything
    local is created; `sync_working_copy` then fetches the run (once the run lock is held)."""
    from orchestrator.storage import remote
    from orchestrator.storage.rundir import RunDir

    if remote.is_uri(location):
        remote.Remote(str(location)).preflight()
        run = RunDir.at(location)
        _writable(run.root)
        return run
    return RunDir(_writable(Path(location)))


def sync_working_copy(run: "RunDir", log) -> None:
    """A run on object storage: make its local working copy what the store holds (a resume continues from
    the store, never from files that did not reach it). Call it holding the run lock."""
    from orchestrator.storage import remote

    if run.uri is not None:
        fetched = remote.sync_down(run.root)
        log(f"run directory {run.uri} (working copy {run.root}; {fetched} file(s) fetched)")


def _writable(run_dir: Path) -> Path:
    """Create a local folder, failing clearly when it cannot be written; returns its absolute path."""
    run_dir = Path(run_dir).resolve()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run directory {run_dir} is not writable ({e.strerror}); pass --run-dir to a writable folder") from None
    return run_dir


def guarded(main: Callable[[], int | None]) -> Callable[[], None]:
    """Run a CLI entry point: a UserError becomes one clear line on stderr and exit code 2."""

    def wrapper() -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            code = main()
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted: finished shards and stages are kept; rerun the same command to resume", file=sys.stderr)
            sys.exit(130)
        sys.exit(code or 0)

    return wrapper
