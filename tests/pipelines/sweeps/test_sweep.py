"""Sweeps: spec checks (no Ray), choosing on validation, and real Ray Tune sweeps over a trained smoke run."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from pipelines.core.config import ConfigError, build_config
from pipelines.sweeps.spec import SweepConfig, expand, load_spec
from tests.conftest import ROOT, copy_run, run_cli

PRESETS = {"default": {}}


def make_config(*overrides: str, spec=None) -> SweepConfig:
    """The sweep config the CLI builds from `--spec FILE` and `--set` overrides."""
    return build_config(SweepConfig, PRESETS, "default", list(overrides), layers=[load_spec(spec)] if spec else [])


# ----------------------------------------------------------------------------- spec (pure)


def test_spec_file_and_overrides_expand_to_deduplicated_trials(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("methods: [hnet_hyperldm, hnet_hyperclip, multitask]\nguidance_scale: [0, 4]\n"
                    "guidance_lr: {loguniform: [0.01, 0.1]}\nnum_samples: 2\n")
    cfg = make_config("guidance_scale=0,1.5,4", spec=spec)
    trials = expand(cfg, ["random", "compositional"], [0, 1])
    per = pd.Series([t["method"] for t in trials]).value_counts().to_dict()
    # 3 γ (the override wins over the file) x 2 splits x 2 seeds; 2 lr draws; multitask ignores both grids
    assert per == {"hnet_hyperldm": 12, "hnet_hyperclip": 8, "multitask": 4}
    lrs = {t["params"]["guidance_lr"] for t in trials if t["method"] == "hnet_hyperclip"}
    assert len(lrs) == 2 and all(0.01 <= v <= 0.1 for v in lrs)
    assert len({t["key"] for t in trials}) == len(trials)
    assert expand(cfg, ["random", "compositional"], [0, 1]) == trials  # seeded: the same trials every time


@pytest.mark.parametrize("item, named", [
    ("guidance_scael=1", "guidance_scael"),
    ("train.hyperldm.stepz=10", "hyperldm.stepz"),
    ("train.decoder.lr=1e-3", "decoder.lr"),
    ("train.generators.seeds=1", "generators.seeds"),  # defines the run, not sweepable
    ("methods=hnet_hyperldm,telepathy", "telepathy"),
])
def test_unknown_sweep_parameter_is_named(item, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        make_config(item)


def test_setting_is_chosen_on_validation_not_meta_test():
    from pipelines.sweeps.results import choose

    rows = [dict(method="hnet_hyperldm", split="random", seed=s, guidance_scale=g, val_accuracy=v, test_accuracy=t)
            for s in (0, 1) for g, v, t in ((1.0, 0.70, 0.90), (4.0, 0.80, 0.60))]
    c = choose(pd.DataFrame(rows)).iloc[0]
    assert c["guidance_scale"] == 4.0 and c["test_mean"] == pytest.approx(0.60)
    assert c["best_test_setting"] == "guidance_scale=1"  # reported for reference only


# ----------------------------------------------------------------------------- real sweeps (Ray Tune + MLflow SQLite)


@pytest.fixture
def trained_run(smoke_pipeline, tmp_path):
    run_dir, r = smoke_pipeline
    assert r.returncode == 0, r.stderr[-3000:]
    return copy_run(run_dir, tmp_path / "run")


def sweep_runs(run_dir, name: str):
    """(the sweep's parent run, its trial child runs) in the run's MLflow SQLite store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name("weightgen")
    state = json.loads((run_dir / "sweeps" / name / "sweep.json").read_text())
    parent = client.get_run(state["mlflow_parent"])
    kids = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, kids


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_small_sweep_logs_one_child_run_per_trial_with_tags(trained_run, tmp_path):
    spec = tmp_path / "small.yaml"
    spec.write_text("name: small\nmethods: [hnet_hyperldm, hvae_hyperclip, multitask]\nguidance_scale: [0, 1.5]\n"
                    "sampler_steps: [5]\nguidance_steps: [5]\nguidance_lr: {loguniform: [0.01, 0.1]}\nnum_samples: 2\n")
    r = run_cli("pipelines.sweep", "--run-dir", str(trained_run), "--spec", str(spec), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    parent, kids = sweep_runs(trained_run, "small")
    assert len(kids) == 5 == parent.data.metrics["trials"]  # 2 γ + 2 lr draws + multitask, for the one split and seed
    tags = pd.DataFrame([k.data.tags for k in kids])
    assert set(tags["method"]) == {"hnet_hyperldm", "hvae_hyperclip", "multitask"}
    assert set(tags["split"]) == {"given"} and set(tags["seed"]) == {"0"}
    assert sorted(tags["guidance_scale"].dropna()) == ["0.0", "1.5"]
    assert set(tags["stage"]) == {"sweep"} and set(tags["preset"]) == {"default"}
    assert tags["trial_key"].is_unique
    for k in kids:
        assert 0.0 <= k.data.metrics["val_accuracy"] <= 1.0 and 0.0 <= k.data.metrics["test_accuracy"] <= 1.0
    # Searchable by tags, as the README shows. (An explicit client: an earlier in-process tracker may have
    # set mlflow's process-wide tracking URI, which wins over the environment.)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{trained_run.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name("weightgen")
    hit = client.search_runs([exp.experiment_id],
                             filter_string="tags.method = 'hnet_hyperldm' and tags.guidance_scale = '1.5' and tags.sweep = 'small'")
    assert len(hit) == 1
    folder = trained_run / "sweeps" / "small"
    assert (folder / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "Chosen on the validation tasks" in (folder / "results.md").read_text()
    assert len(pd.read_csv(folder / "results.csv")) == 5


class PlantedPayload:
    """Unpickling this creates a file: proof that code from the run directory ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_interrupted_sweep_resumes_with_every_trial_done_exactly_once(trained_run):
    args = [sys.executable, "-m", "pipelines.sweep", "--run-dir", str(trained_run), "--no-progress", "--set", "name=long",
            "--set", "methods=hnet_hyperldm,hvae_hyperldm", "--set", "sampler_steps=5",
            "--set", "guidance_scale=" + ",".join(str(g) for g in range(12)), "--set", "max_concurrent=1"]
    done_dir = trained_run / "sweeps" / "long" / "done"
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    tune_state = trained_run / "sweeps" / "long" / "tune" / "trials"
    # kill once 4 trials are done and Tune has saved its (pickled) experiment state
    while time.time() < deadline and proc.poll() is None and (
            len(list(done_dir.glob("*.json"))) < 4 or not list(tune_state.glob("experiment_state-*.json"))):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in done_dir.glob("*.json")}
    assert 4 <= len(before) < 24, f"kill landed after {len(before)} of 24 trials; the test needs it mid-sweep"

    # Anyone who can write the run directory could plant a pickle where Ray or Tune keeps one: resuming must
    # never unpickle it. Every pickle file under the run directory becomes one that creates `marker` when loaded.
    marker = trained_run.parent / "payload-ran"
    payload = pickle.dumps(PlantedPayload(str(marker)))
    planted = list(trained_run.rglob("*.pkl")) + [tune_state / "tuner.pkl", tune_state / "trainable.pkl"]
    for p in planted:
        p.write_bytes(payload)
    assert len(planted) > 2

    again = run_cli("pipelines.sweep", *args[3:-2])  # without --resume: refused, with the fix in the message
    assert again.returncode == 2 and "--resume" in again.stderr
    r = run_cli("pipelines.sweep", *args[3:], "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(before)} already done (kept)" in r.stderr
    assert not marker.exists(), "a planted pickle was loaded"

    after = {p.name: p.stat().st_mtime_ns for p in done_dir.glob("*.json")}
    assert len(after) == 24
    assert all(after[k] == t for k, t in before.items())  # finished trials were not computed again
    parent, kids = sweep_runs(trained_run, "long")
    keys = [k.data.tags["trial_key"] for k in kids]
    assert len(keys) == 24 and len(set(keys)) == 24  # every trial logged, each exactly once
    assert parent.info.status == "FINISHED"
    assert len(pd.read_csv(trained_run / "sweeps" / "long" / "results.csv")) == 24


@pytest.mark.ray
@pytest.mark.slow
def test_training_sweep_trains_its_own_models_through_ray_train(trained_run):
    r = run_cli("pipelines.sweep", "--run-dir", str(trained_run), "--no-progress", "--set", "name=train",
                "--set", "methods=hnet_hyperldm", "--set", "guidance_scale=1", "--set", "sampler_steps=5",
                "--set", "train.hyperldm.steps=10,20")
    assert r.returncode == 0, r.stderr[-3000:]
    base = json.loads((trained_run / "models" / "hyperldm" / "given-seed0.json").read_text())
    trained = sorted((trained_run / "sweeps" / "train" / "train").glob("*/models/hyperldm/given-seed0.json"))
    assert len(trained) == 2
    assert sorted(json.loads(p.read_text())["stage_config"]["steps"] for p in trained) == [10, 20]
    assert base["stage_config"]["steps"] not in (10, 20)  # the base run's model is untouched
    table = pd.read_csv(trained_run / "sweeps" / "train" / "results.csv")
    assert sorted(table["train.hyperldm.steps"]) == [10, 20]


@pytest.mark.ray
@pytest.mark.slow
def test_trials_no_node_can_hold_are_refused_before_tune_waits(trained_run):
    r = run_cli("pipelines.sweep", "--run-dir", str(trained_run), "--no-progress", "--set", "name=big",
                "--set", "methods=hnet_hyperldm", "--set", "cpus_per_trial=8", timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "asks for 8 CPU but the largest node has 2" in r.stderr and "cpus_per_trial" in r.stderr


def test_unknown_parameter_in_a_spec_fails_before_any_trial(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: bad\nguidance_scale: [1, 4]\nguidance_scael: [1]\n")
    run_dir = tmp_path / "run"
    r = run_cli("pipelines.sweep", "--run-dir", str(run_dir), "--spec", str(spec), "--no-progress")
    assert r.returncode == 2
    assert "guidance_scael" in r.stderr and "valid keys" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (run_dir / "sweeps").exists()


def test_default_config_is_the_issue_grid():
    assert SweepConfig().params["guidance_scale"] == [0.0, 0.5, 1.0, 1.5, 2.0, 4.0, 7.5, 15.0]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "sweeps").glob("*.yaml")))
def test_example_specs_parse(name):
    cfg = make_config(spec=ROOT / "configs" / "sweeps" / name)
    assert expand(cfg, ["random"], [0])
