"""Capture activations of any set of layers in one forward, gradients of all of them in one backward.

Hooks live only for the duration of a call and are removed in ``finally`` (also when the model raises).
Nothing changes the model's train/eval mode or its parameters' ``requires_grad`` flags.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from xai_core._tensor import as_targets, check_images
from xai_core.targets import Pairs


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


Reshape = Callable[[torch.Tensor], torch.Tensor]
ReshapeArg = Reshape | Mapping[str, Reshape] | None
MAX_PREFIX_TOKENS = 16  # class + distillation + register tokens a ViT may lead with (DINOv2: 1 + 4)


def _patch_size(model: nn.Module) -> tuple[int, int] | None:
    """The model's patch size: its ``patch_size`` (torchvision ViT, ours), ``patch_embed.patch_size``
    (timm), else the first Conv2d whose kernel equals its stride > 1 (a patch embedding); None if none."""
    for owner in (model, getattr(model, "patch_embed", None)):
        p = getattr(owner, "patch_size", None)
        if isinstance(p, int) and p > 0:
            return (p, p)
        if isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(v, int) and v > 0 for v in p):
            return (int(p[0]), int(p[1]))
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == tuple(m.stride) and max(m.stride) > 1:
            return (int(m.stride[0]), int(m.stride[1]))
    return None


def _is_grid(size: tuple[int, int], h: int, w: int) -> bool:
    """Whether an h x w map can be the input of ``size`` at one integer stride (floor or ceil)."""
    if h < 1 or w < 1:
        return False
    for s in {max(1, size[0] // h), max(1, -(-size[0] // h)), max(1, round(size[0] / h))}:
        if (size[0] // s == h or -(-size[0] // s) == h) and (size[1] // s == w or -(-size[1] // s) == w):
            return True
    return False


@dataclass(frozen=True)
class Grid:
    """How a layer's output maps to the [B,D,h,w] grid every method works on, and back.

    kind "nchw": the output itself (conv layers); "tokens": [B,N,D] with ``prefix`` leading non-patch
    tokens (class, distillation, registers) followed by h*w patch tokens in row-major order; "nhwc":
    [B,h,w,D] (torchvision Swin); "index": a user ``reshape``, held as the flat output element behind each
    grid element (``index`` [D*h*w]), so the same gather builds the grid and a scatter puts it back.
    """

    kind: str
    h: int
    w: int
    prefix: int = 0
    index: torch.Tensor | None = None

    def to_grid(self, out: torch.Tensor) -> torch.Tensor:
        if self.kind == "nchw":
            return out
        if self.kind == "nhwc":
            return out.permute(0, 3, 1, 2)
        if self.kind == "tokens":
            return out[:, self.prefix:].transpose(1, 2).reshape(out.shape[0], out.shape[2], self.h, self.w)
        return out.flatten(1)[:, self.index].view(out.shape[0], -1, self.h, self.w)

    def from_grid(self, out: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """The layer's output with its grid part replaced by ``grid`` (prefix tokens taken from ``out``):
        what the rest of the model sees, so gradients w.r.t. the grid are the layer's gradients."""
        if self.kind == "nchw":
            return grid
        if self.kind == "nhwc":
            return grid.permute(0, 2, 3, 1)
        if self.kind == "tokens":
            return torch.cat([out[:, :self.prefix], grid.flatten(2).transpose(1, 2)], dim=1)
        flat = out.flatten(1).clone()
        flat[:, self.index] = grid.flatten(1)
        return flat.view_as(out)


def _user_grid(name: str, out: torch.Tensor, fn: Reshape) -> Grid:
    """A user reshape (out -> [B,D,h,w], as pytorch-grad-cam's reshape_transform) as an index map: the
    callable runs once on the element numbers of one sample, so it must only select, reshape or permute."""
    numbers = torch.arange(out[:1].numel(), dtype=torch.float64, device=out.device).view(1, *out.shape[1:])
    try:
        idx = fn(numbers)
    except Exception as e:  # noqa: BLE001 - re-raised with the layer named
        raise ValueError(f"reshape for layer {name!r} failed on its output shape {tuple(out.shape)}: "
                         f"{type(e).__name__}: {e}") from e
    if not isinstance(idx, torch.Tensor) or idx.dim() != 4 or idx.shape[0] != 1:
        shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"reshape for layer {name!r} must return [B,D,h,w] for an output of shape "
                         f"{tuple(out.shape)}, got {shape}")
    flat = idx.flatten()
    if not bool((flat == flat.round()).all()) or flat.unique().numel() != flat.numel():
        raise ValueError(f"reshape for layer {name!r} must only select, reshape or permute the output's "
                         "elements (each at most once), as pytorch-grad-cam's reshape transforms do")
    return Grid("index", int(idx.shape[2]), int(idx.shape[3]), index=flat.long())


def layer_grid(model: nn.Module, name: str, out: torch.Tensor, size: tuple[int, int] | None,
               reshape: Reshape | None = None) -> Grid:
    """How layer ``name``'s output ``out`` for an input of spatial ``size`` becomes [B,D,h,w].

    [B,C,h,w] stays as it is, unless only the channels-last reading [B,h,w,D] is a grid of the input
    (torchvision Swin; a shape both readings fit stays [B,C,h,w]); [B,N,D] is a token sequence whose grid
    is the input size over the model's patch size (or, with no patch size, the h*w of the input's aspect
    that leaves the fewest leading tokens); the leading N - h*w tokens are dropped. ``reshape`` overrides.
    """
    if reshape is not None:
        return _user_grid(name, out, reshape)
    if out.dim() == 4:
        if size is not None and not _is_grid(size, out.shape[2], out.shape[3]) and _is_grid(
                size, out.shape[1], out.shape[2]):
            return Grid("nhwc", int(out.shape[1]), int(out.shape[2]))
        return Grid("nchw", int(out.shape[2]), int(out.shape[3]))
    if out.dim() != 3:
        return Grid("nchw", 0, 0)  # not a map: methods that need one say so with the shape
    n = int(out.shape[1])
    hint = ("pass reshape= (a callable [B,N,D] -> [B,D,h,w]) or give the model a patch_size attribute")
    if size is None:
        raise ValueError(f"layer {name!r} outputs tokens {tuple(out.shape)} but the model's input size is "
                         f"unknown; {hint}")
    patch = _patch_size(model)
    if patch is not None:
        h, w = size[0] // patch[0], size[1] // patch[1]
        if h < 1 or w < 1 or h * w > n:
            raise ValueError(f"layer {name!r} outputs {tuple(out.shape)}: {n} tokens, fewer than the "
                             f"{h}x{w} patches of a {size[0]}x{size[1]} input at patch size {patch}; {hint}")
        return Grid("tokens", h, w, prefix=n - h * w)
    best = None
    for s in range(1, min(size) + 1):
        h, w = size[0] // s, size[1] // s
        if 0 <= n - h * w <= MAX_PREFIX_TOKENS and (best is None or n - h * w < best.prefix):
            best = Grid("tokens", h, w, prefix=n - h * w)
    if best is None:
        raise ValueError(f"layer {name!r} outputs {tuple(out.shape)}: no patch grid of a {size[0]}x{size[1]} "
                         f"input leaves <= {MAX_PREFIX_TOKENS} leading tokens of {n}; {hint}")
    return best


def _reshape_for(reshape: ReshapeArg, name: str) -> Reshape | None:
    if reshape is None or callable(reshape):
        return reshape
    if isinstance(reshape, Mapping):
        return reshape.get(name)
    raise ValueError(f"reshape must be a callable or a mapping of layer name to callable, got "
                     f"{type(reshape).__name__}")


@contextmanager
def on_grids(model: nn.Module, layers: Sequence[str], edit: Callable[[str, torch.Tensor], torch.Tensor],
             reshape: ReshapeArg = None) -> Iterator[None]:
    """Forward hooks that pass each named layer's output, as its [B,D,h,w] grid (``layer_grid``), to
    ``edit(name, grid)``; the grid ``edit`` returns goes downstream in the output's place (prefix tokens
    unchanged). The input size comes from a pre-hook on ``model``. Hooks are removed in ``finally``."""
    handles = []
    size: list[tuple[int, int] | None] = [None]
    grids: dict[tuple[str, tuple[int, ...]], Grid] = {}

    def pre_hook(_m: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        size[0] = tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) and x.dim() == 4 else None

    def make_hook(name: str):  # noqa: ANN202
        fn = _reshape_for(reshape, name)

        def hook(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> torch.Tensor:
            if not isinstance(out, torch.Tensor):
                raise ValueError(f"layer {name!r} returns {type(out).__name__}, expected a tensor")
            key = (name, tuple(out.shape[1:]), size[0])
            if key not in grids:
                grids[key] = layer_grid(model, name, out, size[0], fn)
            grid = grids[key]
            return grid.from_grid(out, edit(name, grid.to_grid(out)))
        return hook

    try:
        handles.append(model.register_forward_pre_hook(pre_hook))
        for name in layers:
            handles.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture(model: nn.Module, layers: Sequence[str],
            reshape: ReshapeArg = None) -> Iterator[dict[str, torch.Tensor]]:
    """Record each named layer's output, as its [B,D,h,w] grid (``layer_grid``), during forwards.

    Downstream modules receive a clone, so that an in-place op after the layer (``ReLU(inplace=True)``)
    cannot corrupt the record or its gradient; gradients w.r.t. a recorded grid are the layer's own.
    """
    acts: dict[str, torch.Tensor] = {}

    def record(name: str, grid: torch.Tensor) -> torch.Tensor:
        acts[name] = grid
        return grid.clone()

    with on_grids(model, layers, record, reshape):
        yield acts


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


def _attention_for(create_graph: bool) -> AbstractContextManager:
    """For a graph of the gradients, attention runs on SDPA's math kernel: the fused CPU/flash kernels
    that torch picks otherwise have no double backward (a ViT's Grad-CAM loss could not be trained)."""
    if not create_graph:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _pair_classes(pairs: Pairs, num_classes: int) -> torch.Tensor:
    if pairs.num_classes is not None and pairs.num_classes != num_classes:
        raise ValueError(f"the multi-hot target has {pairs.num_classes} columns but the model has "
                         f"{num_classes} classes")
    return as_targets(pairs.target, len(pairs), num_classes, pairs.target.device)


def _pair_grads(logits: torch.Tensor, pairs: Pairs, inputs: list[torch.Tensor],
                create_graph: bool) -> list[torch.Tensor | None]:
    """Gradients of y[image, class] w.r.t. ``inputs`` for every pair, rows [P,...]: one backward per
    label rank (the r-th class of every image at once), never one per pair."""
    ranks = int(pairs.rank.max()) + 1 if len(pairs) else 0
    order, parts = [], [[] for _ in inputs]
    for r in range(ranks):
        sel = (pairs.rank == r).nonzero().squeeze(1)
        img = pairs.image[sel]
        y = logits[img, pairs.target[sel]].sum()
        g = torch.autograd.grad(y, inputs, retain_graph=create_graph or r < ranks - 1,
                                create_graph=create_graph, allow_unused=True)
        order.append(sel)
        for i, (gi, inp) in enumerate(zip(g, inputs)):
            parts[i].append((torch.zeros_like(inp) if gi is None else gi)[img])
    if not ranks:
        return [inp[:0] for inp in inputs]
    back = torch.argsort(torch.cat(order))
    return [torch.cat(p)[back] for p in parts]


def layer_maps(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int,
               layers: Sequence[str] | str = (), *, input_grad: bool = False,
               create_graph: bool = False, reshape: ReshapeArg = None) -> LayerMaps:
    """Activations and gradients of ``layers`` (and optionally of the input) for y_t, one pass each way.

    The backward only runs as deep as needed: to the shallowest requested layer, or to the input
    when ``input_grad`` is set. ``target`` is a class per sample (any class, not only the predicted one),
    or ``Pairs`` (xai_core.targets): then the B images run one forward, one backward per label rank, and
    every result has one row per (image, class) pair.
    Activations and gradients are [B,D,h,w] grids, token layers included (``layer_grid``; ``reshape``).
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
    with torch.enable_grad(), _attention_for(create_graph), capture(model, names, reshape) as acts:
        logits = model(xg)
        if not xg.requires_grad and not all(acts[n].requires_grad for n in names if n in acts):
            # a layer before every parameter (an input normalisation, say): only the input reaches it
            acts.clear()
            xg = x.detach().requires_grad_(True)
            logits = model(xg)
        _check_logits(logits, x.shape[0])
        pairs = target.to(x.device) if isinstance(target, Pairs) else None
        t = _pair_classes(pairs, logits.shape[1]) if pairs is not None else as_targets(
            target, x.shape[0], logits.shape[1], x.device)
        missing = [n for n in names if n not in acts]
        if missing:
            raise ValueError(f"layers {missing} were not called in the forward pass of "
                             f"{type(model).__name__}; choose layers on the path to the output")
        inputs = [acts[n] for n in names] + ([xg] if input_grad else [])
        if pairs is None:
            y = logits.gather(1, t[:, None]).sum()
            grads = list(torch.autograd.grad(y, inputs, create_graph=create_graph, allow_unused=True))
        else:
            grads = _pair_grads(logits, pairs, inputs, create_graph)
    grads = [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]
    if pairs is not None:  # per-pair rows of what the B images' one forward gave
        acts = {n: a[pairs.image] for n, a in acts.items()}
        logits = logits[pairs.image]
    if not create_graph:  # plain maps: drop the graph so callers hold no autograd state
        grads = [g.detach() for g in grads]
        acts = {n: a.detach() for n, a in acts.items()}
        logits = logits.detach()
    gdict = {n: grads[i] for i, n in enumerate(names)}
    return LayerMaps(logits=logits, target=t, activations=dict(acts), gradients=gdict,
                     input_grad=grads[-1] if input_grad else None)
