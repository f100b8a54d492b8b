"""Task network and its flat-weight layout: sizes, order, forward equivalences, vmap, gradients, init."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.task_net import (
    TaskNetSpec,
    TaskNetwork,
    WeightLayout,
    cosine_logits,
    functional_forward,
    init_weights,
    masked_logits,
)

SPEC = TaskNetSpec()
SMALL = TaskNetSpec(d_img=24, hidden=6, d_txt=10)


def data(spec: TaskNetSpec, n: int = 9, a: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, spec.d_img, generator=g), torch.randn(a, spec.d_txt, generator=g)


def net_with(spec: TaskNetSpec, seed: int) -> TaskNetwork:
    torch.manual_seed(seed)
    return TaskNetwork(spec)


def params_of(net: TaskNetwork) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in net.named_parameters()}


# -- layout ---------------------------------------------------------------------------------------
def test_default_layout_size_is_53664_and_equals_parameter_count():
    layout = WeightLayout(SPEC)
    n_params = sum(p.numel() for p in TaskNetwork(SPEC).parameters())
    assert layout.size == 53664 == n_params
    assert layout.size == 1280 * 32 + 32 + 384 * 32 + 384
    assert init_weights(SPEC, 0).shape == (53664,)


def test_layout_order_and_shapes_match_named_parameters():
    net = net_with(SPEC, 1)
    layout = WeightLayout(SPEC)
    named = list(net.named_parameters())
    assert list(layout.shapes) == [k for k, _ in named]
    assert [layout.shapes[k] for k, _ in named] == [tuple(v.shape) for _, v in named]
    w = layout.flatten(params_of(net))
    # each tensor sits at its offset, flattened row-major, and the offsets tile [0, size)
    ends = 0
    for k, v in named:
        a, b = layout.offsets[k]
        assert a == ends
        ends = b
        assert torch.equal(w[a:b], v.detach().reshape(-1))
    assert ends == layout.size == w.numel()
    # the module's own parameters_to_vector uses the same order
    assert torch.equal(w, torch.nn.utils.parameters_to_vector(net.parameters()).detach())


def test_flatten_unflatten_round_trip_is_exact_with_leading_dims():
    layout = WeightLayout(SPEC)
    w = torch.randn(2, 3, layout.size)
    parts = layout.unflatten(w)
    for k, shape in layout.shapes.items():
        assert parts[k].shape == (2, 3, *shape)
    assert torch.equal(layout.flatten(parts), w)
    params = params_of(net_with(SPEC, 2))
    back = layout.unflatten(layout.flatten(params))
    assert set(back) == set(params)
    for k in params:
        assert torch.equal(back[k], params[k])


def test_layout_id_is_stable_and_changes_with_shapes():
    base = WeightLayout(SPEC).id
    assert base == WeightLayout(TaskNetSpec()).id
    assert base.startswith("adapter-")
    others = {
        WeightLayout(TaskNetSpec(hidden=64)).id,
        WeightLayout(TaskNetSpec(hidden=16)).id,
        WeightLayout(TaskNetSpec(d_img=512)).id,
        WeightLayout(TaskNetSpec(d_txt=512)).id,
    }
    assert base not in others and len(others) == 4


# -- forward ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [SPEC, SMALL], ids=["default", "small"])
def test_forward_equals_cosine_logits_of_embed(spec):
    net = net_with(spec, 3)
    x, p = data(spec, n=17, a=5)
    with torch.no_grad():
        got = net(x, p)
        want = cosine_logits(net.embed(x), p, spec.logit_scale)
    assert got.shape == (17, 5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # cosine logits are bounded by the scale and not all tiny (a real comparison, not 0 == 0)
    assert want.abs().max() <= spec.logit_scale + 1e-4
    assert want.abs().max() > 0.1


def test_cosine_logits_is_scaled_cosine():
    out, p = torch.randn(3, 10), torch.randn(4, 10)
    want = torch.stack([torch.stack([F.cosine_similarity(o, q, dim=0) for q in p]) for o in out]) * 7.0
    torch.testing.assert_close(cosine_logits(out, p, 7.0), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shrink", [1e-6, 1e-12])
def test_forward_matches_cosine_logits_for_tiny_outputs(shrink):
    """Cosine is scale-free, so shrinking fc2 must not change the logits (down to F.normalize's eps)."""
    net = net_with(SPEC, 4)
    x, p = data(SPEC)
    with torch.no_grad():
        before = net(x, p)
        net.fc2.weight.mul_(shrink)
        net.fc2.bias.mul_(shrink)
        out = net.embed(x)
        assert out.norm(dim=-1).max() < 1e-4
        got = net(x, p)
        want = cosine_logits(out, p, SPEC.logit_scale)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, before, rtol=1e-4, atol=1e-4)


def test_forward_zero_and_bias_only_outputs():
    net = net_with(SPEC, 5)
    x, p = data(SPEC)
    with torch.no_grad():
        # every ReLU dead: embed(x) == fc2.bias for every row
        net.fc1.bias.fill_(-1e4)
        assert torch.equal(net.embed(x), net.fc2.bias.expand(x.shape[0], -1))
        torch.testing.assert_close(net(x, p), cosine_logits(net.embed(x), p, SPEC.logit_scale), rtol=1e-5, atol=1e-5)
        # exactly zero output: both give 0 logits, not NaN or inf
        net.fc2.bias.zero_()
        got = net(x, p)
        assert torch.equal(got, torch.zeros_like(got))
        assert torch.equal(cosine_logits(net.embed(x), p, SPEC.logit_scale), got)


# -- functional forms ----------------------------------------------------------------------------
def test_functional_forward_equals_module():
    net = net_with(SPEC, 6)
    layout = WeightLayout(SPEC)
    x, p = data(SPEC, n=11, a=3)
    w = layout.flatten(params_of(net))
    with torch.no_grad():
        want = net(x, p)
    got = functional_forward(layout, w, x, p)
    assert got.shape == (11, 3)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_vmap_of_functional_forward_equals_loop():
    layout = WeightLayout(SPEC)
    w = torch.stack([init_weights(SPEC, s) for s in range(4)])  # [B, P]
    x, p = data(SPEC, n=7, a=3)
    fwd = torch.func.vmap(lambda wi: functional_forward(layout, wi, x, p))
    got = fwd(w)
    want = torch.stack([functional_forward(layout, wi, x, p) for wi in w])
    assert got.shape == (4, 7, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # distinct weights give distinct logits, so the map really is per row
    assert not torch.allclose(got[0], got[1])

    # per-expert data mapped together with the weights
    xs = torch.randn(4, 7, SPEC.d_img)
    ps = torch.randn(4, 3, SPEC.d_txt)
    got2 = torch.func.vmap(lambda wi, xi, pi: functional_forward(layout, wi, xi, pi))(w, xs, ps)
    want2 = torch.stack([functional_forward(layout, w[i], xs[i], ps[i]) for i in range(4)])
    torch.testing.assert_close(got2, want2, rtol=1e-5, atol=1e-5)


def test_gradients_through_functional_forward_match_module_autograd():
    net = net_with(SPEC, 7)
    layout = WeightLayout(SPEC)
    x, p = data(SPEC, n=13, a=4)
    lab = torch.arange(13) % 4
    F.cross_entropy(net(x, p), lab).backward()
    want = layout.flatten({k: v.grad for k, v in net.named_parameters()})
    w = layout.flatten(params_of(net))
    got = torch.func.grad(lambda wi: F.cross_entropy(functional_forward(layout, wi, x, p), lab))(w)
    assert got.shape == w.shape
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # and through plain autograd on a leaf w
    w2 = w.clone().requires_grad_(True)
    F.cross_entropy(functional_forward(layout, w2, x, p), lab).backward()
    torch.testing.assert_close(w2.grad, want, rtol=1e-4, atol=1e-6)


# -- init -------------------------------------------------------------------------------------------
def test_init_weights_deterministic_per_seed_and_distinct_across_seeds():
    a, b, c = init_weights(SPEC, 11), init_weights(SPEC, 11), init_weights(SPEC, 12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a != c).float().mean() > 0.99
    # it is PyTorch's default init from that seed (Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)))
    assert torch.equal(a, WeightLayout(SPEC).flatten(params_of(net_with(SPEC, 11))))
    fc1 = WeightLayout(SPEC).unflatten(a)["fc1.weight"]
    assert fc1.abs().max() <= 1 / math.sqrt(SPEC.d_img)


def test_init_weights_does_not_touch_global_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    expected = torch.rand(5)
    torch.set_rng_state(state)
    init_weights(SPEC, 0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(5), expected)


# -- masking ----------------------------------------------------------------------------------------
def test_masked_logits_sets_neg_inf_and_softmax_ignores_masked_slots():
    logits = torch.randn(3, 5)
    mask = torch.tensor([True, True, False, True, False])
    out = masked_logits(logits, mask)
    assert torch.isneginf(out[:, ~mask]).all()
    assert torch.equal(out[:, mask], logits[:, mask])
    probs = out.softmax(-1)
    assert torch.equal(probs[:, ~mask], torch.zeros(3, 2))
    torch.testing.assert_close(probs[:, mask], logits[:, mask].softmax(-1))
    # a per-row mask broadcast over samples, as evaluate_experts uses it
    rows = torch.tensor([[True, True, False, False, False], [True, True, True, True, True], [True] * 5])
    out2 = masked_logits(logits, rows)
    assert torch.isneginf(out2[0, 2:]).all() and torch.isfinite(out2[1:]).all()
    assert torch.isfinite(F.cross_entropy(out2, torch.tensor([1, 4, 0])))


@pytest.mark.parametrize("ratio, exact", [(1e-2, True), (1e-4, False), (0.0, False)])
def test_forward_near_cancellation(ratio, exact):
    """embed(x) ~ 0 while fc2 h and b2 are large: the Gram form stays bounded by the scale always, and
    equals the direct cosine down to 1e-2 relative cancellation (below that fp32 cannot resolve it)."""
    net = net_with(SPEC, 8)
    x, p = data(SPEC, n=1)
    with torch.no_grad():
        wh = net.fc2.weight @ F.relu(net.fc1(x))[0]  # [d_txt]
        noise = torch.randn(SPEC.d_txt, generator=torch.Generator().manual_seed(0)) / SPEC.d_txt**0.5
        net.fc2.bias.copy_(-wh + ratio * wh.norm() * noise)
        want = cosine_logits(net.embed(x), p, SPEC.logit_scale)
        got = net(x, p)
    assert torch.isfinite(got).all()
    assert got.abs().max() <= SPEC.logit_scale * 1.001
    if exact:
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_functional_forward_works_first_inside_vmap():
    """Nothing is built lazily on the first call, so the very first use may be inside a transform."""
    spec = TaskNetSpec(d_img=12, hidden=5, d_txt=7)  # a spec no other test has used
    layout = WeightLayout(spec)
    w = torch.stack([init_weights(spec, s) for s in range(3)])
    x, p = torch.randn(4, 12), torch.randn(2, 7)
    out = torch.func.vmap(lambda v: functional_forward(layout, v, x, p))(w)
    assert out.shape == (3, 4, 2) and torch.isfinite(out).all()
