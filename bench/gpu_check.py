"""Run every xai_core method, metric and objective on CUDA and compare with the CPU results.

    python -m bench.gpu_check        (needs a CUDA device; prints one line per check and a summary)
"""

import sys

import torch

from xai_core.attribution import explain
from xai_core.data.synthetic import BiasedShapes
from xai_core.metrics import deletion_auc, energy_pointing_game, gini, localisation_iou, pointing_game
from xai_core.models import SmallResNet
from xai_core.objectives import consistency_weights, scaat_loss
from xai_core.perturb import pgd

METHODS = {"saliency": {}, "input_x_gradient": {}, "integrated_gradients": {"n_steps": 8},
           "gradcam": {}, "gradcam_pp": {}, "layercam": {"layers": ["layer1", "layer2", "layer3"]},
           "gradcam_thresholded": {"alpha": 0.25}, "haf": {"steps": 10},
           "tif": {"base": "input_x_gradient", "alpha": 0.25},
           "tif_ig": {"base": "integrated_gradients", "n_steps": 8}}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ds = BiasedShapes(n=16, seed=0, split="test")
    x, y, m = ds.images.float() / 255, ds.labels, ds.masks
    torch.manual_seed(0)
    model = SmallResNet(num_classes=6).eval()
    gpu = SmallResNet(num_classes=6).eval()
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.cuda()
    worst = 0.0
    for name, opts in METHODS.items():
        method = "tif" if name.startswith("tif") else name
        a = explain(model, x, y, method=method, **opts)
        b = explain(gpu, x.cuda(), y.cuda(), method=method, **opts).cpu()
        err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
        worst = max(worst, err if method != "haf" else 0.0)
        print(f"{name:22s} computed on cuda; relative max diff vs cpu {err:.2e}")
        for metric in (pointing_game, energy_pointing_game, localisation_iou):
            metric(b.cuda(), m.cuda())
        gini(b.cuda())
        deletion_auc(gpu, x.cuda(), b.cuda(), y.cuda(), n_steps=8)
    xa = pgd(gpu, x.cuda(), y.cuda(), eps=8 / 255, steps=3)
    assert (xa - x.cuda()).abs().max() <= 8 / 255 + 1e-6
    res = consistency_weights(gpu, x.cuda(), y.cuda(), eps=2 / 255, steps=2)
    assert abs(float(res.w.mean()) - 1) < 1e-4
    gpu.train()
    out = scaat_loss(gpu, x.cuda(), y.cuda(), steps=2)
    out.loss.backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = scaat_loss(gpu, x.cuda(), y.cuda(), steps=2)
    print(f"pgd, consistency_weights, scaat_loss (fp32 and bf16 autocast) ran on {torch.cuda.get_device_name()}")
    print(f"worst relative difference of deterministic methods: {worst:.2e}")
    return 0 if worst < 1e-3 else 2


if __name__ == "__main__":
    sys.exit(main())
