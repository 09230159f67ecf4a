"""SmallResNet, build_model, default layers and checked checkpoint loading."""

import pytest
import torch
from torch import nn

from xai_core.models import SmallResNet, build_model, default_layers, load_state_dict_checked


def test_small_resnet_shapes_and_layers():
    torch.manual_seed(0)
    model = SmallResNet(num_classes=4, width=8)
    x = torch.rand(2, 3, 64, 64)
    assert model(x).shape == (2, 4)
    assert default_layers(model) == ["layer1", "layer2", "layer3"] and model.cam_layer == "layer3"
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
             for n in model.default_layers]
    model(x)
    for h in hooks:
        h.remove()
    assert {n: tuple(o.shape) for n, o in seen.items()} == {
        "layer1": (2, 8, 32, 32), "layer2": (2, 16, 16, 16), "layer3": (2, 32, 8, 8)}
    assert all((o >= 0).all() for o in seen.values())  # stage outputs are post-ReLU
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_stage_output_is_not_modified_after_the_hook():
    """No in-place op touches a captured stage output: the logits equal fc(GAP(captured layer3))."""
    torch.manual_seed(0)
    model = SmallResNet(width=4).eval()
    seen = {}
    model.layer3.register_forward_hook(lambda m, i, o: seen.__setitem__("o", o))
    logits = model(torch.rand(3, 3, 32, 32))
    assert torch.allclose(logits, model.fc(seen["o"].mean((2, 3))), atol=1e-6)


def test_blocks_and_bad_arguments():
    model = SmallResNet(blocks=(2, 1, 1))
    assert len(model.layer1) == 2 and len(model.layer3) == 1
    with pytest.raises(ValueError, match="blocks"):
        SmallResNet(blocks=(1, 0, 1))


def test_build_model_resnet18_and_small():
    model = build_model("resnet18", num_classes=3)
    assert model.fc.out_features == 3
    assert model.default_layers == ["layer1", "layer2", "layer3", "layer4"] and model.cam_layer == "layer4"
    for name in model.default_layers:
        model.get_submodule(name)
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert isinstance(build_model("small_resnet", num_classes=5, width=4), SmallResNet)


def test_build_model_vgg_and_fallback():
    vgg = build_model("vgg11", num_classes=2)
    assert vgg.default_layers[-1] == vgg.cam_layer == "features.19"  # the ReLU before the last max-pool
    assert all(isinstance(vgg.get_submodule(n), nn.ReLU) for n in vgg.default_layers)
    mob = build_model("mobilenet_v3_small", num_classes=2)
    assert 1 <= len(mob.default_layers) <= 4 and mob.cam_layer == mob.default_layers[-1]
    out = {}
    mob.get_submodule(mob.cam_layer).register_forward_hook(lambda m, i, o: out.__setitem__("o", o))
    assert mob.training  # the dry forward restored the mode
    mob.eval()(torch.rand(1, 3, 64, 64))
    assert out["o"].dim() == 4


def test_unknown_arch_and_missing_defaults():
    with pytest.raises(ValueError, match=r"'resnet_9000'.*small_resnet.*resnet18"):
        build_model("resnet_9000", num_classes=2)
    with pytest.raises(ValueError, match="layers="):
        default_layers(nn.Sequential(nn.Conv2d(3, 2, 3)))


def test_load_state_dict_checked():
    torch.manual_seed(0)
    src = SmallResNet(num_classes=6, width=4)
    dst = SmallResNet(num_classes=6, width=4)
    load_state_dict_checked(dst, src.state_dict())
    assert torch.equal(dst.fc.weight, src.fc.weight)
    ddp = {f"module.{k}": v for k, v in src.state_dict().items()}  # saved from DistributedDataParallel
    assert torch.equal(load_state_dict_checked(SmallResNet(width=4), ddp).fc.bias, src.fc.bias)
    with pytest.raises(ValueError, match=r"fc\.weight: checkpoint \(6, 16\) vs model \(3, 16\)"):
        load_state_dict_checked(SmallResNet(num_classes=3, width=4), src.state_dict())
    extra = dict(src.state_dict(), **{"head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys: head.weight"):
        load_state_dict_checked(dst, extra)
    with pytest.raises(ValueError, match=r"missing keys: .*layer4|missing keys: fc\.weight"):
        load_state_dict_checked(dst, {k: v for k, v in src.state_dict().items() if k != "fc.weight"})


def test_stage_imports_leave_torchvision_out_for_the_small_resnet():
    # Every actor of a stage imports these and builds the configured model; torchvision (and the
    # torch._dynamo it pulls in) took about 3 s of each actor's start-up. A torchvision arch still loads it.
    import subprocess
    import sys

    code = ("import sys\n"
            "from pipelines.common import load_model, to_tensors\n"
            "from pipelines.precompute import ConsistencyActor\n"
            "from pipelines.evaluate import EvalActor\n"
            "from xai_core.models import build_model\n"
            "build_model('small_resnet', 3, width=4)\n"
            "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))\n"
            "build_model('resnet18', 3)\n"
            "print('torchvision' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "True"]


# ---------------------------------------------------------------- inference_copy

def _with_running_stats(model, seed=0):
    """Trained-like BatchNorm statistics and affine weights, so that folding them into the convs shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


@pytest.mark.parametrize("arch", ["small_resnet", "resnet18"])
def test_inference_copy_is_the_same_function_and_leaves_the_model_alone(arch):
    from xai_core.models import inference_copy

    torch.manual_seed(0)
    model = _with_running_stats(build_model(arch, 5)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference_copy(model)
    assert model.training and all(p.requires_grad for p in model.parameters())  # untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())  # folded into the convs
    assert any(isinstance(m, torch.nn.ReLU) and m.inplace for m in fast.modules())
    assert fast.input_memory_format is torch.channels_last
    x = torch.rand(3, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(fast(x), ref, rtol=1e-4, atol=1e-5)
    # input gradients (saliency, IG, PGD run on the copy) equal the model's
    xg = x.clone().requires_grad_(True)
    (g_fast,) = torch.autograd.grad(fast(xg)[:, 1].sum(), xg)
    xg = x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(model(xg)[:, 1].sum(), xg)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-6)
    assert torch.equal(x, xg.detach())  # the input is not overwritten by an in-place ReLU


class _Branchy(torch.nn.Module):
    """A ReLU whose input feeds another op too (may not run in place), and a forward fx cannot trace."""

    def __init__(self, traceable=True):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(4, 2)
        self.traceable = traceable

    def forward(self, x):
        a = self.bn(self.conv(x))
        if not self.traceable and x.sum() > 0:  # data-dependent control flow
            a = a * 2
        h = self.relu(a) - a  # relu(a) in place would make this 0
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("traceable", [True, False])
def test_inference_copy_keeps_shared_inputs_and_untraceable_models(traceable):
    from xai_core.models import inference_copy

    torch.manual_seed(1)
    model = _with_running_stats(_Branchy(traceable)).eval()
    fast = inference_copy(model)
    assert not any(getattr(m, "inplace", False) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules()) is (not traceable)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(fast(x), ref, rtol=1e-4, atol=1e-6)
    assert (ref - model.fc.bias).abs().max() > 1e-3  # h is not all zeros: the check can fail
