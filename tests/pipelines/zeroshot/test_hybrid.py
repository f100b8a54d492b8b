"""The hybrid variants on real smoke-sized models: text-HNet's network started in each route's latent space and
edited by HyperLDM, with the plain sampler and the route's own reconstruction at the two ends of t0."""
from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(zs_run_dir):
    """The smoke presets' zero-shot models for split `given`, seed 0, trained in this process (no Ray)."""
    from models.zeroshot.tasks import Hooks
    from orchestrator.storage.rundir import RunDir
    from pipelines.core.config import build_config, config_values
    from pipelines.zeroshot.data import load_split, save_model, write_plan
    from pipelines.zeroshot.trained import TrainedModels

    run = RunDir(zs_run_dir)
    write_plan(run, ("given",), (0,), 0.25)
    data = load_split(run, "given")
    for kind in ("generators", "hyperclip", "hyperldm", "baselines"):  # in pipeline order: both read the routes
        module = importlib.import_module(f"pipelines.{kind}")
        cfg = build_config(module.CONFIG, module.PRESETS, "smoke", [])
        state, _ = module.train_one(run, data, 0, cfg, Hooks())
        save_model(run.model(kind, "given", 0), state, {"kind": kind, "split": "given", "seed": 0,
                                                         "stage_config": config_values(cfg), "val_fraction": 0.25})
    return TrainedModels(run, data, 0)


@pytest.mark.parametrize("route", ["hnet", "hvae"])
def test_hybrid_ends_are_the_plain_sampler_and_the_routes_copy_of_text_hnet(models, route):
    from pipelines.zeroshot.methods import generate
    from pipelines.zeroshot.sampling import SamplingSettings

    c = models.data.test.c
    s = SamplingSettings(guidance_scale=4.0, sampler_steps=10, hybrid_fit_steps=0)
    at = {t0: generate(f"{route}_hybrid", models, c, dataclasses.replace(s, hybrid_t0=t0)) for t0 in (0, 400, 1000)}
    assert torch.equal(at[1000], generate(f"{route}_hyperldm", models, c, s))  # t0 = T: the plain sampler, same noise
    r = models.routes[route]
    w_text = generate("text_hnet", models, c, s)
    assert torch.equal(at[0], r.decode(r.encode(w_text)))  # t0 = 0: text-HNet's network as the route decodes it
    assert not torch.allclose(at[400], at[0]) and not torch.allclose(at[400], at[1000])
    wn = r.norm.encode

    def err(w):  # squared distance to text-HNet's network in the normalised weight space
        return (wn(w) - wn(w_text)).pow(2).mean()

    if route == "hnet":  # the HNet has no encoder: its projection must bring the decoder nearer text-HNet's weights
        assert err(at[0]) < err(r.decode(r.z_start.expand(len(c), -1)))
    fitted = generate(f"{route}_hybrid", models, c, dataclasses.replace(s, hybrid_t0=0, hybrid_fit_steps=50))
    assert err(fitted) < err(at[0])  # fitting through the decoder moves the start nearer text-HNet's weights
    residual = {t0: generate(f"{route}_hybrid", models, c, dataclasses.replace(s, hybrid_t0=t0, hybrid_residual=True))
                for t0 in (0, 400)}
    assert torch.equal(residual[0], w_text)  # nothing edited: text-HNet's own weights
    assert torch.allclose(residual[400] - w_text, at[400] - at[0], atol=1e-4)  # plus exactly the route's edit


def test_the_hvae_hybrid_is_in_the_table_and_the_hnet_one_joins_only_when_named(models):
    from pipelines.evaluate import EvaluateConfig, evaluate_split

    base = EvaluateConfig(guidance_scales=(4.0,), description_ablation=False, log_models=False)
    plain = {r["method"] for r in evaluate_split(models.data, models, base, "smoke")["zero_shot"]}
    extra = evaluate_split(models.data, models, dataclasses.replace(base, extra_methods=("hnet_hybrid",)), "smoke")
    assert "hvae_hybrid" in plain and "hnet_hybrid" not in plain
    assert {r["method"] for r in extra["zero_shot"]} == plain | {"hnet_hybrid"}
    assert [r["guidance_scale"] for r in extra["zero_shot"] if r["method"] == "hnet_hybrid"] == [4.0]


def test_the_start_fitted_once_serves_every_guidance_scale_unchanged(models):
    """The start latent is cached per set of descriptions (it depends on neither γ nor t0): a hybrid drawn
    after the cache is filled at another γ equals the same hybrid drawn by fresh models."""
    from pipelines.zeroshot.methods import generate
    from pipelines.zeroshot.sampling import SamplingSettings
    from pipelines.zeroshot.trained import TrainedModels

    c = models.data.test.c
    s = SamplingSettings(guidance_scale=4.0, sampler_steps=10, hybrid_fit_steps=20)
    generate("hvae_hybrid", models, c, dataclasses.replace(s, guidance_scale=1.0))  # fills the cache
    assert any(k[:2] == ("hvae", 20) for k in models.hybrid_starts)
    fresh = TrainedModels(models.run, models.data, models.seed)
    assert torch.equal(generate("hvae_hybrid", models, c, s), generate("hvae_hybrid", fresh, c, s))
    assert not torch.equal(generate("hvae_hybrid", models, c, s), generate("hvae_hybrid", models, c[:1].expand_as(c), s))
