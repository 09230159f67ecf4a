"""Training cost per epoch: ERM, consistency (METHODS §5a) and SCAAT (§5b) with the pipeline's own batch code.

    python -m bench.training                    # quick config: 4000 images 64 px, batch 128, width 16, 2 threads
    python -m bench.training --tiny             # seconds: 128 images 32 px, width 8, batch 32, 1 thread
    python -m bench.training --repeats 3 --threads 1

Each mode runs in a fresh child process (``python -m bench.training --child --mode M``), so that its peak
memory is its own. A child builds the quick config's training images (BiasedShapes, uint8, as ingest), the
model (``pipelines.common.make_model``) and Adam as ``pipelines.train.train_loop`` does, and times epochs of
train_loop's inner loop without Ray: ``to_tensors`` -> ``batch_loss(model, batch, mode, cfg, generator)``
-> zero_grad / backward / step, plus its per-batch metric updates, on batches of ``train.batch_size`` in a
seeded random order. A few batches warm up first (untimed). ``torch.set_num_threads(--threads)``.

Consistency = the precompute pass over the same images (``pipelines.precompute.ConsistencyActor.__call__``
in-process, with --threads threads, its model refreshed from the one being trained) + ``normalise_weights``
over the whole set, then an epoch with ``batch["w"]`` (weighted cross-entropy). The pipeline runs one
precompute per ``consistency.round_epochs`` epochs: the "epoch + precompute" row adds
precompute / round_epochs. Repeats alternate precompute and epoch; medians.

Peak memory = the child's VmHWM (Linux: the peak RSS of its own process image; ``ru_maxrss`` is kept
too, but it inherits the parent's peak across exec). Targets (the issue): consistency / ERM <= 3x and
SCAAT / ERM <= 3x (seconds per epoch). Writes bench/results/training.json (training_tiny.json with
--tiny) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench._timing import fix_threads, machine, markdown_table, measure, publish
from pipelines.config import ROOT, Config, load_config

MODES = ("erm", "consistency", "scaat")
TARGET = 3.0  # seconds per epoch of consistency and of SCAAT over ERM, at most
CKPT = "train/bench_model.pt"


def bench_config(config: str, n: int | None, size: int | None, width: int | None, batch: int | None) -> Config:
    """The pipeline config, resized (None: keep the config's value); precompute batch = training batch
    when the batch is overridden."""
    over = []
    if n is not None:
        over.append(f"data.n_train={n}")
    if size is not None:
        over.append(f"data.size={size}")
    if width is not None:
        over.append(f"model.width={width}")
    if batch is not None:
        over += [f"train.batch_size={batch}", f"precompute.batch_size={batch}"]
    return load_config(config, over)


def peak_rss_mib() -> dict[str, float | None]:
    """{"vmhwm_mib": this process image's peak RSS (Linux /proc; None elsewhere), "ru_maxrss_mib"}."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out: dict[str, float | None] = {"vmhwm_mib": None,
                                    "ru_maxrss_mib": peak / 2**20 if sys.platform == "darwin" else peak / 1024}
    try:
        with open("/proc/self/status") as f:
            out["vmhwm_mib"] = next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        pass
    return out


class Trainer:
    """train_loop's model, optimiser and inner loop (CPU, no AMP, one worker) over in-memory arrays."""

    def __init__(self, cfg: Config, mode: str, seed: int = 0) -> None:
        from pipelines.common import make_model
        from xai_core.data.synthetic import BiasedShapes

        d = cfg.data
        kw: dict[str, Any] = {"size": d.size, "num_classes": d.num_classes}
        if d.contrast is not None:
            kw["contrast"] = d.contrast
        arrays = BiasedShapes(n=d.n_train, seed=d.seed, split="train", bias=d.bias, **kw).arrays()
        self.arrays = {"idx": np.arange(d.n_train, dtype=np.int64), **arrays}
        self.cfg, self.mode, self.n = cfg, mode, d.n_train
        torch.manual_seed(seed)
        self.device = torch.device("cpu")
        self.model = make_model(cfg).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.gen = torch.Generator(device=self.device).manual_seed(seed * 1000)
        self.rng = np.random.default_rng(seed)
        self.w: np.ndarray | None = None  # consistency weights by idx, set by a precompute pass
        self.last: dict[str, float] = {}

    def batches(self, shuffle: bool = True, batch_size: int | None = None) -> list[np.ndarray]:
        """Index arrays of one epoch's batches (seeded random order, as the training shard's shuffle)."""
        bs = batch_size or self.cfg.train.batch_size
        order = self.rng.permutation(self.n) if shuffle else np.arange(self.n)
        return [order[i:i + bs] for i in range(0, self.n, bs)]

    def raw(self, idx: np.ndarray, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
        """A numpy batch as the training shard yields it (consistency: with the weight column)."""
        raw = {k: self.arrays[k][idx] for k in columns}
        if self.mode == "consistency" and self.w is not None:
            raw["w"] = self.w[raw["idx"]]  # precompute._add_weights
        return raw

    def epoch(self, limit: int | None = None) -> int:
        """train_loop's inner loop over one epoch (or its first ``limit`` batches); returns images seen."""
        from pipelines.common import to_tensors
        from pipelines.train import batch_loss

        self.model.train()
        tot, correct, loss_sum, extra_sum = 0, 0, 0.0, {}
        for idx in self.batches()[:limit]:
            batch = to_tensors(self.raw(idx, ("idx", "image", "label")), self.device)
            loss, logits, extra = batch_loss(self.model, batch, self.mode, self.cfg, self.gen)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            n = len(batch["label"])
            tot += n
            correct += int((logits.argmax(1) == batch["label"]).sum())
            loss_sum += float(loss) * n
            for k, v in extra.items():
                extra_sum[k] = extra_sum.get(k, 0.0) + v * n
        self.last = {"loss": loss_sum / max(tot, 1), "train_acc": correct / max(tot, 1),
                     **{k: v / max(tot, 1) for k, v in extra_sum.items()}}
        return tot


class Precompute:
    """The precompute stage's work in-process: ConsistencyActor.__call__ over every training image with the
    current weights, then normalise_weights over the whole set (precompute.run_round)."""

    def __init__(self, trainer: Trainer, threads: int, root: str) -> None:
        from pipelines.common import state_bytes
        from pipelines.precompute import ConsistencyActor, actor_kwargs
        from pipelines.storage import Storage

        store = Storage(root)
        store.write_bytes(state_bytes({"model": trainer.model.state_dict()}), CKPT)
        self.actor = ConsistencyActor(**actor_kwargs(trainer.cfg, store, CKPT), threads=threads)
        self.trainer = trainer

    def __call__(self, limit: int | None = None) -> int:
        from xai_core.objectives import normalise_weights

        t = self.trainer
        self.actor.model.load_state_dict(t.model.state_dict())  # the round's checkpoint
        v = np.zeros(t.n, np.float32)
        seen = 0
        for idx in t.batches(shuffle=False, batch_size=t.cfg.precompute.batch_size)[:limit]:
            out = self.actor(t.raw(idx, ("idx", "image", "label", "group", "mask")))
            v[out["idx"]] = out["v"]
            seen += len(out["idx"])
        c = t.cfg.consistency
        t.w = normalise_weights(torch.from_numpy(v), power=c.power, w_min=c.w_min).numpy()
        return seen


def run_mode(cfg: Config, mode: str, threads: int, repeats: int, warmup_batches: int) -> dict:
    """One mode in this process: warm-up batches, then ``repeats`` timed epochs (consistency: precompute
    pass + epoch each); returns medians, per-repeat times and this process's peak memory."""
    fix_threads(threads)
    trainer = Trainer(cfg, mode)
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        fns: dict[str, Callable[[], object]] = {}
        if mode == "consistency":
            pre = Precompute(trainer, threads, tmp)
            pre(limit=warmup_batches)
            fns["precompute"] = pre
        trainer.epoch(limit=warmup_batches)
        fns["epoch"] = trainer.epoch
        res = measure(fns, repeats, warmup=0)
    out = {"mode": mode, "threads": torch.get_num_threads(), "images": trainer.n, "repeats": repeats,
           "warmup_batches": warmup_batches, "epoch_s": res["epoch"]["median_s"],
           "epoch_times_s": res["epoch"]["times_s"], "last_epoch": trainer.last, **peak_rss_mib()}
    if "precompute" in res:
        out.update(precompute_s=res["precompute"]["median_s"], precompute_times_s=res["precompute"]["times_s"])
    return out


def _child_args(args: argparse.Namespace, mode: str, out: str) -> list[str]:
    argv = ["--child", "--mode", mode, "--child-out", out, "--config", args.config, "--threads", str(args.threads),
            "--repeats", str(args.repeats), "--warmup-batches", str(args.warmup_batches)]
    for flag, value in (("--n", args.n), ("--size", args.size), ("--width", args.width),
                        ("--batch-size", args.batch_size)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def run_children(args: argparse.Namespace, modes: list[str]) -> dict[str, dict]:
    """Each mode in a fresh ``python -m bench.training --child`` process, one after the other."""
    results = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        for mode in modes:
            out = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, "-m", "bench.training", *_child_args(args, mode, str(out))]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0 or not out.exists():
                raise RuntimeError(f"bench.training child for mode {mode} failed (rc {proc.returncode}):\n"
                                   f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
            results[mode] = json.loads(out.read_text())
            r = results[mode]
            extra = f", precompute {r['precompute_s']:.2f}s" if "precompute_s" in r else ""
            print(f"  {mode:12s} epoch {r['epoch_s']:.2f}s{extra}  peak RSS {r['vmhwm_mib'] or r['ru_maxrss_mib']:.0f}"
                  f" MiB", flush=True)
    return results


def rows_from(results: dict[str, dict], cfg: Config) -> list[dict]:
    """Table rows: seconds per epoch, images/s, over ERM, the targets."""
    n = cfg.data.n_train
    erm = results.get("erm", {}).get("epoch_s")
    rows = []

    def add(key: str, label: str, seconds: float, mode: str, target: bool) -> None:
        r = results[mode]
        ratio = seconds / erm if erm else None
        rows.append({"key": key, "name": label, "seconds": seconds, "images_per_s": n / seconds,
                     "over_erm": ratio, "target": f"<= {TARGET}x ERM" if target else None,
                     "met": (ratio <= TARGET) if (target and ratio is not None) else None,
                     "peak_rss_mib": r["vmhwm_mib"] if r["vmhwm_mib"] is not None else r["ru_maxrss_mib"],
                     "ru_maxrss_mib": r["ru_maxrss_mib"], "mode": mode})

    if "erm" in results:
        add("erm", "ERM epoch", results["erm"]["epoch_s"], "erm", False)
    if "consistency" in results:
        c = results["consistency"]
        per = c["precompute_s"] / cfg.consistency.round_epochs
        add("consistency", f"consistency epoch + precompute / round_epochs ({cfg.consistency.round_epochs})",
            c["epoch_s"] + per, "consistency", True)
        add("consistency_epoch_only", "consistency epoch, weighted loss only", c["epoch_s"], "consistency", False)
        add("consistency_precompute", "consistency precompute pass (in-process)", c["precompute_s"],
            "consistency", False)
    if "scaat" in results:
        add("scaat", "SCAAT epoch", results["scaat"]["epoch_s"], "scaat", True)
    return rows


def table(rows: list[dict]) -> str:
    header = ["row", "s / epoch", "images/s", "x ERM", "target", "met", "child peak RSS MiB"]
    body = [[r["name"], f"{r['seconds']:.2f}", f"{r['images_per_s']:.1f}",
             "-" if r["over_erm"] is None else f"{r['over_erm']:.2f}", r["target"] or "-",
             "-" if r["met"] is None else ("yes" if r["met"] else "**no**"), f"{r['peak_rss_mib']:.0f}"]
            for r in rows]
    return markdown_table(header, body)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="128 images 32 px, width 8, batch 32, 1 thread: seconds")
    ap.add_argument("--config", default=str(ROOT / "configs/quick.yaml"), help="pipeline config (default quick)")
    ap.add_argument("--n", type=int, default=None, help="training images (default: the config's)")
    ap.add_argument("--size", type=int, default=None, help="image side in px (default: the config's)")
    ap.add_argument("--width", type=int, default=None, help="small_resnet width (default: the config's)")
    ap.add_argument("--batch-size", type=int, default=None, help="training and precompute batch size")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default 2; --tiny 1: robust on a busy machine)")
    ap.add_argument("--repeats", type=int, default=None, help="timed epochs per mode, medians (default 1)")
    ap.add_argument("--warmup-batches", type=int, default=None, help="untimed batches first (default 3; tiny 1)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of: erm, consistency, scaat")
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny:
        args.n, args.size = args.n or 128, args.size or 32
        args.width, args.batch_size = args.width or 8, args.batch_size or 32
    args.repeats = args.repeats or 1
    args.threads = args.threads or (1 if args.tiny else 2)
    args.warmup_batches = args.warmup_batches if args.warmup_batches is not None else (1 if args.tiny else 3)
    cfg = bench_config(args.config, args.n, args.size, args.width, args.batch_size)
    if args.child:
        if not args.mode or not args.child_out:
            raise SystemExit("--child needs --mode and --child-out")
        res = run_mode(cfg, args.mode, args.threads, args.repeats, args.warmup_batches)
        Path(args.child_out).write_text(json.dumps(res, default=float))
        return res
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}: use {', '.join(MODES)}")
    print(f"training: {cfg.data.n_train} images {cfg.data.size}px, batch {cfg.train.batch_size}, {cfg.model.arch} "
          f"width {cfg.model.width}, {args.threads} threads, repeats={args.repeats}, warm-up {args.warmup_batches} "
          f"batches, scaat steps {cfg.scaat.steps}, consistency steps {cfg.consistency.steps}", flush=True)
    results = run_children(args, modes)
    rows = rows_from(results, cfg)
    fix_threads(args.threads)  # machine() reports the children's thread count
    payload = {"benchmark": "training", "tiny": args.tiny, "machine": machine(),
               "command": "python -m bench.training " + " ".join(argv if argv is not None else sys.argv[1:]),
               "config": {"file": Path(args.config).name, "n": cfg.data.n_train, "size": cfg.data.size,
                          "batch_size": cfg.train.batch_size, "precompute_batch_size": cfg.precompute.batch_size,
                          "arch": cfg.model.arch, "width": cfg.model.width, "lr": cfg.train.lr,
                          "consistency": cfg.consistency.model_dump(mode="json"),
                          "scaat": cfg.scaat.model_dump(mode="json")},
               "threads": args.threads, "repeats": args.repeats, "warmup_batches": args.warmup_batches,
               "rows": rows, "children": results,
               "notes": ["seconds per epoch: train_loop's inner loop in-process (no Ray), CPU, one worker",
                         "precompute: ConsistencyActor.__call__ in-process with --threads threads (the stage "
                         "runs an actor pool of 1-thread actors), plus normalise_weights",
                         "peak RSS: the child's VmHWM (ru_maxrss_mib kept: it inherits the parent's peak)",
                         f"targets: consistency (epoch + precompute / round_epochs) and SCAAT <= {TARGET}x ERM"]}
    return publish(payload, "training_tiny" if args.tiny else "training", args.out_dir, table(rows))


if __name__ == "__main__":
    main()
