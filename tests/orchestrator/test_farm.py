"""The expert farm on a real local Ray: completeness, resume after a killed driver, corrupted shards."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from orchestrator.storage.store import StoreError, WeightStore
from pipelines.core.config import build_config
from pipelines import experts
from tests.conftest import ROOT, run_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def experts_cfg(*overrides: str):
    return build_config(experts.ExpertsConfig, experts.PRESETS, "smoke", list(overrides))


def farm(run_dir, cfg):
    from orchestrator.farm import run_farm
    from orchestrator.storage.suite_features import SuiteFeatures

    feats = SuiteFeatures.load(run_dir / "features")
    return feats, run_farm(feats, cfg, WeightStore(run_dir / "store" / "weights"), progress=False, log=lambda m: None)


# 128-d projected image features -> 32 -> 384: 128*32 + 32 + 384*32 + 384 weights
SMOKE_WEIGHTS = 16800


def test_farm_trains_every_expert_once(ray_cluster, run_dir_with_features):
    cfg = experts_cfg("shard_size=8", "num_actors=2", "cpus_per_actor=1")
    feats, summary = farm(run_dir_with_features, cfg)
    stored = WeightStore(run_dir_with_features / "store" / "weights").read()
    keys = list(zip(stored.meta["task_id"], stored.meta["seed"]))
    assert len(keys) == len(set(keys)) == len(feats.tasks) == summary.experts_trained
    assert set(stored.meta["task_id"]) == set(feats.tasks["id"])
    assert stored.w.shape == (len(feats.tasks), SMOKE_WEIGHTS)
    chance = float((1 / feats.tasks["answers"].map(len)).mean())
    assert stored.meta["support_acc"].mean() > 0.9
    assert stored.meta["query_acc"].mean() > chance + 0.15
    import ray

    assert not [a for a in ray.util.list_named_actors() if a.startswith("farm-worker")], "actors must be cleaned up"


def test_rerun_skips_and_corrupted_shard_is_retrained(ray_cluster, run_dir_with_features):
    cfg = experts_cfg("shard_size=8")
    _, first = farm(run_dir_with_features, cfg)
    store = WeightStore(run_dir_with_features / "store" / "weights")
    before = store.read()
    _, again = farm(run_dir_with_features, cfg)
    assert again.experts_trained == 0 and again.shards_skipped == first.shards_trained
    victim = store.completed_shards()[1]
    path = store.root / f"{victim}.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.verify_shard(victim) is not None
    _, repaired = farm(run_dir_with_features, cfg)
    assert repaired.shards_redone == [victim] and repaired.shards_trained == 1
    after = store.read()
    order = lambda m: np.lexsort((m["seed"].to_numpy(), m["task_id"].to_numpy()))
    assert torch.equal(before.w[order(before.meta)], after.w[order(after.meta)]), "retrained shard must match the original"


def test_config_change_refuses_to_mix_experts(ray_cluster, run_dir_with_features):
    farm(run_dir_with_features, experts_cfg("shard_size=8"))
    with pytest.raises(StoreError, match="another config"):
        farm(run_dir_with_features, experts_cfg("shard_size=8", "lr=0.01"))
    # the same training config on other features (e.g. a rebuilt suite) is another config too
    from orchestrator.farm import run_farm
    from orchestrator.storage.suite_features import SuiteFeatures

    feats = SuiteFeatures.load(run_dir_with_features / "features")
    feats.info["config_hash"] = "another-suite"
    with pytest.raises(StoreError, match="another config"):
        run_farm(feats, experts_cfg("shard_size=8"), WeightStore(run_dir_with_features / "store" / "weights"),
                 progress=False, log=lambda m: None)


def test_killed_driver_resumes_with_only_missing_shards(smoke_run_dir, tmp_path, ray_cluster):
    """SIGKILL a real `python -m pipelines.experts` mid-farm, rerun it, compare with an uninterrupted run."""
    import shutil

    import ray

    gcs = ray.get_runtime_context().gcs_address
    runs = {}
    for name in ("killed", "clean"):
        runs[name] = tmp_path / name
        shutil.copytree(smoke_run_dir / "features", runs[name] / "features")
    args = ["pipelines.experts", "--preset", "smoke", "--no-progress", "--address", gcs,
            "--set", "shard_size=2", "--set", "steps=200"]
    proc = subprocess.Popen([sys.executable, "-m", *args, "--run-dir", str(runs["killed"])], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    store = WeightStore(runs["killed"] / "store" / "weights")
    deadline = time.time() + 240
    while time.time() < deadline and len(store.completed_shards()) < 2 and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = set(store.completed_shards())
    assert 2 <= len(done_before) < 12, f"kill landed at {len(done_before)} of 12 shards"
    r = run_cli(*args, "--run-dir", str(runs["killed"]))
    assert r.returncode == 0, r.stderr
    assert f"{len(done_before)} already in the store, {12 - len(done_before)} to train" in r.stderr
    r = run_cli(*args, "--run-dir", str(runs["clean"]))
    assert r.returncode == 0, r.stderr
    a = WeightStore(runs["killed"] / "store" / "weights").read()
    b = WeightStore(runs["clean"] / "store" / "weights").read()
    ka, kb = [list(zip(x.meta["task_id"], x.meta["seed"])) for x in (a, b)]
    assert sorted(ka) == sorted(kb) and len(ka) == len(set(ka))
    ia, ib = np.argsort([f"{t}:{s}" for t, s in ka]), np.argsort([f"{t}:{s}" for t, s in kb])
    assert torch.equal(a.w[ia], b.w[ib]), "resumed store must equal an uninterrupted run"


def test_init_from_file_is_every_experts_start(ray_cluster, run_dir_with_features, tmp_path):
    from safetensors.torch import save_file

    base = torch.randn(SMOKE_WEIGHTS, generator=torch.Generator().manual_seed(7)) * 0.01
    path = tmp_path / "base.safetensors"
    save_file({"w": base}, str(path))
    farm(run_dir_with_features, experts_cfg("shard_size=8", f"init_from={path}", "steps=1", "lr=1e-7"))
    stored = WeightStore(run_dir_with_features / "store" / "weights").read()
    assert (stored.w - base).abs().max() < 1e-5, "one tiny step from the base must stay at the base"


def test_bad_init_from_is_one_clear_line(run_dir_with_features, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "wrong.safetensors"
    save_file({"w": torch.zeros(10)}, str(path))
    r = run_cli("pipelines.experts", "--preset", "smoke", "--run-dir", str(run_dir_with_features),
                "--no-progress", "--set", f"init_from={path}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "init_from" in r.stderr and f"({SMOKE_WEIGHTS},)" in r.stderr and "Traceback" not in r.stderr
    assert not (run_dir_with_features / "store" / "weights" / "manifest.json").exists()


def test_actor_that_cannot_be_placed_fails_after_the_timeout_with_what_it_asked_for(ray_cluster, run_dir_with_features):
    """8 CPUs per actor on a 2-CPU Ray: no actor can start; the farm says so instead of waiting for ever."""
    from orchestrator.farm import FarmError, run_farm
    from orchestrator.storage.suite_features import SuiteFeatures

    feats = SuiteFeatures.load(run_dir_with_features / "features")
    store = WeightStore(run_dir_with_features / "store" / "weights")
    t0 = time.monotonic()
    with pytest.raises(FarmError) as e:
        run_farm(feats, experts_cfg("cpus_per_actor=8"), store, progress=False, log=lambda m: None, placement_timeout=5)
    assert time.monotonic() - t0 < 60
    msg = str(e.value)
    assert "8 CPU" in msg and "the cluster has 2 CPU" in msg and "cpus_per_actor" in msg
    assert not store.manifest()["shards"]  # nothing half-written


def test_more_actors_than_the_cluster_fits_finishes_with_the_ones_placed(ray_cluster, run_dir_with_features):
    """3 one-CPU actors on 2 CPUs: shards go only to running actors, so every shard is trained."""
    from orchestrator.farm import run_farm
    from orchestrator.storage.suite_features import SuiteFeatures

    feats = SuiteFeatures.load(run_dir_with_features / "features")
    store = WeightStore(run_dir_with_features / "store" / "weights")
    said: list[str] = []
    # steps=600: the work must outlast the 5 s placement timeout (smoke's 60 steps can finish first on a quiet machine)
    summary = run_farm(feats, experts_cfg("num_actors=3", "shard_size=4", "steps=600"), store, progress=False,
                       log=said.append, placement_timeout=5)
    assert summary.experts_trained == len(feats.tasks)
    assert len(store.read_meta()) == len(feats.tasks)
    assert any("could not be placed" in m and "going on with the other 2" in m for m in said), said


def test_tasks_without_support_or_query_examples_get_no_expert_and_are_recorded(ray_cluster, run_dir_with_features):
    """No untrained "expert" (support accuracy NaN) and no NaN query accuracy ever reaches the store."""
    from orchestrator.farm import run_farm
    from orchestrator.storage.suite_features import SuiteFeatures

    feats = SuiteFeatures.load(run_dir_with_features / "features")
    empty = np.array([], dtype=np.int64)
    no_support, no_query = feats.tasks["id"].iat[0], feats.tasks["id"].iat[1]
    feats.tasks.at[0, "support_images"], feats.tasks.at[0, "support_labels"] = empty, empty
    feats.tasks.at[1, "query_images"], feats.tasks.at[1, "query_labels"] = empty, empty
    store = WeightStore(run_dir_with_features / "store" / "weights")
    said: list[str] = []
    summary = run_farm(feats, experts_cfg(), store, progress=False, log=said.append)
    meta = store.read_meta()
    assert summary.tasks_skipped == 2 and summary.experts_trained == len(feats.tasks) - 2 == len(meta)
    assert {no_support, no_query}.isdisjoint(meta["task_id"]) and meta[["support_acc", "query_acc"]].notna().all().all()
    assert store.manifest()["skipped_tasks"] == {no_support: "no support examples", no_query: "no query examples"}
    assert any("2 task(s) left out" in m and no_support in m for m in said), said


def test_actors_write_shards_and_an_uncommitted_file_is_retrained_to_the_same_bytes(ray_cluster, run_dir_with_features):
    """Actors write the shard files and send the driver only metadata (no weights: well under 1 KB per expert).
    A file an actor wrote but the driver never committed (the driver died between the two) is not trusted:
    the rerun trains it again and writes the same bytes, with no duplicate rows."""
    cfg = experts_cfg("shard_size=8")
    feats, first = farm(run_dir_with_features, cfg)
    assert 0 < first.result_bytes / first.experts_trained < 1024, first.result_bytes
    store = WeightStore(run_dir_with_features / "store" / "weights")
    manifest = store.manifest()
    victim = sorted(manifest["shards"])[0]
    entry = manifest["shards"].pop(victim)
    from orchestrator.storage.atomic import write_json

    write_json(store.root / "manifest.json", manifest)  # the file stays on disk, uncommitted
    _, again = farm(run_dir_with_features, cfg)
    assert again.shards_trained == 1 and again.shards_skipped == first.shards_trained - 1
    assert store.manifest()["shards"][victim]["file_sha256"] == entry["file_sha256"]
    keys = list(zip(store.read().meta["task_id"], store.read().meta["seed"]))
    assert len(keys) == len(set(keys)) == len(feats.tasks)
