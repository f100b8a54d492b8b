"""orchestrator.train_pool on a real local Ray: launches inside `warm_pool()` reuse the same worker processes,
train exactly what a new Ray Train worker group trains, resume each other's checkpoints, and fail cleanly."""
from __future__ import annotations

import sys
import time

import pytest
import torch

import ray
import ray.cloudpickle
from orchestrator import train
from orchestrator.train_pool import warm_pool

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from test_train import BASE, reference, toy_loop  # noqa: E402  (the toy loop, shipped by value)

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def same_state(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_warm_launches_reuse_their_workers_and_match_ray_train(ray_cluster, tmp_path):
    cfg = {**BASE, "steps": 12, "ckpt_every": 4}
    cold = {2: train.launch(toy_loop, cfg, name="cold-2w", run_dir=tmp_path, num_workers=2)}
    ref_losses, ref_state = reference(cfg)  # one worker: Ray Train matches the in-process loop bit for bit (test_train)
    with warm_pool() as pool:
        warm = []
        for i, n in enumerate((1, 2, 1)):
            warm.append(train.launch(toy_loop, cfg, name=f"warm-{i}", run_dir=tmp_path, num_workers=n))
        pids = pool.pids()
        warm.append(train.launch(toy_loop, cfg, name="warm-3", run_dir=tmp_path, num_workers=2))
        assert pool.pids() == pids, "the same two worker processes serve every launch"
    walls = {"cold": [round(r.wall_s, 1) for r in cold.values()], "warm": [round(r.wall_s, 1) for r in warm]}
    print(f"\n[pool] launch wall s: Ray Train {walls['cold']}, warm {walls['warm']}")
    for i, (run, n) in enumerate(zip(warm, (1, 2, 1, 2))):
        assert run.warm and run.checkpoint_dir.parent.name == f"warm-{i}"
        if n == 2:
            assert [m["loss"] for m in run.metrics] == [m["loss"] for m in cold[2].metrics], f"launch {i}"
            assert same_state(run.state, cold[2].state)
        else:
            assert [m["loss"] for m in run.metrics] == ref_losses, f"launch {i}"
            assert same_state(run.state, ref_state)
        assert 0 < run.loop_s < run.wall_s
    assert max(walls["warm"][1:]) < min(walls["cold"]), "a warm launch is cheaper than starting a worker group"


@pytest.mark.parametrize("first_warm", [True, False])
def test_either_path_resumes_the_others_checkpoint(ray_cluster, tmp_path, first_warm):
    """Interrupted on one path (warm pool or Ray Train), relaunched on the other: it continues from the checkpoint."""
    flag = tmp_path / "crash-once"
    flag.touch()
    cfg = {**BASE, "steps": 20, "ckpt_every": 5, "crash_at": 10, "crash_flag": str(flag)}

    def launch(warm: bool):
        if not warm:
            return train.launch(toy_loop, cfg, name="toy-resume", run_dir=tmp_path, num_workers=2)
        with warm_pool():
            return train.launch(toy_loop, cfg, name="toy-resume", run_dir=tmp_path, num_workers=2)

    with pytest.raises(train.TrainError, match="simulated interruption at step 10"):
        launch(first_warm)
    assert not flag.exists()
    run = launch(not first_warm)
    assert [m["restored_from"] for m in run.metrics] == [0] * 10 + [10] * 10
    _, ref_state = reference(cfg)
    assert max(float((run.state[k] - ref_state[k]).abs().max()) for k in ref_state) < 1e-6
    ckpts = sorted(p.name for p in run.checkpoint_dir.parent.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert run.checkpoint_dir.name == ckpts[-1], "the final checkpoint is the newest of either path's"


def one_rank_fails(config: dict) -> None:
    """Rank 1 raises while rank 0 waits for it in a collective. With `late`, rank 1 first leaves the gloo
    group and reports its error seconds after rank 0's "connection closed by peer" has reached the driver."""
    if train.rank() == 1:
        if config["late"]:
            import torch.distributed as dist

            dist.destroy_process_group()
            time.sleep(3)
        raise RuntimeError("rank 1 gives up")
    train.all_mean(1.0)


@pytest.mark.parametrize("late", [False, True], ids=["together", "peer-error-first"])
def test_failed_rank_stops_the_launch_and_the_pool_recovers(ray_cluster, tmp_path, late):
    """A TrainError naming the failing rank's own error (not its peer's lost connection), not a hang; its
    actors are replaced and the next launch runs."""
    cfg = {**BASE, "steps": 4, "ckpt_every": 2}
    with warm_pool() as pool:
        t0 = time.perf_counter()
        with pytest.raises(train.TrainError, match="rank 1 gives up"):
            train.launch(one_rank_fails, {"late": late}, name="toy-fail", run_dir=tmp_path, num_workers=2)
        assert time.perf_counter() - t0 < 120 and pool.actors == []
        run = train.launch(toy_loop, cfg, name="toy-after", run_dir=tmp_path, num_workers=2)
        assert run.warm and [m["step"] for m in run.metrics] == [1, 2, 3, 4]
        ray.kill(pool.actors[1])  # an idle actor dies (e.g. Ray's memory monitor): the next launch replaces it
        run = train.launch(toy_loop, cfg, name="toy-after-kill", run_dir=tmp_path, num_workers=2)
        assert run.warm and [m["step"] for m in run.metrics] == [1, 2, 3, 4] and len(pool.actors) == 2
