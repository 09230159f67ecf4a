"""Learned reliable masks and HAF (METHODS §3): invariants, hand-checkable cases, the paper's claim."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from tests.unit._models import TinyCNN
from xai_core.attribution import explain
from xai_core.attribution.reliable import haf, learn_masks

torch.set_num_threads(2)


def _data(b=3, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g), torch.tensor([0, 3, 1, 2][:b])


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
               for m in model.modules())


def _masked_logit(model, x, t, masks):
    """Plain re-implementation: multiply each layer's output by its mask, read the target logit."""
    hs = [model.get_submodule(n).register_forward_hook(lambda _m, _i, o, n=n: o * masks[n]) for n in masks]
    try:
        with torch.no_grad():
            return model(x).gather(1, t[:, None]).squeeze(1)
    finally:
        for h in hs:
            h.remove()


def test_masks_nonnegative_shapes_and_preservation_bound():
    model = TinyCNN().eval()
    x, t = _data()
    lam = 1e-3
    masks, pres = learn_masks(model, x, t, layers=["conv1", "conv2"], steps=15, lam=lam)
    assert masks["conv1"].shape == (3, 6, 16, 16) and masks["conv2"].shape == (3, 8, 8, 8)
    assert all(bool((m >= 0).all()) for m in masks.values())
    with torch.no_grad():
        ref = model(x).gather(1, t[:, None]).squeeze(1)
    out = _masked_logit(model, x, t, masks)
    torch.testing.assert_close(pres, (out - ref) ** 2, rtol=1e-4, atol=1e-7)
    # The kept masks have an objective no worse than M = 1 (preservation 0, sparsity sum_l K sqrt(hw)):
    bound = lam * (6 * 16 + 8 * 8)
    assert bool((pres <= bound).all())
    assert (out - ref).abs().max() < math.sqrt(bound)  # the masked logit stays within 0.4 of the original
    assert all(bool((m < 1).any()) for m in masks.values())  # and the masks did move


def test_keep_preservation_is_the_degenerate_literal_reading():
    model = TinyCNN().eval()
    x, t = _data()
    masks, pres = learn_masks(model, x, t, layers=["conv2"], steps=3, keep="preservation")
    assert torch.equal(masks["conv2"], torch.ones_like(masks["conv2"])) and torch.equal(pres, torch.zeros(3))
    heat = haf(model, x, t, layers=["conv2"], steps=3, keep="preservation")
    assert torch.equal(heat, torch.zeros(3, 16, 16))  # flat masks -> norm01 gives zeros


class _ConvMeanFc(nn.Module):
    """x -> 1x1 conv (1 input channel, every weight 1) -> spatial mean -> linear with ``fc_weight``
    [classes, channels]: each class's logit is a known multiple of each channel's mean."""

    def __init__(self, fc_weight: list[list[float]]):
        super().__init__()
        w = torch.tensor(fc_weight)
        self.conv = nn.Conv2d(1, w.shape[1], 1, bias=False)
        self.fc = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.fc.weight.copy_(w)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_unused_channel_mask_goes_to_zero():
    model = _ConvMeanFc([[10.0, 0.0], [-10.0, 0.0]])  # channel 1 is unused
    x = torch.ones(2, 1, 4, 4)
    masks, pres = learn_masks(model, x, torch.tensor([0, 1]), layers=["conv"], steps=30, lr=0.1)
    m = masks["conv"]
    # channel 1: only the sparsity term acts -> Adam moves it by lr per step until the projection hits 0
    assert torch.equal(m[:, 1], torch.zeros(2, 4, 4))
    assert bool((m[:, 0] > 0.8).all())  # channel 0 carries the logit (weight +-10) and is kept
    assert bool((pres < 0.05).all())


def test_one_sided_preservation_drops_features_that_only_argue_against_the_class():
    """Class 1 has only negative evidence (weight -10 on channel 0). Two-sided, its masks must keep channel 0
    to hold the logit at -10; one-sided, removing it RAISES the logit (to 0), so nothing needs keeping and
    every mask goes to 0, and the raw HAF map is empty. Class 0 (positive evidence) is kept either way."""
    model, x, t = _ConvMeanFc([[10.0], [-10.0]]), torch.ones(2, 1, 4, 4), torch.tensor([0, 1])
    kw = {"layers": ["conv"], "steps": 40, "lr": 0.1, "lam": 0.01}
    two, pres2 = learn_masks(model, x, t, **kw)
    one, pres1 = learn_masks(model, x, t, preserve="one_sided", **kw)
    assert bool((two["conv"] > 0.9).all()) and bool((pres2 < 0.05).all())  # both classes kept, two-sided
    assert bool((one["conv"][0] > 0.9).all())  # class 0: a lower mask lowers its logit, so it is kept
    assert torch.equal(one["conv"][1], torch.zeros(1, 4, 4)) and pres1[1].item() == 0.0  # class 1: dropped
    raw = haf(model, x, t, preserve="one_sided", normalize=False, **kw)
    assert torch.equal(raw[1], torch.zeros(4, 4)) and bool((raw[0] > 0.9).all())
    # the kept preservation value is relu(f_c(x) - f_c(x; M))^2, recomputed with the masks applied by hand
    out = model.fc((model.conv(x) * one["conv"]).mean(dim=(2, 3))).gather(1, t[:, None]).squeeze(1)
    ref = model(x).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(pres1, (ref - out).clamp_min(0).detach() ** 2)
    with pytest.raises(ValueError, match="preserve='both' is not allowed: use one of two_sided, one_sided"):
        learn_masks(model, x, t, layers=["conv"], preserve="both")


def test_haf_leaves_model_untouched():
    from xai_core.models import SmallResNet

    torch.manual_seed(0)
    model = SmallResNet(num_classes=4, width=4).train()
    model.layer1.eval()  # mixed modes must come back module by module
    model.conv1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # incl. BatchNorm running stats
    x, t = _data(b=2, size=32)
    heat = haf(model, x, t[:2], layers=["layer2", "layer3"], steps=4)
    assert heat.shape == (2, 32, 32)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.layer2.training and model.layer3[0].bn1.training
    assert not model.layer1.training and not model.layer1[0].bn1.training
    assert not model.conv1.weight.requires_grad and model.fc.weight.requires_grad
    assert _hook_count(model) == 0


class _BoomAfter(nn.Module):
    """Identity for ``n`` calls, then raises: fails inside the mask optimisation, not the first forward."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def forward(self, x):
        self.n -= 1
        if self.n < 0:
            raise RuntimeError("boom")
        return x


@pytest.mark.parametrize("calls", [0, 2])
def test_hooks_removed_and_mode_restored_after_exception(calls):
    model = TinyCNN().train()
    x, t = _data()
    haf(model, x, t, layers=["conv1", "conv2"], steps=2)
    assert _hook_count(model) == 0
    model.pool = nn.Sequential(_BoomAfter(calls), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(RuntimeError, match="boom"):
        haf(model, x, t, layers=["conv1", "conv2"], steps=5)
    assert _hook_count(model) == 0
    assert all(m.training for m in model.modules())


def test_batched_equals_per_sample():
    model = TinyCNN().eval()
    x, t = _data(b=3)
    batched, pres = learn_masks(model, x, t, layers=["conv1", "conv2"], steps=10)
    for i in range(3):
        single, p = learn_masks(model, x[i:i + 1], t[i:i + 1], layers=["conv1", "conv2"], steps=10)
        torch.testing.assert_close(p, pres[i:i + 1], rtol=1e-4, atol=1e-6)
        for n in single:
            torch.testing.assert_close(single[n], batched[n][i:i + 1], rtol=1e-4, atol=1e-5)


def test_haf_through_registry():
    model = TinyCNN().eval()
    x, t = _data()
    heat = explain(model, x, t, method="haf", layers=["conv1", "conv2"], steps=5)
    assert heat.shape == (3, 16, 16) and heat.min() >= 0 and heat.max() <= 1 + 1e-6
    direct = haf(model, x, t, layers=["conv1", "conv2"], steps=5)
    torch.testing.assert_close(heat, direct)
    default = explain(model, x, t, method="haf", steps=5)  # default layers: the last two of the model
    torch.testing.assert_close(default, direct)
    raw = explain(model, x, t, method="haf", layers=["conv2"], steps=5, upsample=False)
    assert raw.shape == (3, 8, 8)
    with pytest.raises(ValueError, match="create_graph"):
        explain(model, x, t, method="haf", create_graph=True)
    with pytest.raises(ValueError, match="unknown option"):
        explain(model, x, t, method="haf", n_steps=3)
    with pytest.raises(ValueError, match="keep="):
        explain(model, x, t, method="haf", keep="best")


@pytest.fixture(scope="module")
def shapes_model():
    """SmallResNet (width 8) trained ~20 s (1 thread) on unbiased 3-class BiasedShapes with large objects.

    Test accuracy 0.95 (128 test images); the 32 first correctly classified test images are returned.
    contrast=0.05 and 12 epochs: at the data's default contrast 0.1 (and its rule that the object colour
    differs from the background by >= 0.35), 8 epochs gave only 0.74. At one radius the object area
    orders circle > square > triangle, a shortcut worth ~0.75-0.8 that the model leaves only with more
    training, and whether it does depends on the seed: at contrast 0.05 / 12 epochs, torch seeds 0-3 gave
    0.98 / 0.88 / 0.80 / 0.94 on 1000 test images (contrast 0.1: seeds 0-2 gave 0.91 / 0.76 / 0.80).
    """
    from xai_core.data.synthetic import BiasedShapes
    from xai_core.models import SmallResNet

    kw = {"num_classes": 3, "obj_scale": (0.5, 0.8), "contrast": 0.05}
    n, epochs, bs = 2000, 12, 32
    train = BiasedShapes(n=n, seed=0, bias=1 / 3, **kw)
    x, y = train.images.float() / 255, train.labels
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = SmallResNet(num_classes=3, width=8)
            opt = torch.optim.Adam(model.parameters(), 3e-3)
            total = epochs * math.ceil(n / bs)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=total)
            model.train()
            for _ in range(epochs):
                perm = torch.randperm(n)
                for i in range(0, n, bs):
                    idx = perm[i:i + bs]
                    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    test = BiasedShapes(n=128, seed=1, split="test", **kw)
    xt, yt = test.images.float() / 255, test.labels
    with torch.no_grad():
        logits = model(xt)
    correct = (logits.argmax(1) == yt).nonzero().squeeze(1)[:32]
    acc = (logits.argmax(1) == yt).float().mean().item()
    return model, xt[correct], yt[correct], test.masks[correct], logits[correct], acc


def _in_object_mass(model, x, t, masks, method):
    """Mean over images of the relu mass of the map for class t inside the object mask."""
    heat = explain(model, x, t, method=method, layers=["layer2", "layer3"])
    return (heat.clamp_min(0) * masks).flatten(1).sum(1).mean().item()


def test_paper_claim_absent_class_measured(shapes_model):
    """METHODS §3's claim: HAF's map for an absent class stays near empty while Grad-CAM's shows the object.

    MEASURED: it depends on WHICH absent class. Measure: in-object relu mass of the map for the absent
    class over that of the map for the true class (mean over 32 correctly classified test images), both
    methods at layer2+layer3 (per-layer norm01 then summed), HAF with its defaults (30 steps, lam 1).
    Seen (test acc 0.953; in brackets the range over 6 models trained while choosing the fixture: torch
    seeds 0, 1, 3 at contrast 0.05, contrast 0.1 and 0.15 at seed 0, 3000 images x 8 epochs at seed 1):
    - runner-up class (logit closest to the winner): HAF 0.075 (0.07-0.33) vs Grad-CAM 0.75 (0.55-0.81):
      the CLAIM HOLDS (but not by 2x in every model: contrast 0.15 gave HAF 0.33 vs Grad-CAM 0.60);
    - least likely class (most negative logit): HAF 1.32 (1.07-1.77) vs Grad-CAM 0.25 (0.16-0.49): the
      CLAIM FAILS. Preserving a strongly negative logit needs the very object features that reject the
      class (masks at 0 give the bias logit, far from it); Grad-CAM's ReLU drops such negative evidence;
    - fixed absent class (label + 1) mod K: HAF 0.66 (0.65-0.87) vs Grad-CAM 0.44 (0.34-0.59): the CLAIM
      FAILS here too. Before the data change (contrast 0.15 default, no colour-distance rule) this read
      HAF 0.57 vs Grad-CAM 0.49 and was left unasserted as "close"; now HAF is above Grad-CAM in all six
      models (by 1.12-1.98x; 1.48x here), so the test asserts HAF > Grad-CAM (no HAF advantage).
    """
    model, x, y, masks, logits, acc = shapes_model
    assert acc > 0.8 and len(y) == 32  # the measurement needs a model that recognises the objects
    masks = masks.float()
    queries = {"next": (y + 1) % 3, "runner_up": logits.topk(2, dim=1).indices[:, 1],
               "least_likely": logits.argmin(1)}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        true_mass = {m: _in_object_mass(model, x, y, masks, m) for m in ("haf", "gradcam")}
        r = {(q, m): _in_object_mass(model, x, t, masks, m) / true_mass[m] for q, t in queries.items()
             for m in ("haf", "gradcam")}
    finally:
        torch.set_num_threads(threads)
    print("absent/true in-object mass, HAF vs Grad-CAM: " + ", ".join(
        f"{q}: {r[q, 'haf']:.3f} vs {r[q, 'gradcam']:.3f}" for q in queries) + f"; test acc {acc:.3f}")
    assert r["runner_up", "haf"] < 0.5 * r["runner_up", "gradcam"]  # the claim holds here
    assert r["least_likely", "haf"] > 2 * r["least_likely", "gradcam"]  # and is contradicted here
    assert r["next", "haf"] > r["next", "gradcam"]  # and here: no HAF advantage for (label + 1) mod K


def _bilinear_plain(m: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False), one output pixel at a time."""
    in_h, in_w = m.shape
    out = np.zeros((out_h, out_w))
    for r in range(out_h):
        sr = max((r + 0.5) * in_h / out_h - 0.5, 0.0)
        r0 = int(np.floor(sr))
        r1, wr = min(r0 + 1, in_h - 1), sr - r0
        for c in range(out_w):
            sc = max((c + 0.5) * in_w / out_w - 0.5, 0.0)
            c0 = int(np.floor(sc))
            c1, wc = min(c0 + 1, in_w - 1), sc - c0
            out[r, c] = ((1 - wr) * ((1 - wc) * m[r0, c0] + wc * m[r0, c1])
                         + wr * ((1 - wc) * m[r1, c0] + wc * m[r1, c1]))
    return out


def test_haf_fused_map_is_the_mean_of_the_normalised_upsampled_layer_masks(shapes_model):
    """METHODS §3's fusion recomputed plainly from the learned masks: channel mean per layer, bilinear to the
    input size, min-max to [0, 1] per image, mean over the layers. On a trained model (a random TinyCNN's
    masks all went to 0 or all to 1, which would check only the flat case)."""
    model, x, y, *_ = shapes_model
    x, y = x[:3], y[:3]
    layers = ["layer2", "layer3"]
    masks, _ = learn_masks(model, x, y, layers=layers, steps=30)
    heat = haf(model, x, y, layers=layers, steps=30)
    heat_raw = haf(model, x, y, layers=layers, steps=30, normalize=False)
    size = x.shape[-2:]
    varied = 0
    for i in range(len(x)):
        per_layer = []
        for name in layers:
            mean = masks[name][i].mean(0).double().numpy()
            assert mean.shape != tuple(size)  # the layer is coarser than the input: upsampling is exercised
            m = _bilinear_plain(mean, *size)
            flat = m.max() - m.min() <= 1e-6 * max(abs(m).max(), 1e-30)  # a constant mask normalises to 0
            varied += not flat
            per_layer.append(np.zeros_like(m) if flat else (m - m.min()) / (m.max() - m.min()))
        np.testing.assert_allclose(heat[i].numpy(), sum(per_layer) / len(layers), rtol=1e-4, atol=1e-5)
        raw = sum(_bilinear_plain(masks[n][i].mean(0).double().numpy(), *size) for n in layers) / len(layers)
        np.testing.assert_allclose(heat_raw[i].numpy(), raw, rtol=1e-4, atol=1e-6)  # normalize=False
    assert varied >= len(x)  # masks that vary over the image: the general case of the normalisation ran


def test_trace_is_the_objective_and_its_running_minimum_is_what_steps_s_keeps():
    """HAF's calibration curve (sweep.haf_trial): trace[0] is the objective at all-ones masks (P_c = 0,
    sparsity = sum over layers of K * sqrt(h w), by hand), and the per-image running minimum of the trace at
    step s is the objective of the masks learn_masks(steps=s) returns."""
    model = TinyCNN().eval()
    x, t = _data()
    layers = list(model.default_layers)
    trace = []
    learn_masks(model, x, t, layers=layers, steps=8, lr=0.1, trace=trace)
    assert len(trace) == 9 and all(v.shape == (3,) for v in trace)
    with torch.no_grad():
        acts = {}
        hs = [model.get_submodule(n).register_forward_hook(lambda _m, _i, o, n=n: acts.__setitem__(n, o))
              for n in layers]
        model(x)
        for h in hs:
            h.remove()
    ones = sum(a.shape[1] * math.sqrt(a.shape[2] * a.shape[3]) for a in acts.values())
    torch.testing.assert_close(trace[0], torch.full((3,), float(ones)), rtol=1e-6, atol=1e-5)
    kept = torch.cummin(torch.stack(trace), dim=0).values
    assert kept[-1].sum() < 0.5 * kept[0].sum()  # it learns: the check below is not at the starting point
    for s in (3, 8):
        masks, pres = learn_masks(model, x, t, layers=layers, steps=s, lr=0.1)
        sparsity = sum(m.abs().flatten(1).sum(1) / math.sqrt(m.shape[2] * m.shape[3]) for m in masks.values())
        torch.testing.assert_close(pres + sparsity, kept[s], rtol=1e-5, atol=1e-5)


def test_haf_pick_and_tuned_settings_by_hand():
    from pipelines.sweep import haf_pick, tuned_settings

    curve = [100.0, 20.0, 12.0, 10.5, 10.2, 10.0]
    assert haf_pick(curve, 0.1) == 3  # 10.5 <= 10 * 1.1; 12 is not
    assert haf_pick(curve, 0.0) == 5 and haf_pick(curve, 100.0) == 1  # at least one step
    res = {"best_alphas": {"tif": 0.25, "gradcam_thresholded": 0.5},
           "haf": {"haf": {"lr": 0.5, "steps": 40, "curves": {}}, "haf_one_sided": {"lr": 0.2, "steps": 7}}}
    assert tuned_settings(res) == {"tif": 0.25, "gradcam_thresholded": 0.5, "haf:steps": 40.0, "haf:lr": 0.5,
                                   "haf_one_sided:steps": 7.0, "haf_one_sided:lr": 0.2}
    assert tuned_settings({"best_alphas": {"tif": 0.0}}) == {"tif": 0.0}  # a sweep result before HAF's calibration
