"""What a smoke pipeline leaves in MLflow, read back with MLflow's own client: a training curve in every
training stage's run, one tag format (`tags.guidance_scale = '1.0'` finds γ = 1), child runs tagged with
stage and preset, and a parent run that carries the headline results, every stage's config as prefixed
params, system metrics and the dataset inputs."""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]

TRAINING_STAGES = ("experts", "generators", "hyperclip", "hyperldm", "baselines", "fewshot")


@pytest.fixture(scope="module")
def logged(smoke_pipeline):
    """(client, experiment id, parent run, {stage: child run}) of the session's smoke pipeline."""
    from mlflow.tracking import MlflowClient

    run_dir, r = smoke_pipeline
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")  # an explicit client: no process-wide URI
    exp = client.get_experiment_by_name("weightgen")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.run_dir = '{run_dir.resolve()}'")
    # the run that made the directory: a later test may rerun the pipeline there, and a rerun trains nothing
    parent = min((x for x in runs if "mlflow.parentRunId" not in x.data.tags), key=lambda x: x.info.start_time)
    children = {x.info.run_name: x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return client, exp, parent, children


def test_every_training_stage_run_has_a_curve_of_at_least_ten_steps(logged):
    client, _, _, children = logged
    longest = {}
    for stage in TRAINING_STAGES:
        run = children[stage]
        assert run.data.tags["stage"] == stage and run.data.tags["preset"] == "smoke"
        histories = {k: client.get_metric_history(run.info.run_id, k) for k in run.data.metrics}
        name, points = max(histories.items(), key=lambda kv: len(kv[1]))
        steps = [m.step for m in points]
        assert len(points) >= 10 and steps == sorted(set(steps)), (stage, name, steps)
        longest[stage] = (name, len(points))
    assert longest["generators"][0].endswith(("hnet_loss", "hvae_loss")), longest
    print("longest curve per stage:", longest)


def test_guidance_scale_tag_one_point_zero_finds_the_gamma_one_trials(logged):
    client, exp, _, children = logged
    sweep = children["sweep"]
    trials = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{sweep.info.run_id}'")
    gamma_one = [t for t in trials if t.data.params.get("guidance_scale") == "1.0"]
    assert gamma_one, [t.data.params for t in trials]
    hit = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{sweep.info.run_id}' "
                                                               "and tags.guidance_scale = '1.0'")
    assert {t.info.run_id for t in hit} == {t.info.run_id for t in gamma_one}
    for t in trials:
        assert {"stage", "preset", "split", "seed", "method"} <= set(t.data.tags)
        assert t.data.tags["stage"] == "sweep" and t.data.tags["preset"] == "smoke"


def test_parent_run_holds_headline_results_prefixed_config_system_metrics_and_datasets(logged):
    client, exp, parent, children = logged
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    m, p = parent.data.metrics, parent.data.params
    assert any(k.startswith("zero_shot/given/") for k in m), sorted(m)
    assert any(k.startswith("sweep/chosen/given/") and k.endswith("/guidance_scale") for k in m), sorted(m)
    assert any(k.startswith("few_shot/") and k.endswith("shot_acc") for k in m), sorted(m)
    for k, v in m.items():
        if k.startswith(("zero_shot/", "few_shot/")) or k.endswith("test_accuracy"):
            assert 0.0 <= v <= 1.0, (k, v)
    assert p["experts.steps"] == "60" and p["generators.hnet_steps"] == "40" and p["fewshot.maml.train_steps"] == "30"
    assert set(children) <= {s.split(".")[0] for s in p} | {"sweep"}
    assert any(k.startswith("system/") for k in m), "MLflow's system metrics"
    names = {d.dataset.name for d in client.get_run(parent.info.run_id).inputs.dataset_inputs}
    assert "features (procedural)" in names
    for run in children.values():
        assert run.data.tags["run_dir"] == parent.data.tags["run_dir"]
