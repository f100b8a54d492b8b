"""The Meta-VQA suite (Nava et al., TMLR 2023): one task per unique VQA v2 question, built from files on disk.

The construction follows the paper's released procedure, in this order: keep `number`/`other` answers,
group question ids by their exact question string, label = `multiple_choice_answer`, each image at most
once per task (first occurrence wins), drop answers seen once, keep questions with > 20 samples, > 1
answer and no standalone "or", then split support/query 70/30 per answer and tasks 70/30, both seeded.
Every function here is pure: paths in, a TaskSuite and a summary out; writing is the CLI's job.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import statistics
from collections import Counter
from typing import NamedTuple

import numpy as np

from .base import META_TEST, META_TRAIN, SuiteError, Task, TaskSuite
from .vqa_prompts import FALLBACK_TEMPLATE, template_rule, answer_template, load_prompt_overrides

DEFAULT_SEED = 2021  # the paper's seed
KEPT_ANSWER_TYPES = ("number", "other")  # yes/no questions are dropped, as in the paper
MIN_SAMPLES = 20  # a question needs strictly more samples than this
SUPPORT_FRACTION = 0.7
META_TRAIN_FRACTION = 0.7
IMAGE_PATTERN = "COCO_<data_subtype>_<image_id as 12 digits>.jpg"
QUESTION_KEYS = ("image_id", "question", "question_id")
ANNOTATION_KEYS = ("question_id", "image_id", "answer_type", "multiple_choice_answer")


class Record(NamedTuple):
    """One annotated VQA v2 question id, in file order."""

    question: str
    subtype: str  # data_subtype of its file, e.g. "train2014"
    image_id: int
    question_id: int
    answer_type: str
    answer: str  # multiple_choice_answer


class RawTask(NamedTuple):
    """A question that survived the filters: its (image key, answer) samples in file order."""

    question: str
    samples: list  # [((subtype, image_id), answer), ...]


# ---- reading VQA v2 files ------------------------------------------------------------------------
def _need_path(path: str, what: str, flag: str, example: str, folder: bool = False) -> str:
    ok = os.path.isdir(path) if folder else os.path.isfile(path)
    if not ok:
        kind = "folder" if folder else "file"
        raise SuiteError(f"{what} {kind} not found: {os.path.abspath(path)}; pass {flag} {example}")
    return os.path.abspath(path)


def _load_vqa_json(path: str, kind: str, list_key: str, keys: tuple[str, ...]) -> tuple[str, list]:
    """(data_subtype, entries) of one VQA v2 questions/annotations file, every entry's keys checked."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SuiteError(f"{kind} file {path}: invalid JSON ({e}); pass the official VQA v2 {kind} file") from None
    except OSError as e:
        raise SuiteError(f"{kind} file {path}: cannot be read ({e.strerror})") from None
    if not isinstance(obj, dict):
        raise SuiteError(f"{kind} file {path}: expected a JSON object with keys 'data_subtype' and '{list_key}'")
    for key in ("data_subtype", list_key):
        if key not in obj:
            raise SuiteError(f"{kind} file {path}: missing key '{key}'; is this a VQA v2 {kind} file?")
    if not isinstance(obj["data_subtype"], str) or not isinstance(obj[list_key], list):
        raise SuiteError(f"{kind} file {path}: key 'data_subtype' must be a string and '{list_key}' a list")
    types = {"image_id": int, "question_id": int}
    for i, e in enumerate(obj[list_key]):
        for key in keys:
            if not isinstance(e, dict) or key not in e:
                raise SuiteError(f"{kind} file {path}: {list_key}[{i}] has no key '{key}' "
                                 f"(each entry needs {', '.join(keys)})")
            if not isinstance(e[key], types.get(key, str)) or isinstance(e[key], bool):
                raise SuiteError(f"{kind} file {path}: {list_key}[{i}] key '{key}' has a bad value {e[key]!r}")
    return obj["data_subtype"], obj[list_key]


def _check_pairs(questions: list[tuple[str, str]], annotations: list[tuple[str, str]]) -> None:
    """Each questions file needs exactly one annotations file of its data_subtype, and vice versa."""
    for kind, pairs in (("questions", questions), ("annotations", annotations)):
        first: dict[str, str] = {}
        for p, sub in pairs:
            if sub in first:
                raise SuiteError(f"{kind} files {first[sub]} and {p} both have data_subtype {sub!r}; pass each once")
            first[sub] = p
    ann = dict((sub, p) for p, sub in annotations)
    qs = dict((sub, p) for p, sub in questions)
    for p, sub in questions:
        if sub not in ann:
            have = ", ".join(f"{s} ({a})" for s, a in ann.items()) or "none"
            raise SuiteError(f"questions file {p} has data_subtype {sub!r} but no annotations file has it "
                             f"(annotations given: {have}); pass --annotations v2_mscoco_{sub}_annotations.json")
    for p, sub in annotations:
        if sub not in qs:
            raise SuiteError(f"annotations file {p} has data_subtype {sub!r} but no questions file has it; "
                             f"pass --questions v2_OpenEnded_mscoco_{sub}_questions.json or drop that annotations file")


def _peek_subtype(path: str, span: int = 1 << 16) -> str | None:
    """data_subtype read from the first or last 64 KiB of a file, or None; lets a mismatch fail before parsing."""
    try:
        with open(path, "rb") as f:
            head = f.read(span)
            f.seek(max(0, os.fstat(f.fileno()).st_size - span))
            tail = f.read(span)
    except OSError:
        return None  # the full read reports it
    for chunk in (head, tail):
        m = re.search(rb'"data_subtype"\s*:\s*"([^"\\]*)"', chunk)
        if m:
            return m.group(1).decode("utf-8", "replace")
    return None


def read_vqa(question_files: list[str], annotation_files: list[str]) -> list[Record]:
    """Every annotated question id of the given files, questions files in the order given, each in file order."""
    peeked = {p: _peek_subtype(p) for p in [*question_files, *annotation_files]}
    if None not in peeked.values():  # the real files are large: check the pairing before parsing them
        _check_pairs([(p, peeked[p]) for p in question_files], [(p, peeked[p]) for p in annotation_files])
    questions = [(p, *_load_vqa_json(p, "questions", "questions", QUESTION_KEYS)) for p in question_files]
    annotations = [(p, *_load_vqa_json(p, "annotations", "annotations", ANNOTATION_KEYS)) for p in annotation_files]
    _check_pairs([(p, sub) for p, sub, _ in questions], [(p, sub) for p, sub, _ in annotations])
    by_subtype = {sub: (p, entries) for p, sub, entries in annotations}
    records = []
    for p, sub, entries in questions:
        ann_path, anns = by_subtype[sub]
        by_id = {a["question_id"]: a for a in anns}
        for q in entries:
            a = by_id.get(q["question_id"])
            if a is None:
                raise SuiteError(f"question_id {q['question_id']} of {p} has no annotation in {ann_path}; "
                                 "pass the annotations file that belongs to these questions")
            records.append(Record(q["question"], sub, q["image_id"], q["question_id"],
                                  a["answer_type"], a["multiple_choice_answer"]))
    return records


# ---- the paper's filters (steps 1-6) -------------------------------------------------------------
def has_or_token(question: str) -> bool:
    """True when "or" is a whitespace token of the question ("color" and "floor" do not count)."""
    return "or" in question.split()


def filter_tasks(records: list[Record]) -> tuple[list[RawTask], dict]:
    """Apply the paper's filters; returns the kept questions (first-seen order) and what each filter removed."""
    grouped: dict[str, list[Record]] = {}
    all_questions, n_yes_no = set(), 0
    for r in records:
        all_questions.add(r.question)
        if r.answer_type not in KEPT_ANSWER_TYPES:  # step 1: yes/no answers are excluded
            n_yes_no += 1
            continue
        grouped.setdefault(r.question, []).append(r)  # step 2: a task is one exact question string
    removed = {
        "answer_type": {"question_ids": n_yes_no, "questions": len(all_questions) - len(grouped)},
        "duplicate_image": {"samples": 0},
        "single_answer_occurrence": {"samples": 0},  # one sample per dropped answer
        "too_few_samples": {"questions": 0},
        "single_answer": {"questions": 0},
        "or_token": {"questions": 0},
    }
    kept = []
    for question, recs in grouped.items():
        samples, seen = [], set()
        for r in recs:
            key = (r.subtype, r.image_id)  # an image is (data_subtype, image_id): ids repeat across subtypes
            if key in seen:  # step 4: each image at most once per task, the first occurrence wins
                removed["duplicate_image"]["samples"] += 1
                continue
            seen.add(key)
            samples.append((key, r.answer))  # step 3: label = multiple_choice_answer
        counts = Counter(a for _, a in samples)
        once = {a for a, n in counts.items() if n == 1}  # step 5: an answer on a single image is dropped
        removed["single_answer_occurrence"]["samples"] += len(once)
        samples = [s for s in samples if s[1] not in once]
        # Step 6, each rejected question counted under the first test it fails.
        if len(samples) <= MIN_SAMPLES:
            removed["too_few_samples"]["questions"] += 1
        elif len(counts) - len(once) <= 1:
            removed["single_answer"]["questions"] += 1
        elif has_or_token(question):
            removed["or_token"]["questions"] += 1
        else:
            kept.append(RawTask(question, samples))
    removed["questions_total"] = len(all_questions)
    removed["questions_kept"] = len(kept)
    return kept, removed


def _most_removing(removed: dict) -> str:
    """The filter that removed the most questions (used to explain an empty result)."""
    names = ("answer_type", "too_few_samples", "single_answer", "or_token")
    return max(names, key=lambda k: removed[k]["questions"])


# ---- seeded splits (steps 7-8) -------------------------------------------------------------------
def split_support_query(samples: list, seed: int = DEFAULT_SEED) -> tuple[list, list]:
    """Per answer: shuffle its samples with a fresh random.Random(seed); the first round(0.7 n) are support."""
    by_answer: dict[str, list] = {}
    for s in samples:
        by_answer.setdefault(s[1], []).append(s)
    support, query = [], []
    for answer in sorted(by_answer):
        xs = list(by_answer[answer])
        random.Random(seed).shuffle(xs)
        k = round(SUPPORT_FRACTION * len(xs))
        support += xs[:k]
        query += xs[k:]
    return support, query


def split_meta(questions: list[str], seed: int = DEFAULT_SEED) -> dict[str, str]:
    """Shuffle the kept questions (first-seen order) with random.Random(seed); the first round(0.7 n) are meta-train."""
    order = list(questions)
    random.Random(seed).shuffle(order)
    k = round(META_TRAIN_FRACTION * len(order))
    return {q: (META_TRAIN if i < k else META_TEST) for i, q in enumerate(order)}


def task_id(question: str) -> str:
    """A stable, readable id: "metavqa-" + a slug of the question + 8 hex digits of its sha1."""
    slug = "-".join(re.findall(r"[a-z0-9]+", question.lower()))[:48].strip("-")
    return f"metavqa-{slug}-{hashlib.sha1(question.encode('utf-8')).hexdigest()[:8]}"


# ---- the suite -----------------------------------------------------------------------------------
def image_name(subtype: str, image_id: int) -> str:
    """The COCO file name of one VQA v2 image, e.g. COCO_train2014_000000000009.jpg."""
    return f"COCO_{subtype}_{image_id:012d}.jpg"


def _resolve_images(kept: list[RawTask], dirs: list[str]) -> tuple[list[str], dict]:
    """Absolute paths of the kept samples' images (first-use order) and {(subtype, image_id): index}."""
    found: dict[str, str] = {}
    for d in dirs:  # one listing per folder is far cheaper than a stat per image on 120k COCO files
        for name in os.listdir(d):
            found.setdefault(name, os.path.join(d, name))
    images, index, missing = [], {}, {}
    for t in kept:
        for key, _ in t.samples:
            if key in index or key in missing:
                continue
            path = found.get(image_name(*key))
            if path is None or not os.path.isfile(path):
                missing[key] = t.question
                continue
            index[key] = len(images)
            images.append(path)
    if missing:
        key, question = next(iter(missing.items()))
        # Name the path where it most likely belongs: a folder named after its subtype (COCO's val2014/).
        home = next((d for d in dirs if key[0] in os.path.basename(d)), dirs[0])
        where = os.path.join(home, image_name(*key))
        others = [d for d in dirs if d != home]
        also = f" (also looked in {', '.join(others)})" if others else ""
        raise SuiteError(f"{len(missing)} image(s) of kept samples not found; e.g. question {question!r} needs "
                         f"{where}{also}. The image folder(s) must hold {IMAGE_PATTERN} files: pass --images "
                         "the COCO train2014/ and val2014/ folders")
    return images, index


def build_metavqa(
    question_files: list[str],
    annotation_files: list[str],
    image_dirs: list[str],
    seed: int = DEFAULT_SEED,
    prompts_file: str | None = None,
) -> tuple[TaskSuite, dict]:
    """Build the Meta-VQA suite from VQA v2 files on disk; returns the suite and its summary (see docs/metavqa.md)."""
    if not question_files or not annotation_files or not image_dirs:
        raise SuiteError("pass at least one questions file, one annotations file and one image folder")
    # Every path is checked before the (large) JSON files are read, so a typo fails at once.
    qf = [_need_path(p, "questions", "--questions", "v2_OpenEnded_mscoco_train2014_questions.json ...")
          for p in question_files]
    af = [_need_path(p, "annotations", "--annotations", "v2_mscoco_train2014_annotations.json ...")
          for p in annotation_files]
    dirs = [_need_path(d, "image", "--images", "the COCO train2014/ and val2014/ image folders", folder=True)
            for d in image_dirs]
    pf = _need_path(prompts_file, "prompts", "--prompts", "FILE.json (a JSON object question -> template)") \
        if prompts_file is not None else None
    overrides = load_prompt_overrides(pf) if pf else {}

    kept, removed = filter_tasks(read_vqa(qf, af))
    if not kept:
        worst = _most_removing(removed)
        raise SuiteError(f"no question survived the Meta-VQA filters (of {removed['questions_total']} questions: "
                         + ", ".join(f"{k} removed {removed[k]['questions']}" for k in
                                     ("answer_type", "too_few_samples", "single_answer", "or_token"))
                         + f"); the filter '{worst}' removed the most. Pass the full VQA v2 files")
    images, index = _resolve_images(kept, dirs)
    splits = split_meta([t.question for t in kept], seed)
    tasks, rules, ids = [], Counter(), {}
    for t in kept:
        answers = sorted({a for _, a in t.samples})
        label = {a: i for i, a in enumerate(answers)}
        if t.question in overrides:
            template, rule = overrides[t.question], "override"
        else:
            template, rule = answer_template(t.question), template_rule(t.question)[1]
            rule = rule if template != FALLBACK_TEMPLATE else "fallback"
        rules[rule] += 1
        tid = task_id(t.question)
        if tid in ids:
            raise SuiteError(f"questions {ids[tid]!r} and {t.question!r} map to the same task id {tid}")
        ids[tid] = t.question
        s, q = split_support_query(t.samples, seed)
        tasks.append(Task(
            id=tid, description=t.question, answers=answers,
            answer_prompts=[template.replace("{}", a) for a in answers], split=splits[t.question],
            support_images=np.asarray([index[k] for k, _ in s], np.int64),
            support_labels=np.asarray([label[a] for _, a in s], np.int64),
            query_images=np.asarray([index[k] for k, _ in q], np.int64),
            query_labels=np.asarray([label[a] for _, a in q], np.int64),
            concepts=(),
        ))
    inputs = {"questions": qf, "annotations": af, "images": dirs, "prompts": pf}
    suite = TaskSuite(name="metavqa", images=images, tasks=tasks,
                      info={"suite": "metavqa", "seed": seed, "inputs": inputs, "filters": removed})
    unused = len(set(overrides) - set(ids.values()))
    return suite, summarize(suite, removed, inputs, seed, rules, unused_overrides=unused)


def summarize(
    suite: TaskSuite, removed: dict, inputs: dict, seed: int, rules: Counter, unused_overrides: int = 0
) -> dict:
    """Counts to compare against the paper: tasks and samples per split, answers per task, filter removals."""
    sizes = [len(t.support_images) + len(t.query_images) for t in suite.tasks]
    samples = {"total": sum(sizes)}
    for split in (META_TRAIN, META_TEST):
        ts = suite.split(split)
        n_s, n_q = sum(len(t.support_images) for t in ts), sum(len(t.query_images) for t in ts)
        samples[split] = {"support": n_s, "query": n_q, "total": n_s + n_q}
    hist = Counter(len(t.answers) for t in suite.tasks)
    return {
        "suite": "metavqa",
        "seed": seed,
        "inputs": inputs,
        "tasks": {META_TRAIN: len(suite.split(META_TRAIN)), META_TEST: len(suite.split(META_TEST)),
                  "total": len(suite.tasks)},
        "paper_tasks": {META_TRAIN: 870, META_TEST: 373},  # VQA v2 train2014 + val2014, seed 2021
        "samples": samples,
        "samples_per_task": {"min": min(sizes), "median": statistics.median(sizes), "max": max(sizes)},
        "answers_per_task": {str(k): hist[k] for k in sorted(hist)},
        "images": len(suite.images),
        "filters": removed,
        "prompt_rules": dict(sorted(rules.items())),
        "unused_prompt_overrides": unused_overrides,
    }
