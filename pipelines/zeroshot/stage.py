"""The entry points every zero-shot training stage shares: `run`, `track`, `main` for `pipelines.<kind>`.

Kept free of heavy imports (torch, Ray) so a stage's config errors stay fast to report.
"""
from __future__ import annotations

import importlib


def entry_points(kind: str):
    """(run, track, main) of the stage module `pipelines.<kind>` that trains models of `kind`."""
    module = f"pipelines.{kind}"

    def run(cfg, ctx):
        """Train `kind` for every (split, seed) of the run's plan that is not up to date."""
        from pipelines.zeroshot.launch import train_stage

        return train_stage(module, kind, cfg, ctx)

    def track(out, ctx):
        """Final losses and metrics per (split, seed); the model files as artifacts."""
        from pipelines.zeroshot.launch import model_files, stage_metrics

        return stage_metrics(out), model_files(ctx.run_dir, kind)

    def main() -> int:
        from pipelines.core.runner import run_stages

        return run_stages(kind, importlib.import_module(module).__doc__)

    return run, track, main
