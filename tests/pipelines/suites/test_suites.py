"""Task suites: easyvqa, procedural, the JSONL task file and the split helpers."""
from __future__ import annotations

import json
import os
import re
import time
from collections import Counter, defaultdict

import numpy as np
import pytest

from pipelines.suites import META_TEST, META_TRAIN, SuiteError, load_suite, read_task_file, write_task_file
from pipelines.suites.easyvqa import COLOURS, SHAPES, image_attributes, load_easyvqa, read_easyvqa
from pipelines.suites.procedural import load_procedural, max_tasks
from pipelines.suites.splits import split_tasks_compositional, split_tasks_random, stratified_support_query

HOLDOUT = ("gray", "teal", "triangle")


@pytest.fixture(scope="module")
def evqa():
    return load_easyvqa()


@pytest.fixture(scope="module")
def proc100():
    return load_procedural(n_tasks=100)


@pytest.fixture(scope="module")
def raw_truth():
    """Each image's colour and shape straight from easy-vqa's wh-question answers (independent of the suite)."""
    raw = read_easyvqa()
    colour, shape = defaultdict(set), defaultdict(set)
    for q, i, a in zip(raw.questions, raw.image_idx.tolist(), raw.answers):
        if a in COLOURS:
            colour[i].add(a)
        if a in SHAPES:
            shape[i].add(a)
    return {i: (next(iter(colour[i])), next(iter(shape[i]))) for i in colour if len(colour[i]) == 1 == len(shape[i])}


def _check_support_query(t, fraction=0.7):
    s, q = set(t.support_images.tolist()), set(t.query_images.tolist())
    assert not s & q and len(s) == len(t.support_images) and len(q) == len(t.query_images)
    counts = Counter(np.concatenate([t.support_labels, t.query_labels]).tolist())
    for label, n in counts.items():
        n_s = int((t.support_labels == label).sum())
        if n >= 2:  # every answer with >= 2 samples is on both sides, in about the right ratio
            assert 1 <= n_s <= n - 1 and abs(n_s - fraction * n) <= 1
    assert all(0 <= y < len(t.answers) for y in counts)


# ---- easyvqa -------------------------------------------------------------------------------------
def test_easyvqa_tasks(evqa):
    assert len(evqa.tasks) == 107 and len(evqa.images) == 5000
    assert all(os.path.isabs(p) for p in evqa.images) and os.path.isfile(evqa.images[0])
    assert Counter(len(t.answers) for t in evqa.tasks) == Counter({2: 88, 3: 11, 8: 8})
    assert len({t.id for t in evqa.tasks}) == 107 and len({t.description for t in evqa.tasks}) == 107
    for t in evqa.tasks:
        assert t.answers == sorted(t.answers) and t.answer_prompts == t.answers
        _check_support_query(t)
    assert sum(len(t.support_images) + len(t.query_images) for t in evqa.tasks) == 48248


def test_easyvqa_random_split_deterministic(evqa):
    splits = Counter(t.split for t in evqa.tasks)
    assert splits == {META_TRAIN: 75, META_TEST: 32}
    again, other = load_easyvqa(seed=0), load_easyvqa(seed=1)
    assert [t.split for t in again.tasks] == [t.split for t in evqa.tasks]
    assert all(np.array_equal(a.support_images, b.support_images) for a, b in zip(again.tasks, evqa.tasks))
    assert [t.split for t in other.tasks] != [t.split for t in evqa.tasks]
    assert evqa.info["split_mode"] == "random" and evqa.info["seed"] == 0


def test_easyvqa_compositional():
    suite = load_easyvqa(split_mode="compositional", holdout=HOLDOUT)
    for t in suite.tasks:
        mentions = bool(set(re.findall(r"[a-z]+", t.description)) & set(HOLDOUT))
        assert (t.split == META_TEST) == mentions, t.description
    assert len(suite.split(META_TEST)) >= 20 and suite.info["holdout"] == list(HOLDOUT)


def test_easyvqa_errors_and_cap():
    with pytest.raises(SuiteError, match="random, compositional"):
        load_easyvqa(split_mode="nope")
    with pytest.raises(SuiteError, match="valid concepts:.*teal"):
        load_easyvqa(split_mode="compositional", holdout=("purple",))
    with pytest.raises(SuiteError, match="98 meta-train and 9 meta-test"):
        load_easyvqa(split_mode="compositional", holdout=("red",))
    capped = load_easyvqa(max_samples_per_task=20)
    full = {t.id: t for t in load_easyvqa().tasks}
    for t in capped.tasks:
        assert len(t.support_images) + len(t.query_images) == 20
        assert set(t.support_labels.tolist()) == set(full[t.id].support_labels.tolist())  # every answer kept


def test_image_attributes_match_easyvqa_answers(raw_truth):
    colour, shape, stats = image_attributes()
    ok = np.flatnonzero(colour >= 0)
    assert stats["n_labelled"] == len(ok) > 4000
    for i in ok.tolist():
        if i in raw_truth:
            assert (COLOURS[colour[i]], SHAPES[shape[i]]) == raw_truth[i]


# ---- procedural ----------------------------------------------------------------------------------
def _balanced(t, n_classes_tol=True):
    counts = np.bincount(np.concatenate([t.support_labels, t.query_labels]), minlength=len(t.answers))
    return counts.max() - counts.min() <= (len(t.answers) if n_classes_tol else 1)


def test_procedural_small(proc100):
    tasks = proc100.tasks
    assert len(tasks) == 100 and len({t.description for t in tasks}) == 100 and len({t.id for t in tasks}) == 100
    assert Counter(t.split for t in tasks) == {META_TRAIN: 70, META_TEST: 30}
    kinds = Counter("yes/no" if t.answers == ["no", "yes"] else "multi" for t in tasks)
    assert kinds["yes/no"] > 50 and kinds["multi"] > 10  # a mix at small n
    for t in tasks:
        assert t.description in t.paraphrases and len(t.paraphrases) >= 3
        assert len(t.support_images) + len(t.query_images) == 200
        _check_support_query(t)
        assert _balanced(t, n_classes_tol=t.answers != ["no", "yes"])
    same = load_procedural(n_tasks=100)
    assert [(t.id, t.description, t.split) for t in same.tasks] == [(t.id, t.description, t.split) for t in tasks]
    assert all(np.array_equal(a.query_images, b.query_images) for a, b in zip(same.tasks, tasks))


def test_procedural_labels_match_easyvqa(proc100, raw_truth):
    """Tasks whose canonical wording is simple are re-checked against easy-vqa's own answers."""
    checked = 0
    for t in load_procedural(n_tasks=2000).tasks:
        w = t.paraphrases[0]
        m_col = re.fullmatch(r"is the shape (\w+)\?", w)
        m_shape = re.fullmatch(r"is the shape a (\w+)\?", w)
        m_and = re.fullmatch(r"is it a (\w+) (circle|rectangle|triangle)\?", w)
        m_what = re.fullmatch(r"what color is the (circle|rectangle|triangle)\?", w)
        for img, y in zip(np.concatenate([t.support_images, t.query_images]).tolist(),
                          np.concatenate([t.support_labels, t.query_labels]).tolist()):
            if img not in raw_truth:
                continue
            c, s = raw_truth[img]
            if m_col and m_col[1] in COLOURS:
                assert (t.answers[y] == "yes") == (c == m_col[1]), (w, img)
            elif m_shape:
                assert (t.answers[y] == "yes") == (s == m_shape[1]), (w, img)
            elif m_and and m_and[1] in COLOURS:
                assert (t.answers[y] == "yes") == (c == m_and[1] and s == m_and[2]), (w, img)
            elif m_what:
                assert s == m_what[1] and t.answers[y] == c, (w, img)
            else:
                break
            checked += 1
    assert checked > 1000


def test_procedural_large_and_limits():
    t0 = time.time()
    suite = load_procedural(n_tasks=10_000, samples_per_task=100)
    assert time.time() - t0 < 20  # a few seconds on an idle machine; generous for shared cores
    assert len({t.description for t in suite.tasks}) == 10_000 == len({t.id for t in suite.tasks})
    yes_no = [t for t in suite.tasks if t.answers == ["no", "yes"]]
    assert len(yes_no) > 5000 and all(_balanced(t, n_classes_tol=False) for t in yes_no)
    assert max_tasks() >= 10_000 == suite.info["n_tasks"]
    with pytest.raises(SuiteError, match=str(max_tasks())):
        load_procedural(n_tasks=max_tasks() + 1)


def test_procedural_compositional():
    suite = load_procedural(n_tasks=300, split_mode="compositional", holdout=HOLDOUT)
    for t in suite.tasks:
        assert (t.split == META_TEST) == bool(set(t.concepts) & set(HOLDOUT))
        words = set(re.findall(r"[a-z]+", " ".join(t.paraphrases)))
        assert (t.split == META_TEST) == bool(words & set(HOLDOUT)), t.paraphrases
    assert suite.split(META_TRAIN) and suite.split(META_TEST)
    with pytest.raises(SuiteError, match="valid"):
        load_procedural(n_tasks=100, split_mode="compositional", holdout=("purple",))


# ---- splits --------------------------------------------------------------------------------------
def test_split_helpers():
    labels = np.array([0] * 10 + [1] * 2 + [2])
    s, q = stratified_support_query(labels, 0.7, np.random.default_rng(0))
    assert not set(s) & set(q) and sorted(np.concatenate([s, q])) == list(range(13))
    assert Counter(labels[s]) == {0: 7, 1: 1, 2: 1} and Counter(labels[q]) == {0: 3, 1: 1}
    ids = [f"t{i}" for i in range(100)]
    a = split_tasks_random(ids, 0.3, seed=5)
    assert a == split_tasks_random(ids[::-1], 0.3, seed=5) and Counter(a.values())[META_TEST] == 30
    comp = split_tasks_compositional({"a": ("red", "circle"), "b": ("blue",)}, ("circle",))
    assert comp == {"a": META_TEST, "b": META_TRAIN}


# ---- task file -----------------------------------------------------------------------------------
def _labelled(suite):
    return {t.id: Counter((suite.images[i], t.answers[y]) for i, y in zip(
        np.concatenate([t.support_images, t.query_images]), np.concatenate([t.support_labels, t.query_labels])))
        for t in suite.tasks}


def test_task_file_round_trip(tmp_path, proc100):
    for suite in (load_easyvqa(max_samples_per_task=12), proc100):
        path = write_task_file(suite, tmp_path / f"{suite.name}.jsonl")
        back = read_task_file(path)
        assert [(t.id, t.description, t.answers, t.split, t.paraphrases) for t in back.tasks] == \
            [(t.id, t.description, t.answers, t.split, t.paraphrases) for t in suite.tasks]
        assert _labelled(back) == _labelled(suite)
        assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def _img(tmp_path, name="a.png"):
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "img" / name).write_bytes(b"png")
    return f"img/{name}"


def _write(tmp_path, *lines):
    p = tmp_path / "tasks.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_task_file_defaults(tmp_path):
    a, b = _img(tmp_path, "a.png"), _img(tmp_path, "b.png")
    ex = [{"image": a, "answer": "yes"}, {"image": b, "answer": "no"}] * 3 + [{"image": a}]
    tasks = [{"id": f"t{i}", "description": f"task {i}", "answers": ["yes", "no"], "examples": ex} for i in range(10)]
    tasks[0]["split"] = META_TEST
    suite = read_task_file(_write(tmp_path, *tasks), seed=3)
    assert len(suite.images) == 2 and all(os.path.isabs(p) and os.path.isfile(p) for p in suite.images)
    assert suite.tasks[0].split == META_TEST and {t.split for t in suite.tasks} == {META_TRAIN, META_TEST}
    assert all(len(t.support_images) + len(t.query_images) == 6 for t in suite.tasks)
    assert load_suite("easyvqa", tasks_file=str(tmp_path / "tasks.jsonl"), seed=3, n_tasks=5).tasks[3].id == "t3"


GOOD = {"id": "t", "description": "is it red?", "answers": ["yes", "no"], "examples": []}


@pytest.mark.parametrize("line, match", [
    ('{"id": "t", ', r"line 2: invalid JSON"),
    ({k: v for k, v in GOOD.items() if k != "description"}, r"line 2, field 'description': missing"),
    ({**GOOD, "answers": "yes"}, r"line 2, field 'answers': expected a list"),
    ({**GOOD, "answers": []}, r"line 2, field 'answers': the list is empty"),
    ({**GOOD, "answers": ["yes", "yes"]}, r"line 2, field 'answers': duplicate"),
    ({**GOOD, "examples": [{"image": "IMG", "answer": "maybe"}]}, r"line 2, field 'examples\[0\].answer'"),
    ({**GOOD, "split": "train"}, r"line 2, field 'split'"),
    ({**GOOD, "anwsers": ["yes"]}, r"line 2, field 'anwsers': unknown field"),
    ({**GOOD, "id": 7}, r"line 2, field 'id'"),
])
def test_task_file_errors(tmp_path, line, match):
    img = _img(tmp_path)
    if isinstance(line, dict):
        line = json.loads(json.dumps(line).replace("IMG", img))
    with pytest.raises(SuiteError, match=match) as e:
        read_task_file(_write(tmp_path, {**GOOD, "id": "first"}, line))
    assert str(tmp_path / "tasks.jsonl") in str(e.value) and "Fix:" in str(e.value)


def test_task_file_missing_image_duplicate_id_empty(tmp_path):
    bad = {**GOOD, "examples": [{"image": "img/none.png", "answer": "yes"}]}
    with pytest.raises(SuiteError, match=re.escape(str(tmp_path / "img" / "none.png"))):
        read_task_file(_write(tmp_path, bad))
    with pytest.raises(SuiteError, match=r"line 3, field 'id': duplicate task id 't' \(lines 1 and 3\)"):
        read_task_file(_write(tmp_path, GOOD, {**GOOD, "id": "u"}, GOOD))
    with pytest.raises(SuiteError, match="no tasks in"):
        read_task_file(_write(tmp_path, ""))


def test_load_suite_dispatch():
    assert len(load_suite("procedural", n_tasks=120, max_samples_per_task=5).tasks) == 120
    with pytest.raises(SuiteError, match="easyvqa, procedural"):
        load_suite("imagenet")
    with pytest.raises(SuiteError, match="unknown suite argument"):
        load_suite("easyvqa", n_taks=3)
