"""One format for every MLflow tag and param value, so that a search finds what a run name shows.

Floats keep their decimal point (`1.0`, `7.5`, `0.0`), integers and strings stay as they are, so
`tags.guidance_scale = '1.0'` finds the γ = 1 trials; nested configs become dotted keys (`maml.lr`).
"""
from __future__ import annotations

import dataclasses
import math

MAX_VALUE = 6000  # MLflow's limit on a param value


def tag_value(v) -> str:
    """A value as tag text: floats as Python writes them (1.0, 0.25, 1e-05), booleans lower-case, sequences comma-joined."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return ",".join(tag_value(x) for x in v)
    return str(v)


def tag_values(tags: dict) -> dict[str, str]:
    """Every tag value through `tag_value` (None values dropped)."""
    return {k: tag_value(v) for k, v in tags.items() if v is not None}


def flat_params(cfg, prefix: str = "") -> dict[str, str]:
    """A config (dataclass or mapping) as MLflow params: nested configs as dotted keys, values as `tag_value` text."""
    d = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tag_value(v)[:MAX_VALUE]
    return out
