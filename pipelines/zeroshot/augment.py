"""Paraphrase augmentation: training-time rephrasings of the meta-train tasks' easyvqa descriptions.

Users do not write in the suite's templates, and a model trained on one wording per task can miss
another. These rules reword each meta-train question from what it asks (its colour or shape, whether it
is negated, whether it is a yes/no or an open question), so a generator can train on several
(latent, description) pairs per task. Their wording shares no three-word phrase with the held-out
rephrasing set of `pipelines.paraphrases` (tested), and they are applied to meta-train tasks only.
"""
from __future__ import annotations

import functools
import re

from pipelines.core.config import ConfigError
from pipelines.suites.easyvqa import COLOURS, SHAPES, read_easyvqa

MAX_REPHRASINGS = 3  # templates per kind of question

# {c}: a colour, {s}: a shape; "object" stands in where a question names no shape.
TEMPLATES = {
    "has_colour": ("Is anything {c} visible?", "Answer with yes or no: you spot {c}.", "Do we get a {c} object here?"),
    "lacks_colour": ("Is nothing {c} visible?", "Answer with yes or no: you spot no {c}.", "Is the object any hue but {c}?"),
    "has_shape": ("Is a {s} visible?", "Answer with yes or no: you spot a {s}.", "Do we get a {s} here?"),
    "lacks_shape": ("Is no {s} visible?", "Answer with yes or no: you spot no {s}.", "Is the object anything apart from a {s}?"),
    "colour_of": ("Which colour is used for this {s}?", "Give the colouring of this {s}.", "State this {s}'s paint."),
    "shape_of": ("Which outline does something {c} have?", "Give the outline of anything {c}.", "State which outline is {c}."),
    "shape_any": ("Which outline is visible?", "Give the object's outline.", "State the outline you can spot."),
}


@functools.lru_cache(maxsize=1)
def easyvqa_questions() -> frozenset[str]:
    return frozenset(read_easyvqa().questions)


def kind(question: str) -> tuple[str, dict[str, str]]:
    """(template kind, its slots) of an easyvqa question; a ConfigError for a question of another suite."""
    if question not in easyvqa_questions():  # other suites' wordings can look alike and mean otherwise
        raise ConfigError(f"cannot rephrase {question!r}: training-time rephrasings exist for easyvqa questions only; "
                          f"set rephrasings=0 for this suite")
    words = re.findall(r"[a-z]+", question.lower())
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES]
    negated = bool({"not", "no"} & set(words))
    if words[:1] == ["what"]:
        if "color" in words and len(colours) == 0:
            return "colour_of", {"s": shapes[0] if shapes else "object"}
        if "shape" in words and not shapes and len(colours) <= 1:
            return ("shape_of", {"c": colours[0]}) if colours else ("shape_any", {})
    elif len(colours) + len(shapes) == 1:
        if colours:
            return ("lacks_colour" if negated else "has_colour"), {"c": colours[0]}
        return ("lacks_shape" if negated else "has_shape"), {"s": shapes[0]}
    raise ConfigError(f"no training-time rephrasing rule for the easyvqa question {question!r}")


def rephrase(question: str, n: int) -> list[str]:
    """The first `n` (at most MAX_REPHRASINGS) training-time rephrasings of an easyvqa question."""
    if not 0 <= n <= MAX_REPHRASINGS:
        raise ConfigError(f"rephrasings={n}: choose 0 to {MAX_REPHRASINGS}")
    k, slots = kind(question)
    return [t.format(**slots) for t in TEMPLATES[k][:n]]


def check_run(run, n: int) -> None:
    """A ConfigError, before any training, unless every task of the run can be rephrased `n` times."""
    import pandas as pd

    from orchestrator.storage.suite_features import TASKS_FILE

    if n:
        for d in pd.read_parquet(run.features / TASKS_FILE, columns=["description"])["description"]:
            rephrase(d, n)


def rephrased_conditions(run, data, n: int):
    """Embeddings [N n, d_c] of `n` training-time rephrasings of each meta-train task of `data` (task-major:
    task i's are rows i n .. i n + n - 1), from the run's own text encoder; None for n = 0."""
    import pandas as pd

    from orchestrator.storage.suite_features import TASKS_FILE, read_info
    from pipelines.zeroshot.description_ablation import text_encoder

    if n == 0:
        return None
    tasks = pd.read_parquet(run.features / TASKS_FILE, columns=["id", "description"])
    desc = dict(zip(tasks["id"], tasks["description"]))
    texts = [t for task in data.train_ids for t in rephrase(desc[task], n)]
    return text_encoder(read_info(run.features)).encode(texts).to(data.train.c.dtype)


def augmented_pairs(z, c, c_rephrased, n: int):
    """(latents, conditions) with each task's rephrasings appended, paired with its latent: [N (1 + n), ...]."""
    import torch

    if c_rephrased is None:
        return z, c
    return torch.cat([z, z.repeat_interleave(n, dim=0)]), torch.cat([c, c_rephrased])
