"""Run one stage or a chain of them: configs first (fail fast), then Ray, MLflow and the stages in order.

Configs resolve as preset < --config FILE < the sweep's --spec < --set < --seed; the result is saved
in the run's config.yaml and the command line in its command.txt before any stage starts.

Each stage module provides `CONFIG` (a frozen dataclass), `PRESETS`, `NEEDS_RAY`, `run(cfg, ctx)` and
`track(outputs, ctx) -> (metrics, artifact paths)`. A stage's in-memory output is kept in
`ctx.outputs[name]` for the next stage, which otherwise reads it from the run directory.
"""
from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import time
from pathlib import Path

from orchestrator.storage.atomic import write_json
from pipelines.core.cli import PRESETS, RunContext, base_parser, prepare_run_dir, sync_working_copy
from pipelines.core.config import ConfigError
from pipelines.core.stages import STAGES, stage_module

def stages_with(key: str, mods: dict) -> list[str]:
    """The stages among `mods` whose config accepts `key` (a dotted field name such as `sampling.sampler`)."""
    from pipelines.core.config import valid_keys

    return [s for s, m in mods.items() if key in valid_keys(m.CONFIG) or key.split(".")[0] in valid_keys(m.CONFIG)]


def split_overrides(overrides: list[str], stages: tuple[str, ...], mods: dict | None = None) -> dict[str, list[str]]:
    """Route `--set stage.field=value` to its stage; a bare `field=value` is only allowed for one stage."""
    routed: dict[str, list[str]] = {s: [] for s in stages}
    mods = mods or {s: stage_module(s) for s in stages}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "." in key and not (len(stages) == 1 and key.split(".")[0] not in routed):  # one stage: dotted keys are its own (train.x.y)
            stage, rest = item.split(".", 1)
            if stage not in routed:
                owners = stages_with(key, mods)
                hint = f"; {key} is a field of {', '.join(owners)}, e.g. --set {owners[0]}.{item}" if owners else ""
                raise ConfigError(f"--set {item!r}: unknown stage {stage!r}; stages here: {', '.join(stages)}{hint}")
            routed[stage].append(rest)
        elif len(stages) == 1:
            routed[stages[0]].append(item)
        else:
            owners = stages_with(key, mods)
            where = (f"stages with a field {key!r}: {', '.join(owners)}, e.g. --set {owners[0]}.{item}" if owners
                     else f"no stage here has a field {key!r}")
            raise ConfigError(f"--set {item!r}: name the stage; {where}")
    return routed


def read_config_file(path: Path) -> dict[str, dict]:
    """A YAML config file shaped like --print-config's output: {stage: {field: value}}."""
    from pipelines.core.config import read_yaml_mapping

    data = read_yaml_mapping(path, "--config", "write one with --print-config")
    if not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"--config {path}: expected a mapping of stage names to their fields, as --print-config prints")
    unknown = [k for k in data if k not in STAGES]
    if unknown:
        raise ConfigError(f"--config {path}: unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
    return data


def config_yaml(cfgs: dict) -> str:
    """Resolved stage configs as YAML: {stage: {field: value}}, nested configs as nested mappings."""
    from pipelines.core.config import config_values, to_yaml

    return to_yaml({s: config_values(c) for s, c in cfgs.items()})


def record_invocation(run, cfgs: dict, command: str) -> None:
    """Save the resolved configs in the run's config.yaml (each stage run now replacing its section, the
    other stages' kept) and append the command line to command.txt; both written atomically."""
    import yaml

    from orchestrator.storage.atomic import write_text
    from pipelines.core.config import to_yaml

    try:
        saved = yaml.safe_load(run.config_file.read_text()) if run.config_file.exists() else {}
    except yaml.YAMLError:
        saved = {}  # a damaged record: rewritten from what this command knows
    saved = saved if isinstance(saved, dict) else {}
    saved.update(yaml.safe_load(config_yaml(cfgs)))
    write_text(run.config_file, to_yaml(saved))
    before = run.command_file.read_text() if run.command_file.exists() else ""
    write_text(run.command_file, before + command + "\n")


def resolve(args, stages: tuple[str, ...], mods: dict) -> dict:
    """Every stage's config from the preset, --config, the sweep's --spec, --set and --seed (fail fast)."""
    from pipelines.core.config import build_config

    routed = split_overrides(args.overrides, stages, mods)
    layers = {s: [] for s in stages}
    if args.config:
        loaded = read_config_file(args.config)
        for s in stages:
            layers[s].append(loaded.get(s, {}))
    if getattr(args, "tasks", None):
        routed["features"].append(f"tasks_file={Path(args.tasks).resolve()}")
    if getattr(args, "spec", None):
        layers["sweep"].append(mods["sweep"].load_spec(Path(args.spec)))  # the sweep stage reads its own spec files
    if getattr(args, "resume", False):
        routed["sweep"].append("resume=true")
    # one stage: --seed must mean something for it; a chain: it seeds the stages that have a seed
    seeds = {s: args.seed if len(stages) == 1 or mods[s].CONFIG.__seed_field__ else None for s in stages}
    return {s: build_config(mods[s].CONFIG, mods[s].PRESETS, args.preset, routed[s], seeds[s], layers[s]) for s in stages}


def make_parser(prog: str, doc: str | None, stages: tuple[str, ...], mods: dict, argv: list[str]):
    """The shared CLI; with --help, every stage's fields listed at the values of the chosen --preset."""
    parser = base_parser(f"python -m pipelines.{prog}", (doc or "").strip().splitlines()[0] if doc else prog)
    if "features" in stages:
        parser.add_argument("--tasks", default=None, metavar="FILE", help="a JSONL task file to use instead of a suite")
    if len(stages) > 1:
        parser.add_argument("--until", default=None, choices=stages, metavar="STAGE",
                            help=f"stop after this stage (one of {', '.join(stages)}; default: run them all)")
    if "sweep" in stages:
        parser.add_argument("--spec", default=None, metavar="FILE", help="sweep spec (YAML); --set overrides its keys")
        parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep (finished trials are kept)")
    if "-h" in argv or "--help" in argv:
        from pipelines.core.config_docs import help_text

        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--preset", default="default")
        preset = pre.parse_known_args(argv)[0].preset
        parser.epilog = help_text(mods, preset if preset in PRESETS else "default", prefixed=len(stages) > 1)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def put_stage_files(run) -> None:
    """A run on object storage: put what a stage wrote outside the atomic writers (figures, logs) to the store."""
    if run.uri is not None:
        from orchestrator.storage import remote

        remote.sync_up(run.root)


def stage_params(cfgs: dict) -> dict[str, str]:
    """Every stage's resolved config as MLflow params prefixed by stage (`experts.steps`, `fewshot.maml.lr`)."""
    from orchestrator.tracking.tags import flat_params

    return {k: v for s, cfg in cfgs.items() for k, v in flat_params(cfg, f"{s}.").items()}


def log_datasets(ctx: RunContext) -> None:
    """The run's features (and the task file they were built from) as dataset inputs of the innermost run."""
    import json

    info = ctx.run.features_info
    if not info.exists():
        return
    tasks_file = (json.loads(info.read_text()).get("config") or {}).get("tasks_file")
    ctx.tracker.datasets(ctx.run.features, Path(tasks_file) if tasks_file else None)


WARM_ENV = "WEIGHTGEN_WARM_WORKERS"


def warm_workers(ctx: RunContext, stages: tuple[str, ...]):
    """One warm worker group for a chain of two or more training stages (orchestrator.train_pool), so that
    starting workers is paid once, not once per stage; a stage run alone launches Ray Train as before, and so
    does every stage with WEIGHTGEN_WARM_WORKERS=0."""
    import os

    from pipelines.core.stages import LAUNCHING_STAGES

    if ctx.ray is None or sum(s in LAUNCHING_STAGES for s in stages) < 2 or os.environ.get(WARM_ENV, "1") == "0":
        return contextlib.nullcontext()
    from orchestrator.train_pool import warm_pool

    return warm_pool(log=ctx.log)


def run_stages(prog: str, doc: str | None, stages: tuple[str, ...] | None = None, argv: list[str] | None = None) -> int:
    """Parse the shared CLI and run `stages` (default: just `prog`)."""
    stages = stages or (prog,)
    argv = sys.argv[1:] if argv is None else list(argv)
    mods = {s: stage_module(s) for s in stages}
    args = make_parser(prog, doc, stages, mods, argv).parse_args(argv)
    if getattr(args, "until", None):  # the later stages are neither configured nor run
        stages = stages[:stages.index(args.until) + 1]
        mods = {s: mods[s] for s in stages}
        if "sweep" not in stages and (getattr(args, "spec", None) or getattr(args, "resume", False)):
            raise ConfigError(f"--spec and --resume are the sweep's, and --until {args.until} stops before it")
    cfgs = resolve(args, stages, mods)
    if args.print_config:
        print(config_yaml(cfgs), end="")
        return 0

    from orchestrator.storage.runlock import RunLock

    command = shlex.join(["python", "-m", f"pipelines.{prog}", *argv])
    run = prepare_run_dir(args.run_dir or Path("runs") / (args.name or args.preset))
    ctx = RunContext(run=run, address=args.address, preset=args.preset, progress=not args.no_progress)
    # One writer per run directory for the whole invocation: stores, manifests and the MLflow database
    # are created and updated by this process alone (a second invocation is refused or waits).
    lock = RunLock(run.root, command, wait=args.wait, log=ctx.log).acquire()
    t_start = time.perf_counter()
    from orchestrator import logs

    try:
        sync_working_copy(run, ctx.log)
        logs.setup(run)  # everything to <run_dir>/logs/; the console keeps the pipeline's lines and warnings
        record_invocation(run, cfgs, command)
        from orchestrator.tracking import MlflowTracker

        ctx.tracker = MlflowTracker(run)
        ctx.log(f"run directory: {run.location}")
        ctx.log(f"MLflow store: {ctx.tracker.uri}  (open it: {ctx.tracker.ui_command()})")
        if any(mods[s].NEEDS_RAY for s in stages):
            from orchestrator.cluster import connect

            ctx.ray = connect(args.address, log_dir=run.logs)
            ctx.timings["ray_start_s"] = ctx.ray.start_seconds
            for line in ctx.ray.describe():  # which Ray (private, or a cluster joined), its size, its dashboard
                ctx.log(line)
        with warm_workers(ctx, stages), ctx.tracker.pipeline(prog, tags={"preset": args.preset, "stages": ",".join(stages)},
                                                             params=stage_params(cfgs)) as parent:
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
                    if s == "features":
                        log_datasets(ctx)
                if hasattr(mods[s], "headline"):  # the results a table of runs should show, on the parent run
                    ctx.tracker.metrics(mods[s].headline(metrics))
                ctx.timings[f"{s}_s"] = time.perf_counter() - t0
                put_stage_files(run)
                ctx.log(f"stage {s}: done in {ctx.timings[f'{s}_s']:.1f}s")
            log_datasets(ctx)
            if prog == "full":  # the run's results page, from the files its stages just wrote
                from pipelines.report import write_page

                ctx.log(f"results page: {write_page(run.root)}")
            ctx.timings["total_s"] = time.perf_counter() - t_start
            ctx.tracker.metrics({f"time_{k}": v for k, v in ctx.timings.items()})
            write_json(run.timings, ctx.timings)
    finally:
        if ctx.ray is not None:
            from orchestrator.cluster import shutdown

            shutdown(ctx.ray)
        try:
            put_stage_files(run)  # the logs, and whatever a failed stage finished
        except Exception as e:  # noqa: BLE001 - must not hide the error that ended the run
            ctx.log(f"warning: could not put the run's last files to {run.uri}: {e}")
        lock.release()
    ctx.log("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in ctx.timings.items()))
    return 0

