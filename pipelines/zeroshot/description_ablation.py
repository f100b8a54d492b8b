"""The description ablation: how much each conditioned method's accuracy comes from the description it is given.

Every meta-test task is generated three times, from its own description, from another meta-test
task's (a seeded derangement: no task keeps its own), and from a random string with the same word
lengths. The same sampler noise serves all three, so the drops are paired.
"""
from __future__ import annotations

import string

import numpy as np
import torch

CONDITIONS = ("own", "other_task", "random_string")
ABLATION_SEED = 0  # one derangement and one set of random strings, the same for every training seed


def derangement(n: int, seed: int = ABLATION_SEED) -> np.ndarray:
    """A seeded permutation of range(n) with no fixed point (n >= 2): a random cycle through all tasks."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 tasks, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)  # each task takes the next one's description along the cycle
    return perm


def random_strings(texts: list[str], seed: int = ABLATION_SEED) -> list[str]:
    """Each text with every word replaced by random lowercase letters of the same length (punctuation kept)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase))

    def scramble(word: str) -> str:
        return "".join(rng.choice(letters) if ch.isalpha() else ch for ch in word)

    return [" ".join(scramble(w) for w in t.split()) for t in texts]


def text_encoder(features_info: dict):
    """The run's own text encoder, rebuilt from its features config."""
    from models.encoders import make_text_encoder

    cfg = features_info["config"]
    name = cfg["text_encoder"]
    opts = dict(model=cfg["clip_model"], pretrained=cfg["clip_pretrained"]) if name == "open_clip" else {}
    return make_text_encoder(name, device=cfg.get("device", "cpu"), **opts)


def conditions(data, encode) -> dict[str, torch.Tensor]:
    """Description embeddings [T, d] of the meta-test tasks under each condition; `encode(texts)` -> [T, d]."""
    c = data.test.c
    return {"own": c, "other_task": c[torch.as_tensor(derangement(len(c)))],
            "random_string": encode(random_strings(data.test_descriptions)).to(c.dtype)}


def rows(key: dict, method: str, accuracy: dict[str, float]) -> list[dict]:
    """Rows of one method: its accuracy under each condition, and the drops from its own description."""
    out = [dict(key, method=method, measure=k, value=v) for k, v in accuracy.items()]
    out += [dict(key, method=method, measure=f"drop_{k}", value=accuracy["own"] - accuracy[k]) for k in CONDITIONS[1:]]
    return out


STEM = "description_ablation"  # results/<STEM>.csv and .md


def write(table, folder, csv: bool = True, features_info: dict | None = None):
    """results/description_ablation.{csv,md}: methods as rows, (split, condition or drop) as columns."""
    from pipelines.core import names
    from pipelines.core.results import measure_table

    shown = names.resolve_given(table, features_info)["split"]  # the features' own split by its mode, as every table
    table = table.assign(column=[f"{s} {m}" for s, m in zip(shown, table["measure"])])
    return measure_table(table, folder, STEM, group="column",
                         unit="query accuracy and its drop from the own description, points",
                         title="Description ablation: own description, another task's, a random string", csv=csv)
