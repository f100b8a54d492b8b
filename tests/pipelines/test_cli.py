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


def test_full_routes_stage_fields(tmp_path):
    r = run_cli("pipelines.full", "--run-dir", str(tmp_path / "x"), "--set", "steps=3")
    assert r.returncode == 2 and "name the stage" in r.stderr
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
