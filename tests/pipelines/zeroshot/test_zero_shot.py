"""Zero-shot models on real smoke features: HVAE round trips keep expert accuracy; 2 DDP workers match 1."""
from __future__ import annotations


import pandas as pd
import pytest
import torch

from models.zeroshot.tasks import task_accuracy

from models.zeroshot.training import train_hvae

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_hvae_reconstructions_keep_expert_accuracy_within_2_points(zs_run_dir):
    from pipelines.zeroshot.data import load_split

    data = load_split(zs_run_dir, "given")
    wn = data.norm.encode(data.w_train)
    vae = train_hvae(wn, seed=0, steps=300, lr=1e-3, batch=8, beta=1.0, d_latent=16, hidden=(64, 64))
    with torch.no_grad():
        rec = data.norm.decode(vae.decode(vae.encode(wn)[0]))
    experts = task_accuracy(data.train, data.w_train).mean()
    recon = task_accuracy(data.train, rec).mean()
    assert experts > 0.7, experts  # the experts work (chance is about 0.5), so the comparison means something
    assert recon >= experts - 0.02, (float(recon), float(experts))


def test_a_procedural_given_split_holds_validation_tasks_out_of_training(zs_run_dir):
    """`--set features.suite=procedural --set generators.splits=given` keeps the default validation share: a
    seeded part of the meta-train tasks that no model trains on, disjoint from meta-test."""
    from orchestrator.storage.suite_features import SuiteFeatures
    from pipelines.generators import GeneratorsConfig
    from pipelines.suites.base import META_TEST, META_TRAIN
    from pipelines.zeroshot.data import load_split

    feats = SuiteFeatures.load(zs_run_dir / "features")
    assert feats.info["suite_info"]["suite"] == "procedural"
    own = dict(zip(feats.tasks["id"], feats.tasks["split"]))
    fraction = GeneratorsConfig().val_fraction
    assert fraction > 0
    data = load_split(zs_run_dir, "given", val_fraction=fraction)
    train, val, test = set(data.train_ids), set(data.val_ids or ()), set(data.test_ids)
    assert len(val) == round(fraction * (len(train) + len(val))) and not val & train
    assert train | val == {t for t, s in own.items() if s == META_TRAIN} and test == {t for t, s in own.items() if s == META_TEST}
    assert data.train.batch.n == len(train) and data.val.batch.n == len(val)  # the models' training tasks exclude them
    assert load_split(zs_run_dir, "given", val_fraction=fraction).val_ids == data.val_ids  # seeded


@pytest.mark.ray
@pytest.mark.slow
def test_generators_loss_curve_with_two_ddp_workers_matches_one(zs_run_dir, tmp_path):
    """HNet and HVAE trained by the generators stage's Ray Train loop: 2 workers (DDP, gloo) vs 1."""
    import ray

    from orchestrator.storage.rundir import RunDir
    from orchestrator.train import launch
    from pipelines.generators import GeneratorsConfig, train_one
    from pipelines.zeroshot.data import write_plan
    from pipelines.zeroshot.launch import _loop

    write_plan(zs_run_dir, ("given",), (0,))
    cfg = GeneratorsConfig(splits=("given",), seeds=(0,), ddp=True, hnet_steps=20, hvae_steps=20, tasks_per_step=8,
                           hvae_batch=8, d_latent=16, hidden=(32, 32), log_every=2)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        curves = {}
        for n in (1, 2):
            loop_cfg = {"train_one": train_one, "kind": f"generators-{n}w", "cfg": cfg, "run": RunDir(zs_run_dir).to_dict(),
                        "combos": [("given", 0)], "threads": 1, "log_every": 2}
            res = launch(_loop, loop_cfg, name=f"ddp-{n}", run_dir=tmp_path, num_workers=n)
            curves[n] = pd.DataFrame([m for m in res.metrics if m["step"] > 0])
    finally:
        ray.shutdown()
    one, two = curves[1], curves[2]
    for col in ("hnet_loss", "hvae_loss"):
        a, b = torch.tensor(one[col].dropna().values), torch.tensor(two[col].dropna().values)
        assert len(a) == len(b) == 10
        assert torch.allclose(a, b, rtol=1e-3), (col, a, b)



def test_zero_shot_cli_without_a_trained_run_is_one_clear_line(tmp_path):
    from tests.conftest import run_cli

    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"id": "a", "description": "is it red?", "answers": ["no", "yes"], "examples": []}\n')
    r = run_cli("pipelines.zero_shot", "--tasks", str(tasks), "--from", str(tmp_path / "no-run"))
    assert r.returncode == 2 and "no trained generators" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = run_cli("pipelines.zero_shot", "--tasks", str(tasks), "--from", str(tmp_path), "--method", "telepathy")
    assert r.returncode == 2 and "invalid choice: 'telepathy'" in r.stderr
    assert not (tmp_path / "no-run").exists(), "a failed call must not create the run directory"
