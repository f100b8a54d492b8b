"""Vmapped expert training on real torch: padding isolation, equivalence with a plain loop, evaluation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.expert_training import ExpertBatch, evaluate_experts, pad_batch, step_flops, train_experts
from models.task_net import TaskNetSpec, TaskNetwork, WeightLayout, functional_forward, init_weights

SPEC = TaskNetSpec()
LAYOUT = WeightLayout(SPEC)
N_IMG = 300
STEPS = 25
LR = 1e-2


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.randn(N_IMG, SPEC.d_img, generator=torch.Generator().manual_seed(0))


def make_task(seed: int, a: int, n_support: int, n_query: int):
    """Random answer prompts [a, d_txt] and disjoint support/query (indices, labels) into the features."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randn(a, SPEC.d_txt, generator=g)
    idx = torch.randperm(N_IMG, generator=g)[: n_support + n_query]
    lab = torch.randint(0, a, (n_support + n_query,), generator=g)
    return prompts, (idx[:n_support], lab[:n_support]), (idx[n_support:], lab[n_support:])


# answer counts 2, 3, 5 and different support / query sizes, so every axis gets padded
TASKS = [make_task(10, 2, 9, 4), make_task(11, 3, 20, 0), make_task(12, 5, 14, 11)]
SEEDS = [0, 1, 2]


def batch_of(tasks) -> ExpertBatch:
    return pad_batch([t[0] for t in tasks], [t[1] for t in tasks], [t[2] for t in tasks])


def run(features, batch, w0, steps=STEPS, **kw) -> list[tuple[int, torch.Tensor]]:
    return list(train_experts(LAYOUT, features, batch, w0, steps=steps, lr=LR, **kw))


def final(features, batch, w0, **kw) -> torch.Tensor:
    return run(features, batch, w0, **kw)[-1][1]


def test_pad_batch_shapes_and_masks():
    b = batch_of(TASKS)
    assert b.n == 3
    assert b.prompts.shape == (3, 5, SPEC.d_txt)
    assert b.answer_mask.sum(1).tolist() == [2, 3, 5]
    assert b.support_idx.shape == (3, 20) and b.support_n.tolist() == [9, 20, 14]
    assert b.query_idx.shape == (3, 11) and b.query_n.tolist() == [4, 0, 11]
    assert torch.equal(b.prompts[0, 2:], torch.zeros(3, SPEC.d_txt))
    assert torch.equal(b.support_idx[0, :9], TASKS[0][1][0]) and (b.support_idx[0, 9:] == 0).all()


@pytest.fixture(scope="module")
def batched_final(features) -> torch.Tensor:
    w0 = torch.stack([init_weights(SPEC, s) for s in SEEDS])
    return final(features, batch_of(TASKS), w0)


def test_batched_training_equals_each_expert_alone(features, batched_final):
    """Padding (support rows, answer slots) and the vmapped expert axis must not leak between experts."""
    assert batched_final.shape == (3, LAYOUT.size)
    for i, (task, seed) in enumerate(zip(TASKS, SEEDS)):
        alone = final(features, batch_of([task]), init_weights(SPEC, seed)[None])
        assert alone.shape == (1, LAYOUT.size)
        torch.testing.assert_close(batched_final[i], alone[0], rtol=1e-4, atol=1e-5)
        # and training actually moved the weights
        assert (alone[0] - init_weights(SPEC, seed)).abs().max() > 1e-3


def test_shared_init_different_tasks_diverge(features):
    w0 = init_weights(SPEC, 0)[None].repeat(3, 1)
    out = final(features, batch_of(TASKS), w0)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])


def plain_adam(features, task, seed, steps=STEPS) -> torch.Tensor:
    """The textbook loop: one TaskNetwork module, torch.optim.Adam, full batch on the support set."""
    prompts, (idx, lab), _ = task
    net = TaskNetwork(SPEC)
    net.load_state_dict(LAYOUT.unflatten(init_weights(SPEC, seed)))
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    x = features[idx]
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x, prompts), lab).backward()
        opt.step()
    return LAYOUT.flatten({k: v.detach() for k, v in net.named_parameters()})


def test_matches_plain_module_adam_loop(features, batched_final):
    diffs = []
    for i, (task, seed) in enumerate(zip(TASKS, SEEDS)):
        want = plain_adam(features, task, seed)
        got = batched_final[i]
        diffs.append((got - want).abs().max().item())
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
        assert (want - init_weights(SPEC, seed)).abs().max() > 1e-3
    print(f"max |w_vmap_fused - w_plain_adam| per expert: {diffs}")


def test_checkpoint_steps(features):
    b = batch_of(TASKS[:1])
    w0 = init_weights(SPEC, 0)[None]
    assert [s for s, _ in run(features, b, w0, steps=10, checkpoint_every=4)] == [4, 8, 10]
    assert [s for s, _ in run(features, b, w0, steps=8, checkpoint_every=4)] == [4, 8]
    assert [s for s, _ in run(features, b, w0, steps=5)] == [5]
    ck = dict(run(features, b, w0, steps=6, checkpoint_every=3))
    assert set(ck) == {3, 6}
    # a checkpoint is a snapshot (not a view of the live parameters) equal to a shorter run's end
    torch.testing.assert_close(ck[3], final(features, b, w0, steps=3), rtol=0, atol=0)
    assert not torch.equal(ck[3], ck[6])


def manual_eval(features, w, task, which):
    prompts, support, query = task
    idx, lab = support if which == "support" else query
    logits = functional_forward(LAYOUT, w, features[idx], prompts)  # [n, a]: only the real answers
    acc = (logits.argmax(-1) == lab).float().mean()
    return acc, F.cross_entropy(logits, lab)


def test_evaluate_experts_matches_manual_and_ignores_padding(features, batched_final):
    b = batch_of(TASKS)
    w = batched_final
    for chunk in (16, 2):
        acc, loss = evaluate_experts(LAYOUT, features, w, b.prompts, b.answer_mask,
                                     b.support_idx, b.support_lab, b.support_n, chunk=chunk)
        assert acc.shape == loss.shape == (3,)
        for i, task in enumerate(TASKS):
            a, l = manual_eval(features, w[i], task, "support")
            torch.testing.assert_close(acc[i], a, rtol=0, atol=1e-6)
            torch.testing.assert_close(loss[i], l, rtol=1e-4, atol=1e-5)

    # query set: expert 1 has n = 0 -> NaN, the others are finite and match
    qacc, qloss = evaluate_experts(LAYOUT, features, w, b.prompts, b.answer_mask, b.query_idx, b.query_lab, b.query_n)
    assert torch.isnan(qacc[1]) and torch.isnan(qloss[1])
    for i in (0, 2):
        a, l = manual_eval(features, w[i], TASKS[i], "query")
        torch.testing.assert_close(qacc[i], a, rtol=0, atol=1e-6)
        torch.testing.assert_close(qloss[i], l, rtol=1e-4, atol=1e-5)

    # n smaller than the padded length: rows past n (here real, mislabelled rows) must not count
    idx, lab = b.support_idx.clone(), b.support_lab.clone()
    n = torch.tensor([3, 5, 4])
    for i in range(3):
        a_i = int(b.answer_mask[i].sum())
        lab[i, n[i]:] = (lab[i, n[i]:] + 1) % a_i  # garbage that would change the result if counted
    acc, loss = evaluate_experts(LAYOUT, features, w, b.prompts, b.answer_mask, idx, lab, n)
    for i, task in enumerate(TASKS):
        prompts, (s_idx, s_lab), _ = task
        cut = (prompts, (s_idx[: n[i]], s_lab[: n[i]]), None)
        a, l = manual_eval(features, w[i], cut, "support")
        torch.testing.assert_close(acc[i], a, rtol=0, atol=1e-6)
        torch.testing.assert_close(loss[i], l, rtol=1e-4, atol=1e-5)


def test_sample_fraction_is_deterministic_and_differs_from_full_batch(features):
    b = batch_of(TASKS[1:])
    w0 = torch.stack([init_weights(SPEC, s) for s in (5, 6)])
    kw = dict(steps=8, sample_fraction=0.5)
    r1 = final(features, b, w0, generator=torch.Generator().manual_seed(0), **kw)
    r2 = final(features, b, w0, generator=torch.Generator().manual_seed(0), **kw)
    r3 = final(features, b, w0, generator=torch.Generator().manual_seed(1), **kw)
    full = final(features, b, w0, steps=8)
    assert torch.equal(r1, r2)
    assert (r1 - r3).abs().max() > 1e-4
    assert (r1 - full).abs().max() > 1e-4
    assert torch.isfinite(r1).all()


def test_separable_task_reaches_high_support_accuracy():
    """Three well-separated clusters in image space are learned to >= 95% support accuracy."""
    g = torch.Generator().manual_seed(3)
    a, per = 3, 40
    centers = torch.randn(a, SPEC.d_img, generator=g) * 2.0
    lab = torch.arange(a).repeat_interleave(per)
    feats = centers[lab] + torch.randn(a * per, SPEC.d_img, generator=g)
    prompts = torch.randn(a, SPEC.d_txt, generator=g)
    perm = torch.randperm(a * per, generator=g)
    b = pad_batch([prompts], [(perm, lab[perm])], [(torch.empty(0, dtype=torch.long),) * 2])
    w0 = init_weights(SPEC, 0)[None]
    acc0, loss0 = evaluate_experts(LAYOUT, feats, w0, b.prompts, b.answer_mask, b.support_idx, b.support_lab, b.support_n)
    w = final(feats, b, w0, steps=60)
    acc, loss = evaluate_experts(LAYOUT, feats, w, b.prompts, b.answer_mask, b.support_idx, b.support_lab, b.support_n)
    assert acc.item() >= 0.95, (acc0.item(), acc.item())
    assert loss.item() < loss0.item()


def test_step_flops_positive_and_linear_in_n():
    f = [step_flops(SPEC.d_img, SPEC.hidden, SPEC.d_txt, n, 5) for n in range(0, 401, 50)]
    assert all(v > 0 for v in f)
    deltas = {b - a for a, b in zip(f, f[1:])}
    assert len(deltas) == 1 and deltas.pop() > 0  # affine in n with a positive slope
    # the slope is dominated by fc1 (forward + weight gradient: 4 * d_img * hidden per sample)
    slope = step_flops(SPEC.d_img, SPEC.hidden, SPEC.d_txt, 1, 5) - step_flops(SPEC.d_img, SPEC.hidden, SPEC.d_txt, 0, 5)
    assert 4 * SPEC.d_img * SPEC.hidden <= slope < 5 * SPEC.d_img * SPEC.hidden
    assert step_flops(SPEC.d_img, SPEC.hidden, SPEC.d_txt, 10, 6) > step_flops(SPEC.d_img, SPEC.hidden, SPEC.d_txt, 10, 5)
