"""Weight normaliser, HNet (latent route trained on task losses) and HVAE, with real torch at small sizes.

The HNet is trained the way the generators stage trains it: a `LatentHNet` through `fit_task_model`
and its loss `task_ce` (models.zeroshot.training).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.expert_training import evaluate_experts, pad_batch, train_experts
from models.zeroshot.hnet import HNet, HNetLatents
from models.zeroshot.hvae import HVAE, vae_loss
from models.zeroshot.task_models import LatentHNet, fit_task_model
from models.zeroshot.tasks import Hooks, TaskData, sample_support, task_accuracy, task_ce
from models.task_net import TaskNetSpec, TaskNetwork, WeightLayout, init_weights, masked_logits
from models.weight_norm import WeightNormalizer

SMALL = TaskNetSpec(d_img=16, hidden=8, d_txt=8)
LAYOUT = WeightLayout(SMALL)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- normaliser -----------------------------------------------------------------------------------
def scaled_batch(n: int = 12, seed: int = 0) -> torch.Tensor:
    """w [n, P]: each layer a shared offset plus differences, both at the layer's own scale (1e-4 ... 1e2)."""
    g = torch.Generator().manual_seed(seed)
    scales = {"fc1.weight": 1e2, "fc1.bias": 1e-4, "fc2.weight": 1.0, "fc2.bias": 3e-2}
    parts = {}
    for k, shape in LAYOUT.shapes.items():
        base = 3 * scales[k] * torch.randn(shape, generator=g)  # fp32 resolves differences ~1e-7 of it
        parts[k] = base + scales[k] * torch.randn(n, *shape, generator=g)  # [n, *shape]
    return LAYOUT.flatten(parts)


def test_normalizer_decode_inverts_encode():
    w = scaled_batch()
    norm = WeightNormalizer(LAYOUT).fit(w)
    w_n = norm.encode(w)
    assert w_n.shape == w.shape
    torch.testing.assert_close(norm.decode(w_n), w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.encode(norm.decode(w_n)), w_n, rtol=1e-4, atol=1e-4)
    # works on any leading shape, e.g. a single vector
    torch.testing.assert_close(norm.decode(norm.encode(w[0])), w[0], rtol=1e-5, atol=1e-5)


def test_normalizer_gives_zero_mean_and_unit_std_per_layer():
    w = scaled_batch()
    norm = WeightNormalizer(LAYOUT).fit(w)
    w_n = norm.encode(w)
    stds = norm.layer_stds()
    assert stds["fc1.weight"] / stds["fc1.bias"] > 1e5  # the raw layers really differ in scale
    for k, (a, b) in LAYOUT.offsets.items():
        layer = w_n[:, a:b]
        torch.testing.assert_close(layer.mean(0), torch.zeros(b - a), atol=1e-4, rtol=0)
        assert layer.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-4), k


def test_normalizer_constant_layer_is_safe():
    w = scaled_batch()
    a, b = LAYOUT.offsets["fc2.bias"]
    w[:, a:b] = 0.5  # identical in every expert
    norm = WeightNormalizer(LAYOUT).fit(w)
    w_n = norm.encode(w)
    assert torch.isfinite(w_n).all()
    assert torch.equal(w_n[:, a:b], torch.zeros_like(w_n[:, a:b]))
    torch.testing.assert_close(norm.decode(w_n), w)
    # a single expert: every layer is constant, still finite
    assert torch.isfinite(WeightNormalizer(LAYOUT).fit(w[:1]).encode(w)).all()


def test_normalizer_state_dict_round_trip():
    w = scaled_batch()
    norm = WeightNormalizer(LAYOUT).fit(w)
    state = norm.state_dict()
    assert set(state) == {"mean", "std"}
    assert all(type(v) is torch.Tensor for v in state.values())
    fresh = WeightNormalizer(LAYOUT)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.encode(w), norm.encode(w))
    with pytest.raises(ValueError):
        WeightNormalizer(LAYOUT).fit(w[:, :-1])


# -- HNet -----------------------------------------------------------------------------------------
def test_hnet_shape_and_gradient_reaches_latents():
    torch.manual_seed(0)
    hnet, lat = HNet(LAYOUT.size, d_latent=6, hidden=(16, 16)), HNetLatents(3, 6)
    z = lat(torch.tensor([0, 2]))
    assert z.shape == (2, 6)
    w = hnet(z)
    assert w.shape == (2, LAYOUT.size)
    w.pow(2).sum().backward()
    assert lat.delta.grad[0].abs().sum() > 0 and lat.delta.grad[2].abs().sum() > 0
    assert lat.delta.grad[1].abs().sum() == 0  # task 1 was not in the batch
    assert lat.meta.grad.abs().sum() > 0
    assert all(p.grad is not None for p in hnet.parameters())


def test_hnet_latents_start_at_the_meta_latent():
    lat = HNetLatents(5, 32, noise=1e-2, generator=torch.Generator().manual_seed(0))
    spread = (lat.z - lat.meta).norm(dim=-1)
    assert spread.max() < 0.1 * lat.meta.norm()
    assert (lat.z[0] != lat.z[1]).any()  # tasks distinguishable from the start
    lat.reset(0.0)
    assert torch.equal(lat.z, lat.meta.expand(5, -1))


def init_normalizer() -> WeightNormalizer:
    """Normalise around a cloud of inits, so the HNet's 0 output is a PyTorch-default network."""
    return WeightNormalizer(LAYOUT).fit(torch.stack([init_weights(SMALL, s) for s in range(8)]))


def test_task_ce_of_a_latent_hnet_matches_the_task_network():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, SMALL.d_img, generator=g)
    prompts = [torch.randn(3, SMALL.d_txt, generator=g), torch.randn(2, SMALL.d_txt, generator=g)]  # 3 and 2 answers
    sup = [(torch.arange(5), torch.tensor([0, 1, 2, 0, 1])), (torch.arange(5, 10), torch.tensor([0, 1, 1, 0, 1]))]
    data = TaskData(LAYOUT, X, pad_batch(prompts, sup, sup), torch.randn(2, SMALL.d_txt, generator=g))
    torch.manual_seed(0)
    model = LatentHNet(init_normalizer(), 2, 4, (8,), torch.Generator().manual_seed(0))
    rows = torch.tensor([0, 1])
    idx, lab = data.batch.support_idx, data.batch.support_lab  # [2, 5]
    w = model(rows, data.c)  # [2, P]
    loss = task_ce(data, w, rows, idx, lab)
    want = []
    for i in range(2):
        net = TaskNetwork(SMALL)
        net.load_state_dict(LAYOUT.unflatten(w[i].detach()))
        logits = masked_logits(net(X[idx[i]], data.batch.prompts[i]), data.batch.answer_mask[i])
        want.append(F.cross_entropy(logits, lab[i], reduction="none"))
    torch.testing.assert_close(loss.detach(), torch.cat(want).mean())


def test_hnet_training_ignores_padded_samples():
    """Task 0 has 4 support samples padded to task 1's 6: the padding never reaches the loss."""
    g = torch.Generator().manual_seed(0)
    junk_image = 20  # an image only the padding points to
    X = torch.randn(junk_image + 1, SMALL.d_img, generator=g)
    prompts = [torch.randn(2, SMALL.d_txt, generator=g) for _ in range(2)]
    sup = [(torch.arange(4), torch.tensor([0, 1, 0, 1])), (torch.arange(4, 10), torch.tensor([1, 0, 1, 1, 0, 0]))]
    batch = pad_batch(prompts, sup, sup)
    assert batch.support_idx.shape == (2, 6) and batch.support_n.tolist() == [4, 6]
    junk = pad_batch(prompts, sup, sup)
    junk.support_idx[0, 4:], junk.support_lab[0, 4:] = junk_image, 1 - batch.support_lab[0, 4:]
    idx, _ = sample_support(junk, torch.tensor([0, 1, 0, 1]), 256, torch.Generator().manual_seed(0))
    assert (idx != junk_image).all()

    def fit(b) -> tuple[list[float], LatentHNet]:
        torch.manual_seed(0)
        model = LatentHNet(init_normalizer(), 2, 4, (8,), torch.Generator().manual_seed(0))
        losses: list[float] = []
        hooks = Hooks(log=lambda step, m: losses.append(m["loss"].item()), log_every=1)
        fit_task_model(model, TaskData(LAYOUT, X, b, torch.zeros(2, SMALL.d_txt)), 0, hooks, steps=5, lr=1e-3,
                       tasks_per_step=16, samples_per_task=8)
        return losses, model

    (loss_a, model_a), (loss_b, model_b) = fit(batch), fit(junk)
    assert loss_a == loss_b
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))


def train_two_opposite_tasks(steps: int = 200, seed: int = 0) -> tuple[torch.Tensor, list[float]]:
    """One LatentHNet, two tasks on the same images with opposite labels, trained by fit_task_model;
    returns (query accuracy [2], losses)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, SMALL.d_img, generator=g)  # shared random image features
    y0 = (x @ torch.randn(SMALL.d_img, generator=g) > 0).long()
    prompt = torch.randn(2, SMALL.d_txt, generator=g)  # same answers
    tasks = [(torch.arange(64), y0), (torch.arange(64), 1 - y0)]  # task 1 answers the opposite of task 0
    data = TaskData(LAYOUT, x, pad_batch([prompt, prompt], tasks, tasks), torch.zeros(2, SMALL.d_txt))
    torch.manual_seed(seed)
    model = LatentHNet(init_normalizer(), 2, 8, (32, 32), torch.Generator().manual_seed(seed))
    losses: list[float] = []
    hooks = Hooks(log=lambda step, m: losses.append(m["loss"].item()), log_every=1)
    # support drawn with replacement each step
    fit_task_model(model, data, seed, hooks, steps=steps, lr=3e-3, tasks_per_step=2, samples_per_task=64)
    with torch.no_grad():
        acc = task_accuracy(data, model(torch.arange(2), data.c))
    return acc, losses


def test_hnet_latent_route_represents_two_opposite_experts():
    acc, losses = train_two_opposite_tasks()
    print(f"\nHNet two opposite tasks: accuracy {acc.tolist()}, loss {losses[0]:.3f} -> {losses[-1]:.2e}")
    assert (acc >= 0.9).all(), acc
    assert losses[-1] < 0.1 * losses[0]


# -- HVAE -----------------------------------------------------------------------------------------
def test_hvae_shapes_sampling_and_eval_mode():
    torch.manual_seed(0)
    vae = HVAE(LAYOUT.size, d_latent=5, hidden=(16, 8))
    w = torch.randn(3, LAYOUT.size)
    mu, logvar = vae.encode(w)
    assert mu.shape == logvar.shape == (3, 5)
    assert vae.decode(mu).shape == (3, LAYOUT.size)
    w_rec, _, _ = vae(w, torch.Generator().manual_seed(0))
    assert w_rec.shape == (3, LAYOUT.size)
    # training-mode draws are reproducible from a generator; eval mode decodes the mean
    same = vae(w, torch.Generator().manual_seed(0))[0]
    assert torch.equal(w_rec, same)
    vae.eval()
    torch.testing.assert_close(vae(w)[0], vae.decode(mu))
    s = vae.sample(4, torch.Generator().manual_seed(1))
    assert s.shape == (4, LAYOUT.size) and torch.isfinite(s).all()
    assert torch.equal(s, vae.sample(4, torch.Generator().manual_seed(1)))


def test_vae_loss_terms():
    w, w_rec = torch.zeros(2, 4), torch.ones(2, 4)
    mu, logvar = torch.zeros(2, 3), torch.zeros(2, 3)
    loss, recon, kl = vae_loss(w, w_rec, mu, logvar, beta=0.5)
    assert recon.item() == pytest.approx(4.0)  # summed over 4 coordinates, averaged over 2 examples
    assert kl.item() == pytest.approx(0.0)  # posterior equal to the prior
    mu = torch.ones(2, 3)
    loss, recon, kl = vae_loss(w, w_rec, mu, logvar, beta=0.5)
    assert kl.item() == pytest.approx(1.5)  # 0.5 * |mu|^2 per example
    assert loss.item() == pytest.approx(4.0 + 0.5 * 1.5)


def farm_experts(n: int = 20, seed: int = 0):
    """n real experts of SMALL, trained from one shared init on random linear tasks; (w [n, P], eval args)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(200, SMALL.d_img, generator=g)
    prompts, sup = [], []
    for _ in range(n):
        lab = (feats @ torch.randn(SMALL.d_img, generator=g) > 0).long()
        idx = torch.randperm(200, generator=g)[:48]
        prompts.append(torch.randn(2, SMALL.d_txt, generator=g))
        sup.append((idx, lab[idx]))
    batch = pad_batch(prompts, sup, sup)  # query = support: we only compare against the experts
    w0 = init_weights(SMALL, seed).expand(n, -1)
    *_, (_, w) = train_experts(LAYOUT, feats, batch, w0, steps=100, lr=1e-2)
    ev = (feats, batch.prompts, batch.answer_mask, batch.query_idx, batch.query_lab, batch.query_n)
    return w, ev


def train_hvae(w_n: torch.Tensor, steps: int, seed: int = 0) -> tuple[HVAE, list[float]]:
    """Full-batch Adam on the HVAE loss over normalised weights w_n [N, P]; returns (model, losses)."""
    torch.manual_seed(seed)
    vae = HVAE(w_n.shape[1], d_latent=16, hidden=(64, 64))
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    gen, losses = torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        loss, _, _ = vae_loss(w_n, *vae(w_n, gen), beta=1e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return vae.eval(), losses


def test_hvae_reconstructs_experts_from_a_shared_init():
    w, ev = farm_experts()
    norm = WeightNormalizer(LAYOUT).fit(w)
    vae, losses = train_hvae(norm.encode(w), steps=600)
    assert losses[-1] < 0.05 * losses[0]
    with torch.no_grad():
        w_rec = norm.decode(vae(norm.encode(w))[0])
        samples = norm.decode(vae.sample(8, torch.Generator().manual_seed(0)))
    # error relative to the experts' differences from their mean (the part the VAE must learn) and
    # relative to the weights themselves (dominated by the shared init)
    rel_dev = ((w_rec - w).norm() / (w - w.mean(0)).norm()).item()
    rel = ((w_rec - w).norm(dim=1) / w.norm(dim=1)).max().item()
    acc_exp, _ = evaluate_experts(LAYOUT, ev[0], w, *ev[1:])
    acc_rec, _ = evaluate_experts(LAYOUT, ev[0], w_rec, *ev[1:])
    print(
        f"\nHVAE: loss {losses[0]:.1f} -> {losses[-1]:.3f}; rel err vs deviations {rel_dev:.4f}, "
        f"vs weights (max) {rel:.4f}; accuracy experts {acc_exp.mean():.3f}, reconstructions {acc_rec.mean():.3f}"
    )
    assert rel_dev < 0.1 and rel < 0.1
    assert acc_rec.mean() > acc_exp.mean() - 0.05
    assert samples.shape == (8, LAYOUT.size) and torch.isfinite(samples).all()


def test_training_is_deterministic_with_a_fixed_seed():
    w_n = torch.randn(6, LAYOUT.size, generator=torch.Generator().manual_seed(0))
    (vae_a, loss_a), (vae_b, loss_b) = train_hvae(w_n, steps=20), train_hvae(w_n, steps=20)
    assert loss_a == loss_b
    assert all(torch.equal(p, q) for p, q in zip(vae_a.parameters(), vae_b.parameters()))
    acc_a, hl_a = train_two_opposite_tasks(steps=10)
    acc_b, hl_b = train_two_opposite_tasks(steps=10)
    assert hl_a == hl_b and torch.equal(acc_a, acc_b)


def test_hnet_invert_finds_a_latent_that_decodes_near_the_target():
    from models.zeroshot.hnet import HNet, invert

    torch.manual_seed(0)
    hnet = HNet(200, d_latent=8, hidden=(32,)).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    z_true = torch.randn(5, 8, generator=g)
    w = hnet(z_true)  # targets on the decoder's manifold
    start = torch.zeros(5, 8)
    z = invert(hnet, w, start, steps=300, lr=0.05)
    before, after = (hnet(start) - w).pow(2).mean(), (hnet(z) - w).pow(2).mean()
    assert after < 0.05 * before, (before, after)
    assert all(p.grad is None for p in hnet.parameters())
