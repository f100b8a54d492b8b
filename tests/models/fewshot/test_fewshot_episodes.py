"""Episode sampling and padding for the few-shot methods (models.fewshot.episodes): pure, no Ray."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.fewshot.episodes import TaskPool, collate, sample_episode, task_accuracy, task_loss
from models.task_net import TaskNetSpec, WeightLayout, init_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = TaskNetSpec(d_img=16, hidden=4, d_txt=8)


def toy_pool(answers=(2, 3, 8, 2), per_answer=12, seed=0, shared_images=False) -> tuple[TaskPool, torch.Tensor]:
    """Tasks with `answers[i]` candidates and `per_answer` samples each (2/3 support, 1/3 query).

    Images of an answer cluster around a random centre, so the tasks are learnable. With
    `shared_images` each task's query pool reuses some of its support images (a corrupt split), which
    episode sampling must still keep apart.
    """
    rng = np.random.default_rng(seed)
    feats, pools = [], {k: [] for k in ("si", "sl", "qi", "ql", "pr")}
    for a in answers:
        centres = rng.normal(size=(a, SPEC.d_img))
        idx, lab = [], []
        for c in range(a):
            x = centres[c] + 0.3 * rng.normal(size=(per_answer, SPEC.d_img))
            idx += list(range(len(feats), len(feats) + per_answer))
            lab += [c] * per_answer
            feats += list(x)
        idx, lab = np.array(idx), np.array(lab)
        perm = rng.permutation(len(idx))
        n_s = 2 * len(idx) // 3
        s, q = perm[:n_s], perm[n_s:]
        if shared_images:
            q = np.concatenate([q, s[:5]])
        pools["si"].append(idx[s]); pools["sl"].append(lab[s])
        pools["qi"].append(idx[q]); pools["ql"].append(lab[q])
        pools["pr"].append(torch.randn(a, SPEC.d_txt, generator=torch.Generator().manual_seed(len(pools["pr"]))))
    pool = TaskPool(pools["si"], pools["sl"], pools["qi"], pools["ql"], pools["pr"])
    return pool, torch.tensor(np.array(feats), dtype=torch.float32)


@pytest.mark.parametrize("shared", [False, True])
def test_episodes_never_put_a_query_example_in_the_support_set(shared):
    pool, _ = toy_pool(shared_images=shared)
    rng = np.random.default_rng(0)
    for _ in range(200):
        for t in range(len(pool)):
            e = pool.episode(t, shots=5, n_query=8, rng=rng)
            assert not set(e.support) & set(e.query)
            assert set(e.support) <= set(pool.support_images[t]) and set(e.query) <= set(pool.query_images[t])


def test_episode_has_k_shots_per_answer_and_true_labels():
    pool, _ = toy_pool()
    e = pool.episode(2, shots=3, n_query=10, rng=np.random.default_rng(1))
    assert np.bincount(e.support_labels, minlength=8).tolist() == [3] * 8
    assert len(e.query) == 10 and len(set(e.query)) == 10
    lab = dict(zip(pool.support_images[2], pool.support_labels[2])) | dict(zip(pool.query_images[2], pool.query_labels[2]))
    assert [lab[i] for i in e.support] == list(e.support_labels) and [lab[i] for i in e.query] == list(e.query_labels)


def test_answers_with_fewer_than_k_support_samples_give_what_they_have():
    si, sl = np.arange(7), np.array([0, 0, 0, 0, 0, 1, 1])  # answer 1 has 2 samples, answer 2 none
    e = sample_episode(0, si, sl, np.arange(7, 10), np.array([0, 1, 2]), 3, shots=4, n_query=50,
                       rng=np.random.default_rng(0))
    assert np.bincount(e.support_labels, minlength=3).tolist() == [4, 2, 0]
    assert len(e.query) == 3  # the whole query pool when it is smaller than n_query


def test_sampling_is_seeded():
    pool, _ = toy_pool()
    a = pool.episodes(20, 2, 6, np.random.default_rng(7))
    b = pool.episodes(20, 2, 6, np.random.default_rng(7))
    assert all(np.array_equal(x.support, y.support) and np.array_equal(x.query, y.query) for x, y in zip(a, b))


def test_collate_pads_and_masks():
    pool, feats = toy_pool()
    eps = [pool.episode(t, 2, 6, np.random.default_rng(t)) for t in range(len(pool))]
    b = collate(eps, feats, pool.prompts)
    assert b.x_s.shape == (4, 16, SPEC.d_img) and b.prompts.shape == (4, 8, SPEC.d_txt)
    assert b.m_s.sum(1).tolist() == [4, 6, 16, 4] and b.answer_mask.sum(1).tolist() == [2, 3, 8, 2]
    assert b.task.tolist() == [0, 1, 2, 3]
    assert torch.equal(b.x_s[0, :4], feats[eps[0].support]) and b.x_s[0, 4:].abs().sum() == 0
    assert len(b.rows(slice(1, 3))) == 2


def test_task_loss_ignores_padding_rows_and_answers():
    pool, feats = toy_pool()
    eps = [pool.episode(t, 2, 6, np.random.default_rng(t)) for t in range(len(pool))]
    b = collate(eps, feats, pool.prompts)
    layout = WeightLayout(SPEC)
    w = init_weights(SPEC, 0)
    e = eps[0]  # 2 answers, 4 support rows, padded to 16 rows and 8 answers
    alone = collate([e], feats, pool.prompts)
    full = task_loss(layout, w, *[x[0] for x in b.support()])
    single = task_loss(layout, w, *[x[0] for x in alone.support()])
    torch.testing.assert_close(full, single)
    acc = task_accuracy(layout, w, *[x[0] for x in b.query()])
    assert 0.0 <= float(acc) <= 1.0
