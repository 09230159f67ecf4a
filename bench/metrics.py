"""Metric cost and agreement: xai_core.metrics beside Quantus with matching settings.

    python -m bench.metrics                     # SmallResNet(width=16), 64 px, batch 64, saliency maps
    python -m bench.metrics --tiny              # seconds: tiny sizes, 1 repeat (keeps the script alive)

Pairs (ours vs Quantus), each given its native input (torch tensors / numpy arrays prepared beforehand):
- deletion curve, fill 0, n_steps = 3 * H*W / f   vs PixelFlipping(features_in_step=f, perturb_baseline=0.0):
  Quantus flips f channel-values per step of the C*H*W broadcast map, so its curve passes through ours
  (whole pixels) at every third step; both run n_steps model forwards of the batch.
- pointing_game(tolerance=0)                       vs PointingGame(normalise=False)
- gini                                              vs Sparseness(abs=True, normalise=False)
- model_randomisation(layer_order=Quantus' order)   vs MPRT(top_down, spearman), saliency explanations:
  every module with reset_parameters, output to input, cascading; Quantus seeds every layer with
  seed + 1, we seed step k with seed + k, so only the first layer's randomisation is identical.
Writes bench/results/metrics.json (metrics_tiny.json with --tiny) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np
import quantus
import torch

from bench._timing import fix_threads, machine, markdown_table, measure, publish
from xai_core.attribution import explain
from xai_core.data.synthetic import BiasedShapes
from xai_core.metrics import gini, model_randomisation, pointing_game
from xai_core.metrics.faithfulness import perturbation_curves
from xai_core.models import SmallResNet


def _saliency(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return explain(model, x, t, method="saliency")


def _quantus_saliency(model: torch.nn.Module, inputs: np.ndarray, targets: np.ndarray, **_: object) -> np.ndarray:
    x = torch.as_tensor(inputs)
    return _saliency(model, x, torch.as_tensor(targets).long()).numpy()[:, None]


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    return float(np.max(np.where(both_nan, 0.0, np.abs(a - b)), initial=0.0))


def run(size: int, batch: int, width: int, f: int, repeats: int, warmup: int) -> list[dict]:
    torch.manual_seed(0)
    model = SmallResNet(num_classes=6, width=width).eval()
    ds = BiasedShapes(n=batch, seed=0, size=size, split="test")
    x, t, masks = ds.images.float() / 255, ds.labels.long(), ds.masks.bool()
    maps = _saliency(model, x, t)
    x_np, t_np, a_np, s_np = x.numpy(), t.numpy(), maps.numpy()[:, None], masks.numpy()[:, None]
    hw = size * size
    n_steps = 3 * hw // f
    q_kw = {"disable_warnings": True, "display_progressbar": False}
    rows = []

    # deletion curve vs PixelFlipping
    pf = quantus.PixelFlipping(features_in_step=f, perturb_baseline=0.0, normalise=False, abs=False, **q_kw)
    ours_del = lambda: perturbation_curves(model, x, maps, t, n_steps=n_steps, fill=0.0)[0]  # noqa: E731
    theirs_del = lambda: np.asarray(pf(model=model, x_batch=x_np, y_batch=t_np, a_batch=a_np,  # noqa: E731
                                       channel_first=True, softmax=True, device="cpu", batch_size=batch))
    ours_c, theirs_c = ours_del().numpy(), theirs_del()
    # ours: points 0..n_steps (k*HW//n_steps whole pixels); Quantus: after steps 1..n_steps of f values.
    rows.append(_row("deletion curve (AUC)", f"fill 0, ours n_steps={n_steps} vs PixelFlipping "
                     f"features_in_step={f} ({n_steps} steps)", ours_del, theirs_del, repeats, warmup,
                     _diff(ours_c[:, 3::3], theirs_c[:, 2::3]),
                     "every 3rd point (whole pixels removed) compared; in between Quantus has removed only "
                     "some channels of a pixel, we remove whole pixels"))

    pg = quantus.PointingGame(normalise=False, abs=False, **q_kw)
    ours_pg = lambda: pointing_game(maps, masks, tolerance=0)  # noqa: E731
    theirs_pg = lambda: np.asarray(pg(model=model, x_batch=x_np, y_batch=t_np, a_batch=a_np,  # noqa: E731
                                      s_batch=s_np, channel_first=True, batch_size=batch), dtype=float)
    rows.append(_row("pointing_game", "tolerance=0 vs PointingGame", ours_pg, theirs_pg, repeats, warmup,
                     _diff(ours_pg().numpy(), theirs_pg()),
                     "identical unless the maximum is tied (Quantus: any tied max in the mask; ours: first)"))

    sp = quantus.Sparseness(normalise=False, abs=True, **q_kw)
    ours_g = lambda: gini(maps)  # noqa: E731
    theirs_g = lambda: np.asarray(sp(model=model, x_batch=x_np, y_batch=t_np, a_batch=a_np,  # noqa: E731
                                     channel_first=True, batch_size=batch))
    offset = _diff(gini(maps.abs() + 1e-7).numpy(), theirs_g())
    rows.append(_row("gini", "vs Sparseness", ours_g, theirs_g, repeats, warmup,
                     _diff(ours_g().numpy(), theirs_g()),
                     f"Quantus adds 1e-7 to every value before sorting (ours on abs(map) + 1e-7: "
                     f"max abs diff {offset:.1e})"))

    order = [n for n, m in model.named_modules() if hasattr(m, "reset_parameters")][::-1]
    mprt = quantus.MPRT(layer_order="top_down", seed=42, normalise=False, abs=True,
                        similarity_func=quantus.similarity_func.correlation_spearman, **q_kw)
    ours_mr = lambda: model_randomisation(model, x, t, _saliency, layer_order=order, seed=43)  # noqa: E731
    theirs_mr = lambda: mprt(model=model, x_batch=x_np, y_batch=t_np, a_batch=a_np, channel_first=True,  # noqa: E731
                             explain_func=_quantus_saliency, batch_size=batch)
    o, q = ours_mr(), theirs_mr()
    first = _diff(o[order[0]].numpy(), q[order[0]])
    layer_means = _diff([float(np.nanmean(o[n].numpy())) for n in order], [float(np.nanmean(q[n])) for n in order])
    rows.append(_row("model_randomisation", f"saliency, {len(order)} modules cascading vs MPRT", ours_mr,
                     theirs_mr, repeats, warmup, first,
                     f"first layer ({order[0]}) compared per sample; later layers differ by seeding "
                     f"(largest gap of the per-layer mean correlations: {layer_means:.3f})"))
    for r in rows:
        r["config"] = f"SmallResNet(width={width}) {size}px b{batch}"
    return rows


def _row(metric: str, setting: str, ours: object, theirs: object, repeats: int, warmup: int,
         max_abs_diff: float, note: str) -> dict:
    res = measure({"ours": ours, "quantus": theirs}, repeats, warmup)
    o, q = res["ours"]["median_s"], res["quantus"]["median_s"]
    rec = {"metric": metric, "setting": setting, "ours_s": o, "quantus_s": q, "speedup": q / o,
           "target": ">= 5x", "met": q / o >= 5.0, "max_abs_diff": max_abs_diff, "note": note,
           "repeats": repeats, "warmup": warmup, "ours_times_s": res["ours"]["times_s"],
           "quantus_times_s": res["quantus"]["times_s"]}
    print(f"  {metric:20s} ours {o * 1e3:9.2f} ms  quantus {q * 1e3:9.2f} ms  speedup {q / o:6.1f}x  "
          f"max|diff| {max_abs_diff:.2e}", flush=True)
    return rec


def table(rows: list[dict]) -> str:
    header = ["metric", "setting", "ours ms", "Quantus ms", "speedup", ">= 5x", "max abs diff", "agreement"]
    body = [[r["metric"], r["setting"], f"{r['ours_s'] * 1e3:.2f}", f"{r['quantus_s'] * 1e3:.2f}",
             f"{r['speedup']:.1f}x", "yes" if r["met"] else "**no**", f"{r['max_abs_diff']:.1e}", r["note"]]
            for r in rows]
    return markdown_table(header, body)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes and 1 repeat: a seconds-long smoke run")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5)")
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    args = ap.parse_args(argv)
    fix_threads(1)
    warnings.filterwarnings("ignore", module="quantus")
    if args.tiny:
        size, batch, width, f, repeats, warmup = 16, 4, 4, 64, args.repeats or 1, 0
    else:
        size, batch, width, f, repeats, warmup = 64, 64, 16, 128, args.repeats or 5, 1
    print(f"SmallResNet(width={width}) {size}px batch {batch}: repeats={repeats} warmup={warmup}", flush=True)
    rows = run(size, batch, width, f, repeats, warmup)
    payload = {"benchmark": "metrics", "tiny": args.tiny, "machine": machine(),
               "quantus": quantus.__version__,
               "command": "python -m bench.metrics " + " ".join(argv if argv is not None else sys.argv[1:]),
               "rows": rows}
    return publish(payload, "metrics_tiny" if args.tiny else "metrics", args.out_dir, table(rows))


if __name__ == "__main__":
    main()
