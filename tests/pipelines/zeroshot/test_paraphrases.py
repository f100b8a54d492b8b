"""`python -m pipelines.paraphrases` on the smoke run: paired with the evaluate stage, references unmoved, bad files refused."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import run_cli

pytestmark = [pytest.mark.ray, pytest.mark.mlflow, pytest.mark.slow]


def finished(smoke_pipeline) -> Path:
    run_dir, r = smoke_pipeline
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def write_lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def rephrasings(smoke_pipeline, tmp_path) -> tuple[Path, pd.DataFrame]:
    """A rephrasing file over the smoke run's tasks: every meta-test task once, the first twice, one meta-train task.

    The meta-test tasks are "rephrased" with meta-train tasks' descriptions, far enough from their own to move
    even the smoke run's small models."""
    tasks = pd.read_parquet(finished(smoke_pipeline) / "features" / "tasks.parquet", columns=["id", "description", "split"])
    test, train = tasks[tasks["split"] == "meta_test"], tasks[tasks["split"] == "meta_train"]
    other = train["description"].tolist()
    rows = [dict(task_id=t.id, description=t.description, rephrased=other[i:i + (2 if i == 0 else 1)])
            for i, t in enumerate(test.itertuples())]
    rows.append(dict(task_id=train["id"].iloc[0], description=train["description"].iloc[0], rephrased=["Please answer."]))
    return write_lines(tmp_path / "rephrased.jsonl", rows), test


def test_paraphrase_command_pairs_with_the_evaluate_stage(smoke_pipeline, rephrasings, tmp_path):
    run_dir = finished(smoke_pipeline)
    file, test = rephrasings
    before = sorted(p.name for p in (run_dir / "results").iterdir())
    r = run_cli("pipelines.paraphrases", "--run-dir", str(run_dir), "--rephrased", str(file), "--out", str(tmp_path / "out"),
                "--guidance", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "results").iterdir()) == before  # the run is only read
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(last["best"]) == {"given"} and len(last["files"]) == 3

    per_task = pd.read_csv(tmp_path / "out" / "paraphrases_tasks.csv")
    assert set(per_task["task"]) == set(test["id"])  # the meta-train task is not scored
    assert set(per_task["method"]) == {"oracle", "multitask", "nearest_task", "nearest_task_noise", "nearest_k_average",
                                       "text_hnet", "hnet_hyperclip", "hnet_hyperldm", "hvae_hyperclip", "hvae_hyperldm",
                                       "hvae_hybrid"}
    assert set(per_task["guidance_scale"].dropna()) == {1.0}
    assert per_task.loc[per_task["task"] == test["id"].iloc[0], "rephrasings"].eq(2).all()
    # Own-description accuracy is the evaluate stage's, task by task: the same models, settings and sampler noise.
    evaluated = pd.read_csv(run_dir / "results" / "zero_shot_tasks.csv")
    key = ["split", "method", "seed", "task"]
    both = per_task.merge(evaluated[evaluated["guidance_scale"].fillna(1.0) == 1.0], on=key, suffixes=("", "_eval"))
    assert len(both) == len(per_task)
    assert (both["original"] - both["accuracy"]).abs().max() < 1e-6
    # References never read the description; the conditioned methods do.
    refs = per_task[per_task["method"].isin(["oracle", "multitask"])]
    assert (refs["original"] == refs["rephrased"]).all()
    conditioned = per_task[~per_task["method"].isin(["oracle", "multitask"])]
    assert (conditioned["original"] != conditioned["rephrased"]).any()
    assert per_task["majority"].between(0, 1).all()

    summary = pd.read_csv(tmp_path / "out" / "paraphrases.csv")
    row = summary[(summary["method"] == "text_hnet") & (summary["subset"] == "all")].set_index("condition")
    assert row.loc["rephrased", "ci_low"] <= row.loc["rephrased", "mean"] <= row.loc["rephrased", "ci_high"]
    assert row.loc["drop", "mean"] == pytest.approx(row.loc["original", "mean"] - row.loc["rephrased", "mean"])
    assert row.loc["rephrased", "descriptions"] == len(test) + 1 and row.loc["rephrased", "tasks"] == len(test)
    md = (tmp_path / "out" / "paraphrases.md").read_text()
    assert "| Majority answer |" in md and "Text-conditioned HNet" in md and "HNet + HyperLDM (γ = 1)" in md


def test_paraphrase_command_refuses_a_file_for_other_tasks(smoke_pipeline, rephrasings, tmp_path):
    run_dir = finished(smoke_pipeline)
    _, test = rephrasings
    cases = {
        "not tasks of this run": [dict(task_id="easyvqa-what-color-is-the-circle-79e403", description="what color is the circle?",
                                       rephrased=["Name the circle's hue."])],
        "is described": [dict(task_id=test["id"].iloc[0], description="something else?", rephrased=["Say it."])],
        "line 1: invalid JSON": None,
    }
    for message, rows in cases.items():
        path = write_lines(tmp_path / "bad.jsonl", rows) if rows else tmp_path / "bad.jsonl"
        if rows is None:
            path.write_text("{not json\n")
        out = tmp_path / "out"
        r = run_cli("pipelines.paraphrases", "--run-dir", str(run_dir), "--rephrased", str(path), "--out", str(out))
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert not out.exists()  # nothing half-written
