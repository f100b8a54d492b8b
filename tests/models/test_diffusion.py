"""HyperLDM pieces: CFG arithmetic, condition dropping, scheduler wiring (oracle denoiser), a toy conditional fit, EMA."""
from __future__ import annotations

import pytest
import torch

from models.layers import SinusoidalEmbedding
from models.zeroshot.denoiser import ConditionEmbedder, LatentDenoiser
from models.diffusion import EMA, Diffusion, Standardizer, classifier_free_guidance


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_denoiser(z, t, c, drop=None):
    """Row-wise (batch-size independent) ε with distinct conditional and null branches."""
    base = 0.3 * z + 1e-3 * t[:, None].float()
    if c is None:
        return base - 0.5
    cond = base + c.sum(-1, keepdim=True) * torch.tensor([1.0, -2.0])
    return cond if drop is None else torch.where(drop[:, None], base - 0.5, cond)


def oracle(diff: Diffusion, z0: torch.Tensor):
    """A denoiser that returns the true noise of z given the known z0 (tiled when CFG doubles the batch)."""
    ab = diff.alphas_cumprod

    def eps(z, t, c, drop=None):
        a = ab[t][:, None]  # [B, 1]
        x0 = z0.repeat(len(z) // len(z0), 1)  # [B, d]
        return (z - a.sqrt() * x0) / (1 - a).sqrt()

    return eps


# -- guidance arithmetic ------------------------------------------------------------------------
def test_classifier_free_guidance_endpoints_and_extrapolation():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    assert torch.equal(classifier_free_guidance(u, c, 1.0), c)
    assert torch.equal(classifier_free_guidance(u, c, 0.0), u)
    torch.testing.assert_close(classifier_free_guidance(u, c, 7.5), u + 7.5 * (c - u))


def test_guided_eps_through_batched_call_is_exact_at_gamma_0_and_1():
    diff = Diffusion()
    g = torch.Generator().manual_seed(1)
    z, c = torch.randn(6, 2, generator=g), torch.randn(6, 3, generator=g)
    t = torch.tensor(417)
    tb = t.expand(6)
    assert torch.equal(diff.guided_eps(toy_denoiser, z, t, c, 1.0), toy_denoiser(z, tb, c))
    assert torch.equal(diff.guided_eps(toy_denoiser, z, t, c, 0.0), toy_denoiser(z, tb, None))
    # The real denoiser (train mode: its explicit drop mask must override random dropping).
    net = LatentDenoiser(2, 3, hidden=32, t_dim=16).train()
    torch.testing.assert_close(diff.guided_eps(net, z, t, c, 1.0), net(z, tb, c, drop=torch.zeros(6, dtype=torch.bool)))
    torch.testing.assert_close(diff.guided_eps(net, z, t, c, 0.0), net(z, tb, None))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sample_gamma_1_is_conditional_and_gamma_0_unconditional(sampler):
    diff = Diffusion()
    c = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    z_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(3))

    def run(den, cc, gamma):
        return diff.sample(den, cc, gamma, sampler=sampler, steps=20, z_T=z_T, generator=torch.Generator().manual_seed(4))

    plain = lambda z, t, c_, drop=None: toy_denoiser(z, t, c_)  # ignores drop: conditional ε on every row
    assert torch.equal(run(toy_denoiser, c, 1.0), run(plain, c, 1.0))  # guided(γ=1) == conditional-only ε
    uncond = run(toy_denoiser, None, 1.0)
    assert torch.equal(run(toy_denoiser, c, 0.0), uncond)
    assert not torch.allclose(run(toy_denoiser, c, 1.0), uncond)


# -- condition embedder ---------------------------------------------------------------------------
def test_condition_embedder_drops_about_20_percent_in_train_and_never_in_eval():
    torch.manual_seed(0)
    emb = ConditionEmbedder(4, 8, drop_prob=0.2)
    c = torch.randn(20_000, 4)
    is_null = lambda e: (e == emb.null(len(e))).all(-1)
    frac = is_null(emb.train()(c)).float().mean().item()
    assert 0.18 < frac < 0.22, frac
    assert not is_null(emb.eval()(c)).any()
    drop = torch.arange(len(c)) % 3 == 0
    assert torch.equal(is_null(emb.train()(c, drop=drop)), drop)  # a forced mask is exact in train mode
    assert emb.null_emb.requires_grad
    emb(c, drop=torch.ones(len(c), dtype=torch.bool)).sum().backward()
    assert emb.null_emb.grad is not None and emb.null_emb.grad.abs().sum() > 0


def test_sinusoidal_embedding_shape_and_distinct_timesteps():
    e = SinusoidalEmbedding(16)(torch.tensor([0, 1, 500, 999]))
    assert e.shape == (4, 16)
    assert torch.cdist(e, e).fill_diagonal_(1.0).min() > 1e-2
    torch.testing.assert_close(SinusoidalEmbedding(16)(torch.tensor([3.0])), SinusoidalEmbedding(16)(torch.tensor([3])))


# -- scheduler wiring: an oracle denoiser recovers z0 ---------------------------------------------
def test_ddim_shares_ddpm_betas():
    diff = Diffusion()
    assert torch.equal(diff.ddim.alphas_cumprod, diff.ddpm.alphas_cumprod)
    assert diff.alphas_cumprod[-1] < 1e-6  # cosine: z_T is (almost) pure noise


@pytest.mark.parametrize("sampler,schedule", [("ddim", "cosine"), ("ddpm", "cosine"), ("ddim", "linear")])
def test_oracle_denoiser_recovers_z0(sampler, schedule):
    diff = Diffusion(schedule=schedule)
    g = torch.Generator().manual_seed(5)
    z0 = 2 * torch.randn(64, 4, generator=g)  # inside the default x0 clamp of ±10
    z_T = torch.randn(64, 4, generator=g)
    c = torch.randn(64, 2, generator=g)
    out = diff.sample(oracle(diff, z0), c, gamma=4.0, sampler=sampler, steps=50, z_T=z_T, generator=g)
    err = (out - z0).abs().max().item()
    assert err < 1e-5, err  # measured ~5e-10


def test_loss_is_deterministic_given_generator_and_zero_for_oracle():
    diff = Diffusion()
    z0 = torch.randn(32, 3)
    net = LatentDenoiser(3, 2, hidden=16, t_dim=8).eval()
    c = torch.randn(32, 2)
    a = diff.loss(net, z0, c, generator=torch.Generator().manual_seed(0))
    b = diff.loss(net, z0, c, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert diff.loss(oracle(diff, z0), z0, c, generator=torch.Generator().manual_seed(0)) < 1e-8


# -- toy conditional fit, EMA, standardiser -------------------------------------------------------
@pytest.fixture(scope="module")
def toy_fit():
    """LatentDenoiser fit on c=one-hot k -> z ~ N(±(2,2), 0.3² I), in standardised coordinates."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    diff, net = Diffusion(), LatentDenoiser(2, 2, hidden=128, t_dim=32, drop_prob=0.2)
    ema = EMA(net, decay=0.99)
    k = torch.randint(0, 2, (4096,), generator=g)
    z_raw = (1 - 2 * k.float())[:, None] * 2.0 + 0.3 * torch.randn(4096, 2, generator=g)  # [N, 2]
    std = Standardizer(2).fit(z_raw)
    z, c = std.encode(z_raw), torch.eye(2)[k]
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for step in range(800):
        idx = torch.randint(0, len(z), (256,), generator=g)
        loss = diff.loss(net, z[idx], c[idx], generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net)
        losses.append(loss.item())
    return diff, net.eval(), ema, std, losses


def _quadrants(diff, den, std, gamma, sampler="ddim", n=200):
    c = torch.eye(2).repeat_interleave(n, 0)  # [2n, 2]: n of class 0 then n of class 1
    z = std.decode(diff.sample(den, c, gamma, sampler=sampler, steps=50, generator=torch.Generator().manual_seed(9)))
    pos = (z > 0).all(-1)[:n].float().mean().item()  # class 0 -> (+2, +2)
    neg = (z < 0).all(-1)[n:].float().mean().item()  # class 1 -> (-2, -2)
    return pos, neg, z


def test_toy_conditional_samples_land_in_right_mode_with_gamma_1(toy_fit):
    diff, net, ema, std, losses = toy_fit
    assert sum(losses[-50:]) / 50 < 0.5 * sum(losses[:50]) / 50
    print(f"\nloss {sum(losses[:50]) / 50:.3f} -> {sum(losses[-50:]) / 50:.3f}")
    for name, den, sampler in [("net", net, "ddim"), ("ema", ema.module, "ddim"), ("ema", ema.module, "ddpm")]:
        pos, neg, _ = _quadrants(diff, den, std, 1.0, sampler)
        print(f"{name} {sampler} gamma=1: right quadrant {pos:.3f} (c=0), {neg:.3f} (c=1)")
        assert pos >= 0.9 and neg >= 0.9


def test_toy_gamma_0_gives_a_mixture(toy_fit):
    diff, _, ema, std, _ = toy_fit
    _, _, z = _quadrants(diff, ema.module, std, 0.0)
    share = [(z[h].sum(-1) > 0).float().mean().item() for h in (slice(0, 200), slice(200, 400))]
    near = ((z.abs() - 2).abs() < 1.0).all(-1).float().mean().item()  # samples near one of the two modes
    print(f"\nema ddim gamma=0: share near (+2,+2) for c=0 / c=1 = {share[0]:.3f} / {share[1]:.3f}; near a mode {near:.3f}")
    # Unconditional samples ignore c: both halves of the batch are mixtures of the two modes.
    assert all(0.25 < s < 0.75 for s in share) and near > 0.8


def test_ema_tracks_with_the_expected_decay():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)  # the first update copies
    torch.testing.assert_close(ema.module.weight, torch.ones(2, 3))
    with torch.no_grad():
        net.weight.fill_(0.0)
    for _ in range(10):
        ema.update(net)
    torch.testing.assert_close(ema.module.weight, torch.full((2, 3), 0.9**10))
    assert not ema.module.weight.requires_grad and net.weight.requires_grad


def test_standardizer_round_trip():
    z = torch.randn(500, 4) * torch.tensor([1.0, 10.0, 0.1, 3.0]) + 5
    s = Standardizer(4).fit(z)
    e = s.encode(z)
    torch.testing.assert_close(e.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(e.std(0), torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.decode(e), z)
    assert Standardizer(4).fit(torch.ones(10, 4)).std.min() > 0  # constant dims do not divide by 0


# -- SDEdit: the sampler started from a given latent ------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_edit_from_T_is_the_plain_sampler_and_from_0_the_start(sampler):
    diff = Diffusion()
    net = LatentDenoiser(3, 2, hidden=16, t_dim=8).eval()
    g = torch.Generator().manual_seed(3)
    z0, c = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
    plain = diff.sample(net, c, 4.0, sampler=sampler, steps=20, generator=torch.Generator().manual_seed(1))
    edited = diff.edit(net, z0, c, diff.T, 4.0, sampler=sampler, steps=20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain, edited)  # same noise as z_T, same steps: draw for draw
    assert torch.equal(diff.edit(net, z0, c, 0, 4.0, sampler=sampler, steps=20, generator=g), z0)
    mid = diff.edit(net, z0, c, 300, 4.0, sampler=sampler, steps=20, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(mid, plain) and not torch.allclose(mid, z0)


@pytest.mark.parametrize("t_start", [1, 300, 999])
def test_edit_with_the_oracle_denoiser_returns_its_start(t_start):
    diff = Diffusion()
    g = torch.Generator().manual_seed(5)
    z0, c = 2 * torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    out = diff.edit(oracle(diff, z0), z0, c, t_start, 4.0, steps=50, generator=g)
    assert (out - z0).abs().max().item() < 1e-4  # noised to the first step below t_start, then denoised back


def test_toy_edit_keeps_the_start_at_small_t0_and_follows_the_condition_at_large(toy_fit):
    diff, _, ema, std, _ = toy_fit
    n = 200
    z0 = std.encode(torch.full((n, 2), 2.0))  # every start in class 0's mode (+2, +2)
    c = torch.eye(2)[[1] * n]  # ... asked for class 1, whose mode is (-2, -2)

    def share_in_class_1(t0):
        z = std.decode(diff.edit(ema.module, z0, c, t0, 1.0, generator=torch.Generator().manual_seed(9)))
        return (z < 0).all(-1).float().mean().item()

    low, high = share_in_class_1(100), share_in_class_1(diff.T)
    print(f"\nstarted in class 0, conditioned on class 1: in class 1's mode {low:.3f} (t0=100), {high:.3f} (t0=T)")
    assert low < 0.1 and high > 0.9
