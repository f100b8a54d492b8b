"""The `procedural` task family: seeded predicates over each image's (colour, shape).

Every candidate task is a function on the 24 (colour, shape) cells; a yes/no task is a bitmask over the
cells, a multi-class task maps the cells of its domain to answers. Candidates with the same function on
the labelled images are generated once, so n distinct tasks are n distinct functions, not rewordings.
"""
from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import META_TEST, META_TRAIN, SuiteError, Task, TaskSuite
from .easyvqa import COLOURS, SHAPES, image_attributes, read_easyvqa
from .splits import assign_splits, check_holdout, stratified_support_query, task_rng

N_CELLS = len(COLOURS) * len(SHAPES)
CELL_C = np.repeat(np.arange(len(COLOURS)), len(SHAPES))  # [24] colour of cell = c * 3 + s
CELL_S = np.tile(np.arange(len(SHAPES)), len(COLOURS))  # [24] shape of cell
COL_BITS = [sum(1 << i for i in range(N_CELLS) if CELL_C[i] == c) for c in range(len(COLOURS))]
SHAPE_BITS = [sum(1 << i for i in range(N_CELLS) if CELL_S[i] == s) for s in range(len(SHAPES))]
FULL = (1 << N_CELLS) - 1
YES_NO = ["no", "yes"]  # sorted, as everywhere: label 1 is "yes"


@dataclass(frozen=True)
class Candidate:
    """One generatable task: its wordings (canonical first), concepts and answer per cell (-1 = not asked)."""

    family: str
    wordings: tuple[str, ...]
    concepts: tuple[str, ...]
    answers: tuple[str, ...]
    cell_labels: tuple[int, ...]  # [24]


def _or(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _nor(words: Sequence[str]) -> str:
    return f"not {words[0]}" if len(words) == 1 else f"neither {words[0]} nor {words[1]}"


def _cmask(A: Sequence[int]) -> int:
    return functools.reduce(lambda m, c: m | COL_BITS[c], A, 0)


def _subsets(n: int, sizes: Sequence[int]):
    return [A for k in sizes for A in itertools.combinations(range(n), k)]


def _yes_no_families():
    """Yield (family, wordings, concept words, negated, cell bitmask) for every yes/no predicate."""
    C, S = COLOURS, SHAPES
    cols = lambda A: [C[c] for c in A]  # noqa: E731
    for A in _subsets(8, (1, 2, 3)):
        a = _or(cols(A))
        yield "colour", (f"is the shape {a}?", f"is the color of the shape {a}?", f"does the image show a {a} shape?",
                         f"is the object in the picture {a}?"), cols(A), False, _cmask(A)
    for A in _subsets(8, (1, 2)):
        n, o = _nor(cols(A)), _or(cols(A))
        yield "not-colour", (f"is the shape {n}?", f"is the shape any colour other than {o}?",
                             f"does the image show a shape that is {n}?"), cols(A), True, FULL ^ _cmask(A)
    for s in range(3):
        yield "shape", (f"is the shape a {S[s]}?", f"does the picture contain a {S[s]}?",
                        f"is the object a {S[s]}?"), [S[s]], False, SHAPE_BITS[s]
        yield "not-shape", (f"is the shape not a {S[s]}?", f"is the shape anything other than a {S[s]}?",
                            f"does the image show something that is not a {S[s]}?"), [S[s]], True, FULL ^ SHAPE_BITS[s]
    for A, s in itertools.product(_subsets(8, (1, 2, 3)), range(3)):
        a, m, sh = _or(cols(A)), _cmask(A), S[s]
        yield "colour-and-shape", (f"is it a {a} {sh}?", f"is the shape a {a} {sh}?",
                                   f"does the image show a {a} {sh}?"), cols(A) + [sh], False, m & SHAPE_BITS[s]
        yield "colour-not-shape", (f"is it a {a} shape that is not a {sh}?", f"is the shape {a} but not a {sh}?",
                                   f"does the image show a {a} shape other than a {sh}?"), cols(A) + [sh], True, \
            m & ~SHAPE_BITS[s] & FULL
        yield "colour-or-shape", (f"is the shape {a}, or is it a {sh}?", f"is it either a {a} shape or a {sh}?",
                                  f"does the image show a {sh} or a {a} shape?"), cols(A) + [sh], False, \
            m | SHAPE_BITS[s]
    for A, s in itertools.product(_subsets(8, (1, 2)), range(3)):
        n, a, m, sh = _nor(cols(A)), _or(cols(A)), _cmask(A), S[s]
        yield "shape-not-colour", (f"is it a {sh} that is {n}?", f"is the shape a {sh} whose color is {n}?",
                                   f"does the image show a {sh} that is {n}?"), [sh] + cols(A), True, \
            SHAPE_BITS[s] & ~m & FULL
        yield "neither", (f"is it neither a {sh} nor a {a} shape?", f"is the shape not a {sh} and not {a}?",
                          f"does the image show a shape that is not a {sh} and whose colour is not {a}?"), \
            [sh] + cols(A), True, FULL & ~SHAPE_BITS[s] & ~m
    for k in (2, 3):
        for cells in itertools.combinations(range(N_CELLS), k):
            items = _or([f"a {C[CELL_C[i]]} {S[CELL_S[i]]}" for i in cells])
            words = sorted({C[CELL_C[i]] for i in cells}, key=C.index) + sorted(
                {S[CELL_S[i]] for i in cells}, key=S.index)
            yield f"any-of-{k}", (f"is it {items}?", f"is the shape {items}?", f"does the image show {items}?"), \
                words, False, sum(1 << i for i in cells)
    for (s1, s2), A1, A2 in itertools.product(itertools.combinations(range(3), 2), _subsets(8, (1, 2, 3)),
                                              _subsets(8, (1, 2, 3))):
        a1, a2 = _or(cols(A1)), _or(cols(A2))
        words = sorted(set(cols(A1) + cols(A2)), key=C.index) + [S[s1], S[s2]]
        yield "two-kinds", (f"is it a {S[s1]} that is {a1}, or a {S[s2]} that is {a2}?",
                            f"is the shape either a {S[s1]} colored {a1} or a {S[s2]} colored {a2}?",
                            f"does the image show a {a1} {S[s1]} or a {a2} {S[s2]}?"), words, False, \
            (_cmask(A1) & SHAPE_BITS[s1]) | (_cmask(A2) & SHAPE_BITS[s2])


def _multi_class_families():
    """Yield (family, wordings, concept words, negated, domain bitmask, 'colour'|'shape', allowed values)."""
    C, S = COLOURS, SHAPES
    cols = lambda A: [C[c] for c in A]  # noqa: E731
    nouns = [("shape", [], FULL)] + [(S[s], [S[s]], SHAPE_BITS[s]) for s in range(3)]
    for noun, w, dom in nouns:
        yield "what-colour", (f"what color is the {noun}?", f"what is the colour of the {noun}?",
                              f"which color does the {noun} have?"), w, False, dom, "colour", range(8)
    for s in range(3):
        sh = S[s]
        yield "what-colour", (f"what color is the shape that is not a {sh}?", f"if the shape is not a {sh}, what "
                              f"color is it?", f"which colour does the shape have, given it is not a {sh}?"), [sh], \
            True, FULL ^ SHAPE_BITS[s], "colour", range(8)
    for A, (noun, w, dom) in itertools.product(_subsets(8, (2, 3, 4)), nouns):
        a = _or(cols(A))
        yield "which-colour", (f"which color is the {noun}, {a}?", f"of {a}, what colour is the {noun}?",
                               f"what color does the {noun} have: {a}?"), cols(A) + w, False, dom & _cmask(A), \
            "colour", A
    things = [("thing", [], FULL)] + [(f"{_or(cols(A))} thing", cols(A), _cmask(A)) for A in _subsets(8, (1, 2))]
    for thing, w, dom in things:
        yield "what-shape", (f"what shape is the {thing}?", f"what is the shape of the {thing}?",
                             f"which shape does the {thing} have?"), w, False, dom, "shape", range(3)
        for B in itertools.combinations(range(3), 2):
            b = _or([f"a {S[s]}" for s in B])
            yield "which-shape", (f"which shape is the {thing}, {b}?", f"which of {b} is the {thing}?",
                                  f"what shape is the {thing}: {b}?"), w + [S[s] for s in B], False, dom, "shape", B


@functools.lru_cache(maxsize=4)
def catalogue(present_cells: int) -> tuple[Candidate, ...]:
    """Every distinct task the generator can make, given the bitmask of cells that have labelled images."""
    out: list[Candidate] = []
    seen_fn: set = set()
    seen_text: set[str] = set()

    def add(family, wordings, words, negated, key, answers, cell_labels):
        ids = {task_id(wordings[0])}
        if key in seen_fn or seen_text & (set(wordings) | ids):
            return  # same function as an earlier task, or a clashing wording: keep the earlier one
        seen_fn.add(key)
        seen_text.update(wordings, ids)
        concepts = tuple(words) + (("negation",) if negated else ()) + (f"template:{family}",)
        out.append(Candidate(family, wordings, concepts, tuple(answers), tuple(cell_labels)))

    for family, wordings, words, negated, m in _yes_no_families():
        m &= present_cells
        if m and m != present_cells:  # skip predicates that are always true or always false on the images
            add(family, wordings, words, negated, ("yn", m), YES_NO,
                [((m >> i) & 1) if (present_cells >> i) & 1 else -1 for i in range(N_CELLS)])
    for family, wordings, words, negated, dom, attr, allowed in _multi_class_families():
        cells = [i for i in range(N_CELLS) if (dom & present_cells) >> i & 1]
        value = CELL_C if attr == "colour" else CELL_S
        seen = sorted({int(value[i]) for i in cells} & set(allowed))
        if len(seen) < 2:
            continue
        names = [(COLOURS if attr == "colour" else SHAPES)[v] for v in seen]
        order = sorted(range(len(names)), key=names.__getitem__)  # answers sorted by name, as everywhere
        label_of = {seen[j]: k for k, j in enumerate(order)}
        labels = [label_of.get(int(value[i]), -1) if i in cells else -1 for i in range(N_CELLS)]
        add(family, wordings, words, negated, ("mc", attr, tuple(labels)), sorted(names), labels)
    return tuple(out)


def task_id(wording: str) -> str:
    """A stable, readable task id: 'proc-' + a slug of the canonical wording."""
    return "proc-" + "-".join(re.findall(r"[a-z0-9]+", wording.lower()))


def _sample(cell_labels: np.ndarray, cell_pools: list[np.ndarray], n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Draw up to n images with answers as balanced as the pools allow; returns (image idx, labels)."""
    n_classes = int(cell_labels.max()) + 1
    pools = [np.concatenate([cell_pools[i] for i in np.flatnonzero(cell_labels == k)]) for k in range(n_classes)]
    sizes = np.asarray([len(p) for p in pools])
    remaining, imgs, labs = min(n, int(sizes.sum())), [], []
    for i, k in enumerate(np.argsort(sizes, kind="stable")):  # water-filling: small pools first
        q = min(int(sizes[k]), remaining // (n_classes - i))
        imgs.append(rng.choice(pools[k], size=q, replace=False))
        labs.append(np.full(q, k, np.int64))
        remaining -= q
    return np.concatenate(imgs), np.concatenate(labs)


def load_procedural(
    n_tasks: int = 1000,
    samples_per_task: int = 200,
    split_mode: str = "random",
    holdout: tuple[str, ...] = ("gray", "teal", "triangle"),
    meta_test_fraction: float = 0.3,
    support_fraction: float = 0.7,
    seed: int = 0,
) -> TaskSuite:
    """Generate n_tasks distinct seeded predicate tasks over the easy-VQA images' colour and shape."""
    raw = read_easyvqa()
    colour, shape, stats = image_attributes()
    labelled = np.flatnonzero(colour >= 0)
    cell = colour[labelled] * len(SHAPES) + shape[labelled]
    cell_pools = [labelled[cell == i] for i in range(N_CELLS)]  # image indices per (colour, shape) cell
    present = sum(1 << i for i in range(N_CELLS) if len(cell_pools[i]))
    cands = catalogue(present)
    if not 1 <= n_tasks <= len(cands):
        raise SuiteError(f"n_tasks={n_tasks}: the procedural generator makes between 1 and {len(cands)} distinct tasks")
    if samples_per_task < 4:
        raise SuiteError(f"samples_per_task={samples_per_task} must be >= 4 (2 answers x support and query)")
    holdout = check_holdout(holdout, {c for cand in cands for c in cand.concepts}, split_mode)

    # Round-robin over families (each in seeded random order), so small n still mixes every kind of task.
    rng = np.random.default_rng(seed)
    families = sorted({c.family for c in cands})
    fam = np.asarray([families.index(c.family) for c in cands])
    rank = np.empty(len(cands), np.int64)
    for f in range(len(families)):
        idx = np.flatnonzero(fam == f)
        rank[idx[rng.permutation(len(idx))]] = np.arange(len(idx))
    chosen = np.sort(np.lexsort((fam, rank))[:n_tasks])

    tasks = []
    for j in chosen.tolist():
        cand = cands[j]
        tid = task_id(cand.wordings[0])
        t_rng = task_rng(seed, tid)
        description = cand.wordings[int(t_rng.integers(len(cand.wordings)))]
        img, lab = _sample(np.asarray(cand.cell_labels), cell_pools, samples_per_task, t_rng)
        s, q = stratified_support_query(lab, support_fraction, t_rng)
        tasks.append(Task(
            id=tid, description=description, answers=list(cand.answers), answer_prompts=list(cand.answers),
            split="", support_images=img[s], support_labels=lab[s], query_images=img[q], query_labels=lab[q],
            concepts=cand.concepts, paraphrases=cand.wordings,
        ))
    splits = assign_splits({t.id: t.concepts for t in tasks}, split_mode, holdout, meta_test_fraction, seed)
    for t in tasks:
        t.split = splits[t.id]
    info = {
        "suite": "procedural", "n_tasks": n_tasks, "samples_per_task": samples_per_task, "split_mode": split_mode,
        "holdout": list(holdout), "meta_test_fraction": meta_test_fraction, "support_fraction": support_fraction,
        "seed": seed, "max_tasks": len(cands), "attributes": stats,
        "n_meta_train": sum(t.split == META_TRAIN for t in tasks),
        "n_meta_test": sum(t.split == META_TEST for t in tasks),
    }
    return TaskSuite(name="procedural", images=list(raw.images), tasks=tasks, info=info)


def max_tasks() -> int:
    """How many distinct tasks the procedural generator can make from the labelled images."""
    colour, shape, _ = image_attributes()
    ok = colour >= 0
    return len(catalogue(sum(1 << int(i) for i in np.unique(colour[ok] * len(SHAPES) + shape[ok]))))
