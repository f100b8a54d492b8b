"""The Python API and the logged MLflow models on a real smoke run: the README example, bit-identical
weights from a `models:/` URI in a fresh process, the zero_shot CLI's output folder, encoder mismatches."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.mlflow, pytest.mark.slow]


def finished(smoke_pipeline) -> Path:
    run_dir, r = smoke_pipeline
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def python(code: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with the repository importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def run_images(run_dir: Path, n: int) -> list[str]:
    import pandas as pd

    return pd.read_parquet(run_dir / "features" / "images.parquet", columns=["path"])["path"].tolist()[:n]


def test_readme_python_api_example_runs(smoke_pipeline):
    run_dir = finished(smoke_pipeline)
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 10, code
    # The smoke run's only split is "given", and its images stand in for the example's files.
    a, b = run_images(run_dir, 2)
    for old, new in (('"runs/default"', repr(str(run_dir))), ('split="random"', 'split="given"'),
                     ('["a.png", "b.png"]', repr([a, b]))):
        assert old in code, old
        code = code.replace(old, new)
    r = python(code + "\nprint(len(nets), nets[1].answers)\n")
    assert r.returncode == 0, r.stderr[-3000:]
    predicted, shapes, batch = r.stdout.strip().splitlines()[-3:]
    assert all(p in ("yes", "no") for p in eval(predicted)) and len(eval(predicted)) == 2
    assert "fc1.weight" in shapes and "fc2.bias" in shapes
    assert batch == "2 ['red', 'green', 'blue']"


def logged_models(run_dir: Path) -> dict[str, str]:
    """{logged model name: models:/ URI} in the run's MLflow store, the latest where a name repeats."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name("weightgen")
    oldest_first = [{"field_name": "creation_time", "ascending": True}]
    return {m.name: m.model_uri for m in client.search_logged_models([exp.experiment_id], order_by=oldest_first)}


DESCRIPTIONS = {"is the shape red?": ["yes", "no"], "is it a circle or a square?": ["no", "yes"]}
LOAD_AND_PREDICT = f"""
import json
import mlflow, numpy as np, pandas as pd
rows = pd.DataFrame({{"description": {list(DESCRIPTIONS)!r}, "answers": {list(DESCRIPTIONS.values())!r}}})
model = mlflow.pyfunc.load_model(URI)
for method, out, guidance in CASES:
    np.save(out, model.predict(rows, params={{"method": method, "guidance": guidance}}))
try:
    model.predict(rows, params={{"method": "telepathy"}})
    unknown = ""
except Exception as e:
    unknown = str(e)
print(json.dumps({{"bundle": str(model.unwrap_python_model().run.dir.root),
                  "methods": list(model.unwrap_python_model().methods), "unknown": unknown}}))
"""


CASES = {"hnet_hyperldm": 1.5, "hvae_hyperclip": 1.0, "nearest_task": 1.0}  # method: guidance γ


def test_logged_models_in_a_fresh_process_give_the_api_weights_bit_for_bit(smoke_pipeline, tmp_path):
    from pipelines import load_run
    from pipelines.zeroshot.methods import GENERATIVE

    run_dir = finished(smoke_pipeline)
    models = logged_models(run_dir)
    assert "generators-given-seed0" in models, sorted(models)  # one model per split and seed
    uri = models["generators-given-seed0"]
    assert uri.startswith("models:/")
    cases = [(m, str(tmp_path / f"{m}.npy"), g) for m, g in CASES.items()]
    code = LOAD_AND_PREDICT.replace("CASES", repr(cases)).replace("URI", repr(uri))
    r = python(code, env={"MLFLOW_TRACKING_URI": f"sqlite:///{run_dir.parent / 'mlflow.db'}"})
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    bundle = Path(info["bundle"])
    assert not bundle.is_relative_to(run_dir / "models") and (bundle / "bundle.json").exists()  # its own copy
    assert not list(bundle.parent.parent.rglob("*.pkl")), "nothing pickled"
    assert info["methods"][0] == "hnet_hyperldm" and set(info["methods"]) == set(GENERATIVE)  # every generator, one copy
    assert "not in this model" in info["unknown"]
    run = load_run(run_dir)
    for method, guidance in CASES.items():
        nets = run.generate(list(DESCRIPTIONS), answers=list(DESCRIPTIONS.values()), method=method, guidance=guidance,
                            split="given", seed=0)
        from_api, from_mlflow = np.stack([n.w.numpy() for n in nets]), np.load(tmp_path / f"{method}.npy")
        assert from_mlflow.dtype == np.float32 and from_mlflow.shape == from_api.shape == (2, run.layout.size)
        if method.endswith("hyperclip"):  # guidance's Adam steps: last-bit float differences across processes
            np.testing.assert_allclose(from_mlflow, from_api, rtol=1e-5, atol=1e-6, err_msg=method)
        else:
            assert from_mlflow.tobytes() == from_api.tobytes(), method


def test_zero_shot_cli_writes_a_new_folder_under_runs_and_prints_majority_accuracy(smoke_pipeline, tmp_path):
    from tests.pipelines.test_pipeline import tree_digest

    from pipelines.core.config import build_config
    from pipelines.features import PRESETS, FeaturesConfig, load_tasks
    from pipelines.suites import write_task_file

    run_dir = finished(smoke_pipeline)
    task_file = tmp_path / "tasks.jsonl"
    suite = load_tasks(build_config(FeaturesConfig, PRESETS, "smoke", []))
    suite.tasks = suite.tasks[-5:]  # a few tasks of each kind (2 and 3+ answers): each call encodes their images
    write_task_file(suite, task_file)
    before = tree_digest(run_dir / "features") | tree_digest(run_dir / "models") | tree_digest(run_dir / "store")
    cli = f"from pipelines.zero_shot import main; main({['--tasks', str(task_file), '--from', str(run_dir), '--no-progress']!r})"
    work = tmp_path / "cwd"
    work.mkdir()
    for folder in (f"{run_dir.name}-zero-shot-tasks", f"{run_dir.name}-zero-shot-tasks-2"):  # a new folder each time
        r = python(cli, cwd=work)
        assert r.returncode == 0, r.stderr[-3000:]
        last = json.loads(r.stdout.strip().splitlines()[-1])
        assert Path(last["store"]) == work / "runs" / folder / "store" / "weights"
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "task\taccuracy\tmajority\tdescription"
    assert all(re.fullmatch(r"\S+\t\d+\.\d\d%\t\d+\.\d\d%\t.+", x) for x in lines[1:-1]) and len(lines) == 7
    assert last["tasks"] == 5 and 0 <= last["mean_accuracy"] <= 1 and 0 < last["mean_majority_accuracy"] <= 1

    import pandas as pd

    from orchestrator.storage.store import WeightStore

    table = pd.read_csv(last["results"])
    assert list(table.columns) == ["task_id", "description", "accuracy", "majority_accuracy", "examples"]
    assert len(WeightStore(last["store"]).read().w) == 5
    # majority: the share of a task's labelled examples whose answer is its most common one
    majority = [np.bincount(np.concatenate([t.support_labels, t.query_labels])).max() / (len(t.support_labels) + len(t.query_labels))
                for t in suite.tasks]
    assert np.allclose(table["majority_accuracy"], majority) and table["task_id"].tolist() == [t.id for t in suite.tasks]
    # nothing of the source run changed
    assert before == tree_digest(run_dir / "features") | tree_digest(run_dir / "models") | tree_digest(run_dir / "store")


def test_an_encoder_that_differs_from_the_runs_is_a_clear_error(smoke_pipeline):
    from models.encoders import make_image_encoder
    from pipelines import load_run
    from pipelines.zeroshot.api import RunMismatchError

    run_dir = finished(smoke_pipeline)
    info = json.loads((run_dir / "features" / "info.json").read_text())
    other = make_image_encoder("efficientnet_lite0", image_size=96)  # the smoke run encoded at 64 px
    with pytest.raises(RunMismatchError) as e:
        load_run(run_dir, image_encoder=other)
    assert other.id in str(e.value) and info["image_encoder"] in str(e.value) and "info.json" in str(e.value)
    # a run whose recorded text encoder is not the one its settings build refuses to generate
    run = load_run(run_dir)
    run.info["text_encoder"] = "minilm/some-other-model"
    with pytest.raises(RunMismatchError, match="text encoder .* does not match the run's 'minilm/some-other-model'"):
        run.generate("is it red?", answers=["yes", "no"])
