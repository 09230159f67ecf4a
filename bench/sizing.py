"""Benchmark sizing (issue 20, items 5 and 6): does ERM learn the shapes, and does a debiasing baseline's gain show,
at a given size of the biased-shapes benchmark, and what does an epoch cost?

    python -m bench.sizing --base quick --set data.bias=0.8 --set train.epochs=8 --modes erm
    python -m bench.sizing --base paper --set data.n_train=4000 --modes erm jtt group_balanced --seeds 0 1

In one process, without Ray, with the pipeline's own pieces: the config's splits as ingest builds them
(``pipelines.ingest._synthetic_splits``), its model (``pipelines.common.make_model``), Adam and
``pipelines.train.batch_loss`` as ``train_loop`` runs them (batches of train.batch_size in a seeded order per
epoch), JTT's error set and weights (``train.jtt_weights``) and the group-oracle weights
(``train.group_weights``). After every epoch: test accuracy on the aligned and the conflicting group and the
worst (class x background) group with >= 20 images, the whole test split (forwards only). Prints one line per
epoch and writes the rows to bench/results/sizing.json (appended, with the overrides, so runs accumulate).
Numbers from one process on a shared 2-core machine: seconds per epoch compare only within one run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

OUT = Path(__file__).resolve().parent / "results" / "sizing.json"


def _test_metrics(model: torch.nn.Module, test: dict[str, np.ndarray], num_classes: int) -> dict[str, float]:
    from xai_core.metrics.groups import group_accuracy, group_ids

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(test["image"][i:i + 256]).float() / 255).argmax(1)
                          for i in range(0, len(test["label"]), 256)])
    model.train()
    y, g = torch.from_numpy(test["label"]).long(), torch.from_numpy(test["group"])
    correct = pred == y
    groups = group_ids(y, torch.from_numpy(test["background"]).long(), num_classes)
    worst = group_accuracy(correct, groups, min_size=20)["worst"]
    return {"acc": float(correct.float().mean()), "aligned": float(correct[g == 0].float().mean()),
            "conflicting": float(correct[g == 1].float().mean()), "worst_group": float(worst)}


def train(cfg: Any, data: dict[str, dict[str, np.ndarray]], mode: str, seed: int, epochs: int,
          weights: np.ndarray | None = None, label: str = "") -> tuple[torch.nn.Module, list[dict]]:
    """Train ``epochs`` epochs of ``mode`` (erm, or a weighted mode with ``weights`` [N]) from a model seeded
    by ``seed``; returns the model and one row per epoch."""
    from pipelines.common import make_model
    from pipelines.train import batch_loss

    torch.manual_seed(seed)
    model = make_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    tr = data["train"]
    n, bs = len(tr["label"]), cfg.train.batch_size
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = np.random.default_rng(seed * 100 + epoch).permutation(n)
        for i in range(0, n, bs):
            idx = np.sort(order[i:i + bs])
            batch = {"image": torch.from_numpy(tr["image"][idx]).float() / 255,
                     "label": torch.from_numpy(tr["label"][idx]).long()}
            if weights is not None:
                batch["w"] = torch.from_numpy(weights[idx])
            loss, _, _ = batch_loss(model, batch, mode, cfg, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds = time.perf_counter() - t0
        row = {"label": label, "mode": mode, "seed": seed, "epoch": epoch + 1, "epoch_seconds": seconds,
               **_test_metrics(model, data["test"], cfg.data.num_classes)}
        rows.append(row)
        print(f"{label} {mode} s{seed} epoch {epoch + 1}: acc {row['acc']:.3f} aligned {row['aligned']:.3f} "
              f"conflicting {row['conflicting']:.3f} worst {row['worst_group']:.3f} ({seconds:.1f} s)", flush=True)
    return model, rows


def main(argv: list[str] | None = None) -> int:
    from pipelines.config import ROOT, load_config
    from pipelines.ingest import _synthetic_splits
    from pipelines.train import group_weights, jtt_weights

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="quick", help="a shipped config name")
    p.add_argument("--set", action="append", default=[], help="config overrides, as full.py takes them")
    p.add_argument("--modes", nargs="+", default=["erm"], choices=["erm", "jtt", "group_balanced", "scaat"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-test", type=int, default=2000, help="test images (balanced split, forwards only)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "configs" / f"{args.base}.yaml", [*args.set, f"data.n_test={args.n_test}",
                                                                "data.n_dwsol=0"])
    label = f"{args.base} " + " ".join(args.set)
    t0 = time.perf_counter()
    data = _synthetic_splits(cfg)
    print(f"{label}: splits built in {time.perf_counter() - t0:.1f} s", flush=True)
    rows: list[dict] = []
    for seed in args.seeds:
        for mode in args.modes:
            if mode == "jtt":  # ERM for jtt.epochs, its training errors upweighted, a fresh model
                first, r1 = train(cfg, data, "erm", seed, cfg.jtt.epochs, label=label + " [jtt id]")
                with torch.no_grad():
                    first.eval()
                    tr = data["train"]
                    wrong = np.concatenate([(first(torch.from_numpy(tr["image"][i:i + 256]).float() / 255)
                                             .argmax(1).numpy() != tr["label"][i:i + 256])
                                            for i in range(0, len(tr["label"]), 256)])
                share = float((tr["group"][wrong] == 1).mean()) if wrong.any() else float("nan")
                print(f"{label} jtt s{seed}: error set {int(wrong.sum())} ({share:.0%} conflicting)", flush=True)
                _, r = train(cfg, data, "jtt", seed, cfg.train.epochs, jtt_weights(wrong, cfg.jtt.lambda_up), label)
                for row in r:
                    row.update(error_set=int(wrong.sum()), error_conflicting_share=share)
            elif mode == "group_balanced":
                _, r = train(cfg, data, mode, seed, cfg.train.epochs, group_weights(data["train"]["group"]), label)
            else:
                _, r = train(cfg, data, mode, seed, cfg.train.epochs, label=label)
            rows += [{**row, "overrides": args.set, "base": args.base} for row in r]
    OUT.parent.mkdir(exist_ok=True)
    old = json.loads(OUT.read_text()) if OUT.exists() else []
    OUT.write_text(json.dumps(old + rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
