"""The `easyvqa` suite: one task per unique easy-VQA question, as in Meta-VQA."""
from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass

import numpy as np

from .base import META_TEST, META_TRAIN, SuiteError, Task, TaskSuite
from .splits import (
    assign_splits,
    check_holdout,
    stratified_subsample,
    stratified_support_query,
    task_rng,
)

COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
# Fewer meta-test tasks than this makes a compositional evaluation too noisy to compare methods.
MIN_COMPOSITIONAL_TEST_TASKS = 20


@dataclass(frozen=True)
class EasyVQARaw:
    """easy-VQA as shipped: image paths and de-duplicated (question, image, answer) records."""

    images: tuple[str, ...]  # absolute paths; train images first, then test images
    questions: tuple[str, ...]  # [n_records]
    image_idx: np.ndarray  # int64 [n_records], index into images
    answers: tuple[str, ...]  # [n_records]
    n_duplicates: int  # identical (image, question) pairs dropped


@functools.lru_cache(maxsize=1)
def read_easyvqa() -> EasyVQARaw:
    """Read every easy-VQA image and question from the installed `easy_vqa` package (cached)."""
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise SuiteError("the easyvqa suite needs the PyPI package easy-vqa: pip install easy-vqa==1.0") from e
    images: list[str] = []
    questions: list[str] = []
    image_idx: list[int] = []
    answers: list[str] = []
    seen: set[tuple[int, str]] = set()
    n_dup = 0
    # Train and test image ids are separate namespaces (both start at 0), so index them per part.
    for get_q, get_paths in (
        (easy_vqa.get_train_questions, easy_vqa.get_train_image_paths),
        (easy_vqa.get_test_questions, easy_vqa.get_test_image_paths),
    ):
        paths = get_paths()
        offset = len(images)
        ids = sorted(paths)
        local = {image_id: offset + k for k, image_id in enumerate(ids)}
        images.extend(os.path.abspath(paths[i]) for i in ids)
        for q, a, image_id in zip(*get_q()):
            key = (local[image_id], q)
            if key in seen:
                n_dup += 1
                continue
            seen.add(key)
            questions.append(q)
            image_idx.append(local[image_id])
            answers.append(a)
    return EasyVQARaw(tuple(images), tuple(questions), np.asarray(image_idx, np.int64), tuple(answers), n_dup)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def question_concepts(question: str) -> tuple[str, ...]:
    """Colours and shapes a question mentions, then 'negation' if negated, then its template tag."""
    words = _words(question)
    found = [w for w in COLOURS + SHAPES if w in words]
    neg = ["negation"] if {"not", "no"} & set(words) else []
    # The template is the question with its concept words blanked: paraphrase families share one.
    template = "-".join("COLOR" if w in COLOURS else "SHAPE" if w in SHAPES else w for w in words)
    return tuple(found + neg + ["template:" + template])


def task_id_for(question: str) -> str:
    """A stable, readable task id: a slug of the question plus a short hash (slugs drop punctuation)."""
    slug = "-".join(_words(question))
    return f"easyvqa-{slug}-{hashlib.sha1(question.encode('utf-8')).hexdigest()[:6]}"


def image_attributes() -> tuple[np.ndarray, np.ndarray, dict]:
    """Each image's (colour, shape) read off its answers: int arrays over `read_easyvqa().images`, -1 = dropped."""
    raw = read_easyvqa()
    n = len(raw.images)
    # Evidence per image: attributes it has (pos) and has not (neg), from every question about it.
    pos_c = np.zeros((n, len(COLOURS)), bool)
    neg_c = np.zeros_like(pos_c)
    pos_s = np.zeros((n, len(SHAPES)), bool)
    neg_s = np.zeros_like(pos_s)
    parsed = {q: (_words(q), question_concepts(q)) for q in set(raw.questions)}
    for q, i, a in zip(raw.questions, raw.image_idx.tolist(), raw.answers):
        words, concepts = parsed[q]
        named = [c for c in concepts if c in COLOURS or c in SHAPES]
        if a in ("yes", "no"):
            # "is there (not) a red shape?" -> yes/no says whether the named attribute is present.
            present = (a == "yes") != ("negation" in concepts)
            for c in named:
                arr = (pos_c if present else neg_c) if c in COLOURS else (pos_s if present else neg_s)
                arr[i, (COLOURS if c in COLOURS else SHAPES).index(c)] = True
        else:
            # "what color is the circle?" -> the answer is one attribute, the named one is the other.
            for c in named + [a]:
                if c in COLOURS:
                    pos_c[i, COLOURS.index(c)] = True
                elif c in SHAPES:
                    pos_s[i, SHAPES.index(c)] = True

    def resolve(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # With no direct answer, "not red, not blue, ..." for all but one value still pins it down.
        pos = pos | ((pos.sum(1) == 0) & (neg.sum(1) == neg.shape[1] - 1))[:, None] & ~neg
        one = pos.sum(1) == 1
        clash = (pos & neg).any(1) | (pos.sum(1) > 1)
        return np.where(one & ~clash, pos.argmax(1), -1), clash, pos.sum(1) == 0

    colour, clash_c, none_c = resolve(pos_c, neg_c)
    shape, clash_s, none_s = resolve(pos_s, neg_s)
    ok = (colour >= 0) & (shape >= 0)
    colour, shape = np.where(ok, colour, -1), np.where(ok, shape, -1)
    stats = {
        "n_images": n,
        "n_labelled": int(ok.sum()),
        "n_inconsistent": int((clash_c | clash_s).sum()),
        "n_unknown": int(((none_c | none_s) & ~(clash_c | clash_s)).sum()),
    }
    return colour.astype(np.int64), shape.astype(np.int64), stats


def load_easyvqa(
    split_mode: str = "random",
    holdout: tuple[str, ...] = ("gray", "teal", "triangle"),
    meta_test_fraction: float = 0.3,
    support_fraction: float = 0.7,
    seed: int = 0,
    max_samples_per_task: int | None = None,
) -> TaskSuite:
    """Build the easyvqa suite: 107 question tasks, seeded support/query and meta splits."""
    raw = read_easyvqa()
    by_question: dict[str, list[int]] = {}
    for r, q in enumerate(raw.questions):
        by_question.setdefault(q, []).append(r)
    questions = sorted(by_question)
    ids = {q: task_id_for(q) for q in questions}
    concepts = {ids[q]: question_concepts(q) for q in questions}
    holdout = check_holdout(holdout, {c for cs in concepts.values() for c in cs}, split_mode)
    splits = assign_splits(
        concepts, split_mode, holdout, meta_test_fraction, seed, min_meta_test=MIN_COMPOSITIONAL_TEST_TASKS
    )
    if max_samples_per_task is not None and max_samples_per_task < 2:
        raise SuiteError(f"max_samples_per_task={max_samples_per_task} must be >= 2 (or None for all samples)")
    tasks = []
    for q in questions:
        rows = np.asarray(by_question[q], np.int64)
        answers = sorted({raw.answers[r] for r in rows})
        labels = np.asarray([answers.index(raw.answers[r]) for r in rows], np.int64)
        rng = task_rng(seed, ids[q])
        if max_samples_per_task is not None and len(rows) > max_samples_per_task:
            keep = stratified_subsample(labels, max_samples_per_task, rng)
            rows, labels = rows[keep], labels[keep]
        s, qr = stratified_support_query(labels, support_fraction, rng)
        img = raw.image_idx[rows]
        tasks.append(
            Task(
                id=ids[q],
                description=q,
                answers=answers,
                answer_prompts=list(answers),
                split=splits[ids[q]],
                support_images=img[s],
                support_labels=labels[s],
                query_images=img[qr],
                query_labels=labels[qr],
                concepts=concepts[ids[q]],
            )
        )
    info = {
        "suite": "easyvqa",
        "split_mode": split_mode,
        "holdout": list(holdout),
        "meta_test_fraction": meta_test_fraction,
        "support_fraction": support_fraction,
        "seed": seed,
        "max_samples_per_task": max_samples_per_task,
        "n_duplicates_dropped": raw.n_duplicates,
        "n_meta_train": sum(t.split == META_TRAIN for t in tasks),
        "n_meta_test": sum(t.split == META_TEST for t in tasks),
    }
    return TaskSuite(name="easyvqa", images=list(raw.images), tasks=tasks, info=info)
