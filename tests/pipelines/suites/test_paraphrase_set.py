"""The rephrased easyvqa descriptions: real meta-test tasks of both splits, in wording no suite uses, read by nobody else."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines.suites.base import META_TEST
from pipelines.suites.easyvqa import COLOURS, SHAPES, load_easyvqa, read_easyvqa
from pipelines.zeroshot.paraphrases import DEFAULT_FILE, OPEN_MAJORITY, read_rephrasings

ROOT = Path(__file__).resolve().parents[3]


def words(text: str) -> list[str]:
    """Lowercase words with every colour and shape name blanked: a template's phrase, not its concepts."""
    return ["COLOUR" if w in COLOURS else "SHAPE" if w in SHAPES else w for w in re.findall(r"[a-z]+", text.lower())]


def trigrams(text: str) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i:i + 3]) for i in range(len(w) - 2)}


@pytest.fixture(scope="module")
def items():
    return read_rephrasings(DEFAULT_FILE)


@pytest.fixture(scope="module")
def suites():
    """The easyvqa suite as the default features stage splits it, randomly and compositionally."""
    from pipelines.features import FeaturesConfig

    cfg = FeaturesConfig()
    return {mode: load_easyvqa(mode, tuple(cfg.holdout), cfg.meta_test_fraction, cfg.support_fraction, cfg.seed)
            for mode in ("random", "compositional")}


def test_every_task_is_a_meta_test_task_with_its_own_description(items, suites):
    tasks = {mode: {t.id: t for t in s.tasks} for mode, s in suites.items()}
    test_in = {mode: {r.task_id for r in items if tasks[mode][r.task_id].split == META_TEST} for mode in tasks}
    for r in items:
        assert r.task_id in tasks["random"], r.task_id
        assert tasks["random"][r.task_id].description == r.description
        assert any(r.task_id in test_in[mode] for mode in tasks), f"{r.task_id} is meta-train in both splits"
    # both splits' meta-test tasks, all of them
    for mode, s in suites.items():
        assert test_in[mode] == {t.id for t in s.tasks if t.split == META_TEST}, mode
    assert sum(len(r.rephrased) for r in items) >= 30


def test_at_least_30_rephrasings_of_tasks_a_majority_guess_scores_at_most_half_on(items, suites):
    import numpy as np

    tasks = {t.id: t for t in suites["random"].tasks}
    open_tasks = [r for r in items if np.bincount(tasks[r.task_id].query_labels).max() / len(tasks[r.task_id].query_labels)
                  <= OPEN_MAJORITY]
    assert {tasks[r.task_id].description.split()[1] for r in open_tasks} == {"color", "is", "shape"}  # the open questions
    assert sum(len(r.rephrased) for r in open_tasks) >= 30
    assert all(len(tasks[r.task_id].answers) >= 3 for r in open_tasks)


def test_no_rephrasing_shares_a_three_word_phrase_with_any_suite_template(items):
    from pipelines.suites.procedural import _multi_class_families, _yes_no_families
    from pipelines.suites.vqa_prompts import FALLBACK_TEMPLATE

    procedural = {w for family in (*_yes_no_families(), *_multi_class_families()) for w in family[1]}  # every wording
    templates = set(read_easyvqa().questions) | procedural | {FALLBACK_TEMPLATE}
    used = set().union(*(trigrams(t) for t in templates))
    whole = {tuple(words(q)) for q in templates}
    assert ("is", "there", "a") in used and ("a", "COLOUR", "shape") in used  # the check sees the templates' phrases
    texts = [t for r in items for t in r.rephrased]
    assert len(set(texts)) == len(texts)
    for t in texts:
        assert tuple(words(t)) not in whole, t
        assert not trigrams(t) & used, (t, trigrams(t) & used)
        assert len(words(t)) >= 4


def test_only_the_paraphrase_command_reads_the_set():
    """Kept out of all training and tuning: no other module names the folder or imports the module that reads it."""
    reads = r"configs/paraphrases|\"configs\" / \"paraphrases\"|zeroshot\.paraphrases|zeroshot import paraphrases|read_rephrasings"
    readers = {p.relative_to(ROOT).as_posix() for pkg in ("models", "orchestrator", "pipelines")
               for p in (ROOT / pkg).rglob("*.py") if re.search(reads, p.read_text())}
    assert readers == {"pipelines/zeroshot/paraphrases.py", "pipelines/paraphrases.py"}, readers
    assert DEFAULT_FILE.relative_to(ROOT).as_posix() == "configs/paraphrases/easyvqa.jsonl"


def test_training_rephrasings_cover_every_question_and_share_no_phrase_with_the_held_out_set(items):
    from pipelines.core.config import ConfigError
    from pipelines.zeroshot.augment import MAX_REPHRASINGS, rephrase

    held_out = set().union(*(trigrams(t) for r in items for t in r.rephrased))
    questions = set(read_easyvqa().questions)
    for q in questions:
        out = rephrase(q, MAX_REPHRASINGS)
        assert len(set(out)) == MAX_REPHRASINGS and not set(out) & questions, q
        for t in out:
            assert not trigrams(t) & held_out, (q, t, trigrams(t) & held_out)
            assert [w for w in words(t) if w in ("COLOUR", "SHAPE")] == [w for w in words(q) if w in ("COLOUR", "SHAPE")], (q, t)
    assert rephrase("what color is the circle?", 0) == []
    for bad, n in (("is the shape red or blue?", 1), ("is the shape any colour other than red?", 1), ("what color is the circle?", 4)):
        with pytest.raises(ConfigError, match="rephras"):
            rephrase(bad, n)


def test_augmented_pairs_pair_each_rephrasing_with_its_task_latent_and_default_to_none():
    import torch

    from pipelines.hyperldm import HyperLdmConfig
    from pipelines.zeroshot.augment import augmented_pairs

    z, c = torch.randn(3, 4), torch.randn(3, 5)
    same = augmented_pairs(z, c, None, 0)
    assert same[0] is z and same[1] is c and HyperLdmConfig().rephrasings == 0  # the default trains as before
    extra = torch.randn(6, 5)
    z2, c2 = augmented_pairs(z, c, extra, 2)
    assert torch.equal(z2[:3], z) and torch.equal(z2[3:], z[[0, 0, 1, 1, 2, 2]]) and torch.equal(c2, torch.cat([c, extra]))


def test_rephrasings_on_another_suite_are_refused_before_training(smoke_run_dir):
    """The smoke features are procedural tasks: the hyperldm stage says so before any model trains."""
    from orchestrator.storage.rundir import RunDir
    from pipelines.core.config import ConfigError
    from pipelines.zeroshot.augment import check_run

    check_run(RunDir.of(smoke_run_dir), 0)  # the default never reads the tasks
    with pytest.raises(ConfigError, match="easyvqa questions only; set rephrasings=0"):
        check_run(RunDir.of(smoke_run_dir), 1)
