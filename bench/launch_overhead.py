"""Where the seconds of one `orchestrator.train.launch` go: Ray Train's worker-group start against the warm worker group.

    python bench/launch_overhead.py --work /tmp/launch-overhead --workers 1,1,2

A trivial loop (it imports the stages' modules, as their loops do) is launched once per --workers entry
on a new Ray Train worker group, then the same on one warm worker group (orchestrator.train_pool), on a
private 2-CPU Ray. For each Ray Train launch: when its controller asked for resources and for workers
(Ray Train's controller log), when the worker process was created, when it set up its gloo group, when
the loop started, how long the stage modules took to import, and how long `fit()` took to return after
the loop ended; all in seconds from the launch's start. Prints one line per launch.
"""
import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402  (Ray's dependency)

def loop(config):
    """Records when it started, how long the stages' modules took to import, and when it ended."""
    t_enter = time.time()
    import torch.distributed as dist

    from orchestrator import train as rt
    t_imp = time.time()
    import models.zeroshot.training  # noqa: F401 - what the stages' loops import
    import pipelines.fewshot  # noqa: F401
    import pipelines.zeroshot.launch  # noqa: F401
    t_imp2 = time.time()
    p = psutil.Process()
    rt.report({"create": p.create_time(), "enter": t_enter, "stage_imports": t_imp2 - t_imp, "dist": dist.is_initialized(),
               "pid": os.getpid(), "end": time.time()})


def controller_events(session: str, name: str) -> dict[str, float]:
    """Times of the controller's resource request, worker request and started group, and the worker's gloo setup."""
    out = {}
    for f in glob.glob(f"{session}/logs/train/ray-train-app-controller-*.log"):
        for line in open(f):
            d = json.loads(line)
            if d.get("run_name") != name: continue
            t = d["timestamp_ns"] / 1e9
            for key in ("Requesting resources", "Attempting to start", "Started training worker group"):
                if d["message"].startswith(key): out.setdefault(key, t)
    for f in glob.glob(f"{session}/logs/train/ray-train-app-worker-*.log"):
        for line in open(f):
            d = json.loads(line)
            if d.get("run_name") == name and d["message"].startswith("Setting up process group"):
                out.setdefault("pg_setup", d["timestamp_ns"] / 1e9)
    return out

def main():
    from orchestrator.cluster import connect, shutdown
    from orchestrator.train import launch
    from orchestrator.train_pool import warm_pool

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="where the launches' checkpoints go")
    p.add_argument("--workers", default="1,1,2", help="workers of each launch, comma-separated")
    a = p.parse_args()
    run, workers = a.work, [int(x) for x in a.workers.split(",")]
    t = time.time()
    info = connect(address="local", num_cpus=2)
    print(f"ray start {time.time()-t:.2f}s  session {info.session_dir}", flush=True)
    try:
        for i, n in enumerate(workers):
            t0 = time.time()
            res = launch(loop, {}, name=f"prof{i}", run_dir=run, num_workers=n, log=lambda s: None)
            t1 = time.time()
            m = res.metrics[0]
            time.sleep(1.5)  # the controller's log reaches its file
            ev = controller_events(info.session_dir, f"prof{i}")
            rel = {k: round(v - t0, 2) for k, v in ev.items()}
            print(f"RayTrain launch {i} workers={n}: total {t1-t0:.2f}s | controller up (requests resources) {rel.get('Requesting resources')} "
                  f"| workers asked {rel.get('Attempting to start')} | worker proc created {m['create']-t0:.2f} | gloo setup {rel.get('pg_setup')} "
                  f"| group started {rel.get('Started training worker group')} | loop enter {m['enter']-t0:.2f} "
                  f"| stage imports in loop {m['stage_imports']:.2f} | loop end->fit returns {t1-m['end']:.2f} | dist {m['dist']}", flush=True)
        with warm_pool(log=print):
            for i, n in enumerate(workers):
                t0 = time.time()
                res = launch(loop, {}, name=f"warm{i}", run_dir=run, num_workers=n, log=lambda s: None)
                t1 = time.time(); m = res.metrics[0]
                print(f"warm launch {i} workers={n}: total {t1-t0:.2f}s | proc created {m['create']-t0:.2f} | loop enter {m['enter']-t0:.2f} "
                      f"| stage imports in loop {m['stage_imports']:.2f} | loop end->return {t1-m['end']:.2f}", flush=True)
    finally:
        shutdown(info)
if __name__ == "__main__":
    main()
