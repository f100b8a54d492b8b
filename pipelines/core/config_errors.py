"""A pydantic ValidationError of a stage config as one line: `stage.field=value`, what is wrong, what is allowed."""
from __future__ import annotations

import typing
from typing import Any

import annotated_types
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from pipelines.core.config import fields, is_config, valid_keys


def describe(error: ValidationError, cls) -> str:
    """A pydantic ValidationError as one line: stage.field=value, what is wrong and what is allowed."""
    errors = error.errors()
    # a list whose items failed also counts as too short after validation: its items' errors say more
    inner = {e["loc"][:-1] for e in errors if e["loc"] and isinstance(e["loc"][-1], int)}
    return "; ".join(one_error(e, cls) for e in errors if not (e["type"] == "too_short" and e["loc"] in inner))


def one_error(e: dict, cls) -> str:
    loc = [p for p in e["loc"] if p != "__root__"]
    path = cls.__stage__ + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    kind, ctx = e["type"], e.get("ctx") or {}
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        name = ".".join(str(p) for p in loc)
        return f"unknown config field {name!r} for {cls.__stage__}; valid keys: {', '.join(valid_keys(cls))}"
    shown = f"{path}={_show(e['input'])}"
    if kind in ("value_error", "assertion_error"):  # a validator's own message; a long input is left out
        short = loc and not isinstance(e["input"], (dict, list, tuple))
        return f"{shown if short else path}: {ctx.get('error', e['msg'])}"
    ann, meta = _annotation(cls, loc)
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{shown} is out of range; it must be {bounds_of(meta) or bounds_of([ctx])}"
    if kind == "finite_number":
        bounds = bounds_of(meta)
        return f"{shown} is not allowed; it must be a finite number" + (f" {bounds}" if bounds else "")
    if kind == "literal_error":
        choices = typing.get_args(ann) if typing.get_origin(ann) is typing.Literal else ()
        return f"{shown} is not valid; choose one of {', '.join(map(str, choices)) if choices else ctx.get('expected')}"
    if kind == "too_short":
        return f"{shown} is empty; give at least {ctx.get('min_length', 1)} value(s)"
    if kind == "missing":
        return f"{path} is missing"
    if kind == "string_pattern_mismatch":
        return f"{shown} is not valid; it must match {ctx.get('pattern')}"
    expected = {"int": "an int", "float": "a float", "bool": "true or false", "string": "text",
                "tuple": "a comma list", "list": "a list", "dict": "a mapping"}
    for word, what in expected.items():
        if kind.startswith(word + "_") or kind == word:
            return f"{shown} is not {what} (field type {_type_name(ann)})"
    return f"{shown}: {e['msg']}"


def _show(value) -> str:
    """A bad value as the user wrote it: numbers bare, other text quoted."""
    if isinstance(value, str):
        try:
            float(value)
            return value
        except ValueError:
            return repr(value)
    return repr(value)


def _annotation(cls, loc: list) -> tuple[Any, list]:
    """(annotation, constraint metadata) of the field or tuple item at `loc`."""
    ann, meta = None, []
    target = cls
    for p in loc:
        if isinstance(p, str) and target is not None and is_config(target) and p in fields(target):
            info = fields(target)[p]
            ann, meta = info.annotation, list(info.metadata)
            target = ann if is_config(ann) else None
        elif isinstance(p, int) and typing.get_origin(ann) is tuple:
            ann, meta = unwrap(typing.get_args(ann)[0])
        else:
            return None, []
    return ann, meta


def unwrap(ann) -> tuple[Any, list]:
    """An `Annotated[T, Field(...)]` item type as (T, its constraint metadata)."""
    if typing.get_origin(ann) is typing.Annotated:
        base, *extra = typing.get_args(ann)
        meta = []
        for m in extra:
            meta += list(m.metadata) if isinstance(m, FieldInfo) else [m]
        return base, meta
    return ann, []


def bounds_of(meta) -> str:
    """Constraint metadata (annotated_types, or pydantic's error context) as `>= 1 and <= 100`."""
    ops = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
    out = []
    for m in meta:
        for attr, op in ops:
            v = m.get(attr) if isinstance(m, dict) else getattr(m, attr, None)
            if v is not None and isinstance(m, (dict, annotated_types.BaseMetadata)):
                out.append(f"{op} {v}")
    return " and ".join(out)


def _type_name(ann) -> str:
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
