"""A warm worker group: long-lived Ray actors that run the per-worker loops of one driver's launches.

Ray Train starts a new worker group for every launch: a controller actor, a placement group, fresh worker
processes that import torch and the stage's code, a gloo group, then a shutdown. For a smoke-sized stage
that is ~10 s around a loop of under a second, paid again by every stage. Inside `with warm_pool():`
(pipelines.full opens one for its chain of training stages) `orchestrator.train.launch` runs the same loop
on actors of this node instead, started once: imports and process start are paid by the first launch only.

The loop code does not change: `rank`, `world_size`, `prepare`, `report`, `restore` and `progress` work
the same on both paths; checkpoints go to the same folder (`<run_dir>/ray_train/<name>/`, safetensors +
JSON), so either path resumes the other's run. Idle actors hold no CPU (a sweep between two training
stages gets every core); a launch reserves its workers' CPUs on this node with a placement group while it
runs, as Ray Train does. A launch with Ray Data inputs, or asking more CPUs than this node has, goes to
Ray Train. A failed launch kills its actors (a rank may be stuck in a collective); the next starts new ones.
"""
from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


COLLECT_PEERS_S = 10.0  # how long a failed launch waits for the other ranks' errors before killing them


def _in_collective(e: Exception) -> bool:
    """Whether a rank failed inside a torch.distributed collective, i.e. because a peer went away."""
    return "torch/distributed/" in str(e) or "gloo" in str(e)


@ray.remote(num_cpus=0)
class WarmWorker:
    """One rank of the warm group: runs `orchestrator.train`'s per-worker entry for each launch it is given."""

    def __init__(self):
        import torch

        # A fresh Ray Train worker starts from torch's default generator state; so does every launch here.
        self.rng = torch.get_rng_state()

    def free_port(self) -> int:
        with contextlib.closing(socket.socket()) as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def pid(self) -> int:
        import os

        return os.getpid()

    def run(self, loop: Callable, where: dict, config: dict, rank: int, world_size: int, init_method: str | None):
        import torch

        from orchestrator import train

        torch.set_rng_state(self.rng)
        return train.run_warm(loop, where, config, rank, world_size, init_method)


class WarmPool:
    """The warm actors of this driver's node, grown on demand to the most workers a launch asked for."""

    def __init__(self, log: Callable[[str], None] = print):
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == self.node_id)
        self.ip = node["NodeManagerAddress"]
        self.cpus = node["Resources"].get("CPU", 0.0)
        self.actors: list = []
        self.log = log
        self.launches = 0

    def fits(self, num_workers: int, cpus_per_worker: float, datasets: dict | None) -> bool:
        """Whether this pool can run a launch (no Ray Data inputs, and its CPUs exist on this node)."""
        return not datasets and num_workers * cpus_per_worker <= self.cpus

    def _grow(self, n: int) -> None:
        # An idle actor may have died since the last launch (e.g. Ray's memory monitor killed it): replace it.
        dead = []
        for a in self.actors:
            try:
                ray.get(a.pid.remote(), timeout=60)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                dead.append(a)
        if dead:
            self.log(f"warm worker group: replacing {len(dead)} actor(s) that died while idle")
            self.drop(dead)
        where = NodeAffinitySchedulingStrategy(self.node_id, soft=False)
        while len(self.actors) < n:
            self.actors.append(WarmWorker.options(scheduling_strategy=where).remote())

    def pids(self) -> list[int]:
        """The actors' process ids (a warm group keeps them from launch to launch)."""
        return ray.get([a.pid.remote() for a in self.actors])

    def run(self, loop: Callable, where: dict, config: dict, num_workers: int, cpus_per_worker: float,
            start_timeout_s: float) -> list:
        """Every rank's return value; raises TimeoutError when the CPUs cannot be reserved in time, and the
        failing rank's error (its actors killed) when the loop fails."""
        self._grow(num_workers)
        actors = self.actors[:num_workers]
        # The CPUs this launch uses, reserved on the actors' node for as long as it runs.
        pg = placement_group([{"CPU": cpus_per_worker, f"node:{self.ip}": 0.001}] * num_workers, strategy="PACK")
        try:
            ready, _ = ray.wait([pg.ready()], timeout=start_timeout_s)
            if not ready:
                raise TimeoutError("worker group startup timed out")
            init = f"tcp://{self.ip}:{ray.get(actors[0].free_port.remote())}" if num_workers > 1 else None
            refs = [a.run.remote(loop, where, config, r, num_workers, init) for r, a in enumerate(actors)]
            out, pending = {}, list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    out[done[0]] = ray.get(done[0])
                except Exception as first:
                    raise self._root_cause(first, pending, actors) from None
            self.launches += 1
            return [out[r] for r in refs]
        finally:
            remove_placement_group(pg)

    def _root_cause(self, first: Exception, pending: list, actors: list) -> Exception:
        """The error that says why a launch failed. When one rank raises, its peers fail inside a collective
        ("connection closed by peer"), and either error may arrive first: the peers get a few seconds to
        report, then every actor is killed (a rank may wait in a collective for ever), and the first error
        raised outside torch.distributed wins."""
        errors = [first]
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=COLLECT_PEERS_S) if pending else ([], [])
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - collected to choose the root cause
                errors.append(e)
        self.drop(actors)
        for ref in pending:  # collected, so Ray does not print their errors as unhandled
            if ref not in ready:
                with contextlib.suppress(Exception):
                    ray.get(ref, timeout=10)
        own = [e for e in errors if not _in_collective(e)]
        return (own or errors)[0]

    def drop(self, actors: list) -> None:
        for a in actors:
            ray.kill(a)
        self.actors = [a for a in self.actors if a not in actors]

    def close(self) -> None:
        self.drop(list(self.actors))


_pool: WarmPool | None = None


def active() -> WarmPool | None:
    """The warm pool of this process, when a `warm_pool()` block is open."""
    return _pool


@contextlib.contextmanager
def warm_pool(log: Callable[[str], None] = print) -> Iterator[WarmPool]:
    """Run this block's launches on one warm worker group (Ray must be connected); its actors stop at the end."""
    global _pool
    if _pool is not None:  # nested: the outer block's pool serves
        yield _pool
        return
    _pool = WarmPool(log)
    t0 = time.perf_counter()
    try:
        yield _pool
    finally:
        pool, _pool = _pool, None
        actors = len(pool.actors)
        pool.close()
        log(f"warm worker group: {pool.launches} launch(es) on {actors} actor(s) in {time.perf_counter() - t0:.1f}s")
