"""The command line every stage shares: presets, --set overrides, run directory, seed, Ray address.

A stage module defines a frozen config dataclass, a dict of presets (`smoke`, `default`) and
`run(cfg, ctx)`; `stage_main` turns that into `python -m pipelines.<stage>`. Config errors are
raised before any work starts and name the offending field.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from orchestrator.storage.rundir import RunDir

PRESETS = ("smoke", "default")


class ConfigError(ValueError):
    """A bad config field, value or preset; the message names it and the valid choices."""


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def coerce_field(cls, name: str, raw: str):
    """Parse a --set value by the field's declared type."""
    hint = typing.get_type_hints(cls)[name]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        if raw.lower() in ("none", "null", ""):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if origin is tuple:
            item = args[0] if args else str
            return tuple(item(v.strip()) for v in raw.split(",") if v.strip())
        return hint(raw)
    except ValueError as e:
        raise ConfigError(f"--set {name}={raw!r}: {e} (field type {getattr(hint, '__name__', hint)})") from None


def build_config(cls, presets: dict[str, dict], preset: str, overrides: list[str], seed: int | None = None):
    """Preset values, then --set field=value overrides, then --seed; validated by the class's __post_init__."""
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    values = dict(presets[preset])
    names = field_names(cls)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected field=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in names:
            raise ConfigError(f"unknown config field {key!r} for {cls.__name__}; valid fields: {', '.join(names)}")
        values[key] = coerce_field(cls, key, raw.strip())
    if seed is not None and "seed" in names:
        values["seed"] = seed
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def check_choice(name: str, value, choices) -> None:
    """Raise ConfigError unless value is one of choices."""
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


def check_range(name: str, value, lo=None, hi=None) -> None:
    """Raise ConfigError unless lo <= value <= hi."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = " and ".join(b for b in (lo is not None and f">= {lo}", hi is not None and f"<= {hi}") if b)
        raise ConfigError(f"{name}={value!r} is out of range; it must be {bounds}")


@dataclass
class RunContext:
    """What a stage needs besides its config: where to write, how to reach Ray and MLflow."""

    run: "RunDir"  # every path of the run (orchestrator.storage.rundir)
    address: str | None = None
    progress: bool = True
    tracker: Any = None
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
    p.add_argument("--run-dir", type=Path, default=None, help="everything this run writes goes here (default runs/<name>)")
    p.add_argument("--name", default=None, help="run name, used for the default run directory (default: the preset)")
    p.add_argument("--seed", type=int, default=None, help="global seed (overrides the config's seed)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field; repeatable; an unknown field fails before any work starts")
    p.add_argument("--address", default=None, help="Ray cluster to join (default $RAY_ADDRESS, else the one `ray start` runs on this machine, "
                   "else a private Ray on 127.0.0.1; `local` forces a private one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p


def prepare_run_dir(run_dir: Path) -> Path:
    """Create the run directory, failing clearly when it cannot be written; returns its absolute path."""
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
    """Run a CLI entry point: known errors become one clear line on stderr and exit code 2."""

    def wrapper() -> None:
        from pipelines.core.errors import user_errors

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            code = main()
        except user_errors() as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted: finished shards and stages are kept; rerun the same command to resume", file=sys.stderr)
            sys.exit(130)
        sys.exit(code or 0)

    return wrapper
