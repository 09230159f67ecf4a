"""Models: a small ResNet and a small ViT for CPU-sized runs (METHODS §7) and a torchvision factory with
layer defaults.

Every model returned here carries ``default_layers`` (stage outputs, names for ``get_submodule``) and
``cam_layer`` (the last convolutional stage) where they can be found, and uses no in-place activations,
so forward hooks capture clean tensors.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and a (projected) shortcut; separate, non-inplace ReLUs."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stride-2 3x3 stem, stages layer1..layer3 (widths w, 2w, 4w; strides 1, 2, 2), GAP, ``fc``.

    On 64 px inputs the stage outputs are 32, 16 and 8 px.
    """

    def __init__(self, num_classes: int = 6, width: int = 16, in_channels: int = 3,
                 blocks: tuple[int, int, int] = (1, 1, 1)) -> None:
        super().__init__()
        if num_classes < 1 or width < 1 or in_channels < 1 or len(blocks) != 3 or min(blocks) < 1:
            raise ValueError(f"invalid SmallResNet arguments: num_classes={num_classes}, width={width}, "
                             f"in_channels={in_channels}, blocks={blocks} (all must be >= 1, 3 stages)")
        self.default_layers = ["layer1", "layer2", "layer3"]
        self.cam_layer = "layer3"
        self.conv1 = nn.Conv2d(in_channels, width, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        widths, strides, cin = (width, 2 * width, 4 * width), (1, 2, 2), width
        for i, (w, st, nb) in enumerate(zip(widths, strides, blocks), start=1):
            stage = [BasicBlock(cin, w, st)] + [BasicBlock(w, w) for _ in range(nb - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
            cin = w
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class SmallViT(nn.Module):
    """A ViT for CPU-sized runs (``vit_tiny``: 64 px, patch 8, 4 blocks, hidden 128) built from
    torchvision's encoder blocks, with torchvision's module names (``encoder.layers.encoder_layer_i``,
    ``heads.head``). Beyond torchvision's ViT: rectangular ``image_size`` (h, w), ``num_registers``
    register tokens after the class token (no position embedding, as DINOv2's), and any input size
    (multiples of the patch size): the patch position embeddings are interpolated bicubically to its grid.
    The head starts random (torchvision's starts at zero, which makes every gradient of a fresh model 0).
    """

    def __init__(self, num_classes: int = 6, image_size: int | tuple[int, int] = 64, patch_size: int = 8,
                 num_layers: int = 4, num_heads: int = 4, hidden_dim: int = 128, mlp_dim: int = 256,
                 num_registers: int = 0, in_channels: int = 3) -> None:
        super().__init__()
        from collections import OrderedDict

        from torchvision.models.vision_transformer import EncoderBlock

        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if (num_classes < 1 or patch_size < 1 or num_layers < 1 or num_registers < 0 or len(size) != 2
                or min(size) < patch_size or hidden_dim % num_heads):
            raise ValueError(f"invalid SmallViT arguments: num_classes={num_classes}, image_size={image_size}, "
                             f"patch_size={patch_size}, num_layers={num_layers}, num_heads={num_heads}, "
                             f"hidden_dim={hidden_dim}, num_registers={num_registers} (sizes >= 1, image >= "
                             "patch, hidden_dim a multiple of num_heads, registers >= 0)")
        self.patch_size = patch_size
        self.grid = (size[0] // patch_size, size[1] // patch_size)
        self.num_prefix_tokens = 1 + num_registers
        self.conv_proj = nn.Conv2d(in_channels, hidden_dim, patch_size, patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.register_tokens = nn.Parameter(torch.randn(1, num_registers, hidden_dim) * 0.02)
        self.pos_embedding = nn.Parameter(torch.randn(1, 1 + self.grid[0] * self.grid[1], hidden_dim) * 0.02)
        self.encoder = nn.Module()
        self.encoder.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim, 0.0, 0.0))
            for i in range(num_layers)))
        self.encoder.ln = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))
        self.default_layers, self.cam_layer = _vit_layers(num_layers)

    def _positions(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.pos_embedding[:, 1:]
        if (gh, gw) != self.grid:
            d = pos.shape[-1]
            grid = pos.reshape(1, *self.grid, d).permute(0, 3, 1, 2)
            pos = nn.functional.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
            pos = pos.permute(0, 2, 3, 1).reshape(1, gh * gw, d)
        return pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or min(x.shape[-2:]) < self.patch_size:
            raise ValueError(f"SmallViT takes images [B,C,H,W] with H, W >= patch size {self.patch_size}, "
                             f"got {tuple(x.shape)}")
        t = self.conv_proj(x)
        n, gh, gw = t.shape[0], t.shape[-2], t.shape[-1]
        tokens = t.flatten(2).transpose(1, 2) + self._positions(gh, gw)
        cls = (self.class_token + self.pos_embedding[:, :1]).expand(n, -1, -1)
        x = torch.cat([cls, self.register_tokens.expand(n, -1, -1), tokens], dim=1)
        x = self.encoder.ln(self.encoder.layers(x))
        return self.heads(x[:, 0])


def _vit_layers(num_layers: int) -> tuple[list[str], str]:
    """ViT layer defaults: ``ln_1`` (the input of the block's attention, which every patch token reaches
    the class token through) of up to 4 blocks spaced evenly to the last; cam_layer the last block's
    ``ln_1``, pytorch-grad-cam's choice (the last block's output reaches the head only through the class
    token, so its patch tokens have zero gradient)."""
    picks = sorted({max(0, round(num_layers * (k + 1) / 4) - 1) for k in range(4)})
    names = [f"encoder.layers.encoder_layer_{i}.ln_1" for i in picks]
    return names, names[-1]


def available_archs() -> list[str]:
    """Names accepted by ``build_model``: "small_resnet" and torchvision's classification models."""
    import torchvision

    return ["small_resnet", "vit_tiny", *torchvision.models.list_models(module=torchvision.models)]


def build_model(arch: str, num_classes: int, **kw: object) -> nn.Module:
    """Build an untrained model (never downloads weights) with ``default_layers``/``cam_layer`` set.

    torchvision is imported only for its architectures: importing it costs about 3 s (it pulls in
    torch._dynamo), which every actor of a stage paid at start-up for the small ResNet."""
    if arch == "small_resnet":
        return SmallResNet(num_classes=num_classes, **kw)
    if arch == "vit_tiny":
        return SmallViT(num_classes=num_classes, **kw)
    allowed = available_archs()
    if arch not in allowed:
        raise ValueError(f"unknown arch {arch!r}: allowed values are {', '.join(allowed)}")
    import torchvision

    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kw)
    for m in model.modules():  # in-place activations corrupt tensors captured by hooks
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    layers, cam = _torchvision_layers(arch, model)
    if layers:
        model.default_layers, model.cam_layer = layers, cam
    return model


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalize_inputs(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> nn.Module:
    """Put the input normalisation inside ``model``: its forward subtracts ``mean`` and divides by ``std``
    per channel before anything else, so callers (attributions, PGD eps, masks) stay in [0,1] pixel space.
    Module names are unchanged (the layer defaults still hold) and the statistics are non-persistent buffers
    (a torchvision state dict still loads strictly). Applied to a model once."""
    if len(mean) != len(std) or any(v <= 0 for v in std):
        raise ValueError(f"normalisation needs as many means as stds, stds > 0; got mean={mean}, std={std}")
    if getattr(model, "input_mean", None) is not None:
        raise ValueError(f"{type(model).__name__} already normalises its inputs")
    base = type(model)

    def forward(self: nn.Module, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return base.forward(self, (x - self.input_mean) / self.input_std, *args, **kwargs)

    model.__class__ = type(f"Normalized{base.__name__}", (base,), {"forward": forward, "__module__": base.__module__})
    model.register_buffer("input_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
    model.register_buffer("input_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
    return model


def head_name(model: nn.Module) -> str:
    """The classifier head: the last nn.Linear of the model (fc, heads.head, classifier.N, ...)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier head")
    return names[-1]


def load_backbone(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load a (pretrained) state dict into ``model``; the classifier head's tensors are skipped when their
    shape differs (another number of classes) and returned; any other missing, unexpected or mis-shaped key
    is a ValueError naming ``source`` (a checkpoint for another architecture)."""
    own = model.state_dict()
    head = head_name(model)
    skipped = [k for k, v in state_dict.items() if k.startswith(f"{head}.") and k in own
               and tuple(v.shape) != tuple(own[k].shape)]
    kept = {k: v for k, v in state_dict.items() if k not in skipped}
    kept.update({k: own[k] for k in skipped})
    try:
        load_state_dict_checked(model, kept)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return skipped  # the head keeps the fresh model's initialisation


def weights_source(arch: str, weights: str) -> tuple[str, object]:
    """("file", path) for a local state-dict file, ("torchvision", the weights enum member) for a torchvision
    weights name of ``arch``; ValueError naming the value and what is allowed. Downloads nothing."""
    from pathlib import Path

    if weights.endswith((".pt", ".pth", ".bin")) or "/" in weights or Path(weights).exists():
        p = Path(weights).expanduser()
        if not p.is_file():
            raise ValueError(f"model.weights file {str(p)!r} not found (a state-dict file, or a torchvision "
                             f"weights name such as IMAGENET1K_V1)")
        return "file", p
    if arch in ("small_resnet", "vit_tiny"):
        raise ValueError(f"model.weights={weights!r}: {arch} has no published weights; give a state-dict file")
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError:
        raise ValueError(f"model.weights={weights!r}: torchvision has no weights for {arch!r}") from None
    names = [w.name for w in enum]
    if weights not in names and weights != "DEFAULT":
        raise ValueError(f"model.weights={weights!r} is not a weights name of {arch}: allowed {', '.join(names)}, "
                         f"DEFAULT, or a state-dict file")
    return "torchvision", enum[weights] if weights != "DEFAULT" else enum.DEFAULT


def with_weights(model: nn.Module, arch: str, weights: str | None, normalize: str = "auto",
                 load: bool = True) -> nn.Module:
    """``model`` (from build_model) with its initial weights loaded (``weights_source``; not if ``load`` is
    False: a trained checkpoint or a re-initialised baseline follows) and its input normalisation inside
    (``normalize``: "auto" = ImageNet statistics when weights are given, "imagenet", "none"); a torchvision
    weights name uses that weights' own statistics."""
    if normalize not in ("auto", "imagenet", "none"):
        raise ValueError(f"normalize={normalize!r}: allowed values are 'auto', 'imagenet', 'none'")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    kind, src = weights_source(arch, weights) if weights is not None else (None, None)
    if kind == "torchvision":
        t = src.transforms()
        mean, std = tuple(t.mean), tuple(t.std)
    if load and kind == "file":
        try:
            sd = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling error: name the file
            raise ValueError(f"model.weights file {str(src)!r} is not a torch state dict ({e})") from None
        for key in ("state_dict", "model"):  # common checkpoint wrappers
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
        if not isinstance(sd, dict):
            raise ValueError(f"model.weights file {str(src)!r} holds a {type(sd).__name__}, not a state dict")
        load_backbone(model, sd, f"model.weights file {str(src)!r}")
    elif load and kind == "torchvision":
        load_backbone(model, src.get_state_dict(progress=False), f"model.weights {src}")
    if normalize == "imagenet" or (normalize == "auto" and weights is not None):
        normalize_inputs(model, mean, std)
    return model


def _torchvision_layers(arch: str, model: nn.Module) -> tuple[list[str], str | None]:
    """Stage-output layer names of a torchvision model: known families by name, else by a dry forward."""
    names = dict(model.named_modules())
    if all(f"layer{i}" in names for i in range(1, 5)):  # resnet, resnext, wide_resnet
        return [f"layer{i}" for i in range(1, 5)], "layer4"
    if arch.startswith("densenet"):
        return [f"features.denseblock{i}" for i in range(1, 5)], "features.norm5"
    if arch.startswith("vit_"):  # torchvision VisionTransformer: encoder.layers.encoder_layer_i
        return _vit_layers(len(model.encoder.layers))
    if arch.startswith("swin"):  # stages features.1, .3, .5, .7 output [B,h,w,C] (layer_grid reads them)
        stages = [f"features.{i}" for i in range(1, len(model.features), 2)]
        return stages, stages[-1]
    if arch.startswith("vgg"):  # the module just before each max-pool ends a conv block
        feats = list(model.features)
        ends = [f"features.{i - 1}" for i, m in enumerate(feats) if isinstance(m, nn.MaxPool2d)]
        return ends, ends[-1]
    layers = _stage_outputs(model)
    return layers, (layers[-1] if layers else None)


def _stage_outputs(model: nn.Module, size: int = 64, keep: int = 4) -> list[str]:
    """Generic fallback: among the children of the model's body (``features``/``trunk_output`` when it is
    a Sequential, else the model), the last child to output each spatial resolution (> 1x1) in a dry
    forward pass, stem dropped. Runs in eval mode under no_grad and restores the mode, so BatchNorm
    statistics are untouched. Returns [] when the model cannot run on 1x3xSxS (e.g. ViTs need 224 px).
    """
    prefix = next((p for p in ("features", "trunk_output")
                   if isinstance(getattr(model, p, None), nn.Sequential)), "")
    body = model.get_submodule(prefix)
    last: dict[tuple[int, int], str] = {}  # resolution -> last child that output it (first-seen order)

    def record(name: str, out: object) -> None:
        if isinstance(out, torch.Tensor) and out.dim() == 4 and tuple(out.shape[-2:]) != (1, 1):
            last[tuple(out.shape[-2:])] = name

    names = {n: f"{prefix}.{n}" if prefix else n for n, _ in body.named_children()}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=names[n]: record(name, out))
             for n, m in body.named_children()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except Exception:  # noqa: BLE001 - a model that cannot run here simply gets no defaults
        return []
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    ends = list(last.values())
    return ends[1:][-keep:] if len(ends) > 1 else ends


class _ChannelsLast(nn.Module):
    """Runs ``inner`` (weights already channels-last) on its image input in channels-last layout."""

    input_memory_format = torch.channels_last  # callers that build inputs in place can build them so

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)


def _relu_in_place(gm: nn.Module) -> None:
    """In a traced forward-only graph, a ReLU module whose input feeds nothing else may overwrite it (no
    copy per activation); a module called at several places only if it is safe at each of them."""
    import operator

    fresh = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

    def makes_new_tensor(src: object) -> bool:  # not a view, not the model's input or a parameter
        op, target = getattr(src, "op", None), getattr(src, "target", None)
        return ((op == "call_module" and isinstance(gm.get_submodule(target), fresh))
                or (op == "call_function" and target in (operator.add, torch.add))
                or (op == "call_method" and target == "add"))

    calls: dict[str, list[bool]] = {}
    for node in gm.graph.nodes:  # type: ignore[union-attr]
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ReLU):
            src = node.args[0] if node.args else None
            calls.setdefault(node.target, []).append(makes_new_tensor(src) and len(src.users) == 1)
    for name, safe in calls.items():
        if all(safe):
            gm.get_submodule(name).inplace = True


def inference_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for passes that need only its input -> output function (perturbation curves,
    input gradients, PGD): eval mode, parameters without gradients, every
    Conv2d -> BatchNorm2d pair folded into one conv (torch.fx's ``fuse``, where the model traces; a model
    that does not trace is only copied), ReLUs in place where their input is a fresh tensor that feeds nothing
    else, weights and image inputs in channels-last layout. The same function as ``model.eval()`` up to float
    rounding, faster per image on CPU (docs/BENCHMARKS.md, evaluate). ``model`` itself is not changed. Its
    modules are not the model's, so hooks by layer name (CAMs) belong on the model, not on this copy."""
    import copy

    from torch.fx.experimental.optimization import fuse

    base = copy.deepcopy(model).eval()
    try:
        fast: nn.Module = fuse(base, inplace=True)
    except Exception:  # noqa: BLE001 - untraceable forward (data-dependent control flow): keep the modules
        fast = base
    else:
        _relu_in_place(fast)
    for p in fast.parameters():
        p.requires_grad_(False)
    return _ChannelsLast(fast.to(memory_format=torch.channels_last)).eval()


def default_layers(model: nn.Module) -> list[str]:
    """The model's ``default_layers``, or ValueError asking for ``layers=`` explicitly."""
    layers = getattr(model, "default_layers", None)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no `default_layers` attribute: pass layers=[...] "
                         "with module names as model.get_submodule takes them")
    return list(layers)


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Load a state dict strictly; ValueError naming missing/unexpected keys and shape mismatches.

    A ``module.`` prefix (a checkpoint saved from DistributedDataParallel) is stripped first.
    """
    own = model.state_dict()
    if state_dict and all(k.startswith("module.") for k in state_dict) and not any(
            k.startswith("module.") for k in own):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
            problems.append(f"{title}: {', '.join(items[:10])}{more}")
    if problems:
        raise ValueError(f"checkpoint does not fit {type(model).__name__} (another architecture or "
                         f"num_classes?): {'; '.join(problems)}")
    model.load_state_dict(state_dict, strict=True)
    return model
