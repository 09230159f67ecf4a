"""Evaluate throughput: the (image x method x model) rows one evaluate actor computes per second.

    python -m bench.evaluate                  # paper config's evaluate settings, one batch (50 images)
    python -m bench.evaluate --tiny           # smoke config, one batch of 16 images at 32 px, 1 repeat
    python -m bench.evaluate --config configs/quick.yaml --repeats 3
    python -m bench.evaluate --checkpoint artifacts/paper/train/erm_s0/model.pt   # a trained model
    python -m bench.evaluate --against d782e21 --checkpoint artifacts/paper/train/erm_s0/model.pt

``--against REV`` times the ``all`` call of REV's evaluate (a git worktree of REV) and of this tree side by
side, each side a fresh process per round, the order alternated (bench/_evaluate_side.py): the same batch,
checkpoint, alphas and evaluate settings (this tree's config, set in REV's default config; a key REV lacks is
an error unless this run leaves it at this tree's default), and it reports the rounds, the pair ratios and
how far the two sides' values are apart.

The timed call is the stage's own UDF, ``pipelines.evaluate.EvalActor``, built and called in this process
with 1 torch thread (an actor of 1 CPU) on one batch of the config's test split as ingest writes it, with one
untrained model of the config's architecture: every method of ``evaluate.methods`` together (the stage's
work per batch and model), each method alone, and no method (the clean accuracy and PGD rows that every
call computes). A method's own cost is its call less the no-method call. Throughput = images x methods x
models / seconds of the call with every method. Untrained weights: HAF and the maps run the same passes as after
training, but the curves do not: an image whose pixels two methods rank alike is perturbed once
(``perturbation_curve_set``), and untrained models give more such ties (flat maps), so this bench
overstates that saving (docs/BENCHMARKS.md: 1.28x untrained, 1.04x on a trained model); ``--checkpoint``
times a trained model instead.

Issue 19 asks evaluate for at least 2x this throughput, measured before and after. Writes
bench/results/evaluate.json (evaluate_tiny.json with --tiny; *_against.json with --against) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench._timing import fix_threads, machine, markdown_table, measure, publish
from pipelines.config import ROOT, Config, load_config

CKPT = "train/bench_untrained.pt"
ALPHAS = {"tif": 0.5, "gradcam_thresholded": 0.5}  # the bench's alphas unless --alphas
# the config keys that decide an evaluate call's work, set alike on both sides of --against
SAME_WORK = {"data": ("size", "num_classes"), "model": ("arch", "width"),
             "evaluate": ("methods", "batch_size", "tif_base", "haf_steps", "haf_lr", "ig_steps",
                          "smoothgrad_samples", "deletion_steps", "pgd_eps", "pgd_steps", "wsol_boxes")}
SIDE = Path(__file__).resolve().parent / "_evaluate_side.py"


def prepare(cfg: Config, root: str, checkpoint: str | None = None, ckpt: str = CKPT
            ) -> tuple[list, dict[str, np.ndarray]]:
    """A local store with the checkpoint at ``ckpt`` (the file ``checkpoint``, or untrained weights of the
    config's architecture, seed 0), and the first test batch in ingest's arrays."""
    import torch

    from pipelines import ingest
    from pipelines.common import load_model, make_model, state_bytes
    from pipelines.storage import Storage

    store = Storage(root)
    if checkpoint is None:
        torch.manual_seed(0)
        store.write_bytes(state_bytes({"model": make_model(cfg).state_dict(), "epoch": 0}), ckpt)
    else:
        raw = Path(checkpoint).read_bytes()
        load_model(cfg, raw, checkpoint)  # the config's architecture must take it: a clear error here
        store.write_bytes(raw, ckpt)
    test = ingest._synthetic_splits(cfg)["test"]
    n = min(cfg.evaluate.batch_size, len(test["label"]))
    batch = {"idx": np.arange(n, dtype=np.int64), **{k: v[:n] for k, v in test.items()}}
    return store.args(), batch


def only(cfg: Config, methods: list[str]) -> dict:
    """The config (as EvalActor takes it) with ``evaluate.methods`` = ``methods`` and no per-mode subsets
    (``mode_methods`` names subsets of the methods per training mode: not for the bench's one model)."""
    e = cfg.evaluate.model_dump(mode="json") | {"methods": list(methods), "mode_methods": {}}
    return Config.model_validate(cfg.model_dump(mode="json") | {"evaluate": e}).model_dump(mode="json")


def run(cfg: Config, repeats: int, root: str, checkpoint: str | None = None,
        alphas: dict[str, float] | None = None) -> dict:
    from pipelines.evaluate import EvalActor

    storage, batch = prepare(cfg, root, checkpoint)
    methods = list(cfg.evaluate.methods)
    alphas = dict(ALPHAS if alphas is None else alphas)

    def actor(ms: list[str]) -> EvalActor:
        return EvalActor(only(cfg, ms), storage, {"untrained_s0": CKPT}, alphas, "test", threads=1)

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


def _side_spec(cfg: Config, alphas: dict[str, float]) -> dict:
    return {"config": {sec: {k: getattr(getattr(cfg, sec), k) for k in keys} for sec, keys in SAME_WORK.items()},
            "alphas": alphas, "model_key": "bench_s0"}


def _run_side(tree: Path, work: Path, repeats: int, tag: str) -> dict[str, np.ndarray]:
    """One fresh process of bench/_evaluate_side.py on ``tree``; its output npz as arrays."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    p = subprocess.run([sys.executable, str(SIDE), str(tree), str(work), str(repeats), tag], env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"the evaluate side of {tree} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    with np.load(work / f"out_{tag}.npz") as z:
        return {k: z[k] for k in z.files}


def value_gaps(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """{column: {method: max |after - before|}} over the value columns both sides wrote (NaN where both are
    NaN counts as equal; NaN on one side only is inf); the rows must be the same (sample, method) rows."""
    if not np.array_equal(before["col_method"], after["col_method"]) or \
            not np.array_equal(before["col_idx"], after["col_idx"]):
        raise SystemExit("the two sides wrote different rows (idx, method): not the same work")
    methods = before["col_method"]
    out: dict[str, dict[str, float]] = {}
    for c in sorted(set(before) & set(after)):
        if not c.startswith("col_") or c in ("col_method", "col_idx", "col_seed", "col_group", "col_label",
                                            "col_background"):
            continue
        a, b = before[c].astype(np.float64), after[c].astype(np.float64)
        d = np.abs(a - b)
        d = np.where(np.isnan(a) & np.isnan(b), 0.0, np.where(np.isnan(a) | np.isnan(b), np.inf, d))
        per = {str(m): float(d[methods == m].max()) for m in np.unique(methods)}
        per = {m: v for m, v in per.items() if v > 0}
        if per:
            out[c[4:]] = per
    return out


def against(cfg: Config, rev: str, rounds: int, root: str, checkpoint: str | None,
            alphas: dict[str, float]) -> dict:
    """REV's evaluate ``all`` call beside this tree's: ``rounds`` rounds, a fresh process per side and round
    (one untimed call, one timed), the order alternated; the same batch, checkpoint, alphas and settings."""
    import torch

    from pipelines.config import load_config as load

    work = Path(root)
    storage, batch = prepare(cfg, root, checkpoint, ckpt="model.pt")
    np.savez(work / "batch.npz", **batch)
    spec = _side_spec(cfg, alphas)
    (work / "side.json").write_text(json.dumps(spec, default=float))
    defaults = load(None)
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                         capture_output=True, text=True)
    if sha.returncode != 0:
        raise SystemExit(f"--against {rev!r}: not a commit of the git checkout {ROOT}: {sha.stderr.strip()}")
    tree = work / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), sha.stdout.strip()],
                   check=True, capture_output=True)
    try:
        times: dict[str, list[float]] = {"before": [], "after": []}
        last: dict[str, dict[str, np.ndarray]] = {}
        for r in range(rounds):
            for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                out = _run_side(tree if side == "before" else ROOT, work, 1, side)
                times[side].append(float(out["times"][0]))
                last[side] = out
                print(f"round {r + 1}/{rounds} {side}: {times[side][-1]:.2f} s", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    lacking = [str(k) for k in last["before"]["missing"]]
    changed = [k for k in lacking
               if getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1])
               != getattr(getattr(defaults, k.split(".")[0]), k.split(".")[1])]
    if changed:
        raise SystemExit(f"{rev} has no config key {', '.join(changed)}, which this run sets away from its "
                         "default: the two sides would not do the same work")
    n = len(batch["idx"])
    methods = list(cfg.evaluate.methods)
    pairs = [b / a for b, a in zip(times["before"], times["after"])]
    return {"images": n, "size": cfg.data.size, "models": 1, "methods": methods, "against": rev,
            "against_commit": sha.stdout.strip(), "checkpoint": checkpoint or "untrained (seed 0)",
            "alphas": alphas, "rounds": rounds, "times_s": times,
            "median_s": {k: statistics.median(v) for k, v in times.items()}, "pair_ratios": pairs,
            "median_ratio": statistics.median(pairs),
            "rows_per_s": {k: n * len(methods) / statistics.median(v) for k, v in times.items()},
            "keys_before_lacks_at_default": lacking, "value_gaps": value_gaps(last["before"], last["after"]),
            "torch_threads": torch.get_num_threads()}


def _alphas(text: str | None) -> dict[str, float]:
    """--alphas: JSON text, or a JSON file (a sweep manifest's "tuned" picks, or a plain mapping)."""
    if text is None:
        return dict(ALPHAS)
    p = Path(text)
    try:
        got = json.loads(p.read_text()) if p.is_file() else json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--alphas {text!r}: neither a JSON file nor JSON text: {e}") from e
    got = got.get("tuned", got) if isinstance(got, dict) else got
    if not isinstance(got, dict) or not all(isinstance(v, (int, float)) for v in got.values()):
        raise SystemExit(f"--alphas {text!r}: expected a mapping of method (or method:knob) to a number")
    return {str(k): float(v) for k, v in got.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="default configs/paper.yaml (--tiny: configs/smoke.yaml)")
    ap.add_argument("--tiny", action="store_true", help="smoke config, 1 repeat")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds, medians (default 3; --tiny 1)")
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    ap.add_argument("--checkpoint", default=None,
                    help="a trained checkpoint of the config's architecture (default: untrained, seed 0)")
    ap.add_argument("--alphas", default=None, help="JSON text or file (e.g. a sweep manifest's tuned picks: "
                    "artifacts/paper/sweep/_manifest.json); default " + json.dumps(ALPHAS))
    ap.add_argument("--against", default=None, metavar="REV",
                    help="time REV's evaluate beside this tree's (rounds: --repeats, default 3)")
    args = ap.parse_args(argv)
    config = args.config or str(ROOT / ("configs/smoke.yaml" if args.tiny else "configs/paper.yaml"))
    repeats = args.repeats or (1 if args.tiny else 3)
    fix_threads(1)
    cfg = load_config(config)
    alphas = _alphas(args.alphas)
    name = "evaluate_tiny" if args.tiny else "evaluate"
    command = "python -m bench.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.against is not None:
        with tempfile.TemporaryDirectory(prefix="bench_evaluate_") as root:
            r = against(cfg, args.against, repeats, root, args.checkpoint, alphas)
        rows = [[f"round {i + 1}", f"{b:.2f}", f"{a:.2f}", f"{b / a:.2f}x"]
                for i, (b, a) in enumerate(zip(r["times_s"]["before"], r["times_s"]["after"]))]
        rows.append(["median", f"{r['median_s']['before']:.2f}", f"{r['median_s']['after']:.2f}",
                     f"{r['median_ratio']:.2f}x (pairs)"])
        table = markdown_table(["all-methods call (s)", f"before ({args.against})", "after (this tree)",
                                "before / after"], rows)
        gaps = {c: max(v.values()) for c, v in r["value_gaps"].items()}
        table += (f"\n\n{r['images']} images at {r['size']} px x {len(r['methods'])} methods x 1 model "
                  f"({r['checkpoint']}): {r['rows_per_s']['before']:.2f} -> {r['rows_per_s']['after']:.2f} "
                  f"rows per second. Largest |after - before| per column: "
                  + (", ".join(f"{c} {v:.2g}" for c, v in gaps.items()) or "none (equal)"))
        payload = {"benchmark": "evaluate_against", "machine": machine(), "config": config, "command": command,
                   **r}
        return publish(payload, name + "_against", args.out_dir, table)
    with tempfile.TemporaryDirectory(prefix="bench_evaluate_") as root:
        r = run(cfg, repeats, root, args.checkpoint, alphas)
    per_image = {k: v / r["images"] for k, v in r["seconds"].items()}
    table = markdown_table(
        ["call (one batch, 1 model)", "s per batch", "s per image", "own s per image"],
        [[k, f"{r['seconds'][k]:.2f}", f"{per_image[k]:.3f}",
          "" if k in ("all", "none") else f"{r['method_s'][k] / r['images']:.3f}"]
         for k in ["all", "none", *r["methods"]]])
    table += (f"\n\n{r['images']} images at {r['size']} px x {len(r['methods'])} methods x 1 model: "
              f"**{r['rows_per_s']:.2f} (image x method x model) rows per second**")
    payload: dict[str, Any] = {
        "benchmark": "evaluate", "machine": machine(), "config": config, "repeats": repeats, "command": command,
        "checkpoint": args.checkpoint or "untrained (seed 0)", "alphas": alphas, **r}
    return publish(payload, name, args.out_dir, table)


if __name__ == "__main__":
    main()
