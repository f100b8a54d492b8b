"""Memorisation measures, the checkpoint baselines and the description ablation on real smoke experts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.zeroshot.novelty import novelty
from pipelines.zeroshot.description_ablation import derangement, random_strings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_copied_expert_is_at_distance_zero_and_others_are_not():
    train = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    copy = novelty(train[:2], train, own_n=train[:2])
    assert torch.allclose(copy["cos_nearest_train"], torch.ones(2)) and torch.allclose(copy["l2_nearest_train"], torch.zeros(2), atol=1e-5)
    assert torch.allclose(copy["cos_own_oracle"], torch.ones(2))
    among = novelty(train, train, exclude_self=True)  # independent unit-variance points sit about sqrt(2) apart
    assert (among["cos_nearest_train"] < 0.9).all() and among["l2_nearest_train"].min() > 1.0
    assert torch.isnan(among["cos_own_oracle"]).all()


def test_derangement_moves_every_task_and_is_seeded():
    for n in (2, 3, 32):
        p = derangement(n)
        assert sorted(p) == list(range(n)) and (p != np.arange(n)).all()
    assert (derangement(32, seed=1) == derangement(32, seed=1)).all() and (derangement(32, 1) != derangement(32, 2)).any()
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1)


def test_random_strings_keep_word_lengths_and_punctuation():
    texts = ["is the shape red?", "what color is the triangle?"]
    out = random_strings(texts)
    assert out == random_strings(texts) and out != texts
    for t, r in zip(texts, out):
        assert [len(w) for w in t.split()] == [len(w) for w in r.split()] and r.endswith("?")


def test_checkpoint_baselines_choose_their_setting_on_validation(zs_run_dir):
    from pipelines.zeroshot.checkpoint_baselines import K_GRID, NOISE_GRID, knn_average, nearest_task_noise, nearest_k_average
    from pipelines.zeroshot.data import load_split
    from pipelines.zeroshot.methods import generate, nearest_task
    from pipelines.zeroshot.sampling import SamplingSettings
    from pipelines.zeroshot.trained import TrainedModels

    s = SamplingSettings()
    for fraction in (0.25, 0.0):  # with validation tasks, and leave-one-out on meta-train without them
        data = load_split(zs_run_dir, "given", val_fraction=fraction)
        assert (data.val is None) == (fraction == 0)
        m = TrainedModels(zs_run_dir, data, seed=0)
        c = data.test.c
        w = generate("nearest_k_average", m, c, s)
        assert m.tuned["noise_scale"] in NOISE_GRID and m.tuned["k"] in K_GRID and m.tuned["k"] <= len(data.train_ids)
        assert torch.equal(w, knn_average(m, c, int(m.tuned["k"])))
        # k = 1 is the nearest expert; noise is seeded by the training seed and scaled by the chosen σ
        assert torch.equal(knn_average(m, c, 1), nearest_task(m, c, s))
        noisy = nearest_task_noise(m, c, s)
        assert torch.equal(noisy, nearest_task_noise(m, c, s))
        gap = (data.norm.encode(noisy) - data.norm.encode(nearest_task(m, c, s))).pow(2).mean().sqrt()
        assert abs(float(gap) - m.tuned["noise_scale"]) < 0.2 * m.tuned["noise_scale"], (float(gap), m.tuned)
        assert nearest_k_average(m, c, s).shape == (len(c), data.layout.size)


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_evaluate_on_a_finished_run_adds_tables_and_keeps_every_accuracy(smoke_pipeline, tmp_path):
    """The pipeline's evaluate stage writes both tables; rerunning it alone on a copy reproduces the run's rows."""
    import pandas as pd

    from pipelines.zeroshot.methods import CONDITIONED, GENERATIVE
    from tests.conftest import copy_run, run_cli

    run_dir, r = smoke_pipeline
    assert r.returncode == 0, r.stderr[-3000:]
    memo = pd.read_csv(run_dir / "results" / "memorisation.csv")
    assert set(memo["method"]) == set(GENERATIVE) | {"train_experts", "oracle"}
    assert memo["value"].notna().all() and set(memo["measure"]) == {"cos_nearest_train", "l2_nearest_train",
                                                                    "cos_own_oracle", "l2_own_oracle"}
    copies = memo[(memo["method"] == "nearest_task") & (memo["measure"] == "l2_nearest_train")]["value"]
    assert (copies.abs() < 1e-4).all()  # a retrieved expert is a meta-train expert
    assert (memo[(memo["method"] == "train_experts") & (memo["measure"] == "l2_nearest_train")]["value"] > 0).all()
    assert "| Meta-train experts (reference) |" in (run_dir / "results" / "memorisation.md").read_text()
    abl = pd.read_csv(run_dir / "results" / "description_ablation.csv")
    assert set(abl["method"]) == set(CONDITIONED) and "multitask" not in set(abl["method"])
    wide = abl.pivot_table(index=["method", abl["guidance_scale"].fillna(-1)], columns="measure", values="value")
    assert np.allclose(wide["drop_other_task"], wide["own"] - wide["other_task"])

    copy = copy_run(run_dir, tmp_path / "run")
    r = run_cli("pipelines.evaluate", "--preset", "smoke", "--run-dir", str(copy), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    before, after = (pd.read_csv(d / "results" / "zero_shot.csv") for d in (run_dir, copy))
    pd.testing.assert_frame_equal(before, after)
    own = pd.read_csv(copy / "results" / "description_ablation.csv")
    zs = after.set_index(["method", after["guidance_scale"].fillna(-1)])["accuracy"]
    for _, row in own[own["measure"] == "own"].iterrows():
        assert row["value"] == pytest.approx(zs[(row["method"], -1 if pd.isna(row["guidance_scale"]) else row["guidance_scale"])])


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_sampling_bench_reports_a_paired_ci_and_shrinks_with_flags(smoke_pipeline):
    """bench/sampling.py on the smoke run, shrunk: the last line is one JSON object with the paired difference."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    run_dir, r = smoke_pipeline
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "sampling.py"), "--run-dir", str(run_dir), "--ddim-steps", "5,10",
                        "--draws", "2", "--max-tasks", "4"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tasks"] == 4 and out["ddim_steps"] == 5 and [s["ddim_steps"] for s in out["by_steps"]] == [5, 10]
    assert out["ci_low"] <= out["ddim_minus_ddpm"] <= out["ci_high"]
    assert out["ddim_minus_ddpm"] == pytest.approx(100 * (out["ddim_accuracy"] - out["ddpm_accuracy"]), abs=1e-3)
    within = [s["ddim_steps"] for s in out["by_steps"] if -1 <= s["ci_low"] and s["ci_high"] <= 1]
    assert out["steps_within_1_point"] == (min(within) if within else None)


def test_paired_ci_covers_the_mean_and_narrows_with_more_tasks():
    from bench.sampling import paired_ci

    rng = np.random.default_rng(0)
    small, large = (paired_ci(rng.normal(0.5, 3.0, n)) for n in (30, 600))
    for mean, lo, hi in (small, large):
        assert lo < mean < hi
    assert large[2] - large[1] < 0.5 * (small[2] - small[1])
