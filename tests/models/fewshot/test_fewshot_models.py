"""Few-shot methods on tiny episodes: forward + a training step each, and the checks the issue asks for.

HyperMAML with its hypernetwork off equals MAML exactly; second-order MAML's meta-gradient matches
finite differences and differs from first-order's; MetaDiff's sampler with the true noise recovers
its target weights. Pure torch, no Ray (the methods' settings are the stage's own sections).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.fewshot import training as T
from models.fewshot.episodes import batch_loss
from models.fewshot.hypermaml import HyperMAML
from models.fewshot.hypertransformer import HyperTransformer
from models.fewshot.maml import MAML, adapt, meta_loss
from models.fewshot.metadiff import MetaDiff, fit_multitask, fit_targets, head_slice
from models.task_net import init_weights
from pipelines.episodic.settings import HyperMamlSettings, MamlSettings
from pipelines.fewshot import FewShotConfig
from tests.models.fewshot.test_fewshot_episodes import SPEC, toy_pool

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    pool, feats = toy_pool()
    return pool, feats, pool.batch(4, 2, 6, np.random.default_rng(0), feats)


def double(batch):
    """The batch with float tensors in float64 (finite differences need the precision)."""
    return type(batch)(**{k: (v.double() if v.is_floating_point() else v) for k, v in vars(batch).items()})


def one_step(model, batch):
    """One Adam step; returns (loss, whether any parameter moved)."""
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = T.train_step(model, opt, batch)
    moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return loss, moved


# ----------------------------------------------------------------------------- MAML


@pytest.mark.parametrize("method", ["maml", "fomaml"])
def test_maml_forward_and_training_step(data, method):
    _, _, batch = data
    model = T.build(method, SPEC, MamlSettings(inner_steps=3, inner_lr=0.5), seed=0)
    w = model.adapt(batch)
    assert w.shape == (4, model.layout.size) and not torch.allclose(w[0], w[1])
    acc = model.accuracy(batch)
    assert acc.shape == (4,) and ((acc >= 0) & (acc <= 1)).all()
    loss, moved = one_step(model, batch)
    assert np.isfinite(loss) and moved


def test_inner_loop_lowers_support_loss(data):
    _, _, batch = data
    model = MAML(SPEC, steps=5, lr=0.5)
    w0 = model.w0.detach().expand(len(batch), -1)
    before = batch_loss(model.layout, w0, *batch.support())
    after = batch_loss(model.layout, model.adapt(batch).detach(), *batch.support())
    assert (after < before).all()


def test_second_order_meta_gradient_matches_finite_differences(data):
    _, _, batch = data
    batch = double(batch)
    model = MAML(SPEC, steps=3, lr=0.5).double()
    (g,) = torch.autograd.grad(meta_loss(model, batch), model.w0)
    f = lambda w: float(batch_loss(model.layout, adapt(model.layout, w, batch, 3, 0.5), *batch.query()).mean())
    gen = torch.Generator().manual_seed(0)
    w0 = model.w0.detach()
    for _ in range(3):
        d = torch.randn(w0.shape, generator=gen, dtype=torch.float64)
        h = 1e-5
        fd = (f(w0 + h * d) - f(w0 - h * d)) / (2 * h)
        assert abs(fd - float(g @ d)) < 1e-6 * max(1.0, abs(fd)), (fd, float(g @ d))


def test_first_order_gradient_is_the_query_gradient_at_the_adapted_weights(data):
    _, _, batch = data
    fo = MAML(SPEC, steps=3, lr=0.5, first_order=True)
    so = MAML(SPEC, steps=3, lr=0.5)
    (g_fo,) = torch.autograd.grad(meta_loss(fo, batch), fo.w0)
    (g_so,) = torch.autograd.grad(meta_loss(so, batch), so.w0)
    w = fo.adapt(batch).detach().requires_grad_(True)  # [B, P]
    (g_explicit,) = torch.autograd.grad(batch_loss(fo.layout, w, *batch.query()).mean(), w)
    torch.testing.assert_close(g_fo, g_explicit.sum(0))  # dw_task/dw0 = I for every episode
    assert (g_fo - g_so).norm() > 1e-3 * g_so.norm()


# ----------------------------------------------------------------------------- HyperMAML


def test_hypermaml_off_equals_maml_exactly(data):
    _, _, batch = data
    hm = HyperMAML(SPEC, warmup_steps=5, warmup_lr=0.01, seed=3)
    hm.blend.fill_(0.0)
    maml = MAML(SPEC, steps=5, lr=0.01, part="last", seed=3)
    assert torch.equal(hm.w0, maml.w0)
    assert torch.equal(hm.adapt(batch), maml.adapt(batch))
    l_hm, l_maml = hm(batch), meta_loss(maml, batch)
    assert torch.equal(l_hm, l_maml)
    (g_hm,) = torch.autograd.grad(l_hm, hm.w0)
    (g_maml,) = torch.autograd.grad(l_maml, maml.w0)
    torch.testing.assert_close(g_hm, g_maml, rtol=0, atol=1e-7)


def test_hypermaml_warmup_steps_from_the_updated_weights(data):
    """Unlike the reference code, step 2 of the warm-up takes its gradient at the step-1 weights."""
    _, _, batch = data
    lr = 0.5
    one = MAML(SPEC, steps=1, lr=lr, part="last")
    two = HyperMAML(SPEC, warmup_steps=2, warmup_lr=lr)
    two.blend.fill_(0.0)
    w1 = one.adapt(batch).detach()
    g1 = w1 - one.w0.detach()  # -lr * grad at w0
    w2 = two.adapt(batch).detach()
    correct = w1 + (torch.stack([adapt(one.layout, w1[i], batch.rows([i]), 1, lr, part="last")[0] for i in range(4)]) - w1)
    torch.testing.assert_close(w2, correct)
    buggy = w1 + g1  # both steps at w0
    assert (w2 - buggy).norm() > 1e-4


def test_hypermaml_forward_and_training_step(data):
    _, _, batch = data
    model = T.build("hypermaml", SPEC, HyperMamlSettings(), seed=0)
    T.set_progress(model, 1, 10, HyperMamlSettings(warmup_fraction=0.2))
    assert float(model.blend) == 0.5  # halfway through the warm-up ramp
    w = model.adapt(batch)
    layout = model.layout
    a = layout.offsets["fc2.weight"][0]
    assert torch.equal(w[:, :a], model.w0.detach().expand(4, -1)[:, :a]), "only fc2 is updated"
    loss, moved = one_step(model, batch)
    assert np.isfinite(loss) and moved
    T.set_progress(model, 10, 10, HyperMamlSettings())
    assert float(model.blend) == 1.0 and model.accuracy(batch).shape == (4,)


# ----------------------------------------------------------------------------- HyperTransformer


@pytest.mark.parametrize("layers", ["last", "all"])
def test_hypertransformer_forward_and_training_step(data, layers):
    _, _, batch = data
    model = HyperTransformer(SPEC, layers=layers, d_model=16)
    w = model.adapt(batch)
    assert w.shape == (4, model.layout.size)
    fc1 = model.layout.offsets["fc1.bias"][1]
    same_fc1 = torch.equal(w[:, :fc1], model.w0.detach().expand(4, -1)[:, :fc1])
    assert same_fc1 == (layers == "last")
    assert not torch.allclose(w[0], w[1]), "weights depend on the support set"
    loss, moved = one_step(model, batch)
    assert np.isfinite(loss) and moved


def test_hypertransformer_ignores_padding(data):
    pool, feats, _ = data
    model = HyperTransformer(SPEC, d_model=16).eval()
    eps = [pool.episode(t, 2, 6, np.random.default_rng(t)) for t in range(len(pool))]
    from models.fewshot.episodes import collate

    together = model.adapt(collate(eps, feats, pool.prompts))[0]
    alone = model.adapt(collate(eps[:1], feats, pool.prompts))[0]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["hypermaml", "hypertransformer"])
def test_hypernetworks_train_the_head_on_a_frozen_pretrained_extractor(data, method):
    pool, feats, batch = data
    hp = FewShotConfig().settings(method)
    model = T.build(method, SPEC, hp, seed=0)
    T.prepare(model, pool, feats, hp, seed=0, pretrain_steps=5)
    n1 = model.layout.offsets["fc1.bias"][1]
    before = model.w0.detach().clone()
    assert not torch.equal(before, init_weights(SPEC, 0)), "w0 starts at the multitask network"
    T.set_progress(model, 10, 10, hp)
    for _ in range(3):
        one_step(model, batch)
    assert torch.equal(model.w0.detach()[:n1], before[:n1]), "fc1 (the extractor) never moves"
    assert not torch.equal(model.w0.detach()[n1:], before[n1:])


def test_hypertransformer_rotates_only_its_view_and_only_in_training(data):
    _, _, batch = data
    model = HyperTransformer(SPEC, d_model=16)
    with torch.no_grad():
        model.gain.zero_()  # only the prototype rows, built from the real features
        a, b = model.adapt(batch), model.adapt(batch)
        torch.testing.assert_close(a, b)
        model.gain.fill_(0.3)
        assert not torch.allclose(model.adapt(batch), model.adapt(batch)), "a random basis per call in training"
        model.eval()
        torch.testing.assert_close(model.adapt(batch), model.adapt(batch))


# ----------------------------------------------------------------------------- MetaDiff


@pytest.fixture(scope="module")
def metadiff(data):
    pool, feats, _ = data
    model = MetaDiff(SPEC, steps=5, width=32)
    w_base = fit_multitask(model.layout, init_weights(SPEC, 0), pool, feats, steps=20, tasks_per_step=4, samples=8)
    model.prepare(w_base, fit_targets(model.layout, w_base, pool, feats, steps=20))
    return model


def test_metadiff_forward_and_training_step(data, metadiff):
    _, _, batch = data
    assert metadiff.targets.shape == (4, head_slice(metadiff.layout).stop - head_slice(metadiff.layout).start)
    loss, moved = one_step(metadiff, batch)
    assert np.isfinite(loss) and moved
    w = metadiff.adapt(batch, torch.Generator().manual_seed(0))
    head = head_slice(metadiff.layout)
    assert torch.equal(w[:, : head.start], metadiff.w_base[: head.start].expand(4, -1)), "fc1 is the frozen extractor"
    assert torch.isfinite(w).all() and metadiff.accuracy(batch).shape == (4,)


def test_metadiff_sampler_with_true_noise_recovers_the_targets(data, metadiff):
    _, _, batch = data
    z0 = metadiff.encode(metadiff.targets[batch.task])  # [B, d]
    abar = metadiff.diffusion.alphas_cumprod

    def oracle(z, t, cond):  # the exact ε of z_t for a known z0
        a = abar[t].to(z.dtype)[:, None]
        return (z - a.sqrt() * z0) / (1 - a).sqrt()

    metadiff.eps = oracle  # replaces the learned denoiser (instance attribute shadows the method)
    try:
        for steps in (1, 5, 50):
            metadiff.steps = steps
            v = metadiff.sample_head(batch, torch.Generator().manual_seed(steps))
            torch.testing.assert_close(v, metadiff.targets[batch.task], rtol=0, atol=1e-4)
    finally:
        del metadiff.eps
        metadiff.steps = 5


def test_metadiff_support_gradient_is_the_loss_gradient(data, metadiff):
    _, _, batch = data
    z = torch.randn(4, len(metadiff.mu), generator=torch.Generator().manual_seed(0))
    g = metadiff.support_gradient(z, metadiff.support_state(batch))
    zz = z.clone().requires_grad_(True)
    from models.fewshot.metadiff import head_loss

    h, y, m, pr, am = metadiff.support_state(batch)
    loss = sum(head_loss(metadiff.layout, metadiff.decode(zz[i]), h[i], y[i], m[i], pr[i], am[i]) for i in range(4))
    (ref,) = torch.autograd.grad(loss, zz)
    ref = ref / ref.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- evaluation helpers


def test_evaluate_and_confidence_interval(data):
    pool, feats, _ = data
    model = T.build("maml", SPEC, MamlSettings(inner_steps=2), seed=0)
    eps = T.eval_episodes(pool, 2, 30, 6, seed=0)
    assert [e.task for e in eps] == [e.task for e in T.eval_episodes(pool, 2, 30, 6, seed=0)]
    acc = T.evaluate(model, eps, pool, feats, batch_size=7)
    assert acc.shape == (30,) and ((acc >= 0) & (acc <= 1)).all()
    mean, ci = T.mean_ci95(acc)
    assert ci == pytest.approx(1.96 * acc.std(ddof=1) / np.sqrt(30))
    ch = T.chance(eps, pool)
    assert set(np.round(1 / ch).astype(int)) <= {2, 3, 8}
