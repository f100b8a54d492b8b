"""Run one stage or a chain of them: configs first (fail fast), then Ray, MLflow and the stages in order.

Each stage module provides `CONFIG` (a frozen dataclass), `PRESETS`, `NEEDS_RAY`, `run(cfg, ctx)` and
`track(outputs, ctx) -> (metrics, artifact paths)`. A stage's in-memory output is kept in
`ctx.outputs[name]` for the next stage, which otherwise reads it from the run directory.
"""
from __future__ import annotations

import functools
import importlib
import time
from pathlib import Path

from orchestrator.storage.atomic import write_json
from pipelines.core.cli import ConfigError, RunContext, base_parser, build_config, prepare_run_dir

STAGES = ("features", "experts", "generators", "hyperclip", "hyperldm", "baselines", "evaluate", "sweep", "fewshot")  # the pipeline, in order


def stage_module(name: str):
    return importlib.import_module(f"pipelines.{name}")


def split_overrides(overrides: list[str], stages: tuple[str, ...]) -> dict[str, list[str]]:
    """Route `--set stage.field=value` to its stage; a bare `field=value` is only allowed for one stage."""
    routed: dict[str, list[str]] = {s: [] for s in stages}
    for item in overrides:
        key = item.split("=", 1)[0]
        if "." in key and not (len(stages) == 1 and key.split(".")[0] not in routed):  # one stage: dotted keys are its own (train.x.y)
            stage, rest = item.split(".", 1)
            if stage not in routed:
                raise ConfigError(f"--set {item!r}: unknown stage {stage!r}; stages here: {', '.join(stages)}")
            routed[stage].append(rest)
        elif len(stages) == 1:
            routed[stages[0]].append(item)
        else:
            raise ConfigError(f"--set {item!r}: name the stage, e.g. --set {stages[0]}.{item}")
    return routed


def run_stages(prog: str, doc: str | None, stages: tuple[str, ...] | None = None, argv: list[str] | None = None) -> int:
    """Parse the shared CLI and run `stages` (default: just `prog`)."""
    stages = stages or (prog,)
    parser = base_parser(f"python -m pipelines.{prog}", (doc or "").strip().splitlines()[0] if doc else prog)
    if prog == "features" or "features" in stages:
        parser.add_argument("--tasks", default=None, metavar="FILE", help="a JSONL task file to use instead of a suite")
    if "sweep" in stages:
        parser.add_argument("--spec", default=None, metavar="FILE", help="sweep spec (YAML); --set overrides its keys")
        parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep (finished trials are kept)")
    args = parser.parse_args(argv)
    mods = {s: stage_module(s) for s in stages}
    routed = split_overrides(args.overrides, stages)
    if getattr(args, "tasks", None):
        routed["features"].append(f"tasks_file={Path(args.tasks).resolve()}")
    if getattr(args, "spec", None):
        routed["sweep"].insert(0, f"spec={Path(args.spec).resolve()}")
    if getattr(args, "resume", False):
        routed["sweep"].append("resume=true")
    # a stage may parse its own config (the sweep's spec file and search spaces); the rest are plain dataclasses
    cfgs = {s: (getattr(mods[s], "make_config", None) or functools.partial(build_config, mods[s].CONFIG))(
        mods[s].PRESETS, args.preset, routed[s], args.seed) for s in stages}

    from orchestrator.storage.rundir import RunDir

    run = RunDir(prepare_run_dir(args.run_dir or Path("runs") / (args.name or args.preset)))
    ctx = RunContext(run=run, address=args.address, progress=not args.no_progress)
    t_start = time.perf_counter()
    from orchestrator import logs

    logs.setup(run)  # everything to <run_dir>/logs/; the console keeps the pipeline's lines and warnings
    from orchestrator.tracking.tracker import Tracker

    ctx.tracker = Tracker(run.root)
    ctx.log(f"run directory: {run.root}")
    ctx.log(f"MLflow store: {ctx.tracker.uri}  (open it: {ctx.tracker.ui_command()})")
    try:
        if any(mods[s].NEEDS_RAY for s in stages):
            from orchestrator.cluster import connect

            ctx.ray = connect(args.address, log_dir=run.logs)
            ctx.timings["ray_start_s"] = ctx.ray.start_seconds
            for line in ctx.ray.describe():  # which Ray (private, or a cluster joined), its size, its dashboard
                ctx.log(line)
        with ctx.tracker.pipeline(prog, tags={"preset": args.preset, "stages": ",".join(stages)}) as parent:
            ctx.log(f"MLflow run: {parent}")
            for s in stages:
                t0 = time.perf_counter()
                with ctx.tracker.stage(s, cfgs[s], tags={"preset": args.preset}):
                    out = mods[s].run(cfgs[s], ctx)
                    ctx.outputs[s] = out
                    metrics, artifacts = mods[s].track(out, ctx)
                    metrics[f"{s}_seconds"] = time.perf_counter() - t0
                    ctx.tracker.metrics(metrics)
                    for path in artifacts:
                        ctx.tracker.artifact(path)
                ctx.timings[f"{s}_s"] = time.perf_counter() - t0
                ctx.log(f"stage {s}: done in {ctx.timings[f'{s}_s']:.1f}s")
            ctx.timings["total_s"] = time.perf_counter() - t_start
            ctx.tracker.metrics({f"time_{k}": v for k, v in ctx.timings.items()})
            write_json(run.timings, ctx.timings)
    finally:
        if ctx.ray is not None:
            from orchestrator.cluster import shutdown

            shutdown(ctx.ray)
    ctx.log("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in ctx.timings.items()))
    return 0

