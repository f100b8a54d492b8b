"""The few-shot stage: its splits, and on a real local Ray the smoke preset on the smoke features (results files, resume)."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from pipelines import fewshot
from pipelines.core.cli import RunContext
from pipelines.core.config import ConfigError, build_config


def test_splits_are_checked_and_recomputed_from_the_features(run_dir_with_features):
    from orchestrator.storage.suite_features import SuiteFeatures

    with pytest.raises(ConfigError, match="splits"):
        fewshot.FewShotConfig(splits=("diagonal",))
    feats = SuiteFeatures.load(run_dir_with_features / "features")
    given, random = fewshot.split_pools(feats, "given"), fewshot.split_pools(feats, "random")
    assert fewshot.split_label(feats, "given") == "random"  # the smoke features' own split mode
    assert given["test_ids"] == random["test_ids"] and len(given["meta_test"]) == len(given["test_ids"]) > 0
    assert not set(given["test_ids"]) & set(feats.tasks[feats.tasks["split"] == "meta_train"]["id"])


@pytest.mark.ray
@pytest.mark.slow
def test_smoke_preset_writes_a_valid_table_and_resumes(ray_cluster, run_dir_with_features, capsys):
    cfg = build_config(fewshot.FewShotConfig, fewshot.PRESETS, "smoke", [])
    ctx = RunContext(run=run_dir_with_features, progress=False)
    out = fewshot.run(cfg, ctx)
    assert "fine-tuning rows skipped" in capsys.readouterr().err  # no zero-shot models in this run: said, not failed

    results = run_dir_with_features / "results"
    csv = pd.read_csv(results / "few_shot.csv")
    assert {"suite", "split", "method", "shots", "seed", "accuracy", "ci95"} <= set(csv.columns)
    trained = csv[csv["method"] != "chance"]
    assert len(trained) == len(cfg.methods) * len(cfg.shots) * len(cfg.seeds)
    assert set(trained["method"]) == set(cfg.methods) and set(trained["shots"]) == set(cfg.shots)
    assert trained["seed"].notna().all() and csv[csv["method"] == "chance"]["seed"].isna().all()
    assert len(csv[csv["method"] == "chance"]) == len(cfg.shots)
    assert ((csv["accuracy"] >= 0) & (csv["accuracy"] <= 1)).all()
    assert all(math.isfinite(c) and c >= 0 for c in csv["ci95"])
    assert (csv["episodes"] == cfg.eval_episodes).all()
    assert set(csv["suite"]) == {"procedural"} and set(csv["split"]) == {"random"}
    md = (results / "few_shot.md").read_text()
    from pipelines.core.names import method_name

    assert all(f"| {method_name(m)} |" in md for m in (*cfg.methods, "chance"))
    assert (results / "few_shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    metrics, artifacts = fewshot.track(out, ctx)
    assert set(artifacts) == {results / "few_shot.csv", results / "few_shot.md", results / "few_shot.png"}
    assert all(f"random_{m}_{k}shot_acc" in metrics for m in cfg.methods for k in cfg.shots)

    # The same config for one method again: its results come back from the checkpoint, nothing retrains.
    again = fewshot.run(build_config(fewshot.FewShotConfig, fewshot.PRESETS, "smoke", ["methods=maml"]), ctx)
    first = out.table[out.table["method"] == "maml"].reset_index(drop=True)
    second = again.table[again.table["method"] == "maml"].reset_index(drop=True)
    assert first["accuracy"].tolist() == second["accuracy"].tolist()
    # The restored metric history carries the first run's timings; a retrain would have measured new ones.
    assert first["train_s"].tolist() == second["train_s"].tolist()
