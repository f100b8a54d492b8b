"""The expert farm: a few named Ray actors, each training whole shards of experts at once.

Shards and `train_shard` (plain torch) live in `orchestrator.shards`; `FarmWorker` is the
thin actor around it, which writes each shard it trains straight to the store; `run_farm` is the driver:
it plans shards, skips the ones the store already holds intact, feeds the actors, commits each finished
shard to the manifest and shows progress. Weights never pass through the driver.
"""
from __future__ import annotations


import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import ray
import torch

from models.expert_training import LossCurve
from models.task_net import WeightLayout
from orchestrator import metrics
from orchestrator.shards import (  # re-exported: callers import the farm's planning from here too
    FarmError, ShardSpec, config_hash, feature_tensors, load_base, plan_shards, task_net_spec, train_shard,
    untrainable_tasks,
)
from orchestrator.progress import Progress, Reporter, new_hub
from orchestrator.storage import remote
from orchestrator.storage.store import StoreError, WeightStore
from orchestrator.storage.suite_features import SuiteFeatures


@ray.remote
class FarmWorker:
    """A named farm actor: holds the suite's features once and trains whole shards on request, telling the
    driver's progress hub its step within the shard (orchestrator.progress). It writes each shard's file to
    the store itself and returns only small metadata; the driver commits it."""

    def __init__(self, data: SuiteFeatures, cfg, threads: int, store_root: str, chash: str, hub=None,
                 mirrors: dict | None = None):
        torch.set_num_threads(threads)
        remote.install(mirrors or {})  # a run on object storage: each shard file is put there once written
        self.data, self.cfg = data, cfg
        self.store, self.chash = WeightStore(Path(store_root)), chash
        self.tensors = feature_tensors(data)
        self.report = Reporter(hub)

    def node(self) -> str:
        """The Ray node id this actor runs on (also the driver's "it is running" probe)."""
        return ray.get_runtime_context().get_node_id()

    def train(self, shard: ShardSpec) -> dict:
        steps = self.cfg.steps
        out = train_shard(self.data, shard, self.cfg, self.tensors,
                          on_step=lambda step: self.report(shard.shard_id, step, steps))
        meta = pd.DataFrame(out["meta"]).assign(config_hash=self.chash)
        written = self.store.write_shard_file(shard.shard_id, meta, out["w"])
        return dict(shard_id=shard.shard_id, written=written, experts=len(shard.members), seconds=out["seconds"],
                    flops=out["flops"], curve=out["curve"],  # curve: ~100 (step, loss sum, count) points a shard
                    node=ray.get_runtime_context().get_node_id())  # node: who did the work


@dataclass
class FarmSummary:
    """What one farm run did."""

    experts_trained: int
    shards_trained: int
    shards_skipped: int
    shards_redone: list[str]
    seconds: float
    train_seconds: float
    flops: float
    nodes: dict[str, int] = field(default_factory=dict)  # Ray node id -> experts trained there
    tasks_skipped: int = 0  # tasks left out: no support or no query examples (listed in the store's manifest)
    first_eta_seconds: float | None = None  # from the farm's start to the first progress update with an ETA
    result_bytes: int = 0  # what the actors' results weighed in the driver (metadata only: weights stay in the store)
    curve: LossCurve = field(default_factory=lambda: LossCurve(1))  # mean support loss per step of the experts trained now

    @property
    def gflops(self) -> float:
        return self.flops / max(self.seconds, 1e-9) / 1e9


MAX_SHARD_ATTEMPTS = 3
POLL_S = 1.0  # how often the driver asks the progress hub where the actors are
PLACEMENT_TIMEOUT_S = 300.0  # how long the farm waits for an actor to be placed (an autoscaler may add a node)
# What a lost actor or node looks like from the driver; a shard that hit one is trained again elsewhere.
LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
        ray.exceptions.ObjectLostError, ray.exceptions.OutOfMemoryError)


def placed(worker) -> bool:
    """Whether Ray has given an actor a worker process on some node (it may still be starting there)."""
    import ray._private.state as gcs  # the GCS actor table; the public state API needs the dashboard

    try:
        return int(gcs.actors(worker._actor_id.hex()).get("Pid") or 0) > 0
    except Exception:  # noqa: BLE001 - unknown: treat as placed, i.e. keep waiting rather than drop it
        return True


def _alive(worker, timeout: float = 30) -> bool:
    """Whether an actor still answers (a killed one, or one on a dead node, raises at once)."""
    try:
        ray.get(worker.__ray_ready__.remote(), timeout=timeout)
        return True
    except Exception:
        return False


def run_farm(data: SuiteFeatures, cfg, store: WeightStore, progress: bool = True, log=print,
             placement_timeout: float = PLACEMENT_TIMEOUT_S) -> FarmSummary:
    """Train every (task, seed) expert not yet intact in the store, shard by shard, on Ray actors.

    Faults: a shard whose actor (or node) dies goes back to the queue for any live actor; the dead
    actor is replaced, and the replacement gets work only once it is running, so a node that never
    comes back cannot strand a shard. Actors write shard files; only the driver commits them to the manifest.
    Waits are bounded: an actor not placed within `placement_timeout` seconds is dropped (the others
    go on), and when none can be placed the farm stops with what it asked for and what the cluster has.
    """
    chash = config_hash(cfg, data.info.get("config_hash", ""))
    layout = WeightLayout(task_net_spec(data, cfg))
    old = store.manifest()
    if old["shards"] and old.get("config_hash") not in (None, chash):
        raise StoreError(
            f"{store.root} holds experts trained with another config (hash {old.get('config_hash')}, now {chash}); "
            "use a new --run-dir or delete the store"
        )
    if cfg.init_from:
        load_base(cfg.init_from, layout)  # fail here, clearly, not inside every actor
    skipped = untrainable_tasks(data.tasks)
    if skipped:
        shown = ", ".join(f"{t!r} ({why})" for t, why in list(skipped.items())[:5])
        log(f"farm: warning: {len(skipped)} task(s) left out, no expert can be trained and scored on them: {shown}"
            + (" ..." if len(skipped) > 5 else ""))
    store.set_info(config_hash=chash, layout_id=layout.id, n_weights=layout.size, spec=asdict(layout.spec),
                   skipped_tasks=skipped)
    shards = plan_shards(data.tasks, cfg, chash)
    todo, redone = [], []
    for s in shards:  # set_info changed only store-wide keys, so `old` still lists the shards
        why = store.verify_shard(s.shard_id, old)
        if why is not None:
            todo.append(s)
            if why != "not in manifest":
                redone.append(s.shard_id)
                log(f"farm: retraining {s.shard_id}: {why}")
    log(f"farm: {len(shards)} shards ({sum(len(s.members) for s in shards)} experts); "
        f"{len(shards) - len(todo)} already in the store, {len(todo)} to train")
    t0 = time.perf_counter()
    summary = FarmSummary(0, 0, len(shards) - len(todo), redone, 0.0, 0.0, 0.0, tasks_skipped=len(skipped))
    if not todo:
        return summary
    cluster_cpus = ray.cluster_resources().get("CPU", 0)
    wanted = cfg.num_actors or int(cluster_cpus // cfg.cpus_per_actor)
    n_actors = max(1, min(wanted, len(todo)))
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
    log(f"farm: {n_actors} actor(s) x {cfg.cpus_per_actor} CPU (the cluster has {cluster_cpus:g} CPU, "
        f"{largest:g} on its largest node)")
    if cfg.cpus_per_actor > largest:
        log(f"farm: no node has {cfg.cpus_per_actor} CPUs now; waiting up to {placement_timeout:g}s for one "
            "(an autoscaling cluster may add it)")
    data_ref = ray.put(data)
    generation = [0] * n_actors
    hub = new_hub()
    run = Path(store.root).parent.parent.name  # <run_dir>/store/weights
    driver = metrics.tags("driver", metrics.this_node(), "experts", run)
    names = [""] * n_actors  # the actor in each slot, as named in Ray and in the metrics
    node_of = [""] * n_actors  # the node the slot's actor runs on, once it is running

    def new_worker(i: int):
        # No Ray-side restarts: the driver replaces a dead actor itself and resubmits its shards.
        names[i] = f"farm-worker-{i}" + (f"-r{generation[i]}" if generation[i] else "")
        return FarmWorker.options(name=names[i], num_cpus=cfg.cpus_per_actor).remote(
            data_ref, cfg, cfg.cpus_per_actor, str(Path(store.root).resolve()), chash, hub, remote.snapshot())

    workers = [new_worker(i) for i in range(n_actors)]
    queue = list(reversed(todo))
    pending: dict = {}  # train ref -> (actor slot, the actor, shard, the actor's name)
    # Ready probe of an actor not yet running -> (slot, when it was asked for). Shards go only to running
    # actors: one that cannot be placed must not hold any.
    starting: dict = {w.node.remote(): (i, time.monotonic()) for i, w in enumerate(workers)}
    attempts: dict[str, int] = {}
    dropped: set[int] = set()  # slots whose actor could not be placed

    def submit(i: int) -> None:
        if queue:
            shard = queue.pop()
            pending[workers[i].train.remote(shard)] = (i, workers[i], shard, names[i])

    def replace(i: int) -> None:
        ray.kill(workers[i])  # make sure it is gone (it may be half dead, e.g. unreachable)
        generation[i] += 1
        metrics.gauge("farm_actor_restarts", generation[i], keep=True, **metrics.tags(f"farm-worker-{i}", node_of[i], "experts", run))
        workers[i] = new_worker(i)
        starting[workers[i].node.remote()] = (i, time.monotonic())

    def give_up_on_unplaced() -> None:
        """Drop actors not placed on a node within the placement timeout; fail when none is left to do the work."""
        now = time.monotonic()
        late = [ref for ref, (i, asked) in starting.items() if now - asked >= placement_timeout and not placed(workers[i])]
        if not late:
            return
        running = n_actors - len(starting)
        if running == 0 and not pending and len(late) == len(starting):
            raise FarmError(
                f"no farm actor could be placed within {placement_timeout:g}s: each asks for {cfg.cpus_per_actor} CPU, "
                f"the cluster has {ray.cluster_resources().get('CPU', 0):g} CPU ({largest:g} on its largest node); "
                "lower experts.cpus_per_actor or experts.num_actors, or add nodes, then rerun (finished shards are kept)"
            )
        if running == 0:
            return  # others are placed and still starting: they will take the work
        for ref in late:
            i, _ = starting.pop(ref)
            ray.kill(workers[i])
            dropped.add(i)
        log(f"farm: {len(late)} of {n_actors} actor(s) could not be placed within {placement_timeout:g}s "
            f"(each asks for {cfg.cpus_per_actor} CPU); going on with the other {n_actors - len(dropped)}")

    bar = Progress(sum(len(s.members) for s in todo), "expert farm", "expert", progress, log,
                   on_eta=lambda eta: metrics.gauge("farm_eta_seconds", eta, keep=True, **driver))
    poll: dict = {"ref": None, "at": 0.0, "steps": {}}  # the hub's answer in flight, when asked, the latest answer

    def show_progress() -> None:
        """Finished experts plus the in-flight shards' share of their steps (as the actors last reported them).
        The hub is asked at most every POLL_S and never waited for: the farm loop must not stall on it."""
        if poll["ref"] is not None and ray.wait([poll["ref"]], timeout=0)[0]:
            try:
                poll["steps"] = ray.get(poll["ref"])
            except LOST:
                pass
            poll["ref"] = None
        if poll["ref"] is None and time.monotonic() - poll["at"] >= POLL_S:
            in_flight = [sh.shard_id for _, _, sh, _ in pending.values()]
            poll["ref"], poll["at"] = hub.snapshot.remote(in_flight), time.monotonic()
        steps = poll["steps"]
        partial = sum(len(sh.members) * steps[sh.shard_id][0] / max(steps[sh.shard_id][1], 1)
                      for _, _, sh, _ in pending.values() if sh.shard_id in steps)
        bar.update_to(summary.experts_trained + partial)

    try:
        while pending or (queue and starting):
            timeout = POLL_S
            if starting:  # wake up when the oldest waiting actor reaches the placement timeout
                oldest = min(asked for _, asked in starting.values())
                timeout = min(timeout, max(0.0, oldest + placement_timeout - time.monotonic()))
            done, _ = ray.wait(list(pending) + list(starting), num_returns=1, timeout=timeout)
            show_progress()
            if not done:
                give_up_on_unplaced()
                continue
            ref = done[0]
            if ref in starting:
                i, _ = starting.pop(ref)
                try:
                    node_of[i] = ray.get(ref)
                except LOST:
                    replace(i)  # died while starting (e.g. its node went too); the queue waits for it or others
                    continue
                metrics.gauge("farm_actor_restarts", generation[i], keep=True, **metrics.tags(f"farm-worker-{i}", node_of[i], "experts", run))
                submit(i)
                submit(i)  # two shards in flight per actor: the next one is ready when one finishes
                continue
            i, actor, shard, name = pending.pop(ref)
            try:
                out = ray.get(ref)
            except LOST as e:
                attempts[shard.shard_id] = attempts.get(shard.shard_id, 0) + 1
                if attempts[shard.shard_id] > MAX_SHARD_ATTEMPTS:
                    raise RuntimeError(f"shard {shard.shard_id} failed {MAX_SHARD_ATTEMPTS} times; last error: {e}") from e
                queue.append(shard)  # any live actor takes it next
                if workers[i] is actor and not _alive(actor):
                    log(f"farm: actor slot {i} died on {shard.shard_id} ({type(e).__name__}); replacing it, the shard goes back to the queue")
                    replace(i)
                else:
                    log(f"farm: {shard.shard_id} lost ({type(e).__name__}); back in the queue")
                    if workers[i] is actor:
                        submit(i)
                continue
            store.commit_shard(out["shard_id"], out["written"], {"seconds": out["seconds"]})
            n = out["experts"]
            summary.result_bytes += len(pickle.dumps(out))
            summary.experts_trained += n
            summary.shards_trained += 1
            summary.train_seconds += out["seconds"]
            summary.flops += out["flops"]
            summary.curve.merge(out.get("curve", {}))
            summary.nodes[out["node"]] = summary.nodes.get(out["node"], 0) + n
            # recorded here, once the shard is in the store: the counts equal the store's, and outlive the actors
            where = metrics.tags(name, out["node"], "experts", run)
            metrics.inc("farm_experts_trained", n, **where)
            metrics.gauge("farm_experts_per_second", n / max(out["seconds"], 1e-9), keep=True, **where)
            metrics.observe("farm_shard_seconds", out["seconds"], **where)
            metrics.inc("farm_busy_seconds", out["seconds"], **where)
            show_progress()
            if workers[i] is actor:
                submit(i)
    finally:
        bar.close()
        for w in [*workers, hub]:
            ray.kill(w)
    summary.seconds = time.perf_counter() - t0
    metrics.gauge("farm_eta_seconds", 0.0, keep=True, **driver)
    summary.first_eta_seconds = bar.first_eta_s
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    log("farm: experts per node: " + ", ".join(f"{metrics.short_node(k)} ({ips.get(k, '?')}) {v}" for k, v in summary.nodes.items())
        + (f"; first ETA after {bar.first_eta_s:.1f}s" if bar.first_eta_s is not None else ""))
    return summary

