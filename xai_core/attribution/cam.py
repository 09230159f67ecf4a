"""CAM family (METHODS §1): one template, one small weight function per variant.

cam_l = ReLU(sum_k W_k * A_k) where W is [B,K,1,1] (channel weights) or [B,K,h,w] (per position).
Several layers: each map is upsampled to H,W, norm01'd, and the maps are summed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from xai_core._tensor import norm01, upsample
from xai_core.attribution._hooks import layer_maps

WeightFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gradcam_weights(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: w_k = mean_hw dy/dA_k."""
    return grads.mean(dim=(2, 3), keepdim=True)


def gradcam_pp_weights(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ with the exp-output closed form (second/third-order terms from powers of G)."""
    g2, g3 = grads.pow(2), grads.pow(3)
    sum_a = acts.sum(dim=(2, 3), keepdim=True)
    denom = 2 * g2 + sum_a * g3
    denom = torch.where(denom != 0, denom, torch.ones_like(denom))
    alpha = torch.where(grads != 0, g2 / denom, torch.zeros_like(g2))
    return (alpha * grads.clamp_min(0)).sum(dim=(2, 3), keepdim=True)


def layercam_weights(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """LayerCAM: per-position weights ReLU(G)."""
    return grads.clamp_min(0)


CAM_WEIGHTS: dict[str, WeightFn] = {
    "gradcam": gradcam_weights,
    "gradcam_pp": gradcam_pp_weights,
    "layercam": layercam_weights,
}


def cam_maps(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int, layers: Sequence[str],
             weights: WeightFn, *, upsample_maps: bool = True,
             create_graph: bool = False) -> torch.Tensor:
    """The CAM template: one forward and one backward (stopping at the shallowest layer) for all layers."""
    lm = layer_maps(model, x, target, layers, create_graph=create_graph)
    cams = [torch.relu((weights(lm.activations[n], lm.gradients[n]) * lm.activations[n]).sum(1))
            for n in layers]
    if not upsample_maps:
        if len(cams) != 1:
            raise ValueError(f"upsample=False needs exactly one layer (maps of different layers have "
                             f"different sizes), got layers={list(layers)}")
        return cams[0]
    size = (x.shape[-2], x.shape[-1])
    if len(cams) == 1:
        return upsample(cams[0], size)
    return sum(norm01(upsample(c, size)) for c in cams)
