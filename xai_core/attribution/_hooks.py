"""Capture activations of any set of layers in one forward, gradients of all of them in one backward.

Hooks live only for the duration of a call and are removed in ``finally`` (also when the model raises).
Nothing changes the model's train/eval mode or its parameters' ``requires_grad`` flags.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from xai_core._tensor import as_targets, check_images


def resolve_layers(model: nn.Module, layers: Sequence[str] | str) -> list[str]:
    """Validate module names as ``model.get_submodule`` takes them; ValueError lists what is allowed."""
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError("layers must name at least one module, got an empty list")
    known = {n for n, _ in model.named_modules() if n}
    for name in names:
        if name not in known:
            allowed = ", ".join(sorted(n for n in known if "." not in n)) or "(none)"
            raise ValueError(f"unknown layer {name!r}: not a submodule of {type(model).__name__}; "
                             f"top-level modules are: {allowed} (nested names use dots, e.g. 'layer4.1')")
    return names


@contextmanager
def capture(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of each named layer during forwards inside the ``with`` block.

    The stored tensor is the module's own output; downstream modules receive a clone, so that an
    in-place op after the layer (``ReLU(inplace=True)``) cannot corrupt it or its gradient.
    """
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):  # noqa: ANN202
        def hook(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> torch.Tensor:
            if not isinstance(out, torch.Tensor):
                raise ValueError(f"layer {name!r} returns {type(out).__name__}, expected a tensor")
            acts[name] = out
            return out.clone()
        return hook

    try:
        for name in layers:
            handles.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
        yield acts
    finally:
        for h in handles:
            h.remove()


@dataclass
class LayerMaps:
    """Result of one forward + one backward: logits, per-layer activations A and gradients G = dy_t/dA."""

    logits: torch.Tensor
    target: torch.Tensor
    activations: dict[str, torch.Tensor]
    gradients: dict[str, torch.Tensor]
    input_grad: torch.Tensor | None


def _check_logits(logits: torch.Tensor, batch: int) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != batch:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model must return logits of shape [B,K] with B={batch}, got {shape}")


def layer_maps(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int,
               layers: Sequence[str] | str = (), *, input_grad: bool = False,
               create_graph: bool = False) -> LayerMaps:
    """Activations and gradients of ``layers`` (and optionally of the input) for y_t, one pass each way.

    The backward only runs as deep as needed: to the shallowest requested layer, or to the input
    when ``input_grad`` is set. ``target`` is a class per sample (any class, not only the predicted one).
    """
    check_images(x)
    names = resolve_layers(model, layers) if (layers or not input_grad) else []
    if create_graph and x.requires_grad:
        xg = x
    else:
        # The input joins the graph only when it has to: its gradient is asked for, a graph is built for
        # the caller, or a frozen parameter might leave a layer's activation without one. Otherwise the
        # parameters carry the graph to the layers: resnet18 Grad-CAM 5% faster (docs/BENCHMARKS.md).
        xg = x.detach().requires_grad_(
            input_grad or create_graph or not all(p.requires_grad for p in model.parameters()))
    with torch.enable_grad(), capture(model, names) as acts:
        logits = model(xg)
        if not xg.requires_grad and not all(acts[n].requires_grad for n in names if n in acts):
            # a layer before every parameter (an input normalisation, say): only the input reaches it
            acts.clear()
            xg = x.detach().requires_grad_(True)
            logits = model(xg)
        _check_logits(logits, x.shape[0])
        t = as_targets(target, x.shape[0], logits.shape[1], x.device)
        missing = [n for n in names if n not in acts]
        if missing:
            raise ValueError(f"layers {missing} were not called in the forward pass of "
                             f"{type(model).__name__}; choose layers on the path to the output")
        y = logits.gather(1, t[:, None]).sum()
        inputs = [acts[n] for n in names] + ([xg] if input_grad else [])
        grads = torch.autograd.grad(y, inputs, create_graph=create_graph, allow_unused=True)
    grads = [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]
    if not create_graph:  # plain maps: drop the graph so callers hold no autograd state
        grads = [g.detach() for g in grads]
        acts = {n: a.detach() for n, a in acts.items()}
        logits = logits.detach()
    gdict = {n: grads[i] for i, n in enumerate(names)}
    return LayerMaps(logits=logits, target=t, activations=dict(acts), gradients=gdict,
                     input_grad=grads[-1] if input_grad else None)
