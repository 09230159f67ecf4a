"""Profile of the training modes: model passes per batch and their cost, against one ERM training step.

    python -m bench.passes                      # quick config: batch 128, 64 px, small ResNet width 16
    python -m bench.passes --tiny               # seconds: batch 16, 32 px, width 8

What bounds SCAAT and consistency training is how many times they run the model: per batch, SCAAT
runs a saliency pass (forward + backward to the input), ``scaat.steps`` PGD steps (each a forward +
backward to the input) and two training forwards (clean and adversarial) with one backward through both;
the consistency precompute runs a Grad-CAM pass on x, ``consistency.steps`` PGD steps and a Grad-CAM
pass on x_adv, once per sample and round. This script counts those passes with hooks on the model
(forward hooks on the root module; a full backward hook on the first conv counts each backward that
reaches the input side: Grad-CAM's backward stops at its layer and is not counted) and times each
mode's batch, interleaved with the ERM step it is divided by.
Writes bench/results/passes.json (passes_tiny.json with --tiny) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable

import numpy as np
import torch

from bench._timing import fix_threads, machine, markdown_table, measure, publish
from pipelines.common import make_model, to_tensors
from pipelines.config import ROOT, Config, load_config
from pipelines.train import batch_loss
from xai_core.data.synthetic import BiasedShapes
from xai_core.objectives import explanation_consistency


class PassCounter:
    """Counts forwards of the root module and backwards that reach its first layer (any autograd path)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.forwards = 0
        self.backwards = 0
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        self._hooks = [model.register_forward_hook(self._fwd), first.register_full_backward_hook(self._bwd)]

    def _fwd(self, *_: object) -> None:
        self.forwards += 1

    def _bwd(self, *_: object) -> None:
        self.backwards += 1

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def steps_for(cfg: Config, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Callable[[], None]]:
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    gen = torch.Generator().manual_seed(0)
    c = cfg.consistency

    def train_step(mode: str) -> Callable[[], None]:
        def step() -> None:
            model.train()
            loss, _, _ = batch_loss(model, batch, mode, cfg, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def precompute() -> None:
        model.eval()
        explanation_consistency(model, batch["image"], batch["label"].long(), mask_source=c.mask_source,
                                tau=c.tau, eps=c.eps, step_size=c.step_size, steps=c.steps,
                                similarity=c.similarity, layers=[model.cam_layer], generator=gen)

    return {"erm": train_step("erm"), "scaat": train_step("scaat"), "consistency_precompute": precompute}


def actor_step(cfg: Config, model: torch.nn.Module, raw: dict[str, np.ndarray],
               root: str) -> tuple[Callable[[], object], torch.nn.Module]:
    """The precompute stage's whole per-batch call (``ConsistencyActor.__call__``: uint8 batch in, tensors,
    the same consistency computation, numpy columns out) with ``model``'s weights; returns it and the
    actor's own model (loaded from a checkpoint of ``model``, as the stage does)."""
    from pipelines.common import state_bytes
    from pipelines.precompute import ConsistencyActor, actor_kwargs
    from pipelines.storage import Storage

    store = Storage(root)
    store.write_bytes(state_bytes({"model": model.state_dict()}), "model.pt")
    actor = ConsistencyActor(**actor_kwargs(cfg, store, "model.pt"), threads=torch.get_num_threads())
    return (lambda: actor(raw)), actor.model


def expected_passes(cfg: Config) -> dict[str, tuple[int, int]]:
    """(forwards, backwards reaching the first conv) per batch from the algorithms (METHODS §5a, §5b).

    SCAAT's loss backward runs through both training forwards (two graphs: counted twice); Grad-CAM's
    backward stops at its layer and never reaches the first conv (only the PGD steps do)."""
    s, c = cfg.scaat.steps, cfg.consistency.steps
    return {"erm": (1, 1), "scaat": (1 + s + 2, 1 + s + 2), "consistency_precompute": (1 + c + 1, c),
            "precompute_actor_call": (1 + c + 1, c)}


def run(cfg: Config, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    d = cfg.data
    a = BiasedShapes(n=cfg.train.batch_size, seed=0, size=d.size, num_classes=d.num_classes, split="train").arrays()
    batch = to_tensors({"image": a["image"], "label": a["label"]})
    model = make_model(cfg)
    fns = steps_for(cfg, model, batch)
    raw = {"idx": np.arange(len(a["label"]), dtype=np.int64), **a}
    with tempfile.TemporaryDirectory(prefix="bench_passes_") as tmp:
        fns["precompute_actor_call"], actor_model = actor_step(cfg, model, raw, tmp)
        rows, counts = [], {}
        for name, fn in fns.items():  # count once, outside timing
            pc = PassCounter(actor_model if name == "precompute_actor_call" else model)
            fn()
            pc.close()
            counts[name] = (pc.forwards, pc.backwards)
        res = measure(fns, repeats, warmup=1)
    unit = res["erm"]["median_s"]
    for name, (fw, bw) in counts.items():
        exp = expected_passes(cfg)[name]
        rows.append({"mode": name, "forwards": fw, "backwards": bw, "expected": list(exp),
                     "median_s": res[name]["median_s"], "x_erm_step": res[name]["median_s"] / unit,
                     "times_s": res[name]["times_s"]})
    return rows


def table(rows: list[dict]) -> str:
    return markdown_table(["per batch", "forwards", "backwards", "expected (fw, bw)", "median s", "x ERM step"],
                          [[r["mode"], str(r["forwards"]), str(r["backwards"]), str(tuple(r["expected"])),
                            f"{r['median_s']:.3f}", f"{r['x_erm_step']:.2f}"] for r in rows])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="batch 16, 32 px, width 8, 1 repeat")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    fix_threads(1 if args.tiny else args.threads)
    over = ["data.size=32", "model.width=8", "train.batch_size=16"] if args.tiny else []
    cfg = load_config(ROOT / "configs/quick.yaml", over)
    rows = run(cfg, args.repeats or (1 if args.tiny else 5))
    bad = [r["mode"] for r in rows if (r["forwards"], r["backwards"]) != tuple(r["expected"])]
    payload = {"benchmark": "passes", "tiny": args.tiny, "machine": machine(),
               "command": "python -m bench.passes " + " ".join(argv if argv is not None else sys.argv[1:]),
               "config": {"scaat_steps": cfg.scaat.steps, "consistency_steps": cfg.consistency.steps,
                          "batch": cfg.train.batch_size, "size": cfg.data.size, "width": cfg.model.width},
               "rows": rows, "counts_match_algorithm": not bad,
               "mean_erm_s": float(np.median([r["median_s"] for r in rows if r["mode"] == "erm"]))}
    if bad:
        print(f"pass counts differ from the algorithms' for: {', '.join(bad)}", file=sys.stderr)
    return publish(payload, "passes_tiny" if args.tiny else "passes", args.out_dir, table(rows))


if __name__ == "__main__":
    main()
