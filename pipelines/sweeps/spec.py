"""The sweep spec: which methods, splits and seeds, and which values of which parameters, one trial each.

A spec is a YAML file (`--spec FILE`) and/or `--set key=value` overrides (a comma list is a grid).
Every key is checked before any trial starts; an unknown one is named in the error with the valid keys.

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

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.core.cli import ConfigError, check_choice, check_range
from pipelines.zeroshot.methods import METHODS
from pipelines.zeroshot.sampling import SWEEP_GUIDANCE_GRID, SamplingSettings

# sampling parameters -> (type, default grid): one value, the SamplingSettings default, except γ's curve
SAMPLING = {f.name: (f.type if isinstance(f.type, type) else {"float": float, "int": int, "str": str}[f.type],
                     SWEEP_GUIDANCE_GRID if f.name == "guidance_scale" else (f.default,))
            for f in dataclasses.fields(SamplingSettings)}
TRAIN_STAGES = ("generators", "hyperclip", "hyperldm", "baselines")
PLAN_FIELDS = ("splits", "seeds", "val_fraction", "num_workers", "ddp", "log_every")  # not sweepable: they define the run


@dataclass(frozen=True)
class SweepConfig:
    """A sweep over sampling settings (reusing the run's trained models) and/or training hyperparameters."""

    spec: str = ""  # the YAML spec file these values were read from ('' for none)
    name: str = "gamma"  # folder under <run_dir>/sweeps/ and the MLflow parent run's name
    methods: tuple[str, ...] = tuple(METHODS)  # methods to evaluate (baselines are one trial per split and seed)
    splits: tuple[str, ...] = ()  # split modes (default: the run's plan)
    seeds: tuple[int, ...] = ()  # trained-model seeds (default: the run's plan)
    params: dict = field(default_factory=lambda: {k: list(v) for k, (_, v) in SAMPLING.items()})  # sampling parameter -> grid list or {space: args}
    train: dict = field(default_factory=dict)  # "stage.field" -> grid list or {space: args}; these trials train their own models
    num_samples: int = 1  # draws from each search space (grids are crossed with them)
    search_seed: int = 0  # seeds the search-space draws
    max_concurrent: int = 0  # trials at once; 0 = as many as the cluster's CPUs fit
    cpus_per_trial: float = 1.0  # CPUs reserved per sampling trial (training trials reserve none: their Ray Train workers do)
    resume: bool = False  # continue an interrupted sweep of this name (finished trials are kept from done/)

    def __post_init__(self):
        if not self.methods:
            raise ConfigError("methods is empty; choose from " + ", ".join(METHODS))
        for m in self.methods:
            check_choice("methods", m, tuple(METHODS))
        for s in self.splits:
            check_choice("splits", s, ("random", "compositional", "given"))
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"name={self.name!r}: use a plain folder name such as 'gamma'")
        check_range("num_samples", self.num_samples, 1, 10000)
        check_range("max_concurrent", self.max_concurrent, 0)
        check_range("cpus_per_trial", self.cpus_per_trial, 0.01, 1024)
        for k in self.params:
            if k not in SAMPLING:
                raise ConfigError(f"unknown sweep parameter {k!r}; sampling parameters: {', '.join(SAMPLING)}; "
                                  "training hyperparameters go under train as stage.field")
        for k in self.train:
            check_train_key(k)


def check_train_key(key: str) -> None:
    """`stage.field` must name a field of a training stage's config that does not define the run's plan."""
    import importlib

    stage, _, name = key.partition(".")
    if stage not in TRAIN_STAGES:
        raise ConfigError(f"unknown training parameter {key!r}: write stage.field with stage one of {', '.join(TRAIN_STAGES)}")
    fields = [f.name for f in dataclasses.fields(importlib.import_module(f"pipelines.{stage}").CONFIG)]
    if name not in fields or name in PLAN_FIELDS:
        valid = ", ".join(f for f in fields if f not in PLAN_FIELDS)
        raise ConfigError(f"unknown training parameter {key!r}; {stage} fields that can be swept: {valid}")


def _as_values(key: str, value):
    """A grid (list), a search space ({kind: args}) or one value -> list or dict."""
    if isinstance(value, dict):
        if len(value) != 1:
            raise ConfigError(f"{key}: a search space is one mapping such as {{loguniform: [0.001, 0.1]}}, got {value!r}")
        return value
    return list(value) if isinstance(value, (list, tuple)) else [value]


def make_config(presets: dict, preset: str, overrides: list[str], seed: int | None = None) -> SweepConfig:
    """Preset, then the `spec=FILE` YAML, then the other `key=value` overrides; every key checked."""
    import yaml

    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        pairs.append((k.strip(), v.strip()))
    values: dict = dict(presets[preset])
    for k, v in pairs:
        if k == "spec" and v:
            path = Path(v)
            if not path.is_file():
                raise ConfigError(f"sweep spec {path} does not exist; pass --spec with a YAML file (see pipelines/sweep_spec.py)")
            try:
                loaded = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"sweep spec {path} is not valid YAML: {e}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"sweep spec {path} must be a mapping of keys to values")
            values = _merge(values, loaded, str(path))
            values["spec"] = str(path.resolve())
    for k, v in pairs:
        if k == "spec":
            continue
        parsed = [yaml.safe_load(x) for x in v.split(",")] if "," in v else yaml.safe_load(v)
        if k.startswith("train."):
            values = _merge(values, {"train": {k[len("train."):]: parsed}}, "--set")
        else:
            values = _merge(values, {k: parsed}, "--set")
    return _build(values)


def _merge(values: dict, new: dict, where: str) -> dict:
    """Fold spec keys into config values: sampling parameters go to `params`, the rest must be fields."""
    out = {**values, "params": dict(values.get("params") or {}), "train": dict(values.get("train") or {})}
    names = [f.name for f in dataclasses.fields(SweepConfig)]
    for k, v in new.items():
        if k in SAMPLING:
            out["params"][k] = _as_values(k, v)
        elif k == "train":
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: train must map stage.field to values, e.g. train: {{hyperldm.lr: [0.001, 0.002]}}")
            out["train"].update({tk: _as_values(tk, tv) for tk, tv in v.items()})
        elif k in names and k not in ("params", "spec"):
            out[k] = v
        else:
            raise ConfigError(f"unknown sweep parameter {k!r} ({where}); valid keys: "
                              f"{', '.join([n for n in names if n != 'params'] + list(SAMPLING))}")
    return out


def _build(values: dict) -> SweepConfig:
    """Coerce types (tuples, numbers) and construct; the dataclass validates."""
    params = {k: list(v) for k, (_, v) in SAMPLING.items()}
    params.update(values.pop("params", {}) or {})
    for k, v in params.items():
        if isinstance(v, list):
            typ = SAMPLING[k][0] if k in SAMPLING else str
            try:
                params[k] = [typ(x) for x in v]
            except (TypeError, ValueError):
                raise ConfigError(f"{k}: {v!r} are not all {typ.__name__} values") from None
    tup = lambda x, typ: tuple(typ(i) for i in (x if isinstance(x, (list, tuple)) else [x]))  # noqa: E731
    try:
        for k, typ in (("methods", str), ("splits", str), ("seeds", int)):
            if k in values:
                values[k] = tup(values[k], typ)
        for k, typ in (("num_samples", int), ("search_seed", int), ("max_concurrent", int), ("cpus_per_trial", float), ("name", str)):
            if k in values:
                values[k] = typ(values[k])
        if "resume" in values and not isinstance(values["resume"], bool):
            values["resume"] = str(values["resume"]).lower() in ("1", "true", "yes", "on")
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sweep spec: {e}") from None
    return SweepConfig(params=params, **values)


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
