"""Attribution cost: every ``explain`` method in cost units, beside Captum and pytorch-grad-cam.

    python -m bench.attribution                 # SmallResNet 64 px b64, resnet18 224 px b16, vit_b_16 224 px b4
    python -m bench.attribution --tiny          # seconds: tiny sizes, 1 repeat (keeps the script alive)
    python -m bench.attribution --models small --repeats 7

Unit = one forward + one backward to the input (autograd.grad w.r.t. the input only) of the same model
and batch, timed interleaved with each row (bench/_timing.py). Peers compute the same heatmap [B,H,W]
(reduction and, for Captum LayerGradCam, upsampling included). Writes bench/results/attribution.json
(attribution_tiny.json with --tiny, attribution_small.json with --models small) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from captum.attr import (
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from bench._timing import fix_threads, machine, markdown_table, measure, publish, unit_fn
from xai_core.attribution import explain
from xai_core.models import SmallResNet, SmallViT, build_model


@dataclass
class Config:
    name: str
    make: Callable[[], nn.Module]
    size: int
    batch: int
    n_steps: int  # IG steps and SmoothGrad samples
    haf_steps: int
    repeats: int
    warmup: int = 1
    internal_batch_size: int | None = None  # rows per pass for IG / SmoothGrad (ours and Captum alike)
    extra: dict = field(default_factory=dict)


def configs(tiny: bool, repeats: int | None) -> dict[str, Config]:
    if tiny:
        return {
            "small": Config("SmallResNet(width=4) 16px b4", lambda: SmallResNet(num_classes=6, width=4), 16, 4,
                            2, 2, repeats or 1, warmup=0),
            "resnet18": Config("resnet18 32px b2", lambda: build_model("resnet18", num_classes=10), 32, 2,
                               2, 2, repeats or 1, warmup=0),
            "vit": Config("SmallViT 32px b2", lambda: SmallViT(num_classes=10, image_size=32), 32, 2, 2, 2,
                          repeats or 1, warmup=0),
        }
    return {
        "small": Config("SmallResNet(width=16) 64px b64", lambda: SmallResNet(num_classes=6, width=16), 64, 64,
                        16, 10, repeats or 7),
        "resnet18": Config("resnet18 224px b16", lambda: build_model("resnet18", num_classes=10), 224, 16,
                           16, 10, repeats or 3, internal_batch_size=64),
        "vit": Config("vit_b_16 224px b4", _vit_b16, 224, 4, 16, 10, repeats or 3),
    }


def _vit_b16() -> nn.Module:
    """torchvision's vit_b_16 (weights=None) with a random head: its zero-initialised head would make
    every gradient zero."""
    model = build_model("vit_b_16", num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def _vit_reshape(model: nn.Module, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """pytorch-grad-cam's ViT reshape_transform (its tutorial's): drop the class token, tokens to a grid."""
    h = size // model.patch_size

    def reshape_transform(tensor: torch.Tensor) -> torch.Tensor:
        result = tensor[:, 1:, :].reshape(tensor.size(0), h, h, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)
    return reshape_transform


def _captum_gradcam(model: nn.Module, layer: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a = LayerGradCam(model, model.get_submodule(layer)).attribute(x, target=t, relu_attributions=True)
    return LayerAttribution.interpolate(a, x.shape[-2:], "bilinear")[:, 0]


def _pgc(cls: type, model: nn.Module, layers: list[str], x: torch.Tensor, t: torch.Tensor,
         reshape: Callable | None = None) -> object:
    with cls(model=model, target_layers=[model.get_submodule(n) for n in layers],
             reshape_transform=reshape) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])


def vit_rows(cfg: Config, model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> list[dict]:
    """A ViT's token layers: ours (grid inferred) against pytorch-grad-cam with its reshape_transform."""
    layers, cam, rs = list(model.default_layers), [model.cam_layer], _vit_reshape(model, cfg.size)

    def ours(method: str, **kw: object) -> Callable[[], object]:
        return lambda: explain(model, x, t, method=method, **kw)

    pgc = "pytorch-grad-cam GradCAM"
    return [
        {"method": "gradcam", "opts": f"layers={cam}", "ours": ours("gradcam", layers=cam), "target": ("peer", pgc),
         "peers": {pgc: lambda: _pgc(GradCAM, model, cam, x, t, rs)}},
        {"method": "layercam", "opts": f"{len(layers)} layers", "ours": ours("layercam", layers=layers),
         "target": ("peer", "pytorch-grad-cam LayerCAM"),
         "peers": {"pytorch-grad-cam LayerCAM": lambda: _pgc(LayerCAM, model, layers, x, t, rs)}},
        {"method": "tif", "opts": f"base=gradient, {len(layers)} layers", "target": ("units", 1.1),
         "ours": ours("tif", base="gradient", layers=layers),
         "peers": {f"{pgc}, {len(layers)} layers": lambda: _pgc(GradCAM, model, layers, x, t, rs)}},
        {"method": "tif", "opts": f"base=input_x_gradient, {len(layers)} layers", "target": ("units", 1.1),
         "ours": ours("tif", base="input_x_gradient", layers=layers),
         "peers": {f"{pgc}, {len(layers)} layers": lambda: _pgc(GradCAM, model, layers, x, t, rs)}},
    ]


def rows_for(cfg: Config, model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> list[dict]:
    """Each row: our call, its peers, the target it is held to. kind: units | per_n | peer."""
    all_layers = list(model.default_layers)
    cam = [model.cam_layer]
    n, s, ibs = cfg.n_steps, cfg.haf_steps, cfg.internal_batch_size
    nt_batch = None if ibs is None else max(1, ibs // cfg.batch)
    sg_sigma = 0.15  # images in [0,1]: our per-sample sigma*(max-min) ~ Captum's fixed stdev 0.15

    def ours(method: str, **kw: object) -> Callable[[], object]:
        return lambda: explain(model, x, t, method=method, **kw)

    return [
        {"method": "saliency", "opts": "", "ours": ours("saliency"), "target": ("units", 1.1),
         "peers": {"Captum Saliency": lambda: Saliency(model).attribute(x, target=t, abs=True).amax(1)}},
        {"method": "input_x_gradient", "opts": "", "ours": ours("input_x_gradient"), "target": ("units", 1.1),
         "peers": {"Captum InputXGradient":
                   lambda: InputXGradient(model).attribute(x, target=t).sum(1).abs()}},
        {"method": "integrated_gradients", "opts": f"n_steps={n}", "n": n, "target": ("per_n", 1.05),
         "ours": ours("integrated_gradients", n_steps=n, internal_batch_size=ibs),
         "peers": {"Captum IntegratedGradients": lambda: IntegratedGradients(model).attribute(
             x, baselines=0.0, target=t, n_steps=n, method="riemann_middle",
             internal_batch_size=ibs or n * cfg.batch).sum(1).abs()}},
        {"method": "smoothgrad", "opts": f"n_samples={n}", "n": n, "target": ("per_n", 1.05),
         "ours": ours("smoothgrad", n_samples=n, sigma=sg_sigma, internal_batch_size=ibs),
         "peers": {"Captum NoiseTunnel(Saliency)": lambda: NoiseTunnel(Saliency(model)).attribute(
             x, nt_type="smoothgrad", nt_samples=n, nt_samples_batch_size=nt_batch, stdevs=sg_sigma,
             target=t, abs=True).amax(1)}},
        {"method": "gradcam", "opts": f"layers={cam}", "ours": ours("gradcam", layers=cam),
         "target": ("peer", "Captum LayerGradCam"),
         "peers": {"Captum LayerGradCam": lambda: _captum_gradcam(model, cam[0], x, t),
                   "pytorch-grad-cam GradCAM": lambda: _pgc(GradCAM, model, cam, x, t)}},
        {"method": "gradcam_pp", "opts": f"layers={cam}", "ours": ours("gradcam_pp", layers=cam),
         "target": ("peer", "Captum LayerGradCam"),
         "peers": {"Captum LayerGradCam": lambda: _captum_gradcam(model, cam[0], x, t),
                   "pytorch-grad-cam GradCAMPlusPlus": lambda: _pgc(GradCAMPlusPlus, model, cam, x, t)}},
        {"method": "layercam", "opts": f"{len(all_layers)} layers", "ours": ours("layercam", layers=all_layers),
         "target": ("units", 1.1),
         "peers": {"pytorch-grad-cam LayerCAM": lambda: _pgc(LayerCAM, model, all_layers, x, t)}},
        {"method": "tif", "opts": f"base=gradient, {len(all_layers)} layers", "target": ("units", 1.1),
         "ours": ours("tif", base="gradient", layers=all_layers), "peers": {}},
        {"method": "tif", "opts": f"base=input_x_gradient, {len(all_layers)} layers", "target": ("units", 1.1),
         "ours": ours("tif", base="input_x_gradient", layers=all_layers), "peers": {}},
        {"method": "gradcam_thresholded", "opts": f"layers={cam}", "target": None,
         "ours": ours("gradcam_thresholded", layers=cam), "peers": {}},
        {"method": "haf", "opts": f"steps={s}, layers={all_layers[-2:]}", "n": s, "target": ("per_n", 1.1),
         "ours": ours("haf", layers=all_layers[-2:], steps=s), "peers": {}},
    ]


def _verdict(row: dict, units: float, peers: dict) -> tuple[str, bool | None]:
    target = row["target"]
    if target is None:
        return "-", None
    kind, bound = target
    if kind == "units":
        return f"<= {bound} units", units <= bound
    if kind == "per_n":
        return f"<= {bound} x {row['n']} units", units <= bound * row["n"]
    return f"<= {bound}", peers[bound]["ours_over_peer"] <= 1.0


def run_config(key: str, cfg: Config, only: set[str] | None) -> list[dict]:
    torch.manual_seed(0)
    model = cfg.make().eval()
    x = torch.rand(cfg.batch, 3, cfg.size, cfg.size)
    with torch.no_grad():
        t = torch.randint(0, model(x[:1]).shape[1], (cfg.batch,))
    unit = unit_fn(model, x, t)
    out = []
    for row in (vit_rows if key == "vit" else rows_for)(cfg, model, x, t):
        if only and row["method"] not in only:
            continue
        fns = {"unit": unit, "ours": row["ours"], **row["peers"]}
        res = measure(fns, cfg.repeats, cfg.warmup)
        u = res["unit"]["median_s"]
        ours_s = res["ours"]["median_s"]
        peers = {p: {"median_s": res[p]["median_s"], "units": res[p]["median_s"] / u,
                     "ours_over_peer": ours_s / res[p]["median_s"], "times_s": res[p]["times_s"]}
                 for p in row["peers"]}
        target, met = _verdict(row, ours_s / u, peers)
        rec = {"model": key, "config": cfg.name, "method": row["method"], "opts": row["opts"],
               "unit_s": u, "ours_s": ours_s, "units": ours_s / u, "target": target, "met": met,
               "repeats": cfg.repeats, "warmup": cfg.warmup, "unit_times_s": res["unit"]["times_s"],
               "ours_times_s": res["ours"]["times_s"], "peers": peers}
        out.append(rec)
        print(f"  {key:8s} {row['method']:22s} {row['opts']:38s} {rec['units']:7.2f} units "
              + " ".join(f"| {p}: {v['ours_over_peer']:.2f}x" for p, v in peers.items()), flush=True)
    return out


def table(rows: list[dict]) -> str:
    header = ["model", "method", "options", "unit ms", "ours ms", "ours units", "target", "met",
              "peer: ms (units) ours/peer"]
    body = []
    for r in rows:
        peers = "<br>".join(f"{p}: {v['median_s'] * 1e3:.1f} ({v['units']:.2f}) {v['ours_over_peer']:.2f}"
                            for p, v in r["peers"].items()) or "-"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        body.append([r["config"], r["method"], r["opts"] or "-", f"{r['unit_s'] * 1e3:.1f}",
                     f"{r['ours_s'] * 1e3:.1f}", f"{r['units']:.2f}", r["target"], met, peers])
    return markdown_table(header, body)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes and 1 repeat: a seconds-long smoke run")
    ap.add_argument("--models", default="small,resnet18,vit", help="comma list of: small, resnet18, vit")
    ap.add_argument("--methods", default="", help="comma list of method names (default: all)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7 small, 3 resnet18)")
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    ap.add_argument("--internal-batch-size", type=int, default=None,
                    help="rows per pass of IG / SmoothGrad for ours and the peers alike (default: 64 on resnet18, "
                         "each side's own default on the small ResNet); the batch size = one step per pass")
    args = ap.parse_args(argv)
    fix_threads(1)
    cfgs = configs(args.tiny, args.repeats)
    if args.internal_batch_size is not None:
        if args.internal_batch_size < 1:
            raise SystemExit(f"--internal-batch-size={args.internal_batch_size}: expected an integer >= 1")
        cfgs = {k: replace(c, internal_batch_size=args.internal_batch_size) for k, c in cfgs.items()}
    only = {m for m in args.methods.split(",") if m} or None
    rows = []
    keys = [m for m in args.models.split(",") if m]
    for key in keys:
        if key not in cfgs:
            raise SystemExit(f"unknown model {key!r}: use {', '.join(cfgs)}")
        cfg = cfgs[key]
        print(f"{cfg.name}: repeats={cfg.repeats} warmup={cfg.warmup} n_steps={cfg.n_steps} "
              f"haf_steps={cfg.haf_steps} internal_batch_size={cfg.internal_batch_size}", flush=True)
        rows += run_config(key, cfg, only)
    payload = {"benchmark": "attribution", "tiny": args.tiny, "machine": machine(),
               "command": "python -m bench.attribution " + " ".join(argv if argv is not None else sys.argv[1:]),
               "rows": rows}
    name = "attribution" + ("_tiny" if args.tiny else "") + ("" if set(keys) == set(cfgs) else "_" + "_".join(keys))
    return publish(payload, name, args.out_dir, table(rows))


if __name__ == "__main__":
    main()
