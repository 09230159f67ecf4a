"""TIF and thresholded Grad-CAM (METHODS §2) against slow, plain re-implementations.

The references get activations and gradients with their own forward hooks and torch.autograd.grad (not
layer_maps) and build the maps with explicit Python loops over neurons.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.unit._models import OneConv, TinyCNN, tiny_resnet
from xai_core.attribution import explain
from xai_core.attribution.tif import gradcam_thresholded, tif

torch.set_num_threads(1)


def _data(b=4, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g), torch.tensor([0, 3, 1, 2][:b])


@pytest.fixture(scope="module")
def resnet():
    return tiny_resnet()


def _acts_grads(model, x, t, layers):
    """Plain per-layer activations A and gradients dy_t/dA for one input batch."""
    store = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda _m, _i, o, n=n: store.__setitem__(n, o)) for n in layers]
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))
            y = logits[torch.arange(x.shape[0]), t].sum()
            grads = torch.autograd.grad(y, [store[n] for n in layers])
    finally:
        for h in hooks:
            h.remove()
    return {n: (store[n].detach(), g) for n, g in zip(layers, grads)}


def _loop_tif_layer(p, g, alpha, weights="uniform"):
    """T = sum_k w_k R_k, one neuron at a time. p: [B,K,h,w]; g: the gradient used for the weights."""
    out = torch.zeros(p.shape[0], *p.shape[2:])
    for b in range(p.shape[0]):
        mass = p[b].clamp_min(0).sum()
        for k in range(p.shape[1]):
            rp = p[b, k].clamp_min(0)
            region = torch.where(rp >= alpha * rp.max(), rp, torch.zeros_like(rp))
            if weights == "uniform":
                w = 1.0
            elif weights == "gradcam":
                w = max(g[b, k].mean().item(), 0.0)
            else:
                w = (rp.sum() / mass).item() if mass > 0 else 0.0
            out[b] += w * region
    return out


def _up(m, size):
    return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _n01(m):
    lo = m.flatten(1).min(1).values[:, None, None]
    hi = m.flatten(1).max(1).values[:, None, None]
    return (m - lo) / (hi - lo)


@pytest.mark.parametrize("base", ["gradient", "input_x_gradient"])
@pytest.mark.parametrize("which", ["tiny", "resnet"])
def test_alpha0_uniform_is_sum_of_positive_neuron_maps(base, which, resnet):
    model, layer, size = (TinyCNN().eval(), "conv2", 16) if which == "tiny" else (resnet, "layer2", 32)
    x, t = _data(b=2, size=size)
    a, g = _acts_grads(model, x, t, [layer])[layer]
    p = g if base == "gradient" else g * a
    expected = torch.zeros(2, *p.shape[2:])
    for k in range(p.shape[1]):
        expected += p[:, k].clamp_min(0)
    out = tif(model, x, t, layers=[layer], base=base, alpha=0.0, weights="uniform", normalize=False)
    assert out.shape == (2, size, size)
    torch.testing.assert_close(out, _up(expected, (size, size)), rtol=1e-5, atol=1e-7)


def test_alpha1_keeps_only_per_neuron_maxima():
    model = TinyCNN().eval()
    x, t = _data()
    a, g = _acts_grads(model, x, t, ["conv2"])["conv2"]
    p = g * a
    out = tif(model, x, t, layers=["conv2"], alpha=1.0, weights="uniform", normalize=False, upsample=False)
    expected = torch.zeros(4, *p.shape[2:])
    argmax_positions = torch.zeros(4, *p.shape[2:], dtype=torch.bool)
    for b in range(4):
        for k in range(p.shape[1]):
            rp = p[b, k].clamp_min(0)
            if rp.max() > 0:
                at_max = rp == rp.max()
                argmax_positions[b] |= at_max
                expected[b] += rp * at_max
    assert out.shape == p[:, 0].shape
    torch.testing.assert_close(out, expected)
    assert (out[~argmax_positions] == 0).all() and (out[argmax_positions] > 0).all()
    assert ((out > 0).flatten(1).sum(1) <= p.shape[1]).all()  # at most one position per neuron here


@pytest.mark.parametrize("weights", ["gradcam", "attribution_mass"])
def test_weights_match_loop(weights):
    model = TinyCNN().eval()
    x, t = _data()
    ag = _acts_grads(model, x, t, ["relu1", "conv2"])
    out = tif(model, x, t, layers=["relu1", "conv2"], alpha=0.3, weights=weights)  # normalized, fused
    expected = sum(_n01(_up(_loop_tif_layer(g * a, g, 0.3, weights), (16, 16))) for a, g in ag.values())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    a, g = ag["conv2"]
    raw = tif(model, x, t, layers="conv2", alpha=0.3, weights=weights, normalize=False, upsample=False)
    torch.testing.assert_close(raw, _loop_tif_layer(g * a, g, 0.3, weights), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("baseline,ibs", [(0.0, None), (0.5, 8)])
def test_integrated_gradients_base_shares_steps_and_matches_loop(baseline, ibs):
    model = TinyCNN().eval()
    x, t = _data()
    layers, n = ["relu1", "conv2"], 4
    x0 = torch.full_like(x, baseline)
    at_x, at_x0 = _acts_grads(model, x, t, layers), _acts_grads(model, x0, t, layers)
    gsum = {name: 0.0 for name in layers}
    for k in range(n):  # one interpolation at a time
        step = _acts_grads(model, x0 + (k + 0.5) / n * (x - x0), t, layers)
        for name in layers:
            gsum[name] = gsum[name] + step[name][1]
    expected = 0
    for name in layers:
        gbar = gsum[name] / n
        p = (at_x[name][0] - at_x0[name][0]) * gbar
        expected = expected + _n01(_up(_loop_tif_layer(p, gbar, 0.25, "gradcam"), (16, 16)))
    out = tif(model, x, t, layers=layers, base="integrated_gradients", n_steps=n, baseline=baseline,
              internal_batch_size=ibs)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_smoothgrad_base_matches_loop():
    model = TinyCNN().eval()
    x, t = _data()
    n, sigma = 3, 0.2
    noise = torch.randn((n, *x.shape), generator=torch.Generator().manual_seed(5))
    std = sigma * (x.flatten(1).max(1).values - x.flatten(1).min(1).values).view(-1, 1, 1, 1)
    psum, gsum = 0.0, 0.0
    for k in range(n):
        a, g = _acts_grads(model, x + std * noise[k], t, ["conv2"])["conv2"]
        psum, gsum = psum + g * a, gsum + g
    expected = _loop_tif_layer(psum / n, gsum / n, 0.25, "gradcam")
    out = tif(model, x, t, layers=["conv2"], base="smoothgrad", n_samples=n, sigma=sigma,
              generator=torch.Generator().manual_seed(5), normalize=False, upsample=False)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)


def _count_passes(model, first, shallowest):
    counts = {"forward": 0, "backward": 0}

    def on_forward(_m, _i, _o):
        counts["forward"] += 1

    def on_shallowest(_m, _i, o):
        if o.requires_grad:
            o.register_hook(lambda _g: counts.__setitem__("backward", counts["backward"] + 1))
    hooks = [first.register_forward_hook(on_forward), shallowest.register_forward_hook(on_shallowest)]
    return counts, hooks


@pytest.mark.parametrize("base", ["gradient", "input_x_gradient", "integrated_gradients"])
def test_one_forward_one_backward_for_all_layers(base, resnet):
    x, t = _data(b=2, size=32)
    layers = ["layer1", "layer2", "layer3", "layer4"]
    counts, hooks = _count_passes(resnet, resnet.conv1, resnet.layer1)
    try:
        tif(resnet, x, t, layers=layers, base=base, n_steps=4, internal_batch_size=4)
    finally:
        for h in hooks:
            h.remove()
    if base == "integrated_gradients":  # 2 chunks of 2 steps shared by all layers + the [x; x0] forward
        assert counts == {"forward": 3, "backward": 2}
    else:
        assert counts == {"forward": 1, "backward": 1}


@pytest.mark.parametrize("which", ["tiny", "resnet"])
def test_flat_gap_layer_gives_zero_map_not_noise(which, resnet):
    # The gradient of the layer feeding global average pooling is spatially constant.
    model, flat, other, size = ((TinyCNN().eval(), "relu2", "conv2", 16) if which == "tiny"
                                else (resnet, "layer4", "layer3", 64))
    x, t = _data(b=2, size=size)
    kw = dict(base="gradient", weights="uniform", alpha=0.0)
    raw = tif(model, x, t, layers=[flat], normalize=False, **kw)
    assert (raw.abs().flatten(1).amax(1) > 0).all()  # non-trivial, (numerically) constant maps
    torch.testing.assert_close(raw, raw[:, :1, :1].expand_as(raw))
    assert (tif(model, x, t, layers=[flat], **kw) == 0).all()
    fused = tif(model, x, t, layers=[other, flat], **kw)
    torch.testing.assert_close(fused, tif(model, x, t, layers=[other], **kw))


@pytest.mark.parametrize("base", ["gradient", "input_x_gradient", "integrated_gradients"])
def test_batched_equals_per_sample(base):
    model = TinyCNN().eval()
    x, t = _data()
    kw = dict(layers=["relu1", "conv2"], base=base, n_steps=3)
    batched = tif(model, x, t, **kw)
    single = torch.cat([tif(model, x[i:i + 1], t[i:i + 1], **kw) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"alpha": 1.5}, r"alpha=1\.5 is out of range: allowed values are in \[0, 1\]"),
    ({"alpha": -0.1}, r"alpha=-0\.1 is out of range"),
    ({"base": "foo"}, "base='foo' is not allowed.*input_x_gradient"),
    ({"weights": "bar"}, "weights='bar' is not allowed.*attribution_mass"),
    ({"upsample": False}, "upsample=False needs exactly one layer"),
    ({"layers": ["nope"]}, "unknown layer 'nope'"),
])
def test_bad_arguments_raise(kwargs, match):
    model = TinyCNN().eval()
    x, t = _data()
    with pytest.raises(ValueError, match=match):
        tif(model, x, t, **{"layers": ["conv1", "conv2"], **kwargs})
    with pytest.raises(ValueError, match=match):
        explain(model, x, t, method="tif", **{"layers": ["conv1", "conv2"], **kwargs})


@pytest.mark.parametrize("base", ["input_x_gradient", "integrated_gradients", "smoothgrad"])
def test_create_graph_gives_parameter_gradients(base):
    model = TinyCNN().eval()
    x, t = _data()
    heat = tif(model, x, t, layers=["relu1", "conv2"], base=base, create_graph=True, n_steps=2,
               n_samples=2)
    heat.sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


def test_explain_registry_and_hooks_removed():
    model = TinyCNN().eval()
    x, t = _data()
    out = explain(model, x, t, method="tif", layers=["relu1", "conv2"], alpha=0.5)
    torch.testing.assert_close(out, tif(model, x, t, layers=["relu1", "conv2"], alpha=0.5))
    default = explain(model, x, t, method="tif", base="gradient")  # default layers: model.default_layers
    torch.testing.assert_close(default, tif(model, x, t, layers=model.default_layers, base="gradient"))
    with pytest.raises(ValueError, match="unknown option"):
        explain(model, x, t, method="tif", tau=0.5)
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()) == 0

    class Boom(torch.nn.Module):
        def forward(self, h):
            raise RuntimeError("boom")
    model.pool = Boom()
    for base in ("gradient", "integrated_gradients"):
        with pytest.raises(RuntimeError, match="boom"):
            tif(model, x, t, layers=["conv1", "conv2"], base=base, n_steps=2)
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()) == 0


def test_gradcam_thresholded_hand_computed():
    model = OneConv()
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    t = torch.tensor([0, 1])
    # Grad-CAM (see test_attribution): class 0 -> zeros; class 1 -> 0.375 * x = [[.375, .75], [1.125, 1.5]]
    out = explain(model, x, t, method="gradcam_thresholded", alpha=0.5, upsample=False)
    torch.testing.assert_close(out[0], torch.zeros(2, 2))
    torch.testing.assert_close(out[1], torch.tensor([[0.0, 0.75], [1.125, 1.5]]))


@pytest.mark.parametrize("layers", [["conv2"], ["relu1", "conv2"]])
def test_gradcam_thresholded_is_thresholded_gradcam(layers):
    model = TinyCNN().eval()
    x, t = _data()
    cam = explain(model, x, t, method="gradcam", layers=layers)
    out = gradcam_thresholded(model, x, t, layers=layers, alpha=0.4)
    mx = cam.flatten(1).amax(1)
    keep = torch.stack([cam[b] >= 0.4 * mx[b] for b in range(4)])
    assert (out[~keep] == 0).all() and (cam[~keep] > 0).any()  # something non-zero was cut
    torch.testing.assert_close(out[keep], cam[keep])
    default = explain(model, x, t, method="gradcam_thresholded")  # cam layer, alpha 0.25
    torch.testing.assert_close(default, gradcam_thresholded(model, x, t, layers=["conv2"], alpha=0.25))
