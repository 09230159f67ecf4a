"""How many rows one forward(+backward) pass should hold on this machine: IG steps and deletion chunks.

    python -m bench.pass_size                   # small ResNet width 16, 64 px, batch 64, 1 thread
    python -m bench.pass_size --tiny            # seconds

Integrated gradients (16 steps of a 64-image batch) with internal_batch_size None (the default: about
``PASS_INPUT_BYTES`` of input per pass), 1024, 512, 256, 128, 64 rows per pass, in cost units; and the
deletion curve (96 steps) with chunk_size 32, 64, 128, the default (about ``FORWARD_INPUT_BYTES`` of input per
forward) and everything in one forward, beside 97 plain forwards of the batch (its floor). Writes
bench/results/pass_size.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench._timing import fix_threads, machine, markdown_table, measure, publish, unit_fn
from xai_core.attribution import explain
from xai_core.metrics import deletion_auc
from xai_core.models import SmallResNet


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    fix_threads(1)
    torch.manual_seed(0)
    width, size, batch, n, steps = (4, 16, 4, 4, 8) if args.tiny else (16, 64, 64, 16, 96)
    model = SmallResNet(6, width).eval()
    x, t = torch.rand(batch, 3, size, size), torch.randint(0, 6, (batch,))
    maps = torch.rand(batch, size, size)

    def forwards() -> None:
        with torch.no_grad():
            for _ in range(steps + 1):
                model(x)

    fns = {"unit": unit_fn(model, x, t), "plain forwards": forwards}
    for ibs in (None, 1024, 512, 256, 128, 64):
        fns[f"ig ibs={ibs}"] = (lambda ibs=ibs: explain(model, x, t, method="integrated_gradients", n_steps=n,
                                                        internal_batch_size=ibs))
    for c in (None, batch * (steps + 1), 128, 64, 32):
        fns[f"deletion chunk={c}"] = (lambda c=c: deletion_auc(model, x, maps, t, n_steps=steps, fill=0.0,
                                                               chunk_size=c))
    res = measure(fns, args.repeats or (1 if args.tiny else 3), warmup=0 if args.tiny else 1)
    unit = res["unit"]["median_s"]
    rows = [{"call": k, "median_s": v["median_s"], "units": v["median_s"] / unit, "times_s": v["times_s"]}
            for k, v in res.items()]
    payload = {"benchmark": "pass_size", "tiny": args.tiny, "machine": machine(),
               "command": "python -m bench.pass_size " + " ".join(argv if argv is not None else sys.argv[1:]),
               "setting": {"width": width, "size": size, "batch": batch, "ig_steps": n, "deletion_steps": steps},
               "rows": rows}
    table = markdown_table(["call", "median s", "units"],
                           [[r["call"], f"{r['median_s']:.3f}", f"{r['units']:.2f}"] for r in rows])
    return publish(payload, "pass_size_tiny" if args.tiny else "pass_size", args.out_dir, table)


if __name__ == "__main__":
    main()
