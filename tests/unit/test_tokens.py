"""Token layers (ViT [B,N,D], Swin [B,h,w,D]) as [B,D,h,w] grids, against pytorch-grad-cam with its
ViT/Swin reshape transforms, Captum LayerGradCam on an explicit grid module, and hand-made hooks."""

import pytest
import torch
from captum.attr import LayerGradCam
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from xai_core._tensor import norm01
from xai_core.attribution import explain, layer_maps
from xai_core.attribution._hooks import layer_grid, on_grids
from xai_core.attribution.reliable import learn_masks
from xai_core.models import SmallViT, build_model

torch.set_num_threads(2)


def _vit_reshape(prefix: int, h: int, w: int):
    """pytorch-grad-cam's ViT reshape_transform (its docs' example), with the token count as a knob."""
    def reshape_transform(tensor):
        result = tensor[:, prefix:, :].reshape(tensor.size(0), h, w, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)
    return reshape_transform


def _pgc(cls: str, model, layer: nn.Module, x, t, reshape, grid):
    """pytorch-grad-cam's map at the layer's own resolution (its target size set to the grid, so that its
    cv2 resize is the identity), min-max normalised per image as pytorch-grad-cam does."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    base = getattr(pytorch_grad_cam, cls)

    class AtGrid(base):
        def get_target_width_height(self, input_tensor):
            return grid[1], grid[0]

    cam = AtGrid(model=model, target_layers=[layer], reshape_transform=reshape)
    return torch.from_numpy(cam(x, targets=[ClassifierOutputTarget(int(c)) for c in t]))


def _random_head(model: nn.Module) -> nn.Module:
    with torch.no_grad():  # torchvision's ViT head starts at 0: every gradient would be 0
        head = model.heads.head
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    return model


@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(0)
    return _random_head(build_model("vit_b_16", 10)).eval()


@pytest.mark.parametrize("method,cls", [("gradcam", "GradCAM"), ("layercam", "LayerCAM")])
def test_vit_b16_cams_equal_pytorch_grad_cam(vit_b16, method, cls):
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 7])
    layer = vit_b16.cam_layer
    assert layer == "encoder.layers.encoder_layer_11.ln_1"
    ref = _pgc(cls, vit_b16, vit_b16.get_submodule(layer), x, t, _vit_reshape(1, 14, 14), (14, 14))
    ours = explain(vit_b16, x, t, method=method, upsample=False)
    assert ours.shape == (2, 14, 14) and float(ours.amax()) > 0
    torch.testing.assert_close(norm01(ours), ref, rtol=1e-4, atol=1e-4)


def test_swin_t_gradcam_equals_pytorch_grad_cam():
    torch.manual_seed(0)
    model = build_model("swin_t", 10).eval()
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1, 4])
    assert model.cam_layer == "features.7"
    ref = _pgc("GradCAM", model, model.features[7], x, t, lambda a: a.permute(0, 3, 1, 2), (7, 7))
    ours = explain(model, x, t, method="gradcam", upsample=False)
    assert float(ours.amax()) > 0
    torch.testing.assert_close(norm01(ours), ref, rtol=1e-4, atol=1e-4)
    # a stage in the middle (28 x 28 at 224 px) is read as [B,h,w,C] too
    ref2 = _pgc("LayerCAM", model, model.features[3], x, t, lambda a: a.permute(0, 3, 1, 2), (28, 28))
    ours2 = explain(model, x, t, method="layercam", layers=["features.3"], upsample=False)
    torch.testing.assert_close(norm01(ours2), ref2, rtol=1e-4, atol=1e-4)


class _Grid(nn.Module):
    """Tokens [B,1+h*w,D] -> grid [B,D,h,w] (through an Identity Captum can hook) -> tokens again."""

    def __init__(self, inner: nn.Module, prefix: int, h: int, w: int) -> None:
        super().__init__()
        self.inner, self.prefix, self.h, self.w = inner, prefix, h, w
        self.grid = nn.Identity()

    def forward(self, x):
        out = self.inner(x)
        b, _, d = out.shape
        g = self.grid(out[:, self.prefix:].reshape(b, self.h, self.w, d).permute(0, 3, 1, 2))
        return torch.cat([out[:, :self.prefix], g.permute(0, 2, 3, 1).reshape(b, self.h * self.w, d)], 1)


@pytest.mark.parametrize("size,registers", [((48, 80), 0), ((64, 64), 4)])
def test_small_vit_gradcam_equals_captum_on_an_explicit_grid_module(size, registers):
    """Non-square input on a ViT built for it, and a ViT with register tokens (5 leading tokens)."""
    torch.manual_seed(0)
    model = SmallViT(num_classes=4, image_size=size, num_registers=registers).eval()
    x = torch.rand(3, 3, *size, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 2, 3])
    ours = explain(model, x, t, method="gradcam", upsample=False)
    h, w = size[0] // 8, size[1] // 8
    assert ours.shape == (3, h, w)
    block = model.encoder.layers.encoder_layer_3
    block.ln_1 = _Grid(block.ln_1, 1 + registers, h, w)
    ref = LayerGradCam(model, block.ln_1.grid).attribute(x, target=t, relu_attributions=True).squeeze(1)
    assert float(ref.detach().amax()) > 0
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    pgc = _pgc("GradCAM", model, block.ln_1.inner, x, t, _vit_reshape(1 + registers, h, w), (h, w))
    torch.testing.assert_close(norm01(ours), pgc, rtol=1e-4, atol=1e-4)


def test_vit_b16_gradcam_equals_captum_on_an_explicit_grid_module(vit_b16):
    import copy

    model = copy.deepcopy(vit_b16)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([5, 0])
    ours = explain(model, x, t, method="gradcam", upsample=False)
    block = model.encoder.layers.encoder_layer_11
    block.ln_1 = _Grid(block.ln_1, 1, 14, 14)
    ref = LayerGradCam(model, block.ln_1.grid).attribute(x, target=t, relu_attributions=True).squeeze(1)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-4, atol=1e-7)


def test_small_vit_other_input_sizes_use_interpolated_positions():
    torch.manual_seed(0)
    model = SmallViT(num_classes=3).eval()
    x = torch.rand(2, 3, 48, 96)
    ours = explain(model, x, torch.tensor([0, 1]), method="gradcam", upsample=False)
    ref = _pgc("GradCAM", model, model.encoder.layers.encoder_layer_3.ln_1, x, [0, 1],
               _vit_reshape(1, 6, 12), (6, 12))
    torch.testing.assert_close(norm01(ours), ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # at the built size the positions are the parameter itself
        torch.testing.assert_close(model._positions(8, 8), model.pos_embedding[:, 1:])
    with pytest.raises(ValueError, match="patch size 8"):
        model(torch.rand(1, 3, 4, 64))


@pytest.mark.parametrize("method,opts", [
    ("gradcam", {}), ("gradcam_pp", {}), ("layercam", {}), ("gradcam_thresholded", {}),
    ("tif", {"base": "gradient", "alpha": 0.5}), ("tif", {"base": "input_x_gradient"}),
    ("tif", {"base": "integrated_gradients", "n_steps": 4}),
    ("tif", {"base": "smoothgrad", "n_samples": 3}),
    ("haf", {"steps": 3, "lam": 0.01, "normalize": False, "layers": ["encoder.layers.encoder_layer_1"]}),
])
def test_every_layered_method_on_token_layers_equals_the_explicit_reshape(method, opts):
    """The inferred grid against pytorch-grad-cam's reshape_transform passed as reshape= (the index-map
    path: a gather and a scatter, no token arithmetic of ours), for every method over layers."""
    torch.manual_seed(0)
    model = SmallViT(num_classes=3, num_registers=2).eval()
    x, t = torch.rand(2, 3, 64, 64), torch.tensor([2, 0])
    if "n_samples" in opts:
        opts = {**opts, "generator": torch.Generator().manual_seed(0)}
    auto = explain(model, x, t, method=method, **opts)
    if "generator" in opts:
        opts = {**opts, "generator": torch.Generator().manual_seed(0)}
    user = explain(model, x, t, method=method, reshape=_vit_reshape(3, 8, 8), **opts)
    torch.testing.assert_close(auto, user, rtol=1e-5, atol=1e-7)
    assert float(auto.amax()) > 0


def test_user_reshape_overrides_the_inferred_grid():
    torch.manual_seed(0)
    model = SmallViT(num_classes=3, num_registers=2).eval()
    x, t = torch.rand(2, 3, 64, 64), torch.tensor([2, 0])
    # a transposed grid (h and w swapped) is honoured, not silently replaced by the inferred one
    flipped = explain(model, x, t, method="gradcam", upsample=False,
                      reshape=lambda a: _vit_reshape(3, 8, 8)(a).transpose(2, 3))
    torch.testing.assert_close(flipped, explain(model, x, t, method="gradcam", upsample=False).transpose(1, 2))


def test_reshape_that_is_not_a_selection_or_grid_that_cannot_be_inferred_raises():
    torch.manual_seed(0)
    model = SmallViT(num_classes=3).eval()
    x = torch.rand(1, 3, 64, 64)
    with pytest.raises(ValueError, match="only select, reshape or permute"):
        explain(model, x, 0, method="gradcam", reshape=lambda a: a[:, 1:].reshape(1, 8, 8, -1).permute(
            0, 3, 1, 2) * 2 + 0.5)
    with pytest.raises(ValueError, match=r"must return \[B,D,h,w\]"):
        explain(model, x, 0, method="gradcam", reshape=lambda a: a[:, 1:])

    class NoPatch(nn.Module):  # 120 tokens: the nearest grids of 64x64 (10x10, 12x12) leave 20 or too few
        def __init__(self):
            super().__init__()
            self.tok = nn.Linear(3, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.tok(x.flatten(2)[:, :, :120].transpose(1, 2)).mean(1))

    with pytest.raises(ValueError, match=r"layer 'tok' outputs \(1, 120, 8\).*reshape="):
        explain(NoPatch(), x, 0, method="gradcam", layers=["tok"])
    with pytest.raises(ValueError, match="unknown option"):
        explain(model, x, 0, method="saliency", reshape=_vit_reshape(1, 8, 8))


@pytest.mark.parametrize("shape,size,kind", [
    ((2, 56, 56, 96), (224, 224), "nhwc"),     # Swin stage 1 at 224 px
    ((2, 7, 7, 768), (224, 224), "nhwc"),      # Swin stage 4
    ((2, 64, 8, 8), (64, 64), "nchw"),         # a conv stage
    ((2, 8, 8, 8), (64, 64), "nchw"),          # both readings fit: the torch convention wins
    ((2, 512, 1, 1), (64, 64), "nchw"),        # after global pooling
    ((2, 4, 5, 96), (32, 40), "nhwc"),         # Swin on a non-square input
    ((2, 3, 4, 5), (13, 17), "nchw"),          # neither reading: left as it is
])
def test_layer_grid_reads_four_dimensional_layouts(shape, size, kind):
    g = layer_grid(nn.Identity(), "l", torch.zeros(shape), size)
    assert g.kind == kind


def test_token_grid_from_patch_size_or_from_the_token_count():
    model = SmallViT(num_classes=2, num_registers=4)  # patch 8 from its attribute
    g = layer_grid(model, "l", torch.zeros(1, 5 + 6 * 10, 16), (48, 80))
    assert (g.kind, g.prefix, g.h, g.w) == ("tokens", 5, 6, 10)
    g = layer_grid(nn.Identity(), "l", torch.zeros(1, 197, 16), (224, 224))  # no patch size: 14 x 14 + 1
    assert (g.prefix, g.h, g.w) == (1, 14, 14)
    out = torch.arange(2 * 197 * 3, dtype=torch.float32).view(2, 197, 3)
    grid = g.to_grid(out)
    assert grid[1, 2, 0, 1] == out[1, 1 + 1, 2]  # patch (row 0, col 1) is token 1 + 1
    assert grid[0, 0, 3, 5] == out[0, 1 + 3 * 14 + 5, 0]
    torch.testing.assert_close(g.from_grid(out, grid), out)


def test_masks_on_the_token_grid_equal_zeroing_tokens_by_hand():
    """What HAF's masks do on a ViT: a zero at grid position (i, j) zeroes patch token 1 + i*w + j of the
    layer output and nothing else (the class token stays); ones change nothing."""
    torch.manual_seed(0)
    model = SmallViT(num_classes=3).eval()
    layer = "encoder.layers.encoder_layer_1"
    x = torch.rand(2, 3, 64, 64)
    mask = torch.ones(2, 128, 8, 8)
    mask[0, :, 2, 5] = 0
    mask[1, 7, 0, 0] = 0
    with torch.no_grad():
        plain = model(x)
        with on_grids(model, [layer], lambda n, g: g * torch.ones_like(mask)):
            torch.testing.assert_close(model(x), plain, rtol=0, atol=0)
        with on_grids(model, [layer], lambda n, g: g * mask):
            ours = model(x)

        def by_hand(_m, _i, out):
            out = out.clone()
            out[0, 1 + 2 * 8 + 5, :] = 0
            out[1, 1, 7] = 0
            return out
        h = model.get_submodule(layer).register_forward_hook(by_hand)
        try:
            ref = model(x)
        finally:
            h.remove()
    torch.testing.assert_close(ours, ref)
    assert not torch.allclose(ours, plain)


def test_haf_learns_masks_on_the_token_grid():
    torch.manual_seed(0)
    model = SmallViT(num_classes=3).eval()
    x = torch.rand(2, 3, 64, 64)
    layer = "encoder.layers.encoder_layer_2"
    masks, pres = learn_masks(model, x, torch.tensor([0, 1]), layers=[layer], steps=4, lam=0.01, keep="last")
    assert masks[layer].shape == (2, 128, 8, 8)
    with torch.no_grad():  # the kept masks, applied by hand to the tokens, give the reported preservation
        def apply(_m, _i, out):
            m = masks[layer].flatten(2).transpose(1, 2)
            return torch.cat([out[:, :1], out[:, 1:] * m], 1)
        h = model.get_submodule(layer).register_forward_hook(apply)
        try:
            masked = model(x).gather(1, torch.tensor([[0], [1]])).squeeze(1)
        finally:
            h.remove()
        ref = model(x).gather(1, torch.tensor([[0], [1]])).squeeze(1)
    torch.testing.assert_close(pres, (masked - ref) ** 2)
    heat = explain(model, x, torch.tensor([0, 1]), method="haf", layers=[layer], steps=4, lam=0.01)
    assert heat.shape == (2, 64, 64)


def test_create_graph_flows_through_the_token_reshape():
    """d(sum of Grad-CAM)/d(params) with create_graph equals the same CAM built by hand in the test."""
    torch.manual_seed(0)
    model = SmallViT(num_classes=3, num_layers=2, hidden_dim=32, mlp_dim=32).eval()
    x, t = torch.rand(2, 3, 32, 32), torch.tensor([1, 2])
    layer = model.get_submodule(model.cam_layer)
    params = [p for p in model.parameters()]
    cam = explain(model, x, t, method="gradcam", create_graph=True, upsample=False)
    ours = torch.autograd.grad(cam.sum(), params, allow_unused=True)
    store = {}
    h = layer.register_forward_hook(lambda _m, _i, out: store.setdefault("a", out))
    try:  # torch's fused CPU attention kernel has no double backward: the math kernel has
        with sdpa_kernel([SDPBackend.MATH]):
            y = model(x).gather(1, t[:, None]).sum()
    finally:
        h.remove()
    a = store["a"]
    (g,) = torch.autograd.grad(y, a, create_graph=True)
    grid = lambda z: z[:, 1:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)  # noqa: E731
    ga, aa = grid(g), grid(a)
    ref_cam = torch.relu((ga.mean((2, 3), keepdim=True) * aa).sum(1))
    torch.testing.assert_close(cam, ref_cam)
    ref = torch.autograd.grad(ref_cam.sum(), params, allow_unused=True)
    for o, r in zip(ours, ref):
        if r is None:
            assert o is None or float(o.abs().max()) == 0
        else:
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-6)
    assert any(r is not None and float(r.abs().max()) > 0 for r in ref)


def test_layer_maps_of_token_layers_are_grids_and_cnn_layers_unchanged():
    torch.manual_seed(0)
    model = SmallViT(num_classes=3).eval()
    x = torch.rand(2, 3, 64, 64)
    lm = layer_maps(model, x, 0, [model.cam_layer, "conv_proj"])
    assert lm.activations[model.cam_layer].shape == (2, 128, 8, 8)
    assert lm.activations["conv_proj"].shape == (2, 128, 8, 8)  # a conv output as it is


def test_consistency_and_scaat_train_a_vit():
    """The two training objectives on a ViT: consistency's CAM masks come from the token grid (a background
    region per image, the attack confined to it), SCAAT's loss backpropagates to every parameter; both through
    the pipeline's own per-batch loss."""
    from pipelines.config import ROOT, load_config
    from pipelines.train import batch_loss
    from xai_core.objectives import consistency_weights

    torch.manual_seed(0)
    model = SmallViT(num_classes=3, image_size=32, num_layers=2, hidden_dim=32, mlp_dim=32)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    model.eval()
    res = consistency_weights(model, x, y, mask_source="cam", eps=2 / 255, steps=1)
    assert res.cam.shape == (4, 32, 32) and float(res.cam.amax()) > 0
    assert bool(res.background.any()) and not bool(res.background.all())
    assert torch.isfinite(res.w).all() and float(res.w.mean()) == pytest.approx(1.0, rel=1e-5)
    assert float((res.x_adv - x).abs()[~res.background.expand_as(x)].max()) == 0  # object untouched
    cfg = load_config(ROOT / "configs/smoke.yaml", ["model.arch=vit_tiny"])
    model.train()
    for mode, batch in (("consistency", {"image": x, "label": y, "w": res.w}), ("scaat", {"image": x, "label": y})):
        model.zero_grad()
        loss, logits, _ = batch_loss(model, batch, mode, cfg, torch.Generator().manual_seed(0))
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert torch.isfinite(loss) and logits.shape == (4, 3)
        assert all(g is not None and torch.isfinite(g).all() for g in grads), mode
        assert float(model.conv_proj.weight.grad.abs().sum()) > 0, mode
