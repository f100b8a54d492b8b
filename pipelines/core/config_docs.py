"""Every stage's fields as `--help` text and as the configuration reference's tables, from the configs themselves.

    python -m pipelines.core.config_docs            # rewrite the tables in docs/configuration.md
    python -m pipelines.core.config_docs --check    # exit 1 when they are stale

Type, bounds and role come from a field's annotation, the meaning from its docstring, the defaults
from the presets: edit a docstring, then rerun this (a test fails while the page disagrees).
"""
from __future__ import annotations

import sys
import types
import typing
from pathlib import Path

from pipelines.core import config as C
from pipelines.core.config_errors import bounds_of, unwrap

CONFIG_DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
BEGIN = "<!-- config-tables:begin -->"  # generated: edit the field docstrings, then run python -m pipelines.core.config_docs
END = "<!-- config-tables:end -->"


def type_text(annotation, meta=()) -> str:
    """A field's type in words: `int >= 1`, `list of float`, `one of ddim, ddpm`, `str or none`."""
    bounds = bounds_of(meta)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(*unwrap(annotation))
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return " or ".join(type_text(a) for a in rest) + (" or none" if len(rest) < len(args) else "")
    if origin is typing.Literal:
        text = "one of " + ", ".join(map(str, args))
    elif origin is tuple:
        item = type_text(args[0])
        text = ("list, each " if item.startswith("one of") else "list of ") + item
    elif (origin or annotation) is dict:
        text = "mapping"
    else:
        text = getattr(annotation, "__name__", str(annotation))
    return f"{text} {bounds}" if bounds else text


def value_text(v) -> str:
    """A value as it is written after `--set field=`: lists comma-separated, `none`, `true`/`false`."""
    if v is None:
        return "none"
    if v == "":
        return "''"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (tuple, list)):
        return ",".join(value_text(x) for x in v) if v else "(empty)"
    if isinstance(v, dict):
        return "; ".join(f"{k}: {value_text(x)}" if not isinstance(x, dict) else f"{k}: {x}" for k, x in v.items()) or "(empty)"
    return str(v)


def rows(cls, cfg, prefix: str = ""):
    """(dotted name, type text, value, role, meaning) of every leaf field of `cfg`, nested configs expanded."""
    for name, info in C.fields(cls).items():
        sub = C.nested(cls, name)
        value = getattr(cfg, name)
        if sub:
            yield from rows(sub, value, f"{prefix}{name}.")
            continue
        role = "runtime" if C.is_runtime(cls, name) else "plan" if C.is_plan(cls, name) else ""
        meaning = " ".join((info.description or "").split())
        yield prefix + name, type_text(info.annotation, info.metadata), value, role, meaning


def preset_config(mod, preset: str):
    """A stage module's config at `preset`."""
    from pipelines.core.config import build_config

    return build_config(mod.CONFIG, mod.PRESETS, preset)


def help_text(mods: dict, preset: str, prefixed: bool) -> str:
    """The fields part of `--help`: per stage, each field's type, value at `preset` and meaning."""
    out = []
    for stage, mod in mods.items():
        head = f"{stage}." if prefixed else ""
        out.append(f"{stage} fields (--set {head}FIELD=VALUE; values of preset {preset}; "
                   "runtime: where or how fast, never results):")
        for name, typ, value, role, meaning in rows(mod.CONFIG, preset_config(mod, preset)):
            out.append(f"  {head}{name} = {value_text(value)}  ({typ}{'; ' + role if role else ''})")
            out.append(f"      {meaning}")
        out.append("")
    return "\n".join(out)


def _cell(text: str) -> str:
    """Text for a Markdown table cell."""
    return text.replace("|", "\\|")


def markdown_tables() -> str:
    """One Markdown table per stage: field, type, default, smoke value where it differs, meaning."""
    from pipelines.core.stages import STAGES, stage_module

    out = []
    for stage in STAGES:
        mod = stage_module(stage)
        smoke = {r[0]: r[2] for r in rows(mod.CONFIG, preset_config(mod, "smoke"))}
        out += [f"`pipelines.{stage}` (`{mod.CONFIG.__name__}`; `--set {stage}.FIELD=VALUE` in `pipelines.full`):", "",
                "| field | type | default | smoke | meaning |", "|---|---|---|---|---|"]
        for name, typ, value, role, meaning in rows(mod.CONFIG, preset_config(mod, "default")):
            small = "" if smoke[name] == value else f"`{_cell(value_text(smoke[name]))}`"
            typ = f"{typ}; {role}" if role else typ
            out.append(f"| `{name}` | {_cell(typ)} | `{_cell(value_text(value))}` | {small} | {_cell(meaning)} |")
        out.append("")
    return "\n".join(out)


def generated_section(text: str) -> str:
    """The generated part of the page's text (between the markers)."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{CONFIG_DOC}: the markers {BEGIN!r} and {END!r} are missing")
    return text.split(BEGIN, 1)[1].split(END, 1)[0]


def main(argv: list[str] | None = None) -> int:
    """Rewrite the page's tables (or, with --check, only compare them)."""
    argv = sys.argv[1:] if argv is None else argv
    text = CONFIG_DOC.read_text()
    fresh = "\n" + markdown_tables() + "\n"
    if "--check" in argv:
        ok = generated_section(text) == fresh
        print(f"{CONFIG_DOC.name}: configuration tables are " + ("up to date" if ok else "stale: run python -m pipelines.core.config_docs"))
        return 0 if ok else 1
    head, rest = text.split(BEGIN, 1)
    CONFIG_DOC.write_text(head + BEGIN + fresh + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
