"""Stage configs: frozen pydantic dataclasses whose fields declare their type, bounds, help text and role.

    @stage_config("experts")
    class ExpertsConfig:
        lr: Annotated[float, Field(ge=1e-7, le=10)] = 1e-3
        \"\"\"Adam learning rate\"\"\"
        num_actors: Annotated[int, Runtime, Field(ge=0)] = 0
        \"\"\"farm actors (0: one per CPU)\"\"\"

A field's docstring is its help text (`--help`, the README tables). `Runtime` marks a field that
decides where or how fast a stage runs, never what it computes: hashes, resume checks and sweeps
leave it out. `Plan` marks a field that decides which units a run covers (splits, seeds, the
validation share): it changes results, but a sweep cannot vary it. NaN and infinity are refused
everywhere. The class itself validates and coerces (YAML lists to tuples, `--set` strings to numbers),
and every failure is one ConfigError line naming the stage, the field, the value and what is allowed.
"""
from __future__ import annotations

import ast
import functools
import inspect
import itertools
import json
import textwrap
import types
import typing
from typing import Annotated, Literal

import pydantic
from pydantic import ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from models.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad config field, value or preset; the message names it and the valid choices."""


SETTINGS = ConfigDict(use_attribute_docstrings=True, extra="forbid", allow_inf_nan=False)


class Role:
    """A marker in a field's annotation saying what the field decides (see the module docstring)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


Runtime = Role("runtime")
Plan = Role("plan")

Seed = Annotated[int, pydantic.Field(ge=0)]  # numpy and torch generators take non-negative seeds only
DataPath = Literal["auto", "memory", "stream"]  # how a zero-shot stage reads the weight store (pipelines.zeroshot.streamed)
MemoryBudgetMb = Annotated[float, pydantic.Field(gt=0)]  # data_path auto: the most store bytes (MiB) loaded whole


def stage_config(name: str, seed_field: str | None = "seed"):
    """Make a class a frozen, validating config printed and reported as section `name`.

    `seed_field` is the field `--seed` sets (None: the stage has none)."""

    def wrap(cls):
        cls = pydantic.dataclasses.dataclass(frozen=True, config=SETTINGS)(cls)
        _fill_docstrings(cls)
        cls.__stage__ = name
        cls.__seed_field__ = seed_field if seed_field in cls.__pydantic_fields__ else None
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            try:
                init(self, *args, **kwargs)
            except ValidationError as e:
                from pipelines.core.config_errors import describe

                raise ConfigError(describe(e, type(self))) from None

        cls.__init__ = __init__
        return cls

    return wrap


def _fill_docstrings(cls) -> None:
    """Field docstrings pydantic missed: on Python < 3.13 it finds the class source by walking stack frames,
    which fails when the module also runs as __main__ (`python -m pipelines.experts` imports it twice)."""
    missing = [f for f in cls.__pydantic_fields__.values() if f.description is None]
    if not missing:
        return
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    except (OSError, TypeError, SyntaxError, IndexError, AttributeError):
        return
    for stmt, nxt in itertools.pairwise(body):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            info = cls.__pydantic_fields__.get(stmt.target.id)
            if info is not None and info.description is None:
                info.description = inspect.cleandoc(nxt.value.value)


# ----------------------------------------------------------------------------- introspection


def is_config(obj) -> bool:
    """Whether `obj` is a config class made by `stage_config` (or an instance of one)."""
    return hasattr(obj if isinstance(obj, type) else type(obj), "__stage__")


def fields(cls) -> dict[str, FieldInfo]:
    """The fields of a config class, in declaration order."""
    return cls.__pydantic_fields__


def roles(cls, name: str) -> set[str]:
    """The roles (`runtime`, `plan`) field `name` is marked with."""
    return {m.name for m in fields(cls)[name].metadata if isinstance(m, Role)}


def is_runtime(cls, name: str) -> bool:
    """Whether field `name` only decides where or how fast the stage runs."""
    return "runtime" in roles(cls, name)


def is_plan(cls, name: str) -> bool:
    """Whether field `name` decides which units the run covers."""
    return "plan" in roles(cls, name)


def nested(cls, name: str):
    """The config class of field `name` when it is a nested config, else None."""
    t = fields(cls)[name].annotation
    return t if is_config(t) else None


def is_mapping(cls, name: str) -> bool:
    """Whether field `name` is a mapping (its dotted --set keys name entries, not fields)."""
    t = fields(cls)[name].annotation
    return (typing.get_origin(t) or t) is dict


def leaf_names(cls, prefix: str = "") -> list[str]:
    """Every settable field as a dotted name (`sampling.sampler`), nested configs expanded."""
    out = []
    for name in fields(cls):
        sub = nested(cls, name)
        out += leaf_names(sub, f"{prefix}{name}.") if sub else [prefix + name]
    return out


def valid_keys(cls) -> list[str]:
    """What `--set` and config files accept for `cls`: its leaf fields and any extra keys it folds in."""
    extra = getattr(cls, "extra_keys", None)
    return leaf_names(cls) + (list(extra()) if extra else [])


def result_fields(cls, plan: bool = True) -> list[str]:
    """Dotted names of the fields that change results (`plan=False`: the plan fields left out too)."""
    out = []
    for name in fields(cls):
        if is_runtime(cls, name) or (not plan and is_plan(cls, name)):
            continue
        sub = nested(cls, name)
        out += [f"{name}.{n}" for n in result_fields(sub, plan)] if sub else [name]
    return out


def field_value(cls, name: str, value):
    """`value` validated and coerced as field `name` of `cls` would be (a sweep grid value, say); one-line ConfigError if bad."""
    info = fields(cls)[name]
    ann = typing.Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    try:
        return pydantic.TypeAdapter(ann, config=ConfigDict(allow_inf_nan=False)).validate_python(value)
    except ValidationError as e:
        from pipelines.core.config_errors import one_error

        raise ConfigError("; ".join(one_error({**x, "loc": (name, *x["loc"])}, cls) for x in e.errors())) from None


def plain(value):
    """A value as JSON-plain data (tuples to lists, nested configs to dicts)."""
    if is_config(value):
        return config_values(value)
    return json.loads(json.dumps(value, default=str))


def config_values(cfg) -> dict:
    """Every field of a config, JSON-plain and nested: what config.yaml and model sidecars record."""
    return {name: plain(getattr(cfg, name)) for name in fields(type(cfg))}


def result_values(cfg, plan: bool = True) -> dict:
    """JSON-plain values of the fields that change results (nested configs included); `plan=False` also
    leaves out the plan fields. Hashes, resume checks and `up_to_date` compare exactly this."""
    out = {}
    for name in fields(type(cfg)):
        if is_runtime(type(cfg), name) or (not plan and is_plan(type(cfg), name)):
            continue
        v = getattr(cfg, name)
        out[name] = result_values(v, plan) if is_config(v) else plain(v)
    return out


def to_yaml(data: dict) -> str:
    """Config values as YAML: mappings as blocks, lists on one line (`seeds: [0, 1, 2]`)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=120)


# ----------------------------------------------------------------------------- building


def merge(cls, base: dict, new: dict) -> dict:
    """`new` over `base`: nested configs merge field by field, mappings key by key, the rest is replaced."""
    out = dict(base)
    for k, v in new.items():
        known = k in fields(cls)
        sub = nested(cls, k) if known else None
        if sub and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(sub, out[k], v)
        elif known and is_mapping(cls, k) and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def layered(cls, *layers: dict) -> dict:
    """The layers merged in order (later wins); a class with `canonical` normalises each layer first."""
    canon = getattr(cls, "canonical", lambda values: values)
    out: dict = {}
    for layer in layers:
        if layer:
            if not isinstance(layer, dict):
                raise ConfigError(f"{cls.__stage__}: expected a mapping of field names to values, got {layer!r}")
            out = merge(cls, out, canon(_plain_configs(layer)))
    return out


def _plain_configs(layer: dict) -> dict:
    """Config instances in a layer (a preset may hold one) as dicts, so that layers above merge into them."""
    return {k: config_values(v) if is_config(v) else v for k, v in layer.items()}


def build(cls, *layers: dict):
    """A validated config from layers of values (preset, config file, --set ...), later ones winning."""
    values = layered(cls, *layers)
    bad = [k for k in values if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{cls.__stage__}: field names must be text, got {bad[0]!r}")
    return cls(**values)


def parse_set(cls, items: list[str]) -> dict:
    """`--set key=value` items as one layer of values: dotted keys reach nested configs (`sampling.sampler`)
    and mapping fields (`train.hyperldm.lr`); a comma list fills a tuple field; `none` clears an optional one.
    The text itself is left for the class to coerce and check."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected field=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        target, here, parts = cls, out, key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if target is None or part not in fields(target):  # not a field: left to `canonical` or refused on build
                here[".".join(parts[i:])] = raw
                break
            if is_mapping(target, part) and not last:
                here.setdefault(part, {})[".".join(parts[i + 1:])] = raw
                break
            if last:
                here[part] = _shape(fields(target)[part].annotation, raw)
                break
            sub = nested(target, part)
            if sub is None:
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i + 1])} has no fields; write --set {'.'.join(parts[:i + 1])}=VALUE")
            target, here = sub, here.setdefault(part, {})
    return out


def _shape(annotation, raw: str):
    """The container a --set text stands for: None for none/null on an optional field, a tuple of the comma parts."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() in ("none", "null", ""):
            return None
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    return raw


# ----------------------------------------------------------------------------- one-line errors


def build_config(cls, presets: dict[str, dict], preset: str, overrides=(), seed: int | None = None, layers=()):
    """The preset's values, then `layers` (a --config section, a sweep spec), then `--set key=value`
    overrides, then `--seed`; the class validates and coerces, every error is one ConfigError line."""
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    top = parse_set(cls, list(overrides))
    if seed is not None:
        if cls.__seed_field__ is None:
            raise ConfigError(f"--seed: {cls.__stage__} has no seed of its own; set the stage's fields with --set")
        top[cls.__seed_field__] = seed
    return build(cls, presets[preset], *layers, top)


def read_yaml_mapping(path, what: str, fix: str) -> dict:
    """A YAML file that must hold a mapping (a --config file, a sweep spec); every problem is one ConfigError
    naming `what` and the file, with `fix` saying how to write one."""
    import yaml
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path}: no such file; {fix}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of keys to values; {fix}")
    return data
