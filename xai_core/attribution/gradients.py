"""Input-space gradient attributions (METHODS §1): saliency, input x gradient, IG, SmoothGrad."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from xai_core._tensor import check_images
from xai_core.attribution._hooks import LayerMaps, ReshapeArg, layer_maps
from xai_core.targets import rows_for

StepReducer = Callable[[LayerMaps, int], dict[str, torch.Tensor]]


# Input bytes per forward+backward pass when internal_batch_size is not given. On CPU a pass whose
# activations outgrow the caches slows down per image: IG with 16 steps on a 64-image batch of the small
# ResNet (64 px, 1 thread) cost 31.7 units in one 1024-row pass, 27.1 in 512-row passes, 11.8 in 128-row
# passes (bench/results, docs/BENCHMARKS.md). GPUs want large passes; memory bounds them.
PASS_INPUT_BYTES = {"cpu": 8 << 20, "cuda": 512 << 20}
# The same for forward-only passes (no_grad: deletion/insertion curves). Small ResNet (64 px, 64 images x 97
# curve points, 1 thread), two ad hoc runs, sizes side by side: 1.5-3 MiB per forward 3.0 s against 3.8-4.4 s
# for 6-9 MiB; 1 MiB 3.6 s against 4.3-5.1 s for 2-4 MiB. resnet18 at 224 px: 12.5 s for 1.1-3.4 MiB,
# 13.1 s for 8 MiB (docs/BENCHMARKS.md, metrics).
FORWARD_INPUT_BYTES = {"cpu": 1 << 20, "cuda": 512 << 20}


def default_steps_per_pass(one_step: torch.Tensor, n: int, budgets: dict[str, int] = PASS_INPUT_BYTES) -> int:
    """Steps per pass so that a pass holds about ``budgets[device]`` bytes of input (default
    PASS_INPUT_BYTES; at least 1, at most n)."""
    budget = budgets.get(one_step.device.type, budgets["cpu"])
    step_bytes = max(1, one_step.numel() * one_step.element_size())
    return int(min(n, max(1, budget // step_bytes)))


def run_steps(model: nn.Module, make_inputs: Callable[[int, int], torch.Tensor], n: int,
              target: torch.Tensor | int, reducer: StepReducer, *, layers: Sequence[str] = (),
              input_grad: bool = False, create_graph: bool = False,
              internal_batch_size: int | None = None, batch: int,
              step_input: torch.Tensor | None = None, reshape: ReshapeArg = None) -> dict[str, torch.Tensor]:
    """Run ``n`` perturbed copies of a batch through forward+backward, several steps per pass.

    ``make_inputs(start, count)`` returns ``count`` stacked copies [count*B,C,H,W]; ``reducer`` maps the
    pass's LayerMaps to tensors shaped [count,B,...], summed over all steps. ``internal_batch_size``
    bounds the rows per pass (at least one step, B rows, per pass); without it a pass holds about
    ``PASS_INPUT_BYTES`` of input for the device.
    """
    if n < 1:
        raise ValueError(f"the number of steps/samples must be >= 1, got {n}")
    if internal_batch_size is None:  # step_input: one step's input (the batch), for sizing the passes
        per_pass = n if step_input is None else default_steps_per_pass(step_input, n)
    else:
        per_pass = max(1, int(internal_batch_size) // batch)
    tgt = target if isinstance(target, int) else torch.as_tensor(target)
    total: dict[str, torch.Tensor] = {}
    for start in range(0, n, per_pass):
        count = min(per_pass, n - start)
        xs = make_inputs(start, count)
        ts = tgt if isinstance(tgt, int) else tgt.to(xs.device).repeat(count)
        lm = layer_maps(model, xs, ts, layers, input_grad=input_grad, create_graph=create_graph,
                        reshape=reshape)
        for key, val in reducer(lm, count).items():
            s = val.sum(0)
            total[key] = s if key not in total else total[key] + s
    return total


def _input_grad(lm: LayerMaps, count: int) -> dict[str, torch.Tensor]:
    g = lm.input_grad
    return {"grad": g.view(count, -1, *g.shape[1:])}


def saliency(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int, *,
             create_graph: bool = False) -> torch.Tensor:
    """Raw saliency dy_t/dx, [B,C,H,W] (signed; the heatmap takes abs then max over channels)."""
    return layer_maps(model, x, target, input_grad=True, create_graph=create_graph).input_grad


def input_x_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int, *,
                     create_graph: bool = False) -> torch.Tensor:
    """Raw x * dy_t/dx, [B,C,H,W] (a row per pair for a ``Pairs`` target)."""
    return rows_for(x, target) * saliency(model, x, target, create_graph=create_graph)


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int, *,
                         n_steps: int = 32, baseline: torch.Tensor | float = 0.0,
                         internal_batch_size: int | None = None,
                         create_graph: bool = False) -> torch.Tensor:
    """(x - x0) * mean_k dy_t/dx at x0 + a_k (x - x0), Riemann midpoints a_k = (k + 0.5) / n."""
    check_images(x)
    x0 = torch.as_tensor(baseline, dtype=x.dtype, device=x.device).expand_as(x)
    diff = x - x0
    alphas = (torch.arange(n_steps, dtype=x.dtype, device=x.device) + 0.5) / n_steps

    def make(start: int, count: int) -> torch.Tensor:
        a = alphas[start:start + count].view(count, 1, 1, 1, 1)
        return (x0.detach() + a * diff.detach()).flatten(0, 1)

    total = run_steps(model, make, n_steps, target, _input_grad, input_grad=True,
                      create_graph=create_graph, internal_batch_size=internal_batch_size,
                      batch=x.shape[0], step_input=x)
    return diff * total["grad"] / n_steps


def noisy_inputs(x: torch.Tensor, sigma: float,
                 generator: torch.Generator | None) -> Callable[[int, int], torch.Tensor]:
    """A make_inputs for SmoothGrad: x + N(0, (sigma * (max - min))^2), range per sample."""
    if sigma < 0:
        raise ValueError(f"sigma={sigma} is out of range: allowed values are >= 0")
    flat = x.detach().flatten(1)
    std = (sigma * (flat.max(1).values - flat.min(1).values)).view(1, -1, 1, 1, 1)

    def make(_start: int, count: int) -> torch.Tensor:
        noise = torch.randn((count, *x.shape), generator=generator, dtype=x.dtype,
                            device=generator.device if generator is not None else x.device)
        return (x.detach() + std * noise.to(x.device)).flatten(0, 1)
    return make


def smoothgrad(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int, *,
               n_samples: int = 16, sigma: float = 0.15, generator: torch.Generator | None = None,
               internal_batch_size: int | None = None, create_graph: bool = False) -> torch.Tensor:
    """Mean over noisy copies of |dy_t/dx| (as Captum's NoiseTunnel over Saliency(abs=True))."""
    check_images(x)
    total = run_steps(model, noisy_inputs(x, sigma, generator), n_samples, target,
                      lambda lm, c: {"grad": _input_grad(lm, c)["grad"].abs()}, input_grad=True,
                      create_graph=create_graph, internal_batch_size=internal_batch_size,
                      batch=x.shape[0], step_input=x)
    return total["grad"] / n_samples


# Default reductions of raw [B,C,H,W] attributions to heatmaps [B,H,W] (METHODS §1 table).
def reduce_abs_max(raw: torch.Tensor) -> torch.Tensor:
    """abs, then max over channels."""
    return raw.abs().amax(1)


def reduce_sum_abs(raw: torch.Tensor) -> torch.Tensor:
    """sum over channels, then abs."""
    return raw.sum(1).abs()
