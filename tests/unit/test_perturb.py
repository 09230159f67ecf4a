"""Region-masked PGD / FGSM and background masks (METHODS §4)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.unit._models import TinyCNN, colour_squares
from xai_core._tensor import norm01
from xai_core.attribution import explain
from xai_core.perturb import background_mask, fgsm, pgd

torch.set_num_threads(1)


class LinearNet(nn.Module):
    """logits = W x_flat + b: the gradient of CE w.r.t. x is (softmax - onehot) @ W, by hand."""

    def __init__(self, shape=(3, 6, 6), k=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(shape[0] * shape[1] * shape[2], k)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _batch(b=4, size=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g), torch.tensor([0, 3, 1, 2][:b])


def test_outside_region_is_unchanged_bit_for_bit():
    model = TinyCNN().eval()
    x, y = _batch()
    region = (torch.rand(4, 12, 12, generator=torch.Generator().manual_seed(2)) < 0.5).float()
    x_adv = pgd(model, x, y, region=region, eps=0.3, step_size=0.1, steps=2,
                generator=torch.Generator().manual_seed(3))
    outside = (region == 0)[:, None].expand_as(x)
    assert torch.equal(x_adv[outside], x[outside])
    assert (x_adv[~outside] != x[~outside]).float().mean() > 0.9  # the region did move
    # the [B,1,H,W] bool form gives the same result with the same random start
    x_adv2 = pgd(model, x, y, region=region.bool()[:, None], eps=0.3, step_size=0.1, steps=2,
                 generator=torch.Generator().manual_seed(3))
    assert torch.equal(x_adv, x_adv2)


def test_linf_budget_per_sample_and_valid_range():
    model = TinyCNN().eval()
    x, y = _batch()
    eps = torch.tensor([0.0, 1 / 255, 4 / 255, 16 / 255])
    x_adv = pgd(model, x, y, eps=eps, step_size=eps / 2, steps=4, generator=torch.Generator().manual_seed(0))
    dist = (x_adv - x).abs().flatten(1).amax(1)
    assert torch.all(dist <= eps + 1e-6)
    assert torch.equal(x_adv[0], x[0])  # eps 0: nothing moves
    assert dist[3] > 15 / 255  # random start + 4 steps of eps/2 reach the budget
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad


def test_pgd_raises_the_loss_of_a_trained_model():
    x, y, _ = colour_squares(24, seed=0)
    model = LinearNet(shape=(3, 12, 12))
    for _ in range(40):  # plain SGD by hand (torch.optim's first import costs seconds)
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        with torch.no_grad():
            for prm, g in zip(model.parameters(), grads):
                prm -= 0.5 * g
    xt, yt, _ = colour_squares(6, seed=1)
    with torch.no_grad():
        clean = F.cross_entropy(model(xt), yt, reduction="none")
    assert (model(xt).argmax(1) == yt).all()  # the task was learned
    x_adv = pgd(model, xt, yt, eps=8 / 255, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adv = F.cross_entropy(model(x_adv), yt, reduction="none")
    assert torch.all(adv > clean)


def test_fgsm_equals_hand_computed_sign_step_on_a_linear_model():
    model = LinearNet()
    g = torch.Generator().manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(3, 3, 6, 6, generator=g)  # away from 0 and 1: no clamping
    y = torch.tensor([2, 0, 1])
    eps = 4 / 255
    with torch.no_grad():
        p = (x.flatten(1) @ model.fc.weight.T + model.fc.bias).softmax(1)
        grad = ((p - F.one_hot(y, 3).float()) @ model.fc.weight).view_as(x)  # dCE/dx by hand
    expected = (x + eps * grad.sign()).clamp(0, 1)
    assert torch.equal(fgsm(model, x, y, eps=eps), expected)
    # a custom loss (minus CE) steps the other way
    assert torch.equal(fgsm(model, x, y, eps=eps, loss_fn=lambda lo, t: -F.cross_entropy(lo, t)),
                       (x - eps * grad.sign()).clamp(0, 1))


def test_model_mode_params_and_grads_untouched():
    model = TinyCNN()
    model.train()
    model.fc.eval()  # a mixed state must survive as it is
    modes = [m.training for m in model.modules()]
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batch()
    with torch.no_grad():  # works inside no_grad too: gradients w.r.t. delta are enabled locally
        pgd(model, x, y, steps=2)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_random_start_uses_the_generator():
    model = TinyCNN().eval()
    x, y = _batch()
    a = pgd(model, x, y, generator=torch.Generator().manual_seed(5))
    b = pgd(model, x, y, generator=torch.Generator().manual_seed(5))
    c = pgd(model, x, y, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_background_mask_ground_truth_and_cam():
    model = TinyCNN().eval()
    x, y = _batch()
    obj = torch.zeros(4, 12, 12, dtype=torch.bool)
    obj[:, 3:7, 2:9] = True
    bg = background_mask(model, x, y, source="ground_truth", object_mask=obj)
    assert bg.dtype == torch.bool and bg.shape == (4, 1, 12, 12)
    assert torch.equal(bg[:, 0], ~obj)
    cam = norm01(explain(model, x, y, method="gradcam", layers=["conv1"]))
    for tau in (0.3, 0.5):
        got = background_mask(model, x, y, source="cam", tau=tau, layers=["conv1"])
        assert torch.equal(got[:, 0], cam < tau)
    default = norm01(explain(model, x, y, method="gradcam"))  # model.cam_layer
    assert torch.equal(background_mask(model, x, y)[:, 0], default < 0.5)


def test_bad_inputs_raise_value_error_naming_the_value():
    model = TinyCNN().eval()
    x, y = _batch()
    with pytest.raises(ValueError, match=r"eps=-0\.1.*>= 0"):
        pgd(model, x, y, eps=-0.1)
    with pytest.raises(ValueError, match=r"eps=-1\.0"):
        pgd(model, x, y, eps=torch.tensor([0.1, -1.0, 0.1, 0.1]))
    with pytest.raises(ValueError, match=r"eps must be .*\[4\]"):
        pgd(model, x, y, eps=torch.tensor([0.1, 0.1]))
    with pytest.raises(ValueError, match=r"steps=0.*>= 1"):
        pgd(model, x, y, steps=0)
    with pytest.raises(ValueError, match=r"\[4,1,12,12\].*got \(4, 12, 11\)"):
        pgd(model, x, y, region=torch.ones(4, 12, 11))
    with pytest.raises(ValueError, match=r"only 0 and 1"):
        pgd(model, x, y, region=torch.full((4, 12, 12), 0.5))
    with pytest.raises(ValueError, match=r"images in \[0, 1\].*got values in \[-0\.4"):
        pgd(model, x - 0.5, y)
    with pytest.raises(ValueError, match=r"'saliency'.*cam, ground_truth"):
        background_mask(model, x, y, source="saliency")
    with pytest.raises(ValueError, match=r"object_mask"):
        background_mask(model, x, y, source="ground_truth")
    with pytest.raises(ValueError, match=r"tau=1\.5"):
        background_mask(model, x, y, tau=1.5)
