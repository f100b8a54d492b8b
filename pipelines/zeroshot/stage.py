"""The entry points every zero-shot training stage shares: `run`, `track`, `main` for `pipelines.<kind>`.

Kept free of heavy imports (torch, Ray) so a stage's config errors stay fast to report.
"""
from __future__ import annotations

import sys
from typing import Callable


def entry_points(kind: str, train_one: Callable, prepare: Callable | None = None, train_many: Callable | None = None):
    """(run, track, main) of the stage that trains models of `kind` with `train_one(run, data, seed, cfg, hooks)`.

    `prepare(cfg, ctx)`, when given, runs before training (the generators stage records the plan there).
    `train_many`, when given, trains several (split, seed) models as one batched program (see `train_stage`).
    """

    def run(cfg, ctx):
        """Train `kind` for every (split, seed) of the run's plan that is not up to date."""
        from pipelines.zeroshot.launch import train_stage

        if prepare is not None:
            prepare(cfg, ctx)
        return train_stage(kind, train_one, cfg, ctx, train_many=train_many)

    def track(out, ctx):
        """Training curves and final metrics per (split, seed); the model files as artifacts."""
        from pipelines.zeroshot.launch import stage_metrics, stage_series

        curves = stage_series(ctx.run, kind, out)
        ctx.tracker.series(curves)
        return stage_metrics(out, curves), ctx.run.model_files(kind)

    def main() -> int:
        from pipelines.core.runner import run_stages

        return run_stages(kind, sys.modules[train_one.__module__].__doc__)

    return run, track, main
