"""The HyperLDM stage on a real local Ray: two Ray Train workers, each training its denoisers as one batched
program, give every model what training it alone gives (to float rounding; one model after another, exactly);
a rerun retrains nothing."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from models.zeroshot.tasks import Hooks

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

SEEDS = (0, 1, 2)
W_TOL = 1e-4  # as tests/models/zeroshot/test_batched_ldm.py


@pytest.fixture(scope="module")
def ldm_run(zs_run_dir, tmp_path_factory):
    """A copy of the zero-shot run with smoke generators for split `given`, seeds 0-2, trained here without Ray."""
    from pipelines import generators
    from pipelines.core.config import build_config, config_values
    from pipelines.zeroshot.data import load_split, save_model, write_plan

    run = tmp_path_factory.mktemp("ldm") / "run"
    shutil.copytree(zs_run_dir, run)
    write_plan(run, ("given",), SEEDS)
    cfg = build_config(generators.GeneratorsConfig, generators.PRESETS, "smoke", [])
    data = load_split(run, "given")
    for seed in SEEDS:
        state, _ = generators.train_one(run, data, seed, cfg, Hooks())
        save_model(run / "models" / "generators" / f"given-seed{seed}.safetensors", state, {"stage_config": config_values(cfg)})
    return run


def test_batched_stage_equals_each_denoiser_alone_and_resumes(ldm_run, capsys):
    from models.zeroshot.training import train_hyperldm
    from orchestrator.cluster import connect, shutdown
    from orchestrator.storage.rundir import RunDir
    from pipelines import hyperldm
    from pipelines.core.cli import RunContext
    from pipelines.core.config import build_config
    from pipelines.zeroshot.data import load_model, load_split
    from pipelines.zeroshot.trained import TrainedModels

    cfg = build_config(hyperldm.HyperLdmConfig, hyperldm.PRESETS, "smoke", ["num_workers=2", "batched=true"])
    assert cfg.batched and not cfg.ddp
    info = connect(address="local", num_cpus=2)
    try:
        ctx = RunContext(run=ldm_run, progress=False, ray=info)
        out = hyperldm.run(cfg, ctx)
        assert "training 3 model(s) on 2 Ray Train worker(s)" in capsys.readouterr().err
        files = {s: ldm_run / "models" / "hyperldm" / f"given-seed{s}.safetensors" for s in SEEDS}
        stamps = {s: f.stat().st_mtime_ns for s, f in files.items()}
        hyperldm.run(cfg, ctx)  # every model is up to date: nothing retrains
        assert "3 of 3 models up to date, 0 to train" in capsys.readouterr().err
        assert {s: f.stat().st_mtime_ns for s, f in files.items()} == stamps
        # the same stage one model after another (the default), into an overlay of the run
        single = RunDir(ldm_run).overlay(ldm_run.parent / "one-by-one", {"hyperldm"})
        hyperldm.run(replace(cfg, batched=False), RunContext(run=single, progress=False, ray=info))
    finally:
        shutdown(info)
    data = load_split(ldm_run, "given")
    worst = 0.0
    for seed in SEEDS:
        state, side = load_model(files[seed])
        assert [p[0] for p in side["series"]["hnet_loss"]] == list(range(cfg.log_every, cfg.steps + 1, cfg.log_every))
        assert set(out[f"given-seed{seed}"]) >= {"hnet_loss", "hvae_loss", "seconds"}
        one_by_one, _ = load_model(single.model("hyperldm", "given", seed))
        for name, route in TrainedModels(ldm_run, data, seed).routes.items():
            alone = train_hyperldm(route.z_train, data.train.c, seed, **hyperldm.settings(cfg)).denoiser.state_dict()
            for k, want in alone.items():
                worst = max(worst, (state[f"{name}.denoiser.{k}"] - want).abs().max().item())
                assert torch.equal(one_by_one[f"{name}.denoiser.{k}"], want)  # the unbatched stage is the loop itself
    print(f"\nstage (2 workers, batched) vs each denoiser alone: max |dw| {worst:.3g}")
    assert worst <= W_TOL
    # the three seeds are three different models
    a, b = (load_model(files[s])[0]["hnet.denoiser.net.0.weight"] for s in (0, 1))
    assert not torch.allclose(a, b)
    assert json.loads(files[0].with_suffix(".json").read_text())["stage_config"]["batched"] is True
