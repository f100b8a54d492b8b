"""bench/zero_shot_scaling.py's tables from a finished run: fixed-γ and chosen-γ rows, each with its CI."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from pipelines.core.names import method_name
from tests.conftest import ROOT

BENCH = ROOT / "bench" / "zero_shot_scaling.py"


def test_report_only_without_finished_sizes_is_one_clear_error(tmp_path):
    out = tmp_path / "scaling"
    r = subprocess.run([sys.executable, str(BENCH), "--sizes", "100,300", "--out", str(out), "--report-only"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "no size of [100, 300] has finished" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_scaling_tables_report_the_chosen_gamma_beside_fixed_ones_with_cis(smoke_pipeline, tmp_path):
    """The smoke run stands in for one size: every cell's CI holds its mean, the chosen-γ rows are the sweep's
    choice on validation, and the fixed-γ rows are the evaluate stage's table."""
    run_dir, r = smoke_pipeline
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "scaling"
    out.mkdir()
    (out / "n24").symlink_to(run_dir)  # read only: the bench writes beside it
    r = subprocess.run([sys.executable, str(BENCH), "--sizes", "24,48", "--test-tasks", "7", "--out", str(out), "--report-only"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["sizes"] == [24] and res["missing"] == [48]
    for label, by_n in res["accuracy"].items():
        assert res["ci_low"][label]["24"] <= by_n["24"] <= res["ci_high"][label]["24"], label
    chosen = pd.read_csv(run_dir / "sweeps" / "gamma" / "chosen.csv").set_index("method")
    zs = pd.read_csv(run_dir / "results" / "zero_shot.csv")
    assert set(res["chosen_gamma"]) == {"hnet_hyperldm", "hvae_hyperldm", "hvae_hybrid"}  # every swept γ route
    for m, by_n in res["chosen_gamma"].items():
        assert by_n["24"] == chosen.loc[m, "guidance_scale"]
        label = f"{method_name(m)}, γ chosen on validation"
        at = zs[(zs["method"] == m) & (zs["guidance_scale"] == by_n["24"])]["accuracy"].mean()
        # the sweep samples with the evaluate stage's seeded generator: the same γ gives the same accuracy
        assert res["accuracy"][label]["24"] == pytest.approx(chosen.loc[m, "test_mean"]) == pytest.approx(at)
    text_hnet = zs[zs["method"] == "text_hnet"]["accuracy"].mean()
    assert res["accuracy"]["Text-conditioned HNet"]["24"] == pytest.approx(text_hnet)
    md = (out / "scaling.md").read_text()
    assert "| HNet + HyperLDM, γ chosen on validation |" in md and "| N=24 |" in md
    assert (out / "scaling.png").stat().st_size > 0 and len(pd.read_csv(out / "scaling.csv")) == sum(len(v) for v in res["accuracy"].values())
