"""The zero-shot stages on the streamed data path (Ray Data into Ray Train), on a real local Ray and the smoke
features' store: the normaliser from one streaming pass equals the in-memory fit, workers hold a batch of
experts at a time, and HVAE, HyperCLIP and HyperLDM train to sane models, as on the memory path."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]

SPLIT = "given"


@pytest.fixture(scope="module")
def run_dir(zs_run_dir, tmp_path_factory):
    """The smoke run's experts in 4 shards, plus a second seed of every expert (which no stage may read)."""
    from orchestrator.storage.store import WeightStore

    src = WeightStore(zs_run_dir / "store" / "weights")
    stored, manifest = src.read(), src.manifest()
    run = tmp_path_factory.mktemp("streamed") / "run"
    shutil.copytree(zs_run_dir / "features", run / "features")
    store = WeightStore(run / "store" / "weights")
    store.set_info(**{k: manifest[k] for k in ("layout_id", "n_weights", "spec")})
    w = stored.w.numpy()
    for seed in (0, 1):
        for k, rows in enumerate(torch.arange(len(w)).chunk(4)):
            meta = stored.meta.iloc[rows.numpy()].assign(seed=seed)
            store.write_shard(f"shard-{seed}{k:04d}-test", meta, w[rows.numpy()] + 0.05 * seed, {})
    return run


def context(run_dir, ray_info):
    from pipelines.core.cli import RunContext

    return RunContext(run=run_dir, progress=False, ray=ray_info)


def sidecar(run_dir, kind: str, seed: int = 0) -> dict:
    from orchestrator.storage.rundir import RunDir

    return json.loads(RunDir.of(run_dir).model(kind, SPLIT, seed).with_suffix(".json").read_text())


def test_auto_streams_only_a_store_over_its_budget(run_dir):
    from pipelines.generators import GeneratorsConfig
    from pipelines.zeroshot.streamed import resolve_data_path, store_bytes

    size = store_bytes(run_dir)
    assert size > 0
    assert resolve_data_path(run_dir, GeneratorsConfig()) == "memory"  # the smoke store fits the default budget
    assert resolve_data_path(run_dir, GeneratorsConfig(memory_budget_mb=size / 2**20 / 2)) == "stream"
    assert resolve_data_path(run_dir, GeneratorsConfig(data_path="stream")) == "stream"


def test_streamed_normaliser_equals_the_in_memory_fit(run_dir, ray_cluster):
    from models.weight_norm import WeightNormalizer
    from pipelines.zeroshot.data import load_split
    from pipelines.zeroshot.streamed import stream_inputs

    whole = load_split(run_dir, SPLIT, val_fraction=0.15)
    datasets, norms = stream_inputs(run_dir, [SPLIT], 0.15, log=lambda m: None)
    assert sorted(datasets) == [f"{SPLIT}-test", f"{SPLIT}-train"]
    streamed = load_split(run_dir, SPLIT, val_fraction=0.15, norm_state=norms[SPLIT])
    assert streamed.w_train is None and streamed.w_test is None  # the streamed path reads no expert into the split
    assert streamed.train_ids == whole.train_ids and streamed.test_ids == whole.test_ids
    # float64 moments in both fits, stored as float32: equal up to the last float32 digit
    assert torch.allclose(streamed.norm.mean, whole.norm.mean, rtol=1e-6, atol=1e-7)
    assert torch.allclose(streamed.norm.std, whole.norm.std, rtol=1e-5, atol=0)
    assert not torch.equal(whole.norm.std, WeightNormalizer(whole.layout).std)  # a real fit, not the initial ones


def train(kind: str, cfg, run_dir, ray_info) -> dict:
    import importlib

    from pipelines.zeroshot.launch import train_stage

    module = importlib.import_module(f"pipelines.{kind}")
    return train_stage(kind, module.train_one, cfg, context(run_dir, ray_info))


def first_last(series: list) -> tuple[float, float]:
    return series[0][1], series[-1][1]


def test_streamed_stages_train_sane_models_like_the_memory_path(run_dir, ray_cluster, tmp_path):
    from pipelines.generators import GeneratorsConfig
    from pipelines.hyperclip import HyperClipConfig
    from pipelines.hyperldm import HyperLdmConfig
    from pipelines.zeroshot.data import load_split, write_plan

    from orchestrator.train_pool import warm_pool

    runs = {}
    for path in ("stream", "memory"):
        copy = tmp_path / path
        shutil.copytree(run_dir / "features", copy / "features")
        shutil.copytree(run_dir / "store", copy / "store")
        write_plan(copy, (SPLIT,), (0, 1), 0.15)
        gen = GeneratorsConfig(splits=(SPLIT,), seeds=(0, 1), hnet_steps=10, hvae_steps=60, hvae_batch=8, d_latent=16,
                               hidden=(32, 32), log_every=5, num_workers=2, data_path=path)
        # The memory path, the reference here, trains on a warm worker group (the same loops, fewer process
        # starts); the streamed path's launches carry Ray Data inputs, so they go to Ray Train even inside one.
        with warm_pool():
            train("generators", gen, copy, ray_cluster)  # two workers, each its own seed: each reads its own stream
            train("hyperclip", HyperClipConfig(steps=40, hidden=(32,), batch=8, log_every=5, num_workers=1, data_path=path),
                  copy, ray_cluster)
        runs[path] = copy
    stream, memory = runs["stream"], runs["memory"]
    n_train = len(load_split(stream, SPLIT).train_ids)
    for seed in (0, 1):
        g, gm = sidecar(stream, "generators", seed), sidecar(memory, "generators", seed)
        m = g["metrics"]
        # a worker held one batch of experts at a time, never the store
        assert 0 < m["streamed_peak_rows"] <= 8 < n_train, (m["streamed_peak_rows"], n_train)
        assert "streamed_peak_rows" not in gm["metrics"]
        start, end = first_last(g["series"]["hvae_loss"])
        mem_end = gm["series"]["hvae_loss"][-1][1]
        assert end < 0.99 * start and end < 1.1 * mem_end, (start, end, mem_end)  # learning, about as far as in memory
        # the same experts scored task by task in batches as in one tensor
        assert m["expert_train_query_acc"] == pytest.approx(gm["metrics"]["expert_train_query_acc"], abs=1e-6)
        assert m["expert_train_query_acc"] > 0.7
        # reconstructions as good as the memory path's (their minibatches differ: the streamed order is Ray Data's)
        assert m["hvae_recon_train_query_acc"] >= gm["metrics"]["hvae_recon_train_query_acc"] - 0.1
        # HNet reads no expert, only the normaliser (equal up to float32 rounding)
        assert m["hnet_train_query_acc"] == pytest.approx(gm["metrics"]["hnet_train_query_acc"], abs=0.05)
    h = sidecar(stream, "hyperclip")
    for route in ("hnet", "hvae"):
        start, end = first_last(h["series"][f"{route}_loss"])
        assert end < start, (route, start, end)
    assert h["metrics"]["streamed_peak_rows"] <= 8
    # the HNet route's HyperCLIP trains on decoded latents, the same minibatches on both paths
    assert h["metrics"]["hnet_test_top1"] == pytest.approx(sidecar(memory, "hyperclip")["metrics"]["hnet_test_top1"], abs=0.2)
    # HyperLDM needs only the normaliser: on the streamed path its workers read no expert
    train("hyperldm", HyperLdmConfig(steps=10, batch=16, hidden=16, log_every=5, num_workers=1, data_path="stream"),
          stream, ray_cluster)
    assert "hvae_loss" in sidecar(stream, "hyperldm")["series"]
