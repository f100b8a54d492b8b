"""Batched HyperLDM training against training each denoiser alone: same inits, same draws, same results."""
from __future__ import annotations

import pytest
import torch

from models.zeroshot.batched_ldm import LdmJob, ldm_step_flops, train_hyperldms
from models.zeroshot.training import train_hyperldm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = dict(steps=40, lr=1e-3, batch=48, hidden=32, timesteps=100, schedule="cosine", ema_decay=0.9, drop_prob=0.2)
D_Z, D_C = 6, 10
# Weights and samples of the batched models stay this close to those trained alone (measured: see the prints).
W_TOL, Z_TOL = 1e-4, 1e-3


def job(seed: int, n: int, data_seed: int) -> LdmJob:
    g = torch.Generator().manual_seed(data_seed)
    return LdmJob(z=torch.randn(n, D_Z, generator=g) * 3 + 1, c=torch.randn(n, D_C, generator=g), seed=seed)


# Two routes of one (split, seed) (same seed and size: one shared stream), another seed, another size.
JOBS = [job(0, 12, 100), job(0, 12, 101), job(1, 12, 102), job(2, 7, 103)]


@pytest.fixture(scope="module")
def trained():
    logged = []
    batched = train_hyperldms(JOBS, lambda step, losses: logged.append((step, losses.clone())), log_every=10, **SETTINGS)
    alone = []
    for j in JOBS:
        losses = []
        from models.zeroshot.tasks import Hooks

        ldm = train_hyperldm(j.z, j.c, j.seed, Hooks(log=lambda s, m, losses=losses: losses.append((s, m["loss"])),
                                                       log_every=10), **SETTINGS)
        alone.append((ldm, losses))
    return batched, alone, logged


def samples(ldm, c: torch.Tensor) -> torch.Tensor:
    return ldm.sample(c, gamma=1.5, steps=10, generator=torch.Generator().manual_seed(7))


def test_batched_models_equal_models_trained_alone(trained):
    batched, alone, _ = trained
    worst_w = worst_z = 0.0
    for j, got, (want, _) in zip(JOBS, batched, alone):
        sw, sg = want.denoiser.state_dict(), got.denoiser.state_dict()
        assert sw.keys() == sg.keys()
        worst_w = max(worst_w, max((sw[k] - sg[k]).abs().max().item() for k in sw))
        assert torch.equal(got.standardizer.mean, want.standardizer.mean) and torch.equal(got.standardizer.std, want.standardizer.std)
        worst_z = max(worst_z, (samples(got, j.c) - samples(want, j.c)).abs().max().item())
    print(f"\nbatched vs alone: max |Δw| {worst_w:.3g}, max |Δ sampled z| {worst_z:.3g}")
    assert worst_w <= W_TOL and worst_z <= Z_TOL


def test_training_moved_the_weights_and_models_differ(trained):
    batched, _, _ = trained
    torch.manual_seed(0)
    from models.zeroshot.denoiser import LatentDenoiser

    init = LatentDenoiser(D_Z, D_C, hidden=SETTINGS["hidden"]).state_dict()
    first = batched[0].denoiser.state_dict()
    assert max((first[k] - init[k]).abs().max().item() for k in init) > 1e-2
    # routes of one seed share the init and the stream but not the latents: different models
    second = batched[1].denoiser.state_dict()
    assert any(not torch.allclose(first[k], second[k]) for k in first)


def test_logged_losses_match_each_model_alone(trained):
    _, alone, logged = trained
    assert [s for s, _ in logged] == [10, 20, 30, 40]
    for i, (_, losses) in enumerate(alone):
        assert [s for s, _ in losses] == [10, 20, 30, 40]
        got = torch.stack([l[i] for _, l in logged])
        want = torch.stack([torch.as_tensor(v) for _, v in losses])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_one_shape_at_a_time():
    with pytest.raises(ValueError, match="same d_z and d_c"):
        train_hyperldms([job(0, 5, 1), LdmJob(torch.randn(5, D_Z + 1), torch.randn(5, D_C), 0)], log_every=1, **SETTINGS)


def test_step_flops_linear_in_batch():
    one = ldm_step_flops(128, 384, 512, 128, 1)
    assert ldm_step_flops(128, 384, 512, 128, 600) == 600 * one
    # forward 384x128 + 384x512 + 512x512 + 512x128 per row, about 3x that with the backward
    assert 3.0e6 < one < 3.6e6
