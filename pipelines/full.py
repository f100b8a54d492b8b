"""The whole pipeline: features -> expert farm -> zero-shot generators -> evaluation -> γ sweep -> few-shot.

    python -m pipelines.full --preset default
    python -m pipelines.full --preset smoke --set features.suite=easyvqa --set experts.steps=100
    python -m pipelines.full --resume            # after an interruption during the sweep

`--set stage.field=value` overrides one stage's config; rerunning with the same --run-dir resumes.
"""
from __future__ import annotations

from pipelines.core.cli import guarded
from pipelines.core.runner import run_stages
from pipelines.core.stages import STAGES


def main() -> int:
    return run_stages("full", __doc__, STAGES)


if __name__ == "__main__":
    guarded(main)()
