"""The expert farm: a few named Ray actors, each training whole shards of experts at once.

`train_shard` is plain torch (no Ray) so tests and benchmarks call it directly; `FarmWorker` is the
thin actor around it; `run_farm` is the driver: it plans shards, skips the ones the store already
holds intact, feeds the actors, writes each finished shard atomically and shows progress.
"""
from __future__ import annotations


import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import ray
import torch
from tqdm.auto import tqdm

from models.expert_training import evaluate_experts, step_flops, train_experts
from models.task_net import TaskNetSpec, WeightLayout, init_weights
from orchestrator.storage.store import StoreError, WeightStore
from orchestrator.storage.suite_features import SuiteFeatures, task_batch


@dataclass(frozen=True)
class ShardSpec:
    """One unit of farm work: (task row, seed) pairs trained together."""

    shard_id: str
    members: tuple[tuple[int, int], ...]


class FarmError(RuntimeError):
    """The farm cannot start (e.g. a bad init_from file); the message says what to fix."""


def config_hash(cfg, features_id: str = "") -> str:
    """Hash of what decides the trained weights: the experts config's result fields (its runtime fields,
    where and how fast experts train, left out; shard layout counts, as it fixes shard ids and
    minibatch streams) and the features they train on. An init_from file counts by its bytes, so
    replacing the file, or rebuilding the features with another suite, is a new config, never a silent mix.
    """
    from pipelines.core.config import result_values

    keep = result_values(cfg)
    keep["features"] = features_id
    if cfg.init_from:
        with open(cfg.init_from, "rb") as f:
            keep["init_from"] = hashlib.file_digest(f, "sha256").hexdigest()
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def task_net_spec(data: SuiteFeatures, cfg) -> TaskNetSpec:
    """The task network the farm trains on these features with this experts config (the one derivation;
    later stages read it back from the store's manifest)."""
    return TaskNetSpec(d_img=data.d_img, hidden=cfg.hidden, d_txt=data.d_txt, logit_scale=cfg.logit_scale)


def plan_shards(tasks: pd.DataFrame, cfg, chash: str) -> list[ShardSpec]:
    """Deterministic shards of experts sorted by support size, cut at `shard_size` experts or when the
    padded work (experts x largest support set) would pass `shard_samples`: big tasks go in small
    shards, so padding wastes little and resident features stay cache-friendly."""
    sizes = tasks["support_images"].map(len).to_numpy()
    order = sorted(range(len(tasks)), key=lambda i: (sizes[i], tasks["id"].iat[i]))
    members = [(i, s) for i in order for s in range(cfg.seeds_per_task)]
    chunks: list[list[tuple[int, int]]] = [[]]
    for m in members:
        c = chunks[-1]
        if c and (len(c) >= cfg.shard_size or (len(c) + 1) * sizes[m[0]] > cfg.shard_samples):
            chunks.append(c := [])
        c.append(m)
    shards = []
    for k, chunk in enumerate(chunks):
        key = chash + "|" + ";".join(f"{tasks['id'].iat[i]}:{s}" for i, s in chunk)
        shards.append(ShardSpec(f"shard-{k:05d}-{hashlib.sha256(key.encode()).hexdigest()[:8]}", tuple(chunk)))
    return shards


def load_base(path: str, layout: WeightLayout) -> torch.Tensor:
    """The flat 'w' [P] of a safetensors file, checked against the layout."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as e:
        raise FarmError(f"init_from {path}: not a readable safetensors file ({e})") from None
    if "w" not in tensors or tensors["w"].shape != (layout.size,):
        got = tuple(tensors["w"].shape) if "w" in tensors else f"no 'w' among {sorted(tensors)}"
        raise FarmError(f"init_from {path}: needs a flat tensor 'w' of shape ({layout.size},) for layout {layout.id}, got {got}")
    return tensors["w"].float()


def start_weights(layout: WeightLayout, cfg, members, task_ids: list[str]) -> torch.Tensor:
    """w0 [E, P]: one shared init (a seed or a base file, so experts stay aligned) or one init per expert."""
    if cfg.init_from:
        return load_base(cfg.init_from, layout).expand(len(members), -1).contiguous()
    if cfg.init == "shared":
        return init_weights(layout.spec, cfg.init_seed).expand(len(members), -1).contiguous()
    seeds = [int(hashlib.sha256(f"{cfg.init_seed}:{task_ids[i]}:{s}".encode()).hexdigest()[:8], 16) for i, s in members]
    return torch.stack([init_weights(layout.spec, s) for s in seeds])


def feature_tensors(data: SuiteFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, text) features as tensors; copied once, since arrays from Ray's object store are read-only."""
    return torch.tensor(data.image_feats), torch.tensor(data.text_feats)


def train_shard(data: SuiteFeatures, shard: ShardSpec, cfg, tensors=None) -> dict:
    """Train one shard's experts; returns weights [R, P] (R = experts x checkpoints) and their metadata rows."""
    t0 = time.perf_counter()
    spec = task_net_spec(data, cfg)
    layout = WeightLayout(spec)
    rows = [data.tasks.iloc[i] for i, _ in shard.members]
    feats, text = tensors if tensors is not None else feature_tensors(data)
    batch = task_batch(rows, text)
    w0 = start_weights(layout, cfg, shard.members, list(data.tasks["id"]))
    gen = torch.Generator().manual_seed(int(shard.shard_id.rsplit("-", 1)[1], 16) ^ cfg.seed)
    out_w, meta = [], []
    for step, w in train_experts(layout, feats, batch, w0, cfg.steps, cfg.lr, cfg.checkpoint_every, cfg.sample_fraction, gen):
        s_acc, s_loss = evaluate_experts(layout, feats, w, batch.prompts, batch.answer_mask, batch.support_idx, batch.support_lab, batch.support_n)
        q_acc, q_loss = evaluate_experts(layout, feats, w, batch.prompts, batch.answer_mask, batch.query_idx, batch.query_lab, batch.query_n)
        out_w.append(w.numpy())
        for e, ((_, seed), r) in enumerate(zip(shard.members, rows)):
            meta.append(dict(
                task_id=r.id, description=r.description, split=r.split, seed=seed, step=step,
                final=step == cfg.steps, layout_id=layout.id,
                support_acc=float(s_acc[e]), support_loss=float(s_loss[e]),
                query_acc=float(q_acc[e]), query_loss=float(q_loss[e]),
            ))
    a = int(batch.answer_mask.shape[1])
    flops = cfg.steps * batch.n * step_flops(spec.d_img, spec.hidden, spec.d_txt, int(batch.support_idx.shape[1]), a)
    return dict(shard_id=shard.shard_id, w=np.concatenate(out_w), meta=meta, seconds=time.perf_counter() - t0, flops=flops)


@ray.remote
class FarmWorker:
    """A named farm actor: holds the suite's features once and trains whole shards on request."""

    def __init__(self, data: SuiteFeatures, cfg, threads: int):
        torch.set_num_threads(threads)
        self.data, self.cfg = data, cfg
        self.tensors = feature_tensors(data)
        from ray.util import metrics

        self.done = metrics.Counter("farm_experts_trained", description="experts trained by this actor")
        self.rate = metrics.Gauge("farm_experts_per_second", description="experts/s of the last shard")
        self.secs = metrics.Histogram(
            "farm_shard_seconds", description="seconds per shard", boundaries=[1, 5, 15, 30, 60, 120, 300, 600]
        )

    def train(self, shard: ShardSpec) -> dict:
        out = train_shard(self.data, shard, self.cfg, self.tensors)
        out["node"] = ray.get_runtime_context().get_node_id()  # so the driver can say which nodes did the work
        self.done.inc(len(shard.members))
        self.rate.set(len(shard.members) / out["seconds"])
        self.secs.observe(out["seconds"])
        return out


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

    @property
    def gflops(self) -> float:
        return self.flops / max(self.seconds, 1e-9) / 1e9


MAX_SHARD_ATTEMPTS = 3
PLACEMENT_TIMEOUT_S = 300.0  # how long the farm waits for a replacement actor when no live actor is left
# What a lost actor or node looks like from the driver; a shard that hit one is trained again elsewhere.
LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
        ray.exceptions.ObjectLostError, ray.exceptions.OutOfMemoryError)


def _alive(worker, timeout: float = 30) -> bool:
    """Whether an actor still answers (a killed one, or one on a dead node, raises at once)."""
    try:
        ray.get(worker.__ray_ready__.remote(), timeout=timeout)
        return True
    except Exception:
        return False


def run_farm(data: SuiteFeatures, cfg, store: WeightStore, progress: bool = True, log=print) -> FarmSummary:
    """Train every (task, seed) expert not yet intact in the store, shard by shard, on Ray actors.

    Faults: a shard whose actor (or node) dies goes back to the queue for any live actor; the dead
    actor is replaced, and the replacement gets work only once it is running, so a node that never
    comes back cannot strand a shard. Only the driver writes the store, one whole shard at a time.
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
    store.set_info(config_hash=chash, layout_id=layout.id, n_weights=layout.size, spec=asdict(layout.spec))
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
    summary = FarmSummary(0, 0, len(shards) - len(todo), redone, 0.0, 0.0, 0.0)
    if not todo:
        return summary
    wanted = cfg.num_actors or int(ray.cluster_resources().get("CPU", 1) // cfg.cpus_per_actor)
    n_actors = max(1, min(wanted, len(todo)))
    log(f"farm: {n_actors} actor(s) x {cfg.cpus_per_actor} CPU")
    data_ref = ray.put(data)
    generation = [0] * n_actors

    def new_worker(i: int):
        # No Ray-side restarts: the driver replaces a dead actor itself and resubmits its shards.
        name = f"farm-worker-{i}" + (f"-r{generation[i]}" if generation[i] else "")
        return FarmWorker.options(name=name, num_cpus=cfg.cpus_per_actor).remote(data_ref, cfg, cfg.cpus_per_actor)

    workers = [new_worker(i) for i in range(n_actors)]
    queue = list(reversed(todo))
    pending: dict = {}  # train ref -> (actor slot, the actor, shard)
    starting: dict = {}  # ready probe of a replacement actor -> actor slot
    attempts: dict[str, int] = {}

    def submit(i: int) -> None:
        if queue:
            shard = queue.pop()
            pending[workers[i].train.remote(shard)] = (i, workers[i], shard)

    def replace(i: int) -> None:
        ray.kill(workers[i])  # make sure it is gone (it may be half dead, e.g. unreachable)
        generation[i] += 1
        workers[i] = new_worker(i)
        starting[workers[i].__ray_ready__.remote()] = i

    for i in range(n_actors):  # two shards in flight per actor: the next one is ready when one finishes
        submit(i)
        submit(i)
    bar = tqdm(total=sum(len(s.members) for s in todo), unit="expert", desc="expert farm", disable=not progress, smoothing=0.1)
    try:
        while pending or (queue and starting):
            # with no shard in flight, only replacements are left to wait for: bound that wait
            done, _ = ray.wait(list(pending) + list(starting), num_returns=1,
                               timeout=None if pending else PLACEMENT_TIMEOUT_S)
            if not done:
                raise FarmError(
                    f"no farm actor could be placed for {PLACEMENT_TIMEOUT_S:.0f}s after losing the others; "
                    "check `ray status` for nodes with free CPUs (or lower experts.cpus_per_actor), then rerun: "
                    "finished shards are kept"
                )
            ref = done[0]
            if ref in starting:
                i = starting.pop(ref)
                try:
                    ray.get(ref)
                except LOST:
                    replace(i)  # died while starting (e.g. its node went too); the queue waits for it or others
                    continue
                submit(i)
                submit(i)
                continue
            i, actor, shard = pending.pop(ref)
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
            store.write_shard(out["shard_id"], pd.DataFrame(out["meta"]).assign(config_hash=chash), out["w"], {"seconds": out["seconds"]})
            n = len({(m["task_id"], m["seed"]) for m in out["meta"]})
            summary.experts_trained += n
            summary.shards_trained += 1
            summary.train_seconds += out["seconds"]
            summary.flops += out["flops"]
            summary.nodes[out["node"]] = summary.nodes.get(out["node"], 0) + n
            bar.update(n)
            if workers[i] is actor:
                submit(i)
    finally:
        bar.close()
        for w in workers:
            ray.kill(w)
    summary.seconds = time.perf_counter() - t0
    return summary
