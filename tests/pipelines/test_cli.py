"""The shared CLI: help, presets, --set validation and clear errors for bad input (real processes)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_cli


@pytest.mark.parametrize("stage", ["features", "experts", "full"])
def test_help(stage):
    r = run_cli(f"pipelines.{stage}", "--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--preset", "--run-dir", "--seed", "--set"):
        assert flag in r.stdout


def test_unknown_field_fails_before_any_work(tmp_path):
    run_dir = tmp_path / "never"
    r = run_cli("pipelines.experts", "--run-dir", str(run_dir), "--set", "stepz=3")
    assert r.returncode == 2
    assert "unknown config field 'stepz'" in r.stderr and "steps" in r.stderr
    assert not run_dir.exists(), "a config error must stop the run before it writes anything"


@pytest.mark.parametrize("stage, preset", [("experts", "smoke"), ("evaluate", "default")])
def test_help_lists_every_field_with_type_value_and_meaning(stage, preset):
    from pipelines.core.config_docs import preset_config, rows, value_text
    from pipelines.core.stages import stage_module

    r = run_cli(f"pipelines.{stage}", "--preset", preset, "--help")
    assert r.returncode == 0, r.stderr
    mod = stage_module(stage)
    listed = list(rows(mod.CONFIG, preset_config(mod, preset)))
    assert len(listed) >= 7
    for name, typ, value, role, meaning in listed:
        assert f"  {name} = {value_text(value)}  ({typ}" in r.stdout, name
        assert meaning and f"      {meaning}" in r.stdout, name
    if stage == "experts":
        assert "  steps = 60  (int >= 1)" in r.stdout and "  num_actors = 0  (int >= 0; runtime)" in r.stdout
    else:
        assert "  sampling.sampler = ddim  (one of ddim, ddpm)" in r.stdout


def test_full_help_lists_every_stage_field():
    r = run_cli("pipelines.full", "--help")
    assert r.returncode == 0, r.stderr
    for line in ("  features.suite = easyvqa", "  evaluate.sampling.sampler_steps = 50", "  fewshot.hypermaml.lr = 0.001",
                 "  sweep.search_seed = 0", "  generators.seeds = 0,1,2"):
        assert line in r.stdout, line


@pytest.mark.parametrize("override, words", [
    ("experts.lr=nan", ["experts.lr=nan", "finite number"]),
    ("generators.val_fraction=inf", ["generators.val_fraction=inf", "finite number", "<= 0.5"]),
    ("evaluate.sampling.guidance_scale=-1", ["evaluate.sampling.guidance_scale=-1", "out of range", ">= 0.0"]),
    ("fewshot.hypermaml.warmup_fraction=1.5", ["fewshot.hypermaml.warmup_fraction=1.5", "<= 1.0"]),
])
def test_non_finite_or_out_of_range_is_one_line_before_any_work(tmp_path, override, words):
    run_dir = tmp_path / "never"
    r = run_cli("pipelines.full", "--run-dir", str(run_dir), "--set", override)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and all(w in r.stderr for w in words), r.stderr
    assert not run_dir.exists()


def test_a_run_records_its_config_and_command(smoke_run_dir, tmp_path):
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(smoke_run_dir / "features", run / "features")  # same config: the stage reuses them
    args = ["--preset", "smoke", "--run-dir", str(run), "--set", "image_dims=128", "--no-progress"]
    r = run_cli("pipelines.features", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = run_cli("pipelines.features", *args, "--print-config")
    assert yaml.safe_load((run / "config.yaml").read_text()) == yaml.safe_load(printed.stdout)
    assert (run / "command.txt").read_text() == "python -m pipelines.features " + " ".join(args) + "\n"


def test_full_routes_stage_fields(tmp_path):
    r = run_cli("pipelines.full", "--run-dir", str(tmp_path / "x"), "--set", "steps=3")
    assert r.returncode == 2 and "name the stage" in r.stderr
    assert "experts, hyperclip, hyperldm, baselines" in r.stderr and "features.steps" not in r.stderr
    r = run_cli("pipelines.full", "--run-dir", str(tmp_path / "x"), "--set", "farm.steps=3")
    assert r.returncode == 2 and "unknown stage 'farm'" in r.stderr


@pytest.mark.parametrize(
    "override, words",
    [
        ("image_encoder=resnet9000", ["image_encoder", "efficientnet_lite0"]),
        ("text_encoder=bert", ["text_encoder", "minilm"]),
        ("suite=imagenet", ["suite", "easyvqa", "procedural"]),
        ("support_fraction=1.5", ["support_fraction", "out of range"]),
        ("n_tasks=many", ["n_tasks", "many"]),
    ],
)
def test_bad_values_are_named(tmp_path, override, words):
    r = run_cli("pipelines.features", "--run-dir", str(tmp_path / "r"), "--set", override)
    assert r.returncode == 2, r.stderr
    for w in words:
        assert w in r.stderr


def test_unknown_preset(tmp_path):
    r = run_cli("pipelines.features", "--preset", "huge", "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "unknown preset 'huge'" in r.stderr


def test_malformed_task_file_names_line_and_field(tmp_path):
    f = tmp_path / "tasks.jsonl"
    good = {"id": "a", "description": "is it red?", "answers": ["yes", "no"], "examples": []}
    f.write_text(json.dumps(good) + "\n" + json.dumps({"id": "b", "answers": ["yes"], "examples": []}) + "\n")
    r = run_cli("pipelines.features", "--run-dir", str(tmp_path / "r"), "--tasks", str(f))
    assert r.returncode == 2
    assert "line 2" in r.stderr and "description" in r.stderr


def test_missing_image_is_named(tmp_path):
    f = tmp_path / "tasks.jsonl"
    task = {"id": "a", "description": "is it red?", "answers": ["yes", "no"],
            "examples": [{"image": "nowhere/cat.png", "answer": "yes"}]}
    f.write_text(json.dumps(task) + "\n")
    r = run_cli("pipelines.features", "--run-dir", str(tmp_path / "r"), "--tasks", str(f))
    assert r.returncode == 2
    assert "cat.png" in r.stderr


def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = run_cli("pipelines.features", "--run-dir", str(blocker / "run"))
    assert r.returncode == 2 and "not writable" in r.stderr
    assert blocker.read_text() == "not a folder"


def test_missing_task_file(tmp_path):
    r = run_cli("pipelines.features", "--run-dir", str(tmp_path / "r"), "--tasks", str(tmp_path / "nope.jsonl"))
    assert r.returncode == 2 and "nope.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_any_user_error_is_one_line_and_exit_2_without_torch_or_ray():
    """guarded() catches the UserError base class, whichever layer raised it, and needs no heavy import to say so."""
    code = (
        "import sys\n"
        "from models.errors import UserError\n"
        "from pipelines.core.cli import guarded\n"
        "class LayerError(UserError, RuntimeError): pass\n"
        "def main():\n"
        "    raise LayerError('the thing is wrong; fix it like this')\n"
        "try:\n"
        "    guarded(main)()\n"
        "except SystemExit as e:\n"
        "    print(e.code, [m for m in ('torch', 'ray', 'mlflow') if m in sys.modules])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "2 []", (r.stdout, r.stderr)
    assert r.stderr == "error: the thing is wrong; fix it like this\n"
