"""A user's own tasks as a JSONL task file (format: docs/task_file.md): read into a TaskSuite, write any suite."""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter

import numpy as np

from models.encoders.base import not_a_file

from .base import META_TEST, META_TRAIN, SPLITS, SuiteError, Task, TaskSuite
from .splits import split_tasks_random, stratified_support_query, task_rng

REQUIRED = ("id", "description", "answers", "examples")
OPTIONAL = ("split", "answer_prompts", "concepts", "paraphrases")
EXAMPLE_FIELDS = ("image", "answer", "role")
ROLES = ("support", "query")


def _fail(path: str, line: int, field: str, problem: str, fix: str) -> SuiteError:
    """One error message shape for every problem: where, which field, what is wrong, how to fix it."""
    return SuiteError(f"{path}, line {line}, field '{field}': {problem}. Fix: {fix}")


def _str_list(obj: dict, key: str, path: str, line: int, required: bool) -> list[str] | None:
    """A list of non-empty, distinct strings, or None when absent and optional."""
    if key not in obj and not required:
        return None
    v = obj.get(key)
    if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
        raise _fail(path, line, key, f"expected a list of non-empty strings, got {v!r}",
                    f'write e.g. "{key}": ["...", "..."]')
    if not v:
        raise _fail(path, line, key, "the list is empty", "give at least one entry")
    dup = sorted(x for x, k in Counter(v).items() if k > 1)
    if dup:
        raise _fail(path, line, key, f"duplicate entries {dup}", "list each entry once")
    return list(v)


def _parse_line(text: str, path: str, line: int, folder: str) -> dict:
    """Validate one task line; returns its fields with example images resolved to absolute paths."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise SuiteError(
            f"{path}, line {line}: invalid JSON ({e.msg} at column {e.colno}). "
            "Fix: each line must be one complete JSON object, e.g. {\"id\": ..., \"description\": ..., ...}"
        ) from None
    except RecursionError:
        raise SuiteError(f"{path}, line {line}: JSON nested too deeply to read. Fix: one flat task object per line "
                         "(see docs/task_file.md)") from None
    if not isinstance(obj, dict):
        raise SuiteError(
            f"{path}, line {line}: expected a JSON object, got {type(obj).__name__}. Fix: one task object per line"
        )
    unknown = sorted(set(obj) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise _fail(path, line, unknown[0], "unknown field", f"use only {', '.join(REQUIRED + OPTIONAL)}")
    for key in REQUIRED:
        if key not in obj:
            raise _fail(path, line, key, "missing", f"add \"{key}\" (required: {', '.join(REQUIRED)})")
    for key in ("id", "description"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise _fail(path, line, key, f"expected a non-empty string, got {obj[key]!r}", f'write e.g. "{key}": "..."')
    answers = _str_list(obj, "answers", path, line, required=True)
    prompts = _str_list(obj, "answer_prompts", path, line, required=False) or list(answers)
    if len(prompts) != len(answers):
        raise _fail(path, line, "answer_prompts", f"{len(prompts)} prompts for {len(answers)} answers",
                    "give one prompt per answer, in the same order, or leave the field out")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise _fail(path, line, "split", f"unknown split {split!r}",
                    f"use {META_TRAIN!r} or {META_TEST!r}, or leave it out")
    if not isinstance(obj["examples"], list):
        raise _fail(path, line, "examples", f"expected a list, got {type(obj['examples']).__name__}",
                    'write "examples": [{"image": "img/0.png", "answer": "yes"}, ...]')
    examples = []
    for k, ex in enumerate(obj["examples"]):
        where = f"examples[{k}]"
        if not isinstance(ex, dict):
            raise _fail(path, line, where, f"expected an object, got {ex!r}", 'write {"image": "...", "answer": "..."}')
        extra = sorted(set(ex) - set(EXAMPLE_FIELDS))
        if extra:
            raise _fail(path, line, f"{where}.{extra[0]}", "unknown field", f"use only {', '.join(EXAMPLE_FIELDS)}")
        image = ex.get("image")
        if not isinstance(image, str) or not image.strip():
            raise _fail(path, line, f"{where}.image", f"expected a non-empty path string, got {image!r}",
                        "give the image path, absolute or relative to the task file")
        resolved = os.path.normpath(os.path.join(folder, os.path.expanduser(image)))
        if why := not_a_file(resolved):
            raise _fail(path, line, f"{where}.image", f"image path {resolved} is {why}",
                        "check the path (relative paths are relative to the task file's folder)")
        answer = ex.get("answer")
        if answer is not None and answer not in answers:
            raise _fail(path, line, f"{where}.answer", f"{answer!r} is not among answers {answers}",
                        "add it to \"answers\" or correct the example")
        role = ex.get("role")
        if role is not None and (role not in ROLES or answer is None):
            raise _fail(path, line, f"{where}.role", f"role {role!r} needs an answer and one of {ROLES}",
                        "use \"support\" or \"query\" on labelled examples, or leave it out")
        examples.append((resolved, answer, role))
    labelled = [e for e in examples if e[1] is not None]
    if labelled and 0 < sum(e[2] is not None for e in labelled) < len(labelled):
        raise _fail(path, line, "examples", "some labelled examples have a role and some do not",
                    "give every labelled example a role, or none (then support/query is drawn, stratified)")
    return {
        "id": obj["id"], "description": obj["description"], "answers": answers, "answer_prompts": prompts,
        "split": split, "examples": examples, "concepts": tuple(_str_list(obj, "concepts", path, line, False) or ()),
        "paraphrases": tuple(_str_list(obj, "paraphrases", path, line, False) or ()),
    }


def read_task_file(
    path: str, support_fraction: float = 0.7, meta_test_fraction: float = 0.3, seed: int = 0
) -> TaskSuite:
    """Read a JSONL task file into a TaskSuite; raises SuiteError naming file, line and field on bad input."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise SuiteError(f"task file not found: {path}")
    folder = os.path.dirname(path)
    entries, first_line = [], {}
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise SuiteError(f"{path}, line {line}: not UTF-8 text (byte {err.object[err.start]:#04x} at column "
                                 f"{err.start + 1}). Fix: save the task file as UTF-8") from None
            if not text.strip():
                continue  # blank lines are allowed (e.g. a trailing newline)
            e = _parse_line(text, path, line, folder)
            if e["id"] in first_line:
                raise _fail(path, line, "id", f"duplicate task id {e['id']!r} (lines {first_line[e['id']]} and {line})",
                            "give each task a unique id")
            first_line[e["id"]] = line
            entries.append(e)
    if not entries:
        raise SuiteError(f"no tasks in {path}: write one JSON task object per line (see docs/task_file.md)")

    images: list[str] = []
    index: dict[str, int] = {}
    for e in entries:
        for image, _, _ in e["examples"]:
            if image not in index:  # one entry per file, however many tasks use it
                index[image] = len(images)
                images.append(image)
    # Tasks the file leaves unassigned are split at random (seeded); assigned ones keep their split.
    drawn = split_tasks_random([e["id"] for e in entries if e["split"] is None], meta_test_fraction, seed)
    tasks = []
    for e in entries:
        lab = [(index[img], e["answers"].index(a), role) for img, a, role in e["examples"] if a is not None]
        img = np.asarray([x[0] for x in lab], np.int64)
        y = np.asarray([x[1] for x in lab], np.int64)
        if lab and lab[0][2] is not None:  # the file fixes support/query (e.g. exported by write_task_file)
            s = np.flatnonzero([x[2] == "support" for x in lab])
            q = np.flatnonzero([x[2] == "query" for x in lab])
        else:
            s, q = stratified_support_query(y, support_fraction, task_rng(seed, e["id"]))
        tasks.append(Task(
            id=e["id"], description=e["description"], answers=e["answers"], answer_prompts=e["answer_prompts"],
            split=e["split"] or drawn[e["id"]], support_images=img[s], support_labels=y[s],
            query_images=img[q], query_labels=y[q], concepts=e["concepts"], paraphrases=e["paraphrases"],
        ))
    info = {"suite": "taskfile", "path": path, "support_fraction": support_fraction,
            "meta_test_fraction": meta_test_fraction, "seed": seed,
            "tasks_without_labels": [t.id for t in tasks if len(t.support_images) + len(t.query_images) == 0]}
    return TaskSuite(name=os.path.splitext(os.path.basename(path))[0], images=images, tasks=tasks, info=info)


def task_to_json(task: Task, images: list[str]) -> dict:
    """One task as a task-file object: labelled support then query examples, with their roles."""
    obj = {"id": task.id, "description": task.description, "answers": list(task.answers), "split": task.split}
    if list(task.answer_prompts) != list(task.answers):
        obj["answer_prompts"] = list(task.answer_prompts)
    if task.concepts:
        obj["concepts"] = list(task.concepts)
    if task.paraphrases:
        obj["paraphrases"] = list(task.paraphrases)
    obj["examples"] = [
        {"image": images[int(i)], "answer": task.answers[int(y)], "role": role}
        for role, xs, ys in (("support", task.support_images, task.support_labels),
                             ("query", task.query_images, task.query_labels))
        for i, y in zip(xs, ys)
    ]
    return obj


def write_task_file(suite: TaskSuite, path: str) -> str:
    """Export any suite as a JSONL task file, atomically (temporary file in the same folder, then os.replace)."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for task in suite.tasks:
                f.write(json.dumps(task_to_json(task, suite.images), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a crash leaves either the old file or the new one, never half of one
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a task file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
