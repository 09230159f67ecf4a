"""Evaluate throughput: the (image x method x model) rows one evaluate actor computes per second.

    python -m bench.evaluate                  # paper config's evaluate settings, one batch (50 images)
    python -m bench.evaluate --tiny           # smoke config, one batch of 16 images at 32 px, 1 repeat
    python -m bench.evaluate --config configs/quick.yaml --repeats 3

The timed call is the stage's own UDF, ``pipelines.evaluate.EvalActor``, built and called in this process
with 1 torch thread (an actor of 1 CPU) on one batch of the config's test split as ingest writes it, with one
untrained model of the config's architecture: every method of ``evaluate.methods`` together (the stage's
work per batch and model), each method alone, and no method (the clean accuracy and PGD rows that every
call computes). A method's own cost is its call less the no-method call. Throughput = images x methods x
models / seconds of the call with every method. Untrained weights: HAF and the maps run the same passes as after
training, but the curves do not: an image whose pixels two methods rank alike is perturbed once
(``perturbation_curve_set``), and untrained models give more such ties (flat maps), so this bench
overstates that saving (docs/BENCHMARKS.md: 1.28x untrained, 1.04x on a trained model).

Issue 19 asks evaluate for at least 2x this throughput, measured before and after. Writes
bench/results/evaluate.json (evaluate_tiny.json with --tiny) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any

import numpy as np

from bench._timing import fix_threads, machine, markdown_table, measure, publish
from pipelines.config import ROOT, Config, load_config

CKPT = "train/bench_untrained.pt"


def prepare(cfg: Config, root: str) -> tuple[list, dict[str, np.ndarray]]:
    """A local store with an untrained checkpoint at CKPT, and the first test batch in ingest's arrays."""
    import torch

    from pipelines import ingest
    from pipelines.common import make_model, state_bytes
    from pipelines.storage import Storage

    torch.manual_seed(0)
    store = Storage(root)
    store.write_bytes(state_bytes({"model": make_model(cfg).state_dict(), "epoch": 0}), CKPT)
    test = ingest._synthetic_splits(cfg)["test"]
    n = min(cfg.evaluate.batch_size, len(test["label"]))
    batch = {"idx": np.arange(n, dtype=np.int64), **{k: v[:n] for k, v in test.items()}}
    return store.args(), batch


def run(cfg: Config, repeats: int, root: str) -> dict:
    from pipelines.evaluate import EvalActor

    storage, batch = prepare(cfg, root)
    methods = list(cfg.evaluate.methods)
    alphas = {"tif": 0.5, "gradcam_thresholded": 0.5}

    def actor(ms: list[str]) -> EvalActor:
        c = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"methods": ms})})
        return EvalActor(c.model_dump(mode="json"), storage, {"untrained_s0": CKPT}, alphas, "test", threads=1)

    sides = {"all": actor(methods), "none": actor([]), **{m: actor([m]) for m in methods}}
    rows_out = {k: len(a(batch)["idx"]) for k, a in sides.items()}  # one call each: the rows it writes
    n = len(batch["idx"])
    for k, got in rows_out.items():
        want = n * (1 + (len(methods) if k == "all" else 0 if k == "none" else 1))
        if got != want:
            raise SystemExit(f"{k}: {got} rows, expected {want}")
    times = measure({k: (lambda a=a: a(batch)) for k, a in sides.items()}, repeats, warmup=0)
    med = {k: v["median_s"] for k, v in times.items()}
    return {"images": n, "size": cfg.data.size, "models": 1, "methods": methods,
            "seconds": med, "times_s": {k: v["times_s"] for k, v in times.items()},
            "method_s": {m: med[m] - med["none"] for m in methods},
            "rows_per_s": n * len(methods) / med["all"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="default configs/paper.yaml (--tiny: configs/smoke.yaml)")
    ap.add_argument("--tiny", action="store_true", help="smoke config, 1 repeat")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds, medians (default 3; --tiny 1)")
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    args = ap.parse_args(argv)
    config = args.config or str(ROOT / ("configs/smoke.yaml" if args.tiny else "configs/paper.yaml"))
    repeats = args.repeats or (1 if args.tiny else 3)
    fix_threads(1)
    cfg = load_config(config)
    with tempfile.TemporaryDirectory(prefix="bench_evaluate_") as root:
        r = run(cfg, repeats, root)
    per_image = {k: v / r["images"] for k, v in r["seconds"].items()}
    table = markdown_table(
        ["call (one batch, 1 model)", "s per batch", "s per image", "own s per image"],
        [[k, f"{r['seconds'][k]:.2f}", f"{per_image[k]:.3f}",
          "" if k in ("all", "none") else f"{r['method_s'][k] / r['images']:.3f}"]
         for k in ["all", "none", *r["methods"]]])
    table += (f"\n\n{r['images']} images at {r['size']} px x {len(r['methods'])} methods x 1 model: "
              f"**{r['rows_per_s']:.2f} (image x method x model) rows per second**")
    payload: dict[str, Any] = {
        "benchmark": "evaluate", "machine": machine(), "config": config, "repeats": repeats,
        "command": "python -m bench.evaluate " + " ".join(argv if argv is not None else sys.argv[1:]), **r}
    return publish(payload, "evaluate_tiny" if args.tiny else "evaluate", args.out_dir, table)


if __name__ == "__main__":
    main()
