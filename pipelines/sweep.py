"""Stage `sweep`: Ray Tune trials over guidance scale, sampler, HyperCLIP guidance, seeds, baselines and training settings.

    python -m pipelines.sweep --run-dir runs/default                       # the default γ sweep
    python -m pipelines.sweep --run-dir runs/default --spec configs/sweeps/gamma.yaml --set guidance_scale=0,1,4
    python -m pipelines.sweep --run-dir runs/default --resume              # continue an interrupted sweep

Each trial is one (method, split, seed, setting). Sampling settings reuse the run's trained models;
`train.<stage>.<field>` settings train their own (a TorchTrainer inside the trial). Every trial is
scored on the validation tasks (meta-train tasks held out of training) and on meta-test; the setting
of each method is chosen on validation. Writes `<run_dir>/sweeps/<name>/results.{csv,md}`, `chosen.csv`
and `curve.png`; MLflow gets one parent run per sweep and one child run per trial, tagged `method`,
`split`, `seed`, `guidance_scale`, `sweep`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from pipelines.core.cli import RunContext

from pipelines.core.config import ConfigError
from pipelines.sweeps.spec import SweepConfig, load_spec  # noqa: F401  (the runner reads --spec files with load_spec)

CONFIG = SweepConfig
NEEDS_RAY = True
PRESETS = {"smoke": dict(params={"guidance_scale": [0.0, 1.0], "guidance_steps": [5], "sampler_steps": [5]}), "default": dict()}


@dataclass
class SweepOutput:
    """What a sweep left: every trial's row, the chosen settings, written files, the MLflow parent run."""

    table: object  # pandas DataFrame, one row per trial
    chosen: object  # pandas DataFrame, one row per (split, method)
    paths: list[Path]
    parent_id: str
    reused: int  # trials answered from an earlier run of this sweep


def plan_scope(cfg: SweepConfig, run) -> tuple[list[str], list[int]]:
    """The splits and seeds to sweep: the config's, each checked against the run's trained plan."""
    from pipelines.zeroshot.data import read_plan, read_val_fraction

    splits, seeds = read_plan(run)
    for name, want, have in (("splits", cfg.splits, splits), ("seeds", cfg.seeds, seeds)):
        missing = [v for v in want if v not in have]
        if missing:
            raise ConfigError(f"{name}={missing} has no trained models in {run.root} (trained: {have}); "
                              f"sweep a subset of those or retrain with --set generators.{name}=...")
    if read_val_fraction(run) <= 0:
        raise ConfigError(f"the models in {run.root} were trained without a validation split (generators.val_fraction=0), "
                          "so no setting can be chosen without peeking at meta-test; retrain with generators.val_fraction>0")
    return list(cfg.splits or splits), list(cfg.seeds or seeds)


def trial_logger(ctx: RunContext, parent_id: str):
    """Writes trial child runs under the sweep's parent run (see orchestrator.sweep.MlflowTrials)."""
    from orchestrator.sweep import MlflowTrials

    if parent_id is None or parent_id.startswith("local-") or ctx.tracker.experiment_id is None:
        raise ConnectionError("MLflow was unreachable when this sweep started, so its parent run has no id yet")
    return MlflowTrials(ctx.tracker.uri, ctx.tracker.experiment_id, parent_id)


def log_trial_fn(ctx: RunContext, parent_id: str, name: str):
    """Driver-side callback: one MLflow child run per finished trial (a warning, not a failure, while MLflow is down)."""
    from pipelines.sweeps.trial import trial_fields

    failed: list[str] = []
    client: list = []  # made on first use: the store may be unreachable when the sweep starts

    def log(trial: dict, result: dict) -> None:
        from orchestrator.tracking.tags import tag_values

        metrics = {k: result[k] for k in ("val_accuracy", "test_accuracy", "n_val", "n_test", "trial_seconds") if k in result}
        # one tag format (orchestrator.tracking.tags): `tags.guidance_scale = '1.0'` finds the γ = 1 trials
        tags = tag_values({"stage": "sweep", "preset": ctx.preset, "run_dir": str(ctx.run.root), "method": trial["method"],
                           "split": trial["split"], "seed": trial["seed"], "sweep": name,
                           **{k: v for k, v in trial["params"].items() if not isinstance(v, dict)}})
        try:
            if not client:
                client.append(trial_logger(ctx, parent_id))
            client[0].log(trial, metrics, trial_fields(trial), tags)
        except Exception as e:  # noqa: BLE001 - MLflow down must not stop the trials; done/ keeps every result
            if not failed:
                print(f"sweep {name}: could not log to MLflow ({type(e).__name__}: {e}); the trials go on, their "
                      "results stay in done/, and rerunning the sweep logs the missing runs", file=sys.stderr, flush=True)
            failed.append(trial["key"])

    return log


def run(cfg: SweepConfig, ctx: RunContext) -> SweepOutput:
    """Expand the spec, start or resume the Tune experiment, log trials, choose settings on validation."""
    import json

    import pandas as pd

    from orchestrator.sweep import concurrency, read_state, run_trials, write_state
    from pipelines.sweeps import results as sweep_results
    from pipelines.sweeps.spec import expand, spec_hash
    from pipelines.sweeps.trial import DONE, per_task_table, run_trial, trial_fields

    splits, seeds = plan_scope(cfg, ctx.run)
    sweep_dir = ctx.run.sweep(cfg.name)
    trials = expand(cfg, splits, seeds)
    for t in trials:
        t.update(run_dir=str(ctx.run.root), sweep_dir=str(sweep_dir.resolve()), threads=max(1, int(cfg.cpus_per_trial)))
    digest, state = spec_hash(trials), read_state(sweep_dir)
    done_keys = {p.stem for p in (sweep_dir / DONE).glob("*.json")} & {t["key"] for t in trials}
    n_done = len(done_keys)
    finished = n_done == len(trials)
    if state is not None and state["spec_hash"] != digest:
        raise ConfigError(f"sweep {cfg.name!r} in {sweep_dir} was made with another spec ({state['trials']} trials); "
                          "pick a new name with --set name=NEW, or move that folder away")
    if state is None and cfg.resume:
        raise ConfigError(f"there is no sweep {cfg.name!r} in {sweep_dir.parent} to resume; run without --resume")
    if state is not None and not finished and not cfg.resume:
        raise ConfigError(f"sweep {cfg.name!r} in {sweep_dir} was interrupted with {n_done} of "
                          f"{len(trials)} trials done: rerun with --resume to continue it (`make run ARGS=--resume` for the pipeline)")
    if state is None:
        state = {"spec_hash": digest, "trials": len(trials), "mlflow_parent": ctx.tracker.run_id, "name": cfg.name}
        write_state(sweep_dir, state)
    here = ctx.tracker.run_id  # this stage's MLflow run (a local reference while MLflow is unreachable)
    if state["mlflow_parent"] != here:
        ctx.log(f"sweep {cfg.name}: its trial runs are children of the MLflow run {state['mlflow_parent']} that started it")
    log = log_trial_fn(ctx, state["mlflow_parent"], cfg.name)
    # Finished trials come back from their JSON records (done/); Tune's own pickled state is never read.
    records = {t["key"]: {**t, **json.loads((sweep_dir / DONE / f"{t['key']}.json").read_text()), "reused": 1}
               for t in trials if t["key"] in done_keys}
    if finished:
        ctx.log(f"sweep {cfg.name}: all {len(trials)} trials already done in {sweep_dir}; reusing them")
    else:
        todo = [t for t in trials if t["key"] not in done_keys]
        n_train = sum(bool(t["train"]) for t in todo)
        workers = cfg.max_concurrent or concurrency(cfg.cpus_per_trial)
        ctx.log(f"sweep {cfg.name}: {len(trials)} trials, {n_done} already done (kept), {len(todo)} to run "
                f"({n_train} train their own models), {workers} at a time; Tune experiment in {sweep_dir / 'tune'}")
        for r in run_trials(run_trial, todo, sweep_dir=sweep_dir, max_concurrent=workers, cpus_per_trial=cfg.cpus_per_trial,
                            log_trial=log, done_before=n_done, progress=ctx.progress):
            records[r["key"]] = r
        # the trials' own work, in wall time: their summed seconds over the trials that ran at once
        ran = [r.get("trial_seconds", 0.0) for r in records.values() if not r.get("reused")]
        ctx.timings["sweep_loop_s"] = sum(ran) / workers
    rows = [records[t["key"]] for t in trials]
    for r in rows:  # a trial whose child run a killed driver never wrote gets it now (each exactly once)
        log(r, r)
    if state["mlflow_parent"] != here:
        try:
            trial_logger(ctx, state["mlflow_parent"]).finish_parent()  # the run a killed driver left RUNNING
        except Exception as e:  # noqa: BLE001
            ctx.log(f"sweep {cfg.name}: could not mark MLflow run {state['mlflow_parent']} finished ({e})")
    table = pd.DataFrame([{**trial_fields(r), "val_accuracy": r["val_accuracy"], "test_accuracy": r["test_accuracy"],
                           "n_val": r["n_val"], "n_test": r["n_test"], "key": r["key"]} for r in rows])
    # one column order whatever the methods' order: trial, sampling settings, training overrides, results
    settings = sweep_results.setting_columns(table)
    table = table[["method", "split", "seed", *settings, *(c for c in table.columns if c not in {"method", "split", "seed", *settings})]]
    info = ctx.run.features_info
    chosen, paths = sweep_results.write(table, sweep_dir, cfg.name, per_task_table(sweep_dir, list(table["key"])),
                                        json.loads(info.read_text()) if info.exists() else None)
    for _, c in chosen[chosen["settings_tried"] > 1].iterrows():
        ctx.log(f"sweep {cfg.name}: {c['split']} {c['method']}: chose {c['setting']} on validation "
                f"({sweep_results.pct(c['val_mean'])} %); meta-test {sweep_results.pct(c['test_mean'], c['test_std'] if c['seeds'] > 1 else None)} %")
    return SweepOutput(table, chosen, paths, state["mlflow_parent"], sum(int(r.get("reused", 0)) for r in rows))


def track(out: SweepOutput, ctx: RunContext):
    """The chosen settings' accuracies as metrics; results and plot as artifacts (also on the original parent)."""
    m = {"trials": len(out.table), "trials_reused": out.reused}
    for _, c in out.chosen.iterrows():
        base = f"chosen/{c['split']}/{c['method']}"
        m[f"{base}/val_accuracy"], m[f"{base}/test_accuracy"] = c["val_mean"], c["test_mean"]
        if c["guidance_scale"] == c["guidance_scale"]:  # not NaN
            m[f"{base}/guidance_scale"] = c["guidance_scale"]
    if out.parent_id != ctx.tracker.run_id:
        try:
            ctx.tracker.copy_artifacts(out.parent_id, out.paths)
        except Exception as e:  # noqa: BLE001 - the files stay in the sweep folder; this run still gets them below
            ctx.log(f"sweep: could not copy the results to MLflow run {out.parent_id} ({e})")
    return m, out.paths


def headline(metrics: dict) -> dict[str, float]:
    """For the pipeline's parent run: per split and method, the setting chosen on validation (γ) and its accuracies."""
    return {f"sweep/{k}": v for k, v in metrics.items() if k.startswith("chosen/")}


def main() -> int:
    from pipelines.core.runner import run_stages

    return run_stages("sweep", __doc__)


if __name__ == "__main__":
    from pipelines.core.cli import guarded

    guarded(main)()
