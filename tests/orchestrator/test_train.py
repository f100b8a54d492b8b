"""orchestrator.train on a real local Ray: DDP curves match one worker, checkpoints are safetensors + JSON, resume.

The toy below is the pattern later stages follow: a pure `train_step` that knows nothing of Ray,
wrapped by a short `toy_loop` built from the orchestrator.train helpers.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from orchestrator import train

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# pytest imports this file as a top-level module (`test_train`) that Ray workers cannot import, so
# ship the loop and its helpers by value. Loops in installed packages (pipelines/) need nothing of this.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

N, D, H = 64, 8, 32  # global batch rows, input width, hidden width
LOSS_RTOL = 1e-5  # 1 vs 2 workers, max relative loss difference over 30 steps (measured: see the report)
BASE = {"seed": 0, "lr": 0.05, "momentum": 0.9}


# ----------------------------------------------------------------------------- the toy (no Ray here)


def toy_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed regression data: y = sin(x @ w) + noise, x (N, D), y (N, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    w = torch.randn(D, 1, generator=g)
    return x, torch.sin(x @ w) + 0.1 * torch.randn(N, 1, generator=g)


def toy_model(seed: int) -> nn.Module:
    """A small MLP, initialised the same way on every worker."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, 1))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimiser step on the mean squared error of (x, y); returns that loss. Pure: knows nothing of Ray."""
    opt.zero_grad(set_to_none=True)
    loss = F.mse_loss(model(x), y)
    loss.backward()  # under DDP the gradient is averaged over workers: equal shards -> global-batch gradient
    opt.step()
    return loss.detach()


def pack(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Model weights plus SGD momentum buffers ("opt.<param>"), so a resumed run continues exactly."""
    state = dict(model.state_dict())
    for name, p in model.named_parameters():
        if "momentum_buffer" in opt.state.get(p, {}):
            state[f"opt.{name}"] = opt.state[p]["momentum_buffer"]
    return state


def unpack(state: dict[str, torch.Tensor], model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Inverse of `pack`."""
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("opt.")})
    for name, p in model.named_parameters():
        if f"opt.{name}" in state:
            opt.state[p]["momentum_buffer"] = state[f"opt.{name}"].clone()


def make(config: dict) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = toy_model(config["seed"])
    return model, torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"])


def reference(config: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same training in this process, one worker, no Ray: (losses, final packed state)."""
    x, y = toy_data(config["seed"])
    model, opt = make(config)
    losses = [float(train_step(model, opt, x, y)) for _ in range(config["steps"])]
    return losses, pack(model, opt)


# ----------------------------------------------------------------------------- the Ray Train loop


def toy_loop(config: dict) -> None:
    """train_loop_per_worker: restore, shard the global batch, step, report every step, checkpoint every few."""
    x, y = toy_data(config["seed"])
    model, opt = make(config)
    state, start = train.restore()
    if state is not None:
        unpack(state, model, opt)  # before prepare(): DDP then broadcasts these weights from rank 0
    start = start or 0
    model = train.prepare(model)
    rows = train.shard(N)  # this worker's equal share of the same global batch
    for step in range(start + 1, config["steps"] + 1):
        loss = train.all_mean(train_step(model, opt, x[rows], y[rows]))  # mean of equal-shard means = global mean
        save = step % config["ckpt_every"] == 0 or step == config["steps"]
        state = pack(train.unwrap(model), opt) if save else None
        train.report({"step": step, "loss": loss, "restored_from": start}, state, config)
        if step == config.get("crash_at"):
            crash_once(Path(config["crash_flag"]), step)


def crash_once(flag: Path, step: int) -> None:
    """Raise on every worker while `flag` exists; rank 0 removes it so the next attempt runs through."""
    crash = train.all_mean(flag.exists()) > 0  # a collective: every rank has looked before rank 0 unlinks
    if crash and train.rank() == 0:
        flag.unlink()
    if crash:
        raise RuntimeError(f"simulated interruption at step {step}")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def curves(ray_cluster, tmp_path_factory):
    """The same 30-step config trained with 1 and with 2 workers."""
    run_dir = tmp_path_factory.mktemp("train")
    cfg = {**BASE, "steps": 30, "ckpt_every": 10}
    runs = {}
    for n in (1, 2):
        runs[n] = train.launch(toy_loop, cfg, name=f"toy-{n}w", run_dir=run_dir, num_workers=n)
        print(f"\n[train] {n} worker(s): launch wall {runs[n].wall_s:.1f} s")
    return run_dir, cfg, runs


# ----------------------------------------------------------------------------- tests


def test_two_workers_match_one_worker(curves):
    _, cfg, runs = curves
    ref, _ = reference(cfg)
    l1, l2 = ([m["loss"] for m in runs[n].metrics] for n in (1, 2))
    assert [m["step"] for m in runs[2].metrics] == list(range(1, 31))
    rel = lambda a, b: max(abs(p - q) / abs(q) for p, q in zip(a, b))
    print(f"\n[train] max rel loss diff: 2w vs 1w {rel(l2, l1):.2e}, 1w vs in-process {rel(l1, ref):.2e}")
    assert rel(l2, l1) < LOSS_RTOL and rel(l1, ref) < LOSS_RTOL
    for losses in (l1, l2):
        assert losses[-1] < 0.5 * losses[0] and min(losses[-5:]) < min(losses[:5])
    w1, w2 = runs[1].state, runs[2].state
    dw = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print(f"[train] final weights 2w vs 1w: max abs diff {dw:.2e}")
    assert dw < 1e-5


def test_final_checkpoint_has_config_and_safetensors_state(curves):
    _, cfg, runs = curves
    run = runs[2]
    assert run.config == cfg
    ckpt = run.checkpoint_dir
    assert json.loads((ckpt / train.CONFIG_FILE).read_text()) == cfg
    saved = json.loads((ckpt / train.METRICS_FILE).read_text())
    assert saved["step"] == 30 and saved["history"] == run.metrics
    state = load_file(ckpt / train.STATE_FILE)
    assert set(state) == set(run.state) and all(torch.equal(state[k], run.state[k]) for k in state)
    model = toy_model(0)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("opt.")})  # keys carry no "module."
    x, y = toy_data(0)
    assert float(F.mse_loss(model(x), y)) < run.metrics[0]["loss"]


def test_checkpoints_hold_no_pickle(curves):
    run_dir, _, runs = curves
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".pkl", ".pickle", ".pt", ".pth", ".bin"}]
    for run in runs.values():
        ckpts = [d for d in run.checkpoint_dir.parent.iterdir() if d.is_dir() and d.name.startswith("checkpoint")]
        assert len(ckpts) == 2, "CheckpointConfig(num_to_keep=2)"
        for d in ckpts:
            names = sorted(p.name for p in d.rglob("*") if p.is_file())
            assert names == sorted([train.CONFIG_FILE, train.METRICS_FILE, train.STATE_FILE]), names


def test_relaunch_resumes_from_latest_checkpoint(ray_cluster, tmp_path):
    flag = tmp_path / "crash-once"
    flag.touch()
    cfg = {**BASE, "steps": 20, "ckpt_every": 5, "crash_at": 10, "crash_flag": str(flag)}
    t0 = time.perf_counter()
    with pytest.raises(train.TrainError, match="simulated interruption at step 10"):
        train.launch(toy_loop, cfg, name="toy-resume", run_dir=tmp_path, num_workers=2)
    t1 = time.perf_counter()
    assert not flag.exists()
    run = train.launch(toy_loop, cfg, name="toy-resume", run_dir=tmp_path, num_workers=2)
    print(f"\n[train] interrupted launch {t1 - t0:.1f} s, resumed launch {run.wall_s:.1f} s")
    assert [m["step"] for m in run.metrics] == list(range(1, 21))
    assert [m["restored_from"] for m in run.metrics] == [0] * 10 + [10] * 10
    ref_losses, ref_state = reference(cfg)
    diff = max(float((run.state[k] - ref_state[k]).abs().max()) for k in ref_state)
    print(f"[train] resumed 2-worker weights vs uninterrupted in-process run: max abs diff {diff:.2e}")
    assert set(run.state) == set(ref_state) and diff < 1e-6


def test_worker_failure_is_retried_within_one_launch(ray_cluster, tmp_path):
    flag = tmp_path / "crash-once"
    flag.touch()
    cfg = {**BASE, "steps": 20, "ckpt_every": 5, "crash_at": 10, "crash_flag": str(flag)}
    run = train.launch(toy_loop, cfg, name="toy-retry", run_dir=tmp_path, num_workers=1, max_failures=1)
    print(f"\n[train] launch with one in-run retry {run.wall_s:.1f} s")
    assert not flag.exists()
    assert [m["restored_from"] for m in run.metrics] == [0] * 10 + [10] * 10
    _, ref_state = reference(cfg)
    assert all(torch.equal(run.state[k], ref_state[k]) for k in ref_state), "1 worker: bit-exact"


def test_worker_group_that_cannot_be_placed_fails_after_the_timeout(ray_cluster, tmp_path):
    """8 CPUs per worker on a 2-CPU Ray: one TrainError with what was asked and what the cluster has, not a hang."""
    t0 = time.perf_counter()
    with pytest.raises(train.TrainError) as e:
        train.launch(toy_loop, {**BASE, "steps": 2}, name="toy-unplaceable", run_dir=tmp_path, num_workers=1,
                     cpus_per_worker=8, start_timeout_s=5)
    took = time.perf_counter() - t0
    assert took < 90, f"took {took:.0f}s"
    msg = str(e.value)
    assert "1 worker(s) x 8 CPU" in msg and "the cluster has 2 CPU" in msg and "num_workers" in msg, msg
