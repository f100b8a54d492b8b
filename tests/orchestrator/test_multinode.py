"""Multi-node on one machine: a Ray head plus two worker nodes on loopback run the expert farm and a
2-worker Ray Train job, one worker per node, with the same results as a single-node run."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from orchestrator.storage.store import WeightStore
from pipelines import experts
from pipelines.core.config import build_config
from tests.orchestrator.multinode import assert_store_matches, loopback_cluster, reference_weights
from tests.orchestrator.test_train import BASE, reference, toy_loop  # the toy DDP job (shipped by value to the workers)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # pytest's module name is not importable on workers


@pytest.fixture(scope="module")
def cluster():
    """Head with no CPUs (only the driver there) and two 1-CPU worker nodes: work must cross nodes."""
    with loopback_cluster(workers=2) as c:
        yield c


def test_farm_across_nodes_equals_single_node(cluster, run_dir_with_features):
    from orchestrator.farm import run_farm
    from orchestrator.storage.suite_features import SuiteFeatures

    cfg = build_config(experts.ExpertsConfig, experts.PRESETS, "smoke", ["shard_size=4", "num_actors=2"])
    feats = SuiteFeatures.load(run_dir_with_features / "features")
    store = WeightStore(run_dir_with_features / "store" / "weights")
    summary = run_farm(feats, cfg, store, progress=False, log=lambda m: None)
    assert summary.experts_trained == len(feats.tasks)
    workers = {n.node_id for n in cluster.worker_nodes}
    assert set(summary.nodes) == workers, f"both worker nodes train (and not the CPU-less head): {summary.nodes}"
    assert_store_matches(store, reference_weights(feats, cfg))


def spread_loop(config: dict) -> None:
    """The toy DDP loop of test_train, after noting which node this worker runs on."""
    import ray

    from orchestrator import train

    Path(config["where"], f"rank{train.rank()}").write_text(ray.get_runtime_context().get_node_id())
    toy_loop(config)


def test_two_ray_train_workers_on_two_nodes_match_one_process(cluster, tmp_path):
    from orchestrator import train

    cfg = {**BASE, "steps": 20, "ckpt_every": 10, "where": str(tmp_path)}
    run = train.launch(spread_loop, cfg, name="toy-2nodes", run_dir=tmp_path, num_workers=2)
    where = {p.name: p.read_text() for p in tmp_path.glob("rank*")}
    assert len(where) == 2 and len(set(where.values())) == 2, f"workers shared a node: {where}"
    assert cluster.head_node.node_id not in where.values()
    ref_losses, ref_state = reference(cfg)
    losses = [m["loss"] for m in run.metrics]
    assert [m["step"] for m in run.metrics] == list(range(1, 21))
    # DDP averages two half-batch gradients: equal to one process up to float32 summation order
    assert max(abs(a - b) / b for a, b in zip(losses, ref_losses)) < 1e-5
    assert max(float((run.state[k] - ref_state[k]).abs().max()) for k in ref_state) < 1e-6
    assert set(run.state) == set(ref_state) and all(torch.isfinite(v).all() for v in run.state.values())
