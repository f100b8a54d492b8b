"""The sweep spec: which methods, splits and seeds, and which values of which parameters, one trial each.

A spec is a YAML file (`--spec FILE`) and/or `--set key=value` overrides (a comma list is a grid, a
`{loguniform: [a, b]}` mapping a search space). Every key and every grid value is checked before any
trial starts; an unknown key is named in the error with the valid keys. `--seed` sets `search_seed`.

    name: gamma                      # the sweep's folder under <run_dir>/sweeps/ and its MLflow run name
    methods: [hnet_hyperldm, hvae_hyperldm, multitask, text_hnet]
    splits: [random, compositional]  # default: the run's plan
    seeds: [0, 1, 2]                 # trained-model seeds; default: the run's plan
    guidance_scale: [0, 0.5, 1, 1.5, 2, 4, 7.5, 15]   # a list is a grid ...
    guidance_lr: {loguniform: [0.001, 0.1]}           # ... a mapping is a Tune search space (num_samples draws)
    num_samples: 4
    train:                           # training hyperparameters: these trials train their own models
      hyperldm.lr: [0.001, 0.002]

Sampling parameters apply only to the methods that use them (γ and the sampler to HyperLDM, guidance
steps/lr/L2 to HyperCLIP), so a baseline is one trial per (split, seed) whatever the grid.
"""
from __future__ import annotations

import hashlib
import importlib
import itertools
import json
from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from pipelines.core.config import (
    ConfigError,
    Runtime,
    Seed,
    field_value,
    fields,
    read_yaml_mapping,
    result_fields,
    stage_config,
)
from pipelines.zeroshot.methods import METHODS, TABLE
from pipelines.zeroshot.sampling import SWEEP_GUIDANCE_GRID, SamplingSettings

# sampling parameter -> its default grid: one value, the SamplingSettings default, except γ's curve
SAMPLING = {name: list(SWEEP_GUIDANCE_GRID) if name == "guidance_scale" else [getattr(SamplingSettings(), name)]
            for name in fields(SamplingSettings)}
TRAIN_STAGES = ("generators", "hyperclip", "hyperldm", "baselines")


def default_params() -> dict:
    """Every sampling parameter at its default grid."""
    return {k: list(v) for k, v in SAMPLING.items()}


@stage_config("sweep", seed_field="search_seed")
class SweepConfig:
    """A sweep over sampling settings (reusing the run's trained models) and/or training hyperparameters."""

    spec: Annotated[str, Runtime] = ""
    """the YAML spec file these values were read from (empty for none)"""
    name: str = "gamma"
    """folder under <run_dir>/sweeps/ and the MLflow parent run's name"""
    methods: Annotated[tuple[Literal[tuple(METHODS)], ...], Field(min_length=1)] = TABLE
    """methods to evaluate (baselines are one trial per split and seed); opt-in variants such as hnet_hybrid only when named"""
    splits: tuple[Literal["random", "compositional", "given"], ...] = ()
    """split modes (default: the run's plan)"""
    seeds: tuple[Seed, ...] = ()
    """trained-model seeds (default: the run's plan)"""
    params: dict = field(default_factory=default_params)
    """sampling parameter -> grid list or {space: args}; also settable as top-level keys (guidance_scale: [0, 1])"""
    train: dict = field(default_factory=dict)
    """stage.field -> grid list or {space: args}; these trials train their own models"""
    num_samples: Annotated[int, Field(ge=1, le=10000)] = 1
    """draws from each search space (grids are crossed with them)"""
    search_seed: Seed = 0
    """seeds the search-space draws (--seed sets it)"""
    max_concurrent: Annotated[int, Runtime, Field(ge=0)] = 0
    """trials at once; 0 = as many as the cluster's CPUs fit"""
    cpus_per_trial: Annotated[float, Runtime, Field(ge=0.01, le=1024)] = 1.0
    """CPUs reserved per sampling trial (training trials reserve none: their Ray Train workers do)"""
    resume: Annotated[bool, Runtime] = False
    """continue an interrupted sweep of this name (finished trials are kept from done/)"""

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise ValueError("use a plain folder name such as 'gamma'")
        return name

    @field_validator("params")
    @classmethod
    def _sampling_grids(cls, params: dict) -> dict:
        unknown = [k for k in params if k not in SAMPLING]
        if unknown:
            raise ValueError(f"unknown sweep parameter {unknown[0]!r}; sampling parameters: {', '.join(SAMPLING)}; "
                             "training hyperparameters go under train as stage.field")
        return {**default_params(), **{k: _grid(SamplingSettings, k, k, v) for k, v in params.items()}}

    @field_validator("train")
    @classmethod
    def _training_grids(cls, train: dict) -> dict:
        out = {}
        for key, v in train.items():
            stage, name = check_train_key(key)
            out[key] = _grid(stage, name, key, v)
        return out

    @classmethod
    def canonical(cls, values: dict) -> dict:
        """One layer of spec values with sampling keys folded into `params` and `train.stage.field` into `train`."""
        out = {k: v for k, v in values.items() if k not in SAMPLING and not k.startswith("train.")}
        if "train" in out and not isinstance(out["train"], dict):
            raise ConfigError("sweep.train must map stage.field to values, e.g. train: {hyperldm.lr: [0.001, 0.002]}")
        params = {**(out.get("params") or {}), **{k: v for k, v in values.items() if k in SAMPLING}}
        train = {**(out.get("train") or {}), **{k[len("train."):]: v for k, v in values.items() if k.startswith("train.")}}
        return {**out, **({"params": params} if params else {}), **({"train": train} if train else {})}

    @classmethod
    def extra_keys(cls) -> list[str]:
        """Keys accepted besides the fields (folded in by `canonical`)."""
        return [*SAMPLING, "train.STAGE.FIELD"]


def check_train_key(key: str):
    """`stage.field` must name a result field of a training stage that does not define the run's plan;
    returns (config class, field name)."""
    stage, _, name = key.partition(".")
    if stage not in TRAIN_STAGES:
        raise ValueError(f"unknown training parameter {key!r}: write stage.field with stage one of {', '.join(TRAIN_STAGES)}")
    cls = importlib.import_module(f"pipelines.{stage}").CONFIG
    sweepable = result_fields(cls, plan=False)
    if name not in sweepable:
        raise ValueError(f"unknown training parameter {key!r}; {stage} fields that can be swept: {', '.join(sweepable)}")
    return cls, name


def _grid(cls, name: str, key: str, value):
    """A grid (list; a --set text is a comma list) with each value checked as the field's, or a search space {kind: args}."""
    if isinstance(value, str):
        import yaml

        value = yaml.safe_load(value) if value.lstrip().startswith("{") else [p.strip() for p in value.split(",")]
    if isinstance(value, dict):
        if len(value) != 1:
            raise ValueError(f"{key}: a search space is one mapping such as {{loguniform: [0.001, 0.1]}}, got {value!r}")
        return value
    try:
        return [field_value(cls, name, v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    except ConfigError as e:  # already names the field: `hyperldm.lr=-1 is out of range ...`
        raise ValueError(str(e)) from None


def load_spec(path: Path) -> dict:
    """A YAML sweep spec as one layer of SweepConfig values (its path recorded in `spec`)."""
    loaded = read_yaml_mapping(path, "sweep spec", "pass --spec with a YAML file such as configs/sweeps/gamma.yaml")
    return {**loaded, "spec": str(path.resolve())}


# ----------------------------------------------------------------------------- trials


def _values(key: str, v, cfg: SweepConfig, salt: int) -> list:
    if isinstance(v, list):
        return v
    from orchestrator.sweep import SweepError, sample_space

    (kind, args), = v.items()
    try:
        return sample_space(kind, args, cfg.num_samples, cfg.search_seed + salt)
    except (SweepError, TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None


def trial_key(trial: dict) -> str:
    """A stable id of a trial's settings (what `done/` files and the MLflow `trial_key` tag use)."""
    keep = {k: v for k, v in trial.items() if k in ("method", "split", "seed", "params", "train")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def expand(cfg: SweepConfig, splits: list[str], seeds: list[int]) -> list[dict]:
    """Every trial of the sweep, without duplicates: [{method, split, seed, params, train, key, name}]."""
    sampled = {k: _values(k, v, cfg, i) for i, (k, v) in enumerate(sorted(cfg.params.items()))}
    train_sampled = {k: _values(f"train.{k}", v, cfg, 100 + i) for i, (k, v) in enumerate(sorted(cfg.train.items()))}
    trials, seen = [], set()
    for method in cfg.methods:
        used = METHODS[method].uses
        stages = METHODS[method].stages
        tkeys = [k for k in sorted(train_sampled) if k.split(".")[0] in stages]
        for split, seed in itertools.product(splits, seeds):
            for pvals in itertools.product(*(sampled[k] for k in used)):
                for tvals in itertools.product(*(train_sampled[k] for k in tkeys)):
                    params = dict(zip(used, pvals))
                    if params.get("sampler") == "ddpm":
                        params["sampler_steps"] = 1000  # DDPM runs every step: its step grid would only repeat trials
                    t = dict(method=method, split=split, seed=int(seed), params=params, train=dict(zip(tkeys, tvals)))
                    key = trial_key(t)
                    if key in seen:
                        continue
                    seen.add(key)
                    label = ",".join(f"{k}={v}" for k, v in {**t["params"], **t["train"]}.items())
                    trials.append({**t, "key": key, "name": f"{method}[{label}] {split} seed{seed}" if label else f"{method} {split} seed{seed}"})
    return trials


def spec_hash(trials: list[dict]) -> str:
    """Identifies a sweep's trial set: a resumed or reused sweep must have the same one."""
    return hashlib.sha256(json.dumps(sorted(t["key"] for t in trials)).encode()).hexdigest()[:16]
