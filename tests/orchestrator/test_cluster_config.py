"""cluster.yaml and cluster-local.yaml pass Ray's own cluster-launcher validation (offline: no SSH, no cloud calls)
and keep the safe defaults docs/cluster.md promises."""
from __future__ import annotations

import copy

import pytest
import yaml

from tests.conftest import ROOT


def prepared(name: str) -> dict:
    """What `ray up` checks before it contacts any machine: defaults merged, then the JSON schema and cross-field rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / name).read_text())
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def commands(cfg: dict, key: str) -> str:
    return "\n".join(cfg[key])


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_config_is_valid_and_safe(name):
    cfg = prepared(name)
    head, workers = commands(cfg, "head_start_ray_commands"), commands(cfg, "worker_start_ray_commands")
    assert "--dashboard-host=127.0.0.1" in head, "the dashboard (and Jobs API) must stay on loopback"
    assert "0.0.0.0" not in head + workers
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "mlflow server --host 127.0.0.1" in " ".join(head.split())
    setup = " ".join(commands(cfg, "setup_commands").split())
    assert "-c constraints.txt" in setup and "-e ." in setup, "the project is installed with its torch pin"
    assert cfg["file_mounts"]["~/weightgen"] == "." and "~/.ray/auth_token" in cfg["file_mounts"]
    assert {".venv", "runs", ".git"} <= set(cfg["rsync_exclude"])


def test_aws_node_types():
    cfg = prepared("cluster.yaml")
    types = cfg["available_node_types"]
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}
    cpu, gpu = types["cpu_worker"], types["gpu_worker"]
    assert 0 < cpu["min_workers"] < cpu["max_workers"] <= cfg["max_workers"], "CPU workers autoscale"
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] == 1, "the GPU type is optional"
    assert "cu128" in " ".join(gpu["worker_setup_commands"]) and "-c constraints.txt" in " ".join(gpu["worker_setup_commands"])
    assert "boto3" in commands(cfg, "head_setup_commands")  # merged: setup_commands + head_setup_commands
    assert commands(cfg, "setup_commands") in commands(cfg, "head_setup_commands")


def test_local_provider_uses_the_listed_machines():
    cfg = prepared("cluster-local.yaml")
    assert cfg["provider"]["type"] == "local"
    assert cfg["provider"]["head_ip"] and len(cfg["provider"]["worker_ips"]) == 2
    node_type = cfg["available_node_types"][cfg["head_node_type"]]  # the local provider has one node type for all
    assert node_type["min_workers"] == node_type["max_workers"] == cfg["max_workers"] == 2


def test_validation_is_real_a_misspelt_field_fails():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    raw["available_node_types"]["cpu_worker"]["min_wokers"] = 1
    with pytest.raises(Exception, match="min_wokers"):
        validate_config(prepare_config(raw))
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    del raw["available_node_types"]["gpu_worker"]["resources"]
    with pytest.raises(Exception, match="resources"):
        validate_config(prepare_config(raw))
