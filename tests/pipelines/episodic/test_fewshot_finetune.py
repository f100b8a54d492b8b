"""Fine-tuning baselines of the few-shot table: the pure fine-tuning step, and the zero-shot baselines
of a real (smoke-sized) run fine-tuned on the few-shot stage's own meta-test episodes. No Ray."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.fewshot import training as T
from models.fewshot.episodes import batch_accuracy, batch_loss, collate
from models.fewshot.finetune import finetune, finetuned_accuracy
from models.fewshot.maml import inner_adapt
from models.task_net import WeightLayout, init_weights
from tests.models.fewshot.test_fewshot_episodes import SPEC, toy_pool

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_finetune_is_gradient_descent_from_each_episodes_own_start():
    pool, feats = toy_pool()
    batch = pool.batch(4, 2, 6, np.random.default_rng(0), feats)
    layout = WeightLayout(SPEC)
    w = torch.stack([init_weights(SPEC, s) for s in range(4)])  # a different start per episode
    assert torch.equal(finetune(layout, w, batch, 0, 0.5), w)
    tuned = finetune(layout, w, batch, 5, 0.5)
    one = inner_adapt(layout, w[2], *[t[2] for t in batch.support()], steps=5, lr=0.5, first_order=True)
    torch.testing.assert_close(tuned[2], one)
    assert (batch_loss(layout, tuned, *batch.support()) < batch_loss(layout, w, *batch.support())).all()
    acc = finetuned_accuracy(layout, w, batch, 5, 0.5)
    assert acc.shape == (4,) and ((acc >= 0) & (acc <= 1)).all()


def test_run_without_zero_shot_models_gives_no_rows_and_says_why(zs_run_dir):  # noqa: F811
    from orchestrator.storage.suite_features import SuiteFeatures
    from pipelines.fewshot import FewShotConfig, split_pools
    from pipelines.episodic.finetune import finetune_rows

    feats = SuiteFeatures.load(zs_run_dir / "features")
    p = split_pools(feats, "given")
    said = []
    rows = finetune_rows(zs_run_dir / "nowhere", "given", "random", feats, p["test_ids"], p["meta_test"], {}, FewShotConfig(), said.append)
    assert rows == [] and len(said) == 1 and "fine-tuning rows skipped" in said[0]


def test_zero_shot_baselines_fine_tuned_on_the_stage_episodes(zs_run_dir, tmp_path):  # noqa: F811
    """Real baselines (multitask, text-conditioned HNet) trained briefly, saved as the stage saves them,
    then scored by the few-shot stage's fine-tuning rows: zero steps reproduce the zero-shot weights'
    accuracy on the same episodes, and ten steps on the support sets change it."""
    import shutil

    from orchestrator.storage.suite_features import SuiteFeatures
    from pipelines.baselines import PRESETS, BaselinesConfig, train_one
    from pipelines.fewshot import FewShotConfig, split_pools
    from pipelines.episodic.finetune import finetune_rows
    from orchestrator.storage.rundir import RunDir
    from pipelines.zeroshot.data import load_split, save_model
    from pipelines.zeroshot.methods import generate
    from pipelines.zeroshot.sampling import SamplingSettings
    from pipelines.zeroshot.trained import TrainedModels
    from models.zeroshot.tasks import Hooks

    run = RunDir(tmp_path / "run")
    for part in ("features", "store"):
        shutil.copytree(zs_run_dir / part, run.root / part)
    data = load_split(run, "given")
    bcfg = BaselinesConfig(**PRESETS["smoke"])
    state, _ = train_one(run, data, 0, bcfg, Hooks())
    save_model(run.model("baselines", "given", 0), state, {"stage_config": dataclasses.asdict(bcfg)})

    feats = SuiteFeatures.load(run.features)
    p = split_pools(feats, "given")
    eps = {k: T.eval_episodes(p["meta_test"], k, 40, 8, 0) for k in (1, 5)}
    cfg = FewShotConfig(seeds=(0, 1), eval_batch=16, finetune={"steps": 0})  # seed 1 has no baselines: skipped
    zero = finetune_rows(run, "given", "random", feats, p["test_ids"], p["meta_test"], eps, cfg, print)
    assert {(r["method"], r["shots"], r["seed"]) for r in zero} == {
        (m, k, 0) for m in ("finetune_multitask", "finetune_text_hnet") for k in (1, 5)}
    # zero steps: exactly the zero-shot model's weights for each episode's task
    where = {t: i for i, t in enumerate(data.test_ids)}
    w = generate("text_hnet", TrainedModels(run, data, 0), data.test.c, SamplingSettings())[torch.tensor([where[t] for t in p["test_ids"]])]
    b = collate(eps[5], torch.as_tensor(feats.image_feats), p["meta_test"].prompts)
    direct = float(batch_accuracy(data.layout, w[b.task], *b.query()).mean())
    row = next(r for r in zero if r["method"] == "finetune_text_hnet" and r["shots"] == 5)
    assert row["accuracy"] == pytest.approx(direct, abs=1e-6) and row["episodes"] == 40
    tuned = finetune_rows(run, "given", "random", feats, p["test_ids"], p["meta_test"], eps,
                          dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, steps=10)), print)
    assert all(0 <= r["accuracy"] <= 1 and np.isfinite(r["ci95"]) for r in tuned)
    assert [r["accuracy"] for r in tuned] != [r["accuracy"] for r in zero]


def test_support_guidance_off_is_plain_ddim_and_on_lowers_the_support_loss():
    from models.zeroshot.denoiser import LatentDenoiser
    from models.diffusion import Diffusion
    from models.fewshot.finetune import support_guided_latents

    torch.manual_seed(0)
    den = LatentDenoiser(6, 4, hidden=32).eval()
    diffusion = Diffusion(1000, "cosine")
    c = torch.randn(5, 4)
    z_T = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    target = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    loss = lambda z: (z - target).pow(2).sum(-1)  # noqa: E731  a stand-in support loss per episode
    plain = diffusion.sample(den, c, gamma=1.5, sampler="ddim", steps=10, z_T=z_T)
    off = support_guided_latents(diffusion, den, c, 1.5, z_T, 10, 0.0, loss)
    torch.testing.assert_close(off, plain)
    on = support_guided_latents(diffusion, den, c, 1.5, z_T, 10, 1.0, loss)
    assert (loss(on) < loss(plain)).all()
