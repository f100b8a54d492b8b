"""A quiet console: two pipelines at once on one machine, each on its own private Ray (the farm, and a Ray
Train stage, whose helpers used to print tracebacks when several Rays run), both finish with no error
output; Ray's internals are in <run_dir>/logs/, and each run's first lines say which Ray it used."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NOISE = re.compile(r"Traceback|Error|ERROR|Exception|PlacementGroupCleaner|PreemptionWatcher|TrainController|TrainingReport")


def start(args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_TMPDIR")}
    return subprocess.Popen([sys.executable, "-m", *args, "--address", "local"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_pipelines_at_once_each_on_its_own_ray_print_no_errors(smoke_run_dir, zs_run_dir, tmp_path):
    farm, gen = tmp_path / "farm", tmp_path / "gen"
    shutil.copytree(smoke_run_dir / "features", farm / "features")
    shutil.copytree(zs_run_dir, gen)
    procs = {
        "experts": start(["pipelines.experts", "--preset", "smoke", "--run-dir", str(farm), "--set", "steps=600"]),
        "generators": start(["pipelines.generators", "--preset", "smoke", "--run-dir", str(gen), "--no-progress"]),
    }
    out = {name: p.communicate(timeout=1200) for name, p in procs.items()}
    for name, p in procs.items():
        stdout, stderr = out[name]
        assert p.returncode == 0, f"{name}:\n{stderr[-4000:]}"
        console = (stdout + stderr).replace("\r", "\n")
        bad = [ln for ln in console.splitlines() if NOISE.search(ln)]
        assert not bad, f"{name} printed:\n" + "\n".join(bad[:40])
        first = stderr.splitlines()[:5]
        assert first[0].startswith("run directory:") and first[2].startswith("Ray: started a private Ray at 127.0.0.1:"), first
        assert "1 node(s), 2 CPUs, 0 GPUs" in first[2] and "asks for a token" in first[3], first
    addresses = {re.search(r"private Ray at (\S+)", out[n][1]).group(1) for n in procs}
    assert len(addresses) == 2, f"each pipeline has its own Ray: {addresses}"
    # Ray's internals are kept, in the run's logs folder
    workers = (gen / "logs" / "workers.log").read_text()
    assert "TrainController" in workers and "RayTrainWorker" in workers
    assert (gen / "logs" / "ray-session").is_dir() and (farm / "logs" / "driver.log").exists()
    assert re.search(r"generators: 100%|generators: \d+/\d+ steps", out["generators"][1]), out["generators"][1][-2000:]
