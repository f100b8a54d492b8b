"""What readers see: readable method names grouped by route, one split name everywhere, percentages, `1 seed`."""
from __future__ import annotations

import pandas as pd

from pipelines.core import names
from pipelines.zeroshot.methods import METHODS


def test_every_registered_method_has_a_readable_name_and_its_registry_route():
    for m in METHODS.values():
        assert names.method_name(m.name) != m.name, f"{m.name} has no readable name"
        assert names.route(m.name) == m.group, f"{m.name}: route {names.route(m.name)}, registry group {m.group}"
    assert names.method_name("hnet_hyperldm", 7.5) == "HNet + HyperLDM (γ = 7.5)"
    assert names.method_name("hnet_hyperldm", float("nan")) == "HNet + HyperLDM"


def test_routes_are_grouped_in_one_order_and_coloured_once():
    order = names.route_order(["hvae_hyperldm", "text_hnet", "hnet_hyperclip", "chance", "multitask", "hnet_hyperldm"])
    assert order == ["chance", "text_hnet", "multitask", "hnet_hyperclip", "hnet_hyperldm", "hvae_hyperldm"]
    assert len({colour for _, colour in names.ROUTES.values()}) == len(names.ROUTES)
    assert names.route_colour("hnet_hyperclip") == names.route_colour("hnet_hyperldm") != names.route_colour("hvae_hyperldm")


def test_the_features_own_split_is_named_by_its_mode_for_display_only():
    table = pd.DataFrame({"split": ["given", "given"], "accuracy": [0.5, 0.6]})
    shown = names.resolve_given(table, {"suite_info": {"split_mode": "random"}})
    assert list(shown["split"]) == ["random", "random"] and list(table["split"]) == ["given", "given"]
    assert names.split_name("random") == "random split" and names.resolve_given(table, None) is table


def test_numbers_are_percentages_and_one_seed_has_no_std():
    assert names.pct(0.94062) == "94.1" and names.pct(float("nan")) == "n/a"
    assert names.mean_spread(0.5, 0.0213, 3) == "50.0 ± 2.1"
    assert names.mean_spread(0.5, float("nan"), 1) == "50.0 (1 seed)"
    assert names.interval(0.41, 0.597) == "[41.0, 59.7]"
