"""How every table and figure names methods, routes and splits, and the one colour of each route.

The CSV files keep the method ids (`hnet_hyperldm`); what a reader sees uses these names, grouped by
the route that produces the weights, in one order everywhere.
"""
from __future__ import annotations

import math

from pipelines.zeroshot.methods import METHODS as ZERO_SHOT

# route -> (heading, colour); the order is the order of groups in every table and figure
ROUTES: dict[str, tuple[str, str]] = {
    "reference": ("References", "#4d4d4d"),
    "baseline": ("Baselines", "#8c8c8c"),
    "support": ("Support-set generators", "#2ca02c"),
    "hnet": ("HNet route", "#1f77b4"),
    "hvae": ("HVAE route", "#d95f02"),
}

# method id -> (readable name, route): the zero-shot registry's own titles and groups, then the rows that are not
# zero-shot methods (the memorisation table's reference, the few-shot methods)
METHODS: dict[str, tuple[str, str]] = {
    **{m.name: (m.title, m.group) for m in ZERO_SHOT.values()},
    "train_experts": ("Meta-train experts (reference)", "reference"),
    "maml": ("MAML", "baseline"),
    "fomaml": ("First-order MAML", "baseline"),
    "finetune_multitask": ("Multitask + fine-tuning", "baseline"),
    "finetune_text_hnet": ("Text-conditioned HNet + fine-tuning", "baseline"),
    "hypermaml": ("HyperMAML", "support"),
    "hypertransformer": ("HyperTransformer", "support"),
    "metadiff": ("MetaDiff", "support"),
    "hnet_hyperldm_support_guided": ("HNet + HyperLDM, support-guided", "hnet"),
}

SPLITS = {"random": "random split", "compositional": "compositional split", "given": "the suite's own split"}


def method_name(method: str, guidance_scale: float | None = None) -> str:
    """`hnet_hyperldm`, 7.5 -> `HNet + HyperLDM (γ = 7.5)`; an unknown id is shown as it is."""
    name = METHODS.get(method, (method, ""))[0]
    if guidance_scale is None or (isinstance(guidance_scale, float) and math.isnan(guidance_scale)):
        return name
    return f"{name} (γ = {guidance_scale:g})"


def route(method: str) -> str:
    """The route key of a method id (`baseline` for an unknown id)."""
    return METHODS.get(method, ("", "baseline"))[1]


def route_colour(method: str) -> str:
    return ROUTES[route(method)][1]


def route_order(methods) -> list:
    """`methods` (ids, in their given order) stably regrouped route by route."""
    methods = list(methods)
    rank = {r: i for i, r in enumerate(ROUTES)}
    return sorted(methods, key=lambda m: (rank[route(m)], methods.index(m)))


def split_name(split: str) -> str:
    """`random` -> `random split`, in every table and figure."""
    return SPLITS.get(split, f"{split} split")


def given_as(features_info: dict) -> str:
    """What the split `given` (the features' own) is called in every output: the features' split mode, e.g. `random`."""
    return (features_info or {}).get("suite_info", {}).get("split_mode", "given")


def resolve_given(table, features_info: dict | None):
    """A copy of `table` for display, its split `given` renamed by `given_as` (the CSVs keep `given`)."""
    if features_info is None or "split" not in table or not (table["split"] == "given").any():
        return table
    return table.assign(split=table["split"].replace("given", given_as(features_info)))


def pct(x: float, digits: int = 1) -> str:
    """A fraction as a percentage without the sign: 0.9406 -> `94.1`; NaN -> `n/a`."""
    return "n/a" if x is None or x != x else f"{100 * x:.{digits}f}"


def mean_spread(mean: float, std: float, seeds: int, digits: int = 1) -> str:
    """`94.1 ± 2.1` (std over seeds), or `94.1 (1 seed)` where a std does not exist."""
    if seeds <= 1 or std != std:
        return f"{pct(mean, digits)} (1 seed)"
    return f"{pct(mean, digits)} ± {pct(std, digits)}"


def interval(low: float, high: float, digits: int = 1) -> str:
    return f"[{pct(low, digits)}, {pct(high, digits)}]"
