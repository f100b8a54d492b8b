"""The memorisation table: how far each method's generated networks sit from the meta-train experts.

One row per (method, guidance scale, seed) and measure (models.zeroshot.novelty): cosine and
normalised L2 to the nearest meta-train expert and to the task's own oracle expert, averaged over the
meta-test tasks. Two reference rows say what "near" means: the meta-train experts against each other
(`train_experts`, own oracle not applicable) and the meta-test experts against the meta-train ones
(`oracle`: a genuinely new task's expert).
"""
from __future__ import annotations

import torch

from models.zeroshot.novelty import MEASURES, novelty
from pipelines.zeroshot.data import SplitData

SHORT = {"cos_nearest_train": "cos→train", "l2_nearest_train": "L2→train",
         "cos_own_oracle": "cos→oracle", "l2_own_oracle": "L2→oracle"}  # markdown column names


def rows(data: SplitData, method: str, w: torch.Tensor, key: dict) -> list[dict]:
    """Memorisation rows of generated raw weights w [T_test, P] (one per meta-test task); `key` names the row."""
    n = data.norm
    out = novelty(n.encode(w), n.encode(data.w_train), n.encode(data.w_test))
    return [dict(key, method=method, measure=k, value=float(out[k].mean()), n_tasks=len(w)) for k in MEASURES]


def reference_rows(data: SplitData, key: dict) -> list[dict]:
    """The reference rows: meta-train experts to their nearest other one; meta-test experts to the meta-train ones."""
    n = data.norm
    train_n = n.encode(data.w_train)
    out = []
    for method, v in (("train_experts", novelty(train_n, train_n, exclude_self=True)),
                      ("oracle", novelty(n.encode(data.w_test), train_n, n.encode(data.w_test)))):
        out += [dict(key, method=method, guidance_scale=None, measure=k, value=float(v[k].mean()), n_tasks=len(v[k]))
                for k in MEASURES if not torch.isnan(v[k]).all()]
    return out


STEM = "memorisation"  # results/<STEM>.csv and .md


def write(table, folder, csv: bool = True, features_info: dict | None = None):
    """results/memorisation.{csv,md}: methods as rows, (split, measure) as columns."""
    from pipelines.core import names
    from pipelines.core.results import measure_table

    shown = names.resolve_given(table, features_info)["split"]  # the features' own split by its mode, as every table
    table = table.assign(column=[f"{s} {SHORT[m]}" for s, m in zip(shown, table["measure"])])
    return measure_table(table, folder, STEM, group="column", scale=1.0,
                         unit="cosine and normalised L2 in the normalised weight space, mean over meta-test tasks",
                         title="Memorisation: generated networks vs the meta-train experts and the task's own expert", csv=csv)
