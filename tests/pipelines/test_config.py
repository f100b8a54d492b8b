"""The config layer in process: pinned hashes, result vs runtime fields, nested --set, --print-config and
--config, the run's config record, the configuration reference's tables, and the few-shot defaults the results depend on."""
from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from pipelines import evaluate, experts, features, fewshot, generators
from pipelines.core.config import ConfigError, build_config, is_runtime, result_values
from pipelines.core.runner import run_stages
from pipelines.core.stages import STAGES

# Shard ids and the weight store are keyed by these: a change would orphan every existing store.
PINNED = {
    "default": {"features_hash": "7ceedbfbf9bee32e", "farm_config_hash": "5d54c864a7595648"},
    "smoke": {"features_hash": "ba0316c5589fb7c3", "farm_config_hash": "d74cf46a664acb7e"},
}


@pytest.mark.parametrize("preset", ["default", "smoke"])
def test_farm_and_features_hashes_are_pinned(preset):
    from orchestrator.farm import config_hash

    f = build_config(features.FeaturesConfig, features.PRESETS, preset)
    e = build_config(experts.ExpertsConfig, experts.PRESETS, preset)
    fh = features.features_hash(f)
    assert {"features_hash": fh, "farm_config_hash": config_hash(e, fh)} == PINNED[preset]
    # runtime fields move the work, not its results
    moved_f = build_config(features.FeaturesConfig, features.PRESETS, preset, ["device=cuda", "cache_dir=/x", "export_tasks=/y"])
    moved_e = build_config(experts.ExpertsConfig, experts.PRESETS, preset, ["num_actors=3", "cpus_per_actor=2"])
    assert features.features_hash(moved_f) == fh and config_hash(moved_e, fh) == PINNED[preset]["farm_config_hash"]
    assert config_hash(build_config(experts.ExpertsConfig, experts.PRESETS, preset, ["shard_size=8"]), fh) != config_hash(e, fh)


def test_configuration_reference_tables_match_the_configs():
    from pipelines.core.config_docs import CONFIG_DOC, generated_section, markdown_tables

    assert generated_section(CONFIG_DOC.read_text()) == "\n" + markdown_tables() + "\n", \
        "docs/configuration.md tables are stale: run python -m pipelines.core.config_docs"


def test_roles_and_result_values():
    cfg = build_config(fewshot.FewShotConfig, fewshot.PRESETS, "smoke")
    assert is_runtime(fewshot.FewShotConfig, "num_workers")
    # batching and DDP change float reduction order, so they count as results (a change retrains)
    assert not is_runtime(fewshot.FewShotConfig, "eval_batch") and not is_runtime(generators.GeneratorsConfig, "ddp")
    values = result_values(cfg, plan=False)
    assert "num_workers" not in values and "methods" not in values and values["hypermaml"]["train_steps"] == 30
    assert "methods" in result_values(cfg)
    json.dumps(values)  # JSON-plain


def test_nested_set_reaches_method_and_sampling_settings():
    cfg = build_config(fewshot.FewShotConfig, fewshot.PRESETS, "smoke", ["hypermaml.lr=3e-4", "metadiff.width=16"])
    assert cfg.hypermaml.lr == 3e-4 and cfg.hypermaml.train_steps == 30 and cfg.metadiff.width == 16
    assert cfg.hypertransformer.lr == 1e-3 and cfg.settings("fomaml") is cfg.maml
    ev = build_config(evaluate.EvaluateConfig, evaluate.PRESETS, "smoke", ["sampling.sampler=ddpm", "guidance_scales=0,2"])
    assert ev.sampling.sampler == "ddpm" and ev.sampling.guidance_steps == 5 and ev.guidance_scales == (0.0, 2.0)


@pytest.mark.parametrize("cls, presets, item, words", [
    (experts.ExpertsConfig, experts.PRESETS, "lr=nan", ["experts.lr=nan", "finite"]),
    (generators.GeneratorsConfig, generators.PRESETS, "val_fraction=inf", ["generators.val_fraction=inf", "finite", "<= 0.5"]),
    (evaluate.EvaluateConfig, evaluate.PRESETS, "sampling.guidance_scale=-1", ["evaluate.sampling.guidance_scale=-1", ">= 0.0"]),
    (evaluate.EvaluateConfig, evaluate.PRESETS, "guidance_scales=1,nan", ["evaluate.guidance_scales[1]=nan", "finite"]),
    (fewshot.FewShotConfig, fewshot.PRESETS, "hypermaml.lr=2", ["fewshot.hypermaml.lr=2", "<= 1.0"]),
    (fewshot.FewShotConfig, fewshot.PRESETS, "hypermaml.lrr=2", ["unknown config field 'hypermaml.lrr'", "hypermaml.lr"]),
    (fewshot.FewShotConfig, fewshot.PRESETS, "splits=diagonal", ["fewshot.splits[0]='diagonal'", "random, compositional, given"]),
    (experts.ExpertsConfig, experts.PRESETS, "seeds_per_task=2", ["experts: seeds_per_task > 1", "init=independent"]),
])
def test_bad_values_are_one_line_naming_stage_field_value_and_what_is_allowed(cls, presets, item, words):
    with pytest.raises(ConfigError) as e:
        build_config(cls, presets, "smoke", [item])
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_fewshot_defaults_are_the_former_flat_ones():
    """Few-shot results depend on these; the nesting must not move a single default."""
    c = fewshot.FewShotConfig()
    flat = dict(train_steps=150, metadiff_train_steps=400, tasks_per_batch=16, hyper_train_steps=300, hyper_tasks_per_batch=8,
                queries=32, lr=1e-3, hypermaml_lr=1e-3, ht_lr=1e-3, mixed_shots=True, inner_steps=5, inner_lr=0.5,
                hypermaml_warmup_steps=5, hypermaml_warmup_lr=0.01, hypermaml_warmup_fraction=0.2, ht_layers="last",
                ht_init_gain=0.3, rotate_views=True, metadiff_width=128, pretrain_steps=1000, metadiff_target_steps=100,
                eval_episodes=600, eval_batch=200, finetune_steps=10, finetune_lr=0.1, ldm_steps=20, ldm_support_scale=1.0)
    now = dict(train_steps=c.maml.train_steps, metadiff_train_steps=c.metadiff.train_steps, tasks_per_batch=c.maml.tasks_per_batch,
               hyper_train_steps=c.hypermaml.train_steps, hyper_tasks_per_batch=c.hypermaml.tasks_per_batch, queries=c.queries,
               lr=c.maml.lr, hypermaml_lr=c.hypermaml.lr, ht_lr=c.hypertransformer.lr, mixed_shots=c.mixed_shots,
               inner_steps=c.maml.inner_steps, inner_lr=c.maml.inner_lr, hypermaml_warmup_steps=c.hypermaml.warmup_steps,
               hypermaml_warmup_lr=c.hypermaml.warmup_lr, hypermaml_warmup_fraction=c.hypermaml.warmup_fraction,
               ht_layers=c.hypertransformer.layers, ht_init_gain=c.hypertransformer.init_gain, rotate_views=c.hypermaml.rotate_views,
               metadiff_width=c.metadiff.width, pretrain_steps=c.pretrain_steps, metadiff_target_steps=c.metadiff.target_steps,
               eval_episodes=c.eval_episodes, eval_batch=c.eval_batch, finetune_steps=c.finetune.steps, finetune_lr=c.finetune.lr,
               ldm_steps=c.finetune.ldm_steps, ldm_support_scale=c.finetune.ldm_support_scale)
    assert now == flat
    assert (c.hypertransformer.train_steps, c.hypertransformer.tasks_per_batch, c.hypertransformer.rotate_views) == (300, 8, True)
    assert (c.metadiff.tasks_per_batch, c.metadiff.lr, c.metadiff.denoise_steps) == (16, 1e-3, 5)


def test_fewshot_checkpoint_key_ignores_runtime_plan_and_finetune_fields():
    inputs = {"features_hash": "f", "spec": {"hidden": 32}}
    base = build_config(fewshot.FewShotConfig, fewshot.PRESETS, "smoke")
    key = fewshot.config_hash(base, inputs)
    for same in (["num_workers=1"], ["methods=maml"], ["splits=random"], ["finetune.steps=3"]):
        assert fewshot.config_hash(build_config(fewshot.FewShotConfig, fewshot.PRESETS, "smoke", same), inputs) == key, same
    assert fewshot.config_hash(build_config(fewshot.FewShotConfig, fewshot.PRESETS, "smoke", ["hypermaml.lr=3e-4"]), inputs) != key
    assert fewshot.config_hash(base, {**inputs, "spec": {"hidden": 64}}) != key


def test_up_to_date_compares_result_fields_only(tmp_path):
    from pipelines.core.config import config_values
    from pipelines.hyperclip import HyperClipConfig
    from pipelines.zeroshot.data import save_model
    from pipelines.zeroshot.launch import up_to_date

    path = tmp_path / "given-seed0.safetensors"
    cfg = HyperClipConfig(steps=30)
    save_model(path, {}, {"stage_config": config_values(cfg), "val_fraction": 0.15})
    assert up_to_date(path, dataclasses.replace(cfg, num_workers=1, log_every=7), 0.15)
    assert not up_to_date(path, dataclasses.replace(cfg, ddp=True), 0.15)  # DDP reduces in another order
    assert not up_to_date(path, dataclasses.replace(cfg, steps=31), 0.15)
    assert not up_to_date(path, cfg, 0.0)


def test_sweep_seed_search_space_and_grid_values_through_set():
    from pipelines.sweeps.spec import SweepConfig

    cfg = build_config(SweepConfig, {"default": {}}, "default", ["guidance_lr={loguniform: [0.01, 0.1]}", "guidance_scale=0,2"], seed=7)
    assert cfg.search_seed == 7 and cfg.params["guidance_lr"] == {"loguniform": [0.01, 0.1]}
    assert cfg.params["guidance_scale"] == [0.0, 2.0] and cfg.params["sampler"] == ["ddim"]  # the rest at their defaults
    with pytest.raises(ConfigError, match=r"guidance_scale=-1 is out of range"):
        build_config(SweepConfig, {"default": {}}, "default", ["guidance_scale=0,-1"])
    with pytest.raises(ConfigError, match=r"hyperldm\.lr=nan is not allowed"):
        build_config(SweepConfig, {"default": {}}, "default", ["train.hyperldm.lr=0.001,nan"])
    with pytest.raises(ConfigError, match="--seed: hyperclip has no seed"):
        from pipelines.hyperclip import PRESETS, HyperClipConfig

        build_config(HyperClipConfig, PRESETS, "default", seed=3)


def test_print_config_round_trips_through_config(tmp_path, capsys):
    argv = ["--preset", "smoke", "--set", "fewshot.hypermaml.lr=3e-4", "--set", "evaluate.sampling.sampler=ddpm", "--print-config"]
    assert run_stages("full", None, STAGES, argv) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    assert list(data) == list(STAGES) and data["fewshot"]["hypermaml"]["lr"] == 3e-4
    assert data["evaluate"]["sampling"]["sampler"] == "ddpm"
    saved = tmp_path / "cfg.yaml"
    saved.write_text(printed)
    assert run_stages("full", None, STAGES, ["--config", str(saved), "--print-config"]) == 0  # default preset under the file
    assert capsys.readouterr().out == printed
    # --set wins over --config, which wins over the preset; one stage reads its own section of a pipeline's file
    assert run_stages("experts", None, None, ["--config", str(saved), "--set", "steps=7", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == {"experts": {**data["experts"], "steps": 7}}
    assert not (tmp_path / "runs").exists()


def test_until_stops_the_pipeline_after_a_stage(capsys):
    assert run_stages("full", None, STAGES, ["--preset", "smoke", "--until", "sweep", "--print-config"]) == 0
    assert list(yaml.safe_load(capsys.readouterr().out)) == list(STAGES[:STAGES.index("sweep") + 1])
    with pytest.raises(ConfigError, match="unknown stage 'fewshot'"):  # a later stage's field is refused, not ignored
        run_stages("full", None, STAGES, ["--until", "sweep", "--set", "fewshot.seeds=0", "--print-config"])
    with pytest.raises(ConfigError, match="--until evaluate stops before it"):
        run_stages("full", None, STAGES, ["--until", "evaluate", "--resume", "--print-config"])
    with pytest.raises(SystemExit):
        run_stages("full", None, STAGES, ["--until", "nosuchstage", "--print-config"])


def test_config_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("expertz: {steps: 3}\n")
    with pytest.raises(ConfigError, match="unknown stage 'expertz'"):
        run_stages("experts", None, None, ["--config", str(bad), "--print-config"])
    bad.write_text("experts: {steps: 0}\n")
    with pytest.raises(ConfigError, match=r"experts\.steps=0 is out of range"):
        run_stages("experts", None, None, ["--config", str(bad), "--print-config"])


def test_run_records_merge_stage_sections_and_append_commands(tmp_path):
    from orchestrator.storage.rundir import RunDir
    from pipelines.core.runner import record_invocation

    run = RunDir(tmp_path / "run")
    e = build_config(experts.ExpertsConfig, experts.PRESETS, "smoke")
    f = build_config(features.FeaturesConfig, features.PRESETS, "smoke")
    record_invocation(run, {"features": f, "experts": e}, "python -m pipelines.full --preset smoke")
    record_invocation(run, {"experts": dataclasses.replace(e, steps=9)}, "python -m pipelines.experts --set steps=9")
    saved = yaml.safe_load(run.config_file.read_text())
    assert list(saved) == ["features", "experts"] and saved["experts"]["steps"] == 9 and saved["features"]["n_tasks"] == 24
    assert run.command_file.read_text().splitlines() == ["python -m pipelines.full --preset smoke",
                                                         "python -m pipelines.experts --set steps=9"]


def test_fewshot_uses_the_farms_network(zs_run_dir, tmp_path):
    from models.task_net import TaskNetSpec
    from orchestrator.storage.suite_features import SuiteFeatures
    feats = SuiteFeatures.load(zs_run_dir / "features")
    run_spec = fewshot.task_net
    assert run_spec(zs_run_dir, feats) == TaskNetSpec(d_img=feats.d_img, d_txt=feats.d_txt)  # the store's manifest
    derived = run_spec(tmp_path / "no-store", feats, "smoke")  # no farm yet: what the farm would train
    assert derived == TaskNetSpec(d_img=feats.d_img, hidden=32, d_txt=feats.d_txt, logit_scale=10.0)
    assert "hidden" not in {f for f in fewshot.FewShotConfig.__pydantic_fields__}
