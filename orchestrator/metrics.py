"""The pipeline's Prometheus metrics, recorded with `ray.util.metrics` and exported by Ray's metrics agents.

A scrape shows each under Ray's names: a `ray_` prefix, counters also `_total`, histograms as `_bucket`,
`_sum` and `_count`. Every metric carries the labels `actor` (the farm actor or Ray Train worker that did
the work; `driver` for the driver's own estimates), `node` (the first 8 hex digits of the Ray node id
where that work ran), `stage` (`experts`, `generators`, ..., `fewshot`) and `run` (the run directory's
name); Ray adds `Component`, `NodeAddress` (the node that recorded the value), `SessionName`, `Version`,
`WorkerId` and `otel_scope_*`. The training metrics also carry `model` (which model: split, seed, method).

Ray records a histogram's observations by bucket and exports its `_sum` from the buckets' midpoints
(measured: 6 shards of 0.8-1.9 s gave a `_sum` of 10.5 s against 10.9 s measured), so the bucket
counts are exact and the `_sum` is not; `farm_busy_seconds` carries the exact total.

The farm's counts are recorded on the driver when it writes a shard to the store, so they agree with
the store exactly and outlive the actors that trained them. The training metrics are recorded inside
the training loop, on the Ray Train worker (`orchestrator.train.progress`).
"""
from __future__ import annotations

import threading
import time
from functools import cache

LABELS = ("actor", "node", "stage", "run")
TRAIN_LABELS = LABELS + ("model",)
SHARD_SECONDS_BOUNDARIES = [1, 5, 15, 30, 60, 120, 300, 600]

# name as recorded -> (type, unit, description); the scrape's names follow from Ray's rules (`exported`).
FARM = {
    "farm_experts_trained": ("counter", "experts", "experts trained and written to the store"),
    "farm_experts_per_second": ("gauge", "experts/s", "experts per second of the actor's last shard"),
    "farm_shard_seconds": ("histogram", "seconds", ("wall time of each shard on its actor, by bucket (Ray exports the "
                                                    "_sum from bucket midpoints: use farm_busy_seconds for exact totals)")),
    "farm_busy_seconds": ("counter", "seconds", ("seconds the actor spent training shards: the exact sum of the shard "
                                                 "wall times the store's manifest records")),
    "farm_eta_seconds": ("gauge", "seconds", "the driver's estimate of the time left in the farm"),
    "farm_actor_restarts": ("gauge", "restarts", "times the driver replaced the actor in this slot (died or lost its node)"),
}
TRAIN = {
    "train_step": ("gauge", "steps", "the model's current optimiser step (all its phases counted)"),
    "train_loss": ("gauge", "loss", "the model's latest training loss"),
    "train_steps_per_second": ("gauge", "steps/s", "the worker's optimiser steps per second since its last report"),
    "train_eta_seconds": ("gauge", "seconds", "the driver's estimate of the time left in the stage's Ray Train job"),
}


def exported(name: str, kind: str) -> list[str]:
    """The names a Prometheus scrape shows for a metric recorded as `name` (Ray 2.60, OpenTelemetry exporter)."""
    base = f"ray_{name}"
    if kind == "counter":
        return [f"{base}_total"]
    if kind == "histogram":
        return [f"{base}_bucket", f"{base}_sum", f"{base}_count"]
    return [base]


@cache
def _metric(name: str):
    from ray.util import metrics

    kind, _, desc = {**FARM, **TRAIN}[name]
    keys = TRAIN_LABELS if name in TRAIN and name != "train_eta_seconds" else LABELS
    if kind == "counter":
        return metrics.Counter(name, description=desc, tag_keys=keys)
    if kind == "histogram":
        return metrics.Histogram(name, description=desc, boundaries=SHARD_SECONDS_BOUNDARIES, tag_keys=keys)
    return metrics.Gauge(name, description=desc, tag_keys=keys)


def tags(actor: str, node: str, stage: str, run: str, **extra) -> dict[str, str]:
    return {"actor": actor, "node": short_node(node), "stage": stage, "run": run, **{k: str(v) for k, v in extra.items()}}


def short_node(node_id: str) -> str:
    return (node_id or "")[:8]


def this_node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def inc(name: str, value: float, **labels) -> None:
    if value > 0:
        _metric(name).inc(value, tags=labels)


def gauge(name: str, value: float, keep: bool = False, **labels) -> None:
    """Set a gauge. Ray drops a gauge series that is not set again within two export intervals (about
    20 s); `keep=True` (the driver's own gauges) sets it again every KEEP_S while this process lives."""
    _metric(name).set(value, tags=labels)
    if keep:
        with _lock:
            _kept[(name, tuple(sorted(labels.items())))] = value
            global _keeper
            if _keeper is None:
                _keeper = threading.Thread(target=_keep_alive, name="weightgen-metrics", daemon=True)
                _keeper.start()


KEEP_S = 5.0
_kept: dict = {}
_lock = threading.Lock()
_keeper: threading.Thread | None = None


def _keep_alive() -> None:
    while True:
        time.sleep(KEEP_S)
        with _lock:
            items = list(_kept.items())
        for (name, labels), value in items:
            try:
                _metric(name).set(value, tags=dict(labels))
            except Exception:  # noqa: BLE001 - Ray shut down: nothing left to export to
                return


def observe(name: str, value: float, **labels) -> None:
    _metric(name).observe(value, tags=labels)
