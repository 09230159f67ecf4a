"""Base attributions against Captum, pytorch-grad-cam and hand-computed values (METHODS §1)."""

import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients, LayerGradCam, Saliency

from tests.unit._models import OneConv, TinyCNN, tiny_resnet
from xai_core._tensor import norm01
from xai_core.attribution import explain, layer_maps

torch.set_num_threads(2)


def _data(b=4, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g), torch.tensor([0, 3, 1, 2][:b])


@pytest.fixture(scope="module", params=["tiny", "resnet"])
def model_and_layer(request):
    if request.param == "tiny":
        return TinyCNN().eval(), "conv2"
    return tiny_resnet(), "layer3"


def test_saliency_matches_captum(model_and_layer):
    model, _ = model_and_layer
    x, t = _data(size=32)
    raw = explain(model, x, t, method="saliency", reduce=None)
    ref = Saliency(model).attribute(x, target=t, abs=True)
    torch.testing.assert_close(raw.abs(), ref, rtol=1e-5, atol=1e-7)
    heat = explain(model, x, t, method="saliency")
    torch.testing.assert_close(heat, ref.amax(1), rtol=1e-5, atol=1e-7)


def test_input_x_gradient_matches_captum(model_and_layer):
    model, _ = model_and_layer
    x, t = _data(size=32)
    raw = explain(model, x, t, method="input_x_gradient", reduce=None)
    ref = InputXGradient(model).attribute(x, target=t)
    torch.testing.assert_close(raw, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(explain(model, x, t, method="input_x_gradient"), ref.sum(1).abs())


@pytest.mark.parametrize("ibs", [None, 8])
def test_integrated_gradients_matches_captum(model_and_layer, ibs):
    model, _ = model_and_layer
    x, t = _data(size=32)
    raw = explain(model, x, t, method="integrated_gradients", reduce=None, n_steps=8,
                  internal_batch_size=ibs)
    ref = IntegratedGradients(model).attribute(x, target=t, n_steps=8, method="riemann_middle")
    torch.testing.assert_close(raw, ref, rtol=1e-4, atol=1e-6)


def test_gradcam_matches_captum(model_and_layer):
    model, layer = model_and_layer
    x, t = _data(size=32)
    lgc = LayerGradCam(model, model.get_submodule(layer))
    ref = lgc.attribute(x, target=t, relu_attributions=True)
    raw = explain(model, x, t, method="gradcam", layers=[layer], upsample=False)
    torch.testing.assert_close(raw, ref.squeeze(1), rtol=1e-5, atol=1e-7)
    up = explain(model, x, t, method="gradcam", layers=[layer])
    ref_up = torch.nn.functional.interpolate(ref, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, ref_up.squeeze(1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method,cls", [("gradcam_pp", "GradCAMPlusPlus"), ("layercam", "LayerCAM"),
                                        ("gradcam", "GradCAM")])
def test_cam_variants_match_pytorch_grad_cam(method, cls):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = TinyCNN().eval()
    with torch.no_grad():  # large gradients: pytorch-grad-cam's eps=1e-6 in the Grad-CAM++ denominator
        model.fc.weight.mul_(1000.0)  # then no longer matters (ours uses the exact closed form)
    x, t = _data(size=16)
    # relu1 keeps the input resolution, so pytorch-grad-cam's cv2 resize is the identity.
    cam = getattr(pytorch_grad_cam, cls)(model=model, target_layers=[model.relu1])
    ref = torch.from_numpy(cam(x, targets=[ClassifierOutputTarget(int(c)) for c in t]))
    ours = explain(model, x, t, method=method, layers=["relu1"], upsample=False)
    torch.testing.assert_close(norm01(ours), ref, rtol=1e-4, atol=1e-4)


def test_smoothgrad_equals_plain_loop():
    model = TinyCNN().eval()
    x, t = _data()
    out = explain(model, x, t, method="smoothgrad", reduce=None, n_samples=5, sigma=0.2,
                  generator=torch.Generator().manual_seed(3), internal_batch_size=8)
    g = torch.Generator().manual_seed(3)
    std = 0.2 * (x.flatten(1).max(1).values - x.flatten(1).min(1).values).view(-1, 1, 1, 1)
    acc = torch.zeros_like(x)
    for count in (2, 2, 1):  # internal_batch_size 8 with B=4: passes of 2, 2, 1 samples
        noises = torch.randn((count, *x.shape), generator=g)
        for k in range(count):
            acc += Saliency(model).attribute(x + std * noises[k], target=t, abs=True)
    torch.testing.assert_close(out, acc / 5, rtol=1e-5, atol=1e-7)


def test_hand_computed_gradcam_and_layercam():
    model = OneConv()
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    t = torch.tensor([0, 1])
    # A0 = x, A1 = -x; class 0: G = [1/4, 2/4] -> 0.25x - 0.5x < 0 -> relu 0
    # class 1: G = [0.125, -0.25] -> gradcam 0.125x + 0.25x = 0.375x; layercam relu(G): 0.125x
    gc = explain(model, x, t, method="gradcam", upsample=False)
    lc = explain(model, x, t, method="layercam", upsample=False)
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    torch.testing.assert_close(gc[0], torch.zeros(2, 2))
    torch.testing.assert_close(gc[1], 0.375 * base)
    torch.testing.assert_close(lc[0], torch.zeros(2, 2))
    torch.testing.assert_close(lc[1], 0.125 * base)


def test_gradcam_pp_weights_by_hand_including_a_zero_denominator():
    from xai_core.attribution.cam import gradcam_pp_weights

    # alpha = G^2 / (2 G^2 + sum(A) G^3), 0 where G = 0, G^2 where the denominator is 0; w = sum alpha ReLU(G)
    acts = torch.tensor([[1.0, 1.0, 0.0], [-2.0, -2.0, 0.0]]).view(1, 2, 1, 3)  # sum(A) = 2 and -4
    grads = torch.tensor([[-1.0, 0.5, 0.0], [0.5, 0.25, 0.0]], requires_grad=True)
    w = gradcam_pp_weights(acts, grads.view(1, 2, 1, 3))
    # channel 0: G=-1 -> 0; G=0.5 -> 0.25 / (0.5 + 2 * 0.125) * 0.5 = 1/6; G=0 -> 0
    # channel 1: G=0.5 -> denominator 0.5 - 4 * 0.125 = 0 -> alpha 0.25 -> 0.125; G=0.25 -> 1 / (2 - 1) * 0.25
    torch.testing.assert_close(w.flatten(), torch.tensor([1 / 6, 0.125 + 0.25]))
    w.sum().backward()  # differentiable (create_graph users) and no NaN from the zero denominator
    assert torch.isfinite(grads.grad).all()


def test_multi_layer_cam_is_sum_of_normalised_maps():
    model = TinyCNN().eval()
    x, t = _data()
    both = explain(model, x, t, method="layercam", layers=["conv1", "conv2"])
    a = explain(model, x, t, method="layercam", layers=["conv1"])
    b = explain(model, x, t, method="layercam", layers=["conv2"])

    def n01(m):
        lo, hi = m.flatten(1).min(1).values, m.flatten(1).max(1).values
        return (m - lo[:, None, None]) / (hi - lo)[:, None, None]
    torch.testing.assert_close(both, n01(a) + n01(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "integrated_gradients", "gradcam",
                                    "gradcam_pp", "layercam"])
def test_batched_equals_per_sample(method):
    model = TinyCNN().eval()
    x, t = _data()
    batched = explain(model, x, t, method=method)
    single = torch.cat([explain(model, x[i:i + 1], t[i:i + 1], method=method) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
               for m in model.modules())


class Boom(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


@pytest.mark.parametrize("method", ["gradcam", "layercam", "saliency", "integrated_gradients"])
def test_hooks_removed_after_success_and_exception(method):
    model = TinyCNN().eval()
    x, t = _data()
    explain(model, x, t, method=method)
    assert _hook_count(model) == 0
    model.pool = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        explain(model, x, t, method=method)
    assert _hook_count(model) == 0


def test_mode_and_requires_grad_untouched():
    model = TinyCNN().train()
    model.conv1.weight.requires_grad_(False)
    x, t = _data()
    explain(model, x, t, method="gradcam")
    explain(model, x, t, method="saliency")
    assert model.training and all(m.training for m in model.modules())
    assert not model.conv1.weight.requires_grad and model.conv2.weight.requires_grad


class _Scaled(torch.nn.Module):
    """A parameter-free first layer: nothing upstream of it carries a graph but the input."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.scale = torch.nn.Identity()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.scale(x) * 2.0)


@pytest.mark.parametrize("freeze", ["none", "all", "conv1"])
def test_layer_maps_with_frozen_parameters_match_captum(freeze):
    # The input joins the graph only when needed; frozen weights (all, or just the first conv) must not
    # leave a layer without gradients (they would come back as zeros through allow_unused).
    model = TinyCNN().eval()
    if freeze == "all":
        model.requires_grad_(False)
    elif freeze == "conv1":
        model.conv1.requires_grad_(False)
    x, t = _data(size=32)
    for layer in ("conv1", "conv2"):
        ref = LayerGradCam(model, model.get_submodule(layer)).attribute(x, target=t, relu_attributions=True)
        got = explain(model, x, t, method="gradcam", layers=[layer], upsample=False)
        assert ref.abs().sum() > 0
        torch.testing.assert_close(got, ref.squeeze(1), rtol=1e-5, atol=1e-7)
    wrapped = _Scaled(TinyCNN().eval())
    ref = LayerGradCam(wrapped, wrapped.scale).attribute(x, target=t, relu_attributions=True)
    got = explain(wrapped, x, t, method="gradcam", layers=["scale"], upsample=False)
    assert ref.abs().sum() > 0
    torch.testing.assert_close(got, ref.squeeze(1), rtol=1e-5, atol=1e-7)


def test_plain_cam_leaves_the_input_out_of_the_graph():
    model = TinyCNN().eval()
    x, t = _data()
    seen = []
    h = model.conv1.register_forward_hook(lambda m, i, o: seen.append(i[0].requires_grad))
    try:
        explain(model, x, t, method="gradcam", layers=["conv2"])
        explain(model, x, t, method="saliency")
    finally:
        h.remove()
    assert seen == [False, True]


@pytest.mark.parametrize("method", ["gradcam", "gradcam_pp", "saliency", "integrated_gradients"])
def test_create_graph_maps_are_differentiable_wrt_params(method):
    model = TinyCNN().eval()
    x, t = _data()
    heat = explain(model, x, t, method=method, create_graph=True, **(
        {"n_steps": 4} if method == "integrated_gradients" else {}))
    heat.sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


def test_layer_maps_one_pass_for_many_layers():
    model = TinyCNN().eval()
    x, t = _data()
    lm = layer_maps(model, x, t, ["conv1", "conv2"], input_grad=True)
    assert set(lm.gradients) == {"conv1", "conv2"}
    # Gradient of y_t w.r.t. conv2 output equals fc weight / (h*w) broadcast through relu.
    h = lm.activations["conv2"]
    expected = model.fc.weight[t][:, :, None, None] / (h.shape[2] * h.shape[3]) * (h > 0)
    torch.testing.assert_close(lm.gradients["conv2"], expected)


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "gradcam", "layers": ["nope"]}, "unknown layer 'nope'"),
    ({"method": "what"}, "unknown method 'what'"),
    ({"method": "gradcam", "n_steps": 3}, "unknown option"),
    ({"method": "saliency", "layers": ["conv1"]}, "takes no layers"),
])
def test_bad_arguments_raise(kwargs, match):
    model = TinyCNN().eval()
    x, t = _data()
    with pytest.raises(ValueError, match=match):
        explain(model, x, t, **kwargs)


def test_bad_targets_and_inputs_raise():
    model = TinyCNN().eval()
    x, t = _data()
    with pytest.raises(ValueError, match="target 9 is out of range.*0..3"):
        explain(model, x, torch.tensor([0, 1, 9, 2]))
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        explain(model, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="4-D float"):
        explain(model, x[0], t)
    with pytest.raises(ValueError, match="integer class"):
        explain(model, x, t.float())


def test_default_pass_size_bounds_the_input_bytes_per_pass():
    from xai_core.attribution.gradients import PASS_INPUT_BYTES, default_steps_per_pass

    assert PASS_INPUT_BYTES["cpu"] == 8 * 2**20
    x = torch.zeros(64, 3, 64, 64)  # 3 MiB per step: 2 steps fit in 8 MiB
    assert default_steps_per_pass(x, 16) == 2
    assert default_steps_per_pass(x, 1) == 1
    assert default_steps_per_pass(torch.zeros(16, 3, 224, 224), 16) == 1  # 9.2 MiB: still one step per pass
    assert default_steps_per_pass(torch.zeros(2, 3, 8, 8), 16) == 16  # tiny: every step in one pass


def test_forward_only_passes_use_their_own_smaller_budget():
    from xai_core.attribution.gradients import FORWARD_INPUT_BYTES, default_steps_per_pass
    from xai_core.metrics.faithfulness import _default_rows

    assert FORWARD_INPUT_BYTES["cpu"] == 2**20
    one = torch.zeros(1, 3, 64, 64)  # 48 KiB per image: 21 images per 1 MiB forward
    assert _default_rows(one, 97 * 64) == 21 == default_steps_per_pass(one, 97 * 64, FORWARD_INPUT_BYTES)
    assert _default_rows(one, 5) == 5
    assert _default_rows(torch.zeros(1, 3, 1024, 1024), 10) == 1  # 12 MiB per image: one per forward
