"""Meta-VQA construction on a small hand-counted fixture in the real VQA v2 JSON format."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipelines.suites import META_TEST, META_TRAIN, SuiteError, read_task_file, write_task_file
from pipelines.suites.metavqa import answer_template, build_metavqa, has_or_token, image_name, task_id

ROOT = Path(__file__).resolve().parents[3]


def _run(answer_type: str, *groups: tuple[str, range]) -> list[tuple[int, str, str]]:
    """[(image_id, answer, answer_type)] for consecutive runs of images sharing an answer."""
    return [(i, a, answer_type) for a, ids in groups for i in ids]


# The fixture, question by question, in file order. Each line says what the filters leave of it.
TRAIN = [
    # kept: train part of a question that also has val samples (ids 1..12 repeat in val2014: other images)
    ("What color is the bus?", _run("other", ("red", range(1, 7)), ("blue", range(7, 13)))),
    # kept: exactly 21 samples (10 x "1", 11 x "2")
    ("How many people are in the image?", _run("number", ("1", range(1, 11)), ("2", range(11, 22)))),
    # dropped: exactly 20 samples
    ("What sport is being played?", _run("other", ("tennis", range(1, 11)), ("baseball", range(11, 21)))),
    # kept: 21 unique images (11 bat, 10 racket) plus a later repeat of image 3, below
    ("What is the man holding?", _run("other", ("bat", range(1, 12)), ("racket", range(12, 22)))),
    # dropped: 20 unique images plus a later repeat of image 5 (21 only if repeats counted)
    ("What is the woman eating?", _run("other", ("pizza", range(1, 11)), ("cake", range(11, 21)))),
    # removed by answer type: 30 yes/no samples, 2 answers (kept if yes/no were allowed)
    ("Is there a dog?", _run("yes/no", ("yes", range(1, 16)), ("no", range(16, 31)))),
    # the repeats: image 3 again with another answer (first occurrence "bat" must win), image 5 again
    ("What is the man holding?", _run("other", ("racket", [3]))),
    ("What is the woman eating?", _run("other", ("cake", [5]))),
]
VAL = [
    # bus: red 5 + blue 6 + green once (dropped) + 3 yes/no ids (excluded) -> with train: red 11, blue 12 = 23
    ("What color is the bus?", _run("other", ("red", range(1, 6)), ("blue", range(6, 12)), ("green", [12]))
     + _run("yes/no", ("yes", range(13, 16)))),
    # dropped: 20 samples after the lone "bird" is dropped (21 if single answers were kept)
    ("What animal is on the bed?", _run("other", ("cat", range(1, 11)), ("dog", range(11, 21)), ("bird", [21]))),
    # dropped: 25 samples, one answer
    ("What room is this?", _run("other", ("kitchen", range(1, 26)))),
    # dropped: standalone "or"
    ("Is it a cat or a dog?", _run("other", ("cat", range(1, 13)), ("dog", range(13, 25)))),
    # kept: "color" and "floor" contain "or" but are not the token "or"; 22 samples
    ("What color is the floor?", _run("other", ("brown", range(1, 12)), ("white", range(12, 23)))),
    # kept: 24 samples
    ("Where is the cat?", _run("other", ("couch", range(1, 13)), ("bed", range(13, 25)))),
    # kept: 30 samples, 3 answers
    ("How many zebras are there?", _run("number", ("2", range(1, 11)), ("3", range(11, 21)), ("4", range(21, 31)))),
]
KEPT = ["What color is the bus?", "How many people are in the image?", "What is the man holding?",
        "What color is the floor?", "Where is the cat?", "How many zebras are there?"]  # first-seen order
# Samples per kept task and per answer, after the filters (see the comments above).
COUNTS = {
    "What color is the bus?": {"red": 11, "blue": 12},  # 23
    "How many people are in the image?": {"1": 10, "2": 11},  # 21
    "What is the man holding?": {"bat": 11, "racket": 10},  # 21
    "What color is the floor?": {"brown": 11, "white": 11},  # 22
    "Where is the cat?": {"couch": 12, "bed": 12},  # 24
    "How many zebras are there?": {"2": 10, "3": 10, "4": 10},  # 30
}
# Support = sum over answers of round(0.7 n): bus 8+8, people 7+8, man 8+7, floor 8+8, cat 8+8, zebras 7+7+7.
N_SUPPORT, N_QUERY = 16 + 15 + 15 + 16 + 16 + 21, 7 + 6 + 6 + 6 + 8 + 9  # 99, 42 (141 samples)


def write_vqa(folder: Path, subtype: str, spec, first_qid: int) -> tuple[Path, Path]:
    """A questions and an annotations file in the real VQA v2 layout (annotations in reverse order)."""
    questions, annotations = [], []
    for k, (question, (image_id, answer, answer_type)) in enumerate((q, s) for q, ss in spec for s in ss):
        qid = first_qid + k
        questions.append({"image_id": image_id, "question": question, "question_id": qid})
        annotations.append({
            "question_id": qid, "image_id": image_id, "question_type": " ".join(question.lower().split()[:2]),
            "answer_type": answer_type, "multiple_choice_answer": answer,
            "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": j} for j in range(1, 11)],
        })
    info = {"description": "fixture", "version": "2.0"}
    qf = folder / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
    af = folder / f"v2_mscoco_{subtype}_annotations.json"
    qf.write_text(json.dumps({"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
                              "data_subtype": subtype, "questions": questions}))
    af.write_text(json.dumps({"info": info, "license": {}, "data_subtype": subtype,
                              "annotations": annotations[::-1]}))
    return qf, af


def write_images(folder: Path, subtype: str, ids) -> Path:
    """8x8 solid-colour JPEGs named like COCO's."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.new("RGB", (8, 8), ((40 * i) % 256, (90 * i) % 256, 128 if subtype == "val2014" else 30)).save(
            folder / image_name(subtype, i))
    return folder


@pytest.fixture(scope="module")
def vqa(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vqa")
    tq, ta = write_vqa(root, "train2014", TRAIN, 1)
    vq, va = write_vqa(root, "val2014", VAL, 100_000)
    images = [write_images(root / "train2014", "train2014", range(1, 31)),
              write_images(root / "val2014", "val2014", range(1, 31))]
    return {"root": root, "q": [tq, vq], "a": [ta, va], "images": images}


def build(vqa, seed=2021, prompts=None):
    return build_metavqa(vqa["q"], vqa["a"], vqa["images"], seed=seed, prompts_file=prompts)


@pytest.fixture(scope="module")
def built(vqa):
    return build(vqa)


def by_question(suite) -> dict:
    return {t.description: t for t in suite.tasks}


def samples(suite, task, role=None) -> list[tuple[str, str]]:
    """[(image file name, answer)] of a task's support, query or both."""
    out = []
    for r, xs, ys in (("support", task.support_images, task.support_labels),
                      ("query", task.query_images, task.query_labels)):
        if role in (None, r):
            out += [(os.path.basename(suite.images[i]), task.answers[y]) for i, y in zip(xs, ys)]
    return out


# ---- counts ---------------------------------------------------------------------------------------
def test_fixture_counts(built):
    suite, summary = built
    assert [t.description for t in suite.tasks] == KEPT
    for t in suite.tasks:
        assert dict(Counter(a for _, a in samples(suite, t))) == COUNTS[t.description]
        assert t.answers == sorted(COUNTS[t.description]) and t.concepts == () and t.id == task_id(t.description)
    # round(0.7 * 6 tasks) = 4 meta-train, 2 meta-test
    assert summary["tasks"] == {META_TRAIN: 4, META_TEST: 2, "total": 6}
    assert summary["samples"]["total"] == 141 == N_SUPPORT + N_QUERY
    assert sum(summary["samples"][s]["support"] for s in (META_TRAIN, META_TEST)) == N_SUPPORT == 99
    assert sum(summary["samples"][s]["query"] for s in (META_TRAIN, META_TEST)) == N_QUERY == 42
    assert summary["answers_per_task"] == {"2": 5, "3": 1}
    assert summary["samples_per_task"] == {"min": 21, "median": 22.5, "max": 30}
    assert summary["images"] == len(suite.images) == 21 + 30  # train 1..21, val 1..30
    f = summary["filters"]
    assert f["answer_type"] == {"question_ids": 30 + 3, "questions": 1}
    assert f["duplicate_image"] == {"samples": 2}
    assert f["single_answer_occurrence"] == {"samples": 2}  # bus "green", bed "bird"
    # sport, woman eating, animal on the bed; room; cat or dog
    assert [f[k]["questions"] for k in ("too_few_samples", "single_answer", "or_token")] == [3, 1, 1]
    assert (f["questions_total"], f["questions_kept"]) == (12, 6)
    assert summary["seed"] == 2021 and [os.path.basename(p) for p in summary["inputs"]["questions"]] == [
        "v2_OpenEnded_mscoco_train2014_questions.json", "v2_OpenEnded_mscoco_val2014_questions.json"]


# ---- one test per filter: each fails if its filter is removed -----------------------------------------
def test_yes_no_answers_excluded(built):
    suite, _ = built
    tasks = by_question(suite)
    assert "Is there a dog?" not in tasks  # 30 samples, 2 answers: it would survive every other filter
    assert tasks["What color is the bus?"].answers == ["blue", "red"]  # the 3 val yes/no ids would add "yes"


def test_image_used_once_per_task_first_wins(built):
    suite, _ = built
    tasks = by_question(suite)
    man = samples(suite, tasks["What is the man holding?"])
    assert len(man) == 21 and Counter(name for name, _ in man).most_common(1)[0][1] == 1
    assert (image_name("train2014", 3), "bat") in man  # the later "racket" for image 3 is skipped
    assert "What is the woman eating?" not in tasks  # 20 unique images; 21 if the repeat counted
    # The same image id in train2014 and val2014 is two images: the bus task has 12 + 11 of them.
    bus = [name for name, _ in samples(suite, tasks["What color is the bus?"])]
    assert image_name("train2014", 1) in bus and image_name("val2014", 1) in bus


def test_answers_seen_once_dropped(built):
    suite, _ = built
    tasks = by_question(suite)
    assert "green" not in tasks["What color is the bus?"].answers
    assert "What animal is on the bed?" not in tasks  # 20 after the lone "bird"; 21 with it


def test_more_than_20_samples(built):
    suite, _ = built
    tasks = by_question(suite)
    assert len(samples(suite, tasks["How many people are in the image?"])) == 21
    assert "What sport is being played?" not in tasks  # exactly 20


def test_single_answer_question_dropped(built):
    assert "What room is this?" not in by_question(built[0])  # 25 samples, all "kitchen"


def test_or_token_dropped(built):
    tasks = by_question(built[0])
    assert "Is it a cat or a dog?" not in tasks and "What color is the floor?" in tasks
    assert has_or_token("Is it red or blue?") and not has_or_token("What color is the floor?")
    assert has_or_token("or is it red?") and not has_or_token("Is it this,or that?")  # whitespace tokens only


# ---- splits ------------------------------------------------------------------------------------------
def _image_key(name: str) -> tuple[str, int]:
    _, subtype, num = name[:-4].split("_")
    return subtype, int(num)


def test_splits_follow_round_and_seed(vqa, built):
    suite, _ = built
    for t in suite.tasks:
        for a, n in COUNTS[t.description].items():
            assert sum(x == a for _, x in samples(suite, t, "support")) == round(0.7 * n)
    # The procedure itself: per answer, samples in file order shuffled by a fresh random.Random(seed).
    red = [("train2014", i) for i in range(1, 7)] + [("val2014", i) for i in range(1, 6)]
    random.Random(2021).shuffle(red)
    bus = by_question(suite)["What color is the bus?"]
    assert {_image_key(n) for n, a in samples(suite, bus, "support") if a == "red"} == set(red[:8])
    order = list(KEPT)
    random.Random(2021).shuffle(order)
    assert {t.description for t in suite.split(META_TRAIN)} == set(order[:4])
    # Deterministic per seed, different with another seed.
    again, _ = build(vqa)
    other, _ = build(vqa, seed=7)
    key = lambda s: [(t.id, t.split, sorted(samples(s, t, "support"))) for t in s.tasks]  # noqa: E731
    assert key(again) == key(suite) and key(other) != key(suite)
    assert [t.split for t in other.tasks] != [t.split for t in suite.tasks]


def test_task_file_round_trip(built, tmp_path):
    suite, _ = built
    back = read_task_file(write_task_file(suite, tmp_path / "metavqa.jsonl"))
    assert [(t.id, t.description, t.split, t.answers, t.answer_prompts) for t in back.tasks] == \
        [(t.id, t.description, t.split, t.answers, t.answer_prompts) for t in suite.tasks]
    for t, u in zip(suite.tasks, back.tasks):
        for role in ("support", "query"):
            assert sorted(samples(suite, t, role)) == sorted(samples(back, u, role))


# ---- answer prompts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("question, template", [
    ("What color is the bus?", "the bus is {}"),
    ("How many people are in the image?", "{} people are in the image"),
    ("What is the man holding?", "the man is holding {}"),
    ("How many zebras are there?", "there are {} zebras"),
    ("How many dogs?", "{} dogs"),
    ("What are the people doing?", "the people are {}"),
    ("What is the cat sitting on?", "the cat is sitting on {}"),
    ("What kind of dog is this?", "the dog is {}"),
    ("What type of hat is the man wearing?", "the man is wearing {} hat"),
    ("Where is the cat?", "the cat is {}"),
    ("What sport is being played?", "the sport being played is {}"),
    ("What room is this?", "the room is {}"),
    ("What is on the plate?", "{} is on the plate"),
    ("What does the sign say?", "the sign says {}"),
    ("Why is the man smiling?", "the answer is {}"),  # fallback
    ("What is {} this?", "the answer is {}"),  # braces in the question: fallback, never two slots
])
def test_answer_template(question, template):
    assert answer_template(question) == template


def test_prompts_in_suite_and_override(vqa, built, tmp_path):
    assert by_question(built[0])["What color is the bus?"].answer_prompts == ["the bus is blue", "the bus is red"]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"What color is the bus?": "a {} bus", "Not in the data?": "{}"}))
    suite, summary = build(vqa, prompts=prompts)
    assert by_question(suite)["What color is the bus?"].answer_prompts == ["a blue bus", "a red bus"]
    assert summary["prompt_rules"]["override"] == 1 and summary["unused_prompt_overrides"] == 1
    prompts.write_text(json.dumps({"What color is the floor?": "a {} floor {}"}))
    with pytest.raises(SuiteError, match="What color is the floor"):
        build(vqa, prompts=prompts)


# ---- the command line ----------------------------------------------------------------------------------
def cli(*args) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pipelines.build_metavqa", *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    return p, time.monotonic() - t0


def test_cli_writes_task_file_and_summary(vqa, built, tmp_path):
    out = tmp_path / "out"
    p, _ = cli("--questions", *vqa["q"], "--annotations", *vqa["a"], "--images", *vqa["images"], "--out", out)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(out)) == ["metavqa.jsonl", "summary.json"]  # no temporary files left behind
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"] == {META_TRAIN: 4, META_TEST: 2, "total": 6} and summary["seed"] == 2021
    back = read_task_file(out / "metavqa.jsonl")
    suite = built[0]
    assert [(t.id, t.split) for t in back.tasks] == [(t.id, t.split) for t in suite.tasks]
    for t, u in zip(suite.tasks, back.tasks):
        assert sorted(samples(suite, t, "support")) == sorted(samples(back, u, "support"))


def _error_cases(vqa, tmp: Path) -> dict:
    """name -> (CLI arguments before --out, words the message must contain)."""
    q, a, img = vqa["q"], vqa["a"], vqa["images"]
    ok = ["--questions", *q, "--annotations", *a, "--images", *img]
    bad_json = tmp / "bad_questions.json"
    bad_json.write_text('{"data_subtype": "train2014", "questions": [')
    no_key = tmp / "no_key_annotations.json"
    ann = json.loads(a[0].read_text())
    del ann["annotations"][4]["multiple_choice_answer"]
    no_key.write_text(json.dumps(ann))
    holes = tmp / "holes" / "val2014"
    shutil.copytree(img[1], holes)
    (holes / image_name("val2014", 7)).unlink()
    small = tmp / "small"
    small.mkdir()
    sq, sa = write_vqa(small, "train2014", [
        ("What color is the cat?", _run("other", ("red", range(1, 4)), ("blue", range(4, 7))))], 1)
    prompts = tmp / "prompts.json"
    prompts.write_text(json.dumps({"Where is the cat?": "the cat is there"}))
    return {
        "missing questions": (["--questions", tmp / "nope_q.json", *ok[3:]],
                              ["questions file not found", "nope_q.json", "--questions"]),
        "missing annotations": (["--questions", *q, "--annotations", tmp / "nope_a.json", "--images", *img],
                                ["annotations file not found", "nope_a.json", "--annotations"]),
        "missing images": ([*ok[:-2], tmp / "no_images", img[1]], ["image folder not found", "no_images", "--images"]),
        "invalid JSON": (["--questions", bad_json, *ok[2:]], ["bad_questions.json", "invalid JSON"]),
        "missing key": (["--questions", *q, "--annotations", no_key, a[1], "--images", *img],
                        ["no_key_annotations.json", "'multiple_choice_answer'"]),
        "unpaired subtype": (["--questions", *q, "--annotations", a[0], "--images", *img],
                             ["val2014", "no annotations file", "v2_mscoco_val2014_annotations.json"]),
        "missing image": ([*ok[:-1], holes], [str(holes / image_name("val2014", 7)), "COCO_<data_subtype>_"]),
        "no task survives": (["--questions", sq, "--annotations", sa, "--images", *img],
                             ["no question survived", "'too_few_samples' removed the most"]),
        "bad prompt template": ([*ok, "--prompts", prompts], ["Where is the cat?", "exactly one"]),
    }


def test_unpaired_subtype_found_after_parsing(vqa, tmp_path):
    # data_subtype far from both ends of the file: the quick peek misses it, the full read must not.
    obj = json.loads(vqa["q"][1].read_text())
    pad = "x" * 70_000
    padded = tmp_path / "val_questions.json"
    padded.write_text(json.dumps({"info": {"pad": pad}, "data_subtype": obj["data_subtype"],
                                  "questions": obj["questions"], "license": {"pad": pad}}))
    with pytest.raises(SuiteError, match="data_subtype 'val2014' but no annotations file"):
        build_metavqa([vqa["q"][0], padded], vqa["a"][:1], vqa["images"])


def test_cli_errors_exit_2_before_writing(vqa, tmp_path):
    for name, (args, words) in _error_cases(vqa, tmp_path).items():
        out = tmp_path / ("out-" + name.replace(" ", "-"))
        p, seconds = cli(*args, "--out", out)
        assert p.returncode == 2, (name, p.stderr)
        line = p.stderr.strip()
        assert line.startswith("error: ") and "\n" not in line, (name, line)
        assert all(w in line for w in words), (name, line)
        assert seconds < 10, (name, seconds)
        assert not out.exists(), name  # nothing written to --out


def test_built_task_file_feeds_the_features_stage(vqa, tmp_path):
    """The builder's output is a task file the pipeline takes as is: real encoders, the paper's splits kept."""
    from pipelines import features
    from pipelines.core.cli import RunContext
    from pipelines.core.config import build_config

    out = tmp_path / "out"
    p, _ = cli("--questions", *vqa["q"], "--annotations", *vqa["a"], "--images", *vqa["images"], "--out", out)
    assert p.returncode == 0, p.stderr
    cfg = build_config(features.FeaturesConfig, features.PRESETS, "smoke", [f"tasks_file={out / 'metavqa.jsonl'}"])
    feats = features.run(cfg, RunContext(run=tmp_path / "run", progress=False))
    assert feats.tasks["split"].value_counts().to_dict() == {META_TRAIN: 4, META_TEST: 2}
    assert feats.image_feats.shape == (51, 1280) and feats.d_txt == 384
    # each task's answer prompts are its question's template filled with each candidate answer
    row = feats.tasks.iloc[0]
    assert all(a in p for a, p in zip(row.answers, row.answer_prompts))
