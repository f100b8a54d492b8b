"""HyperCLIP: clamped logit scale, contrastive training on toy weight/description pairs, and guidance."""
from __future__ import annotations

import math

import pytest
import torch

from models.zeroshot.hyperclip import HyperCLIP, contrastive_loss, guide, score

D_IN, D_TXT = 32, 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_pairs(n: int, g: torch.Generator, mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """n tasks: description c ~ N(0, I) [n, D_TXT]; weights v = tanh(c @ mix) + noise [n, D_IN] (a fixed nonlinear map)."""
    c = torch.randn(n, D_TXT, generator=g)
    v = torch.tanh(c @ mix) + 0.1 * torch.randn(n, D_IN, generator=g)
    return v, c


@pytest.fixture(scope="module")
def trained():
    """HyperCLIP trained for 300 Adam steps on fresh toy pairs each step."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(D_TXT, D_IN, generator=g) / math.sqrt(D_TXT)
    model = HyperCLIP(D_IN, D_TXT)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(300):
        v, c = toy_pairs(128, g, mix)
        loss = contrastive_loss(model, v, c)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.clamp_()
        losses.append(loss.item())
    return model, mix, losses


def test_embed_is_unit_norm_and_scale_starts_as_clip():
    model = HyperCLIP(D_IN, D_TXT)
    e = model.embed(torch.randn(5, D_IN))
    assert e.shape == (5, D_TXT)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(5))
    assert math.isclose(model.scale().item(), 1 / 0.07, rel_tol=1e-5)


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_logit_scale_stays_in_1_100_when_pushed(direction):
    model = HyperCLIP(D_IN, D_TXT)
    opt = torch.optim.SGD([model.log_scale], lr=1.0)
    for _ in range(20):
        opt.zero_grad()
        (-direction * model.log_scale.exp()).backward()  # push the raw parameter hard up (or down)
        opt.step()
        assert 1.0 <= model.scale().item() <= 100.0 + 1e-4
    model.clamp_()
    assert 0.0 <= model.log_scale.item() <= math.log(100.0) + 1e-6
    # After clamp_ the parameter sits on the bound, so the used scale is exactly that bound.
    assert math.isclose(model.scale().item(), 100.0 if direction > 0 else 1.0, rel_tol=1e-5)
    # Without clamp_ a raw value past the bound is still clamped where it is used.
    with torch.no_grad():
        model.log_scale.fill_(direction * 50.0)
    assert 1.0 <= model.scale().item() <= 100.0 + 1e-4


def test_contrastive_loss_is_symmetric_infonce():
    torch.manual_seed(1)
    model = HyperCLIP(D_IN, D_TXT)
    v, c = torch.randn(8, D_IN), torch.randn(8, D_TXT)
    logits = model.scale() * model.embed(v) @ torch.nn.functional.normalize(c, dim=-1).T
    y = torch.arange(8)
    ref = 0.5 * (torch.nn.functional.cross_entropy(logits, y) + torch.nn.functional.cross_entropy(logits.T, y))
    torch.testing.assert_close(contrastive_loss(model, v, c), ref)


def test_contrastive_training_separates_matched_from_mismatched_heldout_pairs(trained):
    model, mix, losses = trained
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)
    v, c = toy_pairs(64, torch.Generator().manual_seed(123), mix)  # held-out tasks
    with torch.no_grad():
        sims = model.embed(v) @ torch.nn.functional.normalize(c, dim=-1).T  # [64, 64]
        matched = score(model, v, c)
    torch.testing.assert_close(matched, sims.diagonal())
    rival = ~torch.eye(64, dtype=torch.bool)  # [64, 64]: row i's mismatched descriptions
    off = sims[rival]
    top1 = (sims.argmax(1) == torch.arange(64)).float().mean().item()
    above = ((matched[:, None] > sims) & rival).float().sum(1).div(63).mean().item()  # share of rivals beaten
    print(f"\nloss {first:.3f} -> {last:.3f}; held-out cos matched {matched.mean():.3f} vs mismatched {off.mean():.3f};"
          f" top-1 retrieval {top1:.3f} (chance 0.016); matched above {above:.3f} of mismatched")
    assert matched.mean() > off.mean() + 0.3
    assert above > 0.95 and top1 > 0.8


def test_guide_increases_score_and_leaves_model_untouched(trained):
    model, _, _ = trained
    g = torch.Generator().manual_seed(7)
    z0, c = torch.randn(16, D_IN, generator=g), torch.randn(16, D_TXT, generator=g)
    model.zero_grad(set_to_none=True)  # training left .grad set; start clean to see any accumulation
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    decode = torch.nn.Linear(D_IN, D_IN)  # a decoder with its own parameters must not be touched either
    with torch.no_grad():
        decode.weight.copy_(torch.eye(D_IN))
        decode.bias.zero_()
    with torch.no_grad():  # guidance must work inside a caller's no_grad block
        z = guide(z0, decode, model, c, steps=50, lr=1e-3)
    s0, s1 = score(model, z0, c), score(model, z, c)
    zf = guide(z0, decode, model, c, steps=50, lr=1e-2)
    s2 = score(model, zf, c)
    print(f"\nguide cos {s0.mean():.3f} -> {s1.mean():.3f} (lr 1e-3) / {s2.mean():.3f} (lr 1e-2)")
    assert not z.requires_grad and z.shape == z0.shape
    assert (s1 > s0).all() and (s2 > s1).all()
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k]) and p.grad is None and p.requires_grad == flags[k]
    assert decode.weight.grad is None


def test_guide_l2_keeps_z_closer_to_start(trained):
    model, _, _ = trained
    g = torch.Generator().manual_seed(8)
    z0, c = torch.randn(16, D_IN, generator=g), torch.randn(16, D_TXT, generator=g)
    free = guide(z0, lambda z: z, model, c, steps=100, lr=1e-2)
    pulled = guide(z0, lambda z: z, model, c, steps=100, lr=1e-2, l2=1.0)
    d_free, d_pulled = (free - z0).norm(dim=-1), (pulled - z0).norm(dim=-1)
    print(f"\n|z - z0|: l2=0 {d_free.mean():.3f}, l2=1 {d_pulled.mean():.3f}")
    assert (d_pulled < d_free).all()
    assert (score(model, pulled, c) > score(model, z0, c)).all()  # still guided, just held nearer z0


def test_hard_negatives_and_margin_change_the_loss_and_zero_is_plain_info_nce():
    from models.zeroshot.hyperclip import info_nce

    g = torch.Generator().manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(8, D_TXT, generator=g), dim=-1)
    c = torch.randn(8, D_TXT, generator=g)
    c[1] = c[0] + 0.05 * torch.randn(D_TXT, generator=g)  # tasks 0 and 1 have near-identical descriptions
    scale = torch.tensor(10.0)
    plain = info_nce(e, c, scale)
    assert torch.equal(info_nce(e, c, scale, hard=0.0, margin=0.0), plain)
    assert info_nce(e, c, scale, margin=0.2) > plain  # a margin makes every positive harder
    # A model that embeds each network on its own description: the near-duplicate pair (0, 1) is the one
    # confusable negative, and weighting negatives by description similarity makes it count more.
    aligned = torch.nn.functional.normalize(c, dim=-1)
    assert info_nce(aligned, c, scale, hard=8.0) > info_nce(aligned, c, scale) + 0.05
    # With equally dissimilar (orthogonal) descriptions every negative keeps weight 1: plain InfoNCE again.
    ortho = torch.eye(8, D_TXT)
    assert torch.allclose(info_nce(e, ortho, scale, hard=8.0), info_nce(e, ortho, scale), atol=1e-6)


def test_hyperclip_trains_with_hard_negatives_on_a_tiny_set():
    from models.zeroshot.training import train_hyperclip

    g = torch.Generator().manual_seed(1)
    mix = torch.randn(D_TXT, D_IN, generator=g) / math.sqrt(D_TXT)
    v, c = toy_pairs(24, g, mix)
    kw = dict(steps=150, lr=3e-3, hidden=(64,), batch=24, margin=0.1)
    hard, plain = (train_hyperclip(v, c, 0, hard_negatives=h, **kw) for h in (4.0, 0.0))
    s = score(hard, v, c)  # matched pairs
    off = (hard.embed(v) @ torch.nn.functional.normalize(c, dim=-1).T)[~torch.eye(24, dtype=torch.bool)]
    assert s.mean() > off.mean() + 0.3, (s.mean(), off.mean())  # it learned the pairing
    assert not torch.equal(hard.embed(v), plain.embed(v))  # and the option changed the model
