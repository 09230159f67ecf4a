"""TIF: threshold interception and fusion of per-neuron layer maps (METHODS §2), and its control.

For each layer l, a base layer attribution gives one map per neuron, P_l [B,K,h,w]; neuron k keeps its
concept region R_lk = relu(P_lk) * 1[relu(P_lk) >= alpha * max_hw relu(P_lk)], the layer map is
T_l = sum_k w_lk R_lk (upsampled, norm01), and TIF = sum_l T_l. All neurons of all layers come from one
forward and one backward ("gradient", "input_x_gradient") or one pass per step chunk shared by every
layer ("integrated_gradients", "smoothgrad"): never one pass per neuron or per layer.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from xai_core._tensor import check_images, check_unit_interval, norm01
from xai_core._tensor import upsample as upsample_to
from xai_core.attribution._hooks import LayerMaps, ReshapeArg, capture, layer_maps, resolve_layers
from xai_core.attribution.cam import cam_maps, gradcam_weights
from xai_core.attribution.gradients import noisy_inputs, run_steps
from xai_core.attribution.registry import Method, always, register

BASES = ("gradient", "input_x_gradient", "integrated_gradients", "smoothgrad")
WEIGHTS = ("gradcam", "uniform", "attribution_mass")


def _choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed: allowed values are {', '.join(allowed)}")


def neuron_maps(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int, layers: Sequence[str],
                base: str = "input_x_gradient", *, n_steps: int = 16, n_samples: int = 16,
                sigma: float = 0.15, baseline: torch.Tensor | float = 0.0,
                generator: torch.Generator | None = None, internal_batch_size: int | None = None,
                create_graph: bool = False, reshape: ReshapeArg = None
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (P [B,K,h,w] per-neuron maps of ``base``, g [B,K] mean_hw of the gradient G).

    g is mean_hw of G for one-pass bases, of the step-mean of G for IG and of the sample-mean for
    SmoothGrad (the Grad-CAM weight before its ReLU). # METHODS §2
    """
    _choice("base", base, BASES)
    names = resolve_layers(model, layers)
    batch = x.shape[0]
    if base in ("gradient", "input_x_gradient"):  # one forward + one backward for every layer
        lm = layer_maps(model, x, target, names, create_graph=create_graph, reshape=reshape)
        out = {}
        for n in names:
            g = lm.gradients[n]
            out[n] = (g if base == "gradient" else g * lm.activations[n], g.mean(dim=(2, 3)))
        return out
    if base == "smoothgrad":  # mean over noisy copies of G*A, all layers from the same passes
        def reduce_sg(lm: LayerMaps, count: int) -> dict[str, torch.Tensor]:
            res = {}
            for n in names:
                g, a = lm.gradients[n], lm.activations[n]
                res["P/" + n] = (g * a).view(count, batch, *g.shape[1:])
                res["g/" + n] = g.mean(dim=(2, 3)).view(count, batch, -1)
            return res
        tot = run_steps(model, noisy_inputs(x, sigma, generator), n_samples, target, reduce_sg,
                        layers=names, create_graph=create_graph, reshape=reshape,
                        internal_batch_size=internal_batch_size, batch=batch, step_input=x)
        return {n: (tot["P/" + n] / n_samples, tot["g/" + n] / n_samples) for n in names}
    # integrated_gradients: layer IG with the input interpolation steps shared by all layers:
    # P_l = (A_l(x) - A_l(x0)) * mean_k G_l(x0 + a_k (x - x0)), midpoints a_k = (k + 0.5) / n.
    x0 = torch.as_tensor(baseline, dtype=x.dtype, device=x.device).expand_as(x)
    diff = (x - x0).detach()
    alphas = (torch.arange(n_steps, dtype=x.dtype, device=x.device) + 0.5) / n_steps

    def make(start: int, count: int) -> torch.Tensor:
        a = alphas[start:start + count].view(count, 1, 1, 1, 1)
        return (x0.detach() + a * diff).flatten(0, 1)

    def reduce_ig(lm: LayerMaps, count: int) -> dict[str, torch.Tensor]:
        return {n: lm.gradients[n].view(count, batch, *lm.gradients[n].shape[1:]) for n in names}

    tot = run_steps(model, make, n_steps, target, reduce_ig, layers=names, create_graph=create_graph,
                    internal_batch_size=internal_batch_size, batch=batch, step_input=x, reshape=reshape)
    # One forward of [x; x0] for the end-point activations of every layer.
    with torch.set_grad_enabled(create_graph), capture(model, names, reshape) as acts:
        model(torch.cat([x, x0.to(x.dtype)]))
    out = {}
    for n in names:
        gbar = tot[n] / n_steps
        a = acts[n]
        out[n] = ((a[:batch] - a[batch:]) * gbar, gbar.mean(dim=(2, 3)))
    return out


def neuron_weights(p: torch.Tensor, g: torch.Tensor, weights: str) -> torch.Tensor:
    """w_lk [B,K]: "gradcam" relu(mean_hw G), "uniform" 1, "attribution_mass" the share of neuron k in
    the layer's positive mass, sum_hw relu(P_k) / sum_k' sum_hw relu(P_k') (0 if all are 0). # METHODS §2
    """
    _choice("weights", weights, WEIGHTS)
    if weights == "gradcam":
        return torch.relu(g)
    if weights == "uniform":
        return torch.ones_like(g)
    mass = torch.relu(p).sum(dim=(2, 3))
    return mass / mass.sum(dim=1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)


def concept_regions(p: torch.Tensor, alpha: float) -> torch.Tensor:
    """R = relu(P) * 1[relu(P) >= alpha * max_hw relu(P)], per sample and neuron. # METHODS §2 step 1"""
    rp = torch.relu(p)
    keep = rp >= alpha * rp.amax(dim=(-2, -1), keepdim=True)
    return rp * keep.to(rp.dtype)


def tif(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int, *, layers: Sequence[str] | str,
        base: str = "input_x_gradient", alpha: float = 0.25, weights: str = "gradcam",
        normalize: bool = True, upsample: bool = True, create_graph: bool = False, n_steps: int = 16,
        n_samples: int = 16, sigma: float = 0.15, baseline: torch.Tensor | float = 0.0,
        generator: torch.Generator | None = None,
        internal_batch_size: int | None = None, reshape: ReshapeArg = None) -> torch.Tensor:
    """TIF heatmaps [B,H,W] (or [B,h,w] for one layer with upsample=False). # METHODS §2

    T_l = sum_k w_lk R_lk, upsampled bilinearly to H,W, norm01'd if ``normalize``; TIF = sum_l T_l.
    """
    check_images(x)
    check_unit_interval(alpha, "alpha")
    _choice("base", base, BASES)
    _choice("weights", weights, WEIGHTS)
    names = resolve_layers(model, layers)
    if not upsample and len(names) != 1:
        raise ValueError(f"upsample=False needs exactly one layer (maps of different layers have "
                         f"different sizes), got layers={names}")
    maps = neuron_maps(model, x, target, names, base, n_steps=n_steps, n_samples=n_samples, sigma=sigma,
                       baseline=baseline, generator=generator, internal_batch_size=internal_batch_size,
                       create_graph=create_graph, reshape=reshape)
    size = (x.shape[-2], x.shape[-1])
    total = None
    for n in names:
        p, g = maps[n]
        t_l = torch.einsum("bk,bkhw->bhw", neuron_weights(p, g, weights), concept_regions(p, alpha))
        if upsample:
            t_l = upsample_to(t_l, size)
        if normalize:
            t_l = norm01(t_l)
        total = t_l if total is None else total + t_l
    return total


def threshold_maps(maps: torch.Tensor, alpha: float) -> torch.Tensor:
    """maps * 1[maps >= alpha * max], max per sample over all positions. # METHODS §2 (control)"""
    check_unit_interval(alpha, "alpha")
    keep = maps >= alpha * maps.flatten(1).amax(1).view(-1, *([1] * (maps.dim() - 1)))
    return maps * keep.to(maps.dtype)


def gradcam_thresholded(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int, *,
                        layers: Sequence[str] | str, alpha: float = 0.25, normalize: bool = True,
                        upsample: bool = True, create_graph: bool = False,
                        reshape: ReshapeArg = None) -> torch.Tensor:
    """Grad-CAM (as explain(method="gradcam")) thresholded by TIF's rule, the control of METHODS §2."""
    check_unit_interval(alpha, "alpha")
    names = resolve_layers(model, layers)
    cam = cam_maps(model, x, target, names, gradcam_weights, upsample_maps=upsample, normalize=normalize,
                   create_graph=create_graph, reshape=reshape)
    return threshold_maps(cam, alpha)


def _one_pass(options: dict) -> bool:
    """Whether TIF with these options runs one forward and one backward (it then takes Pairs targets)."""
    return options.get("base", inspect.signature(tif).parameters["base"].default) in BASES[:2]


register("tif", Method(tif, "layered", default_layers="all", pairs=_one_pass))
register("gradcam_thresholded", Method(gradcam_thresholded, "layered", default_layers="cam", pairs=always))
