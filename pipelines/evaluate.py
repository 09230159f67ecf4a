"""Stage evaluate: a Ray Data actor stage computing, for every trained model and every configured method,
maps and per-sample metrics on the test split (accuracy, PGD robustness, localisation, faithfulness,
sparseness) and the D-WSOL split (METHODS §3a); dataset-level checks (adversarial detection §3b,
model randomisation §6) run on the driver. Output: evaluate/{test,dwsol}/*.parquet, summary.json.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from pipelines import ingest
from pipelines import storage as st
from pipelines.common import pool_map, split_key
from xai_core._tensor import seeded_generator
from xai_core.targets import PairMaps, label_pairs

log = logging.getLogger("xai.evaluate")
STAGE = "evaluate"


# Ablations and controls, evaluated like methods (METHODS §2, §3): name -> (xai_core method, options). "tif
# layers" are TIF's layers (model.layers, else the model's default_layers); a variant of tif at TIF's alpha
# reads alphas["tif"], the others fix their own.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "tif_fusion_only": ("tif", {"alpha": 0.0}),  # no interception: multi-layer fusion alone
    "tif_one_layer": ("tif", {"layers": "last"}),  # interception alone: the last of TIF's layers
    "tif_uniform": ("tif", {"weights": "uniform"}),  # neurons summed without Grad-CAM weights
    "tif_base_fused": ("tif", {"alpha": 0.0, "weights": "uniform"}),  # TIF's base itself at the same layers
    "gradcam_fused": ("gradcam", {"layers": "tif"}),  # fusion control: Grad-CAM over TIF's layers, summed
    "haf_one_sided": ("haf", {"preserve": "one_sided"}),  # METHODS §3's second reading of preservation
}
DETECTION_METHODS = ("haf", "haf_one_sided", "gradcam", "saliency")  # maps the detector learns from (§3b)
# the per-method metric columns of the test split (accuracy-only rows hold them as NaN)
METRIC_COLUMNS = ("pointing_game", "energy_pointing_game", "pxap", "iou", "gini", "deletion_auc", "insertion_auc",
                  "deletion_auc_random", "wsss_miou")  # in the order the method rows hold them
# xai_core methods whose maps are rescaled per map (or per layer) unless normalize=False
NORMALIZED = ("tif", "haf", "gradcam", "gradcam_pp", "layercam", "gradcam_thresholded")
# Methods that need only the model's input -> output function (no layer hooks): they, PGD and the perturbation
# curves run on the actor's inference copy of each model (xai_core.models.inference_copy: the same function up
# to float rounding, faster per pass); layer methods (CAMs, TIF, HAF) run on the model as loaded.
INPUT_GRADIENT = ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad")


def base_method(method: str) -> str:
    """The xai_core method behind an evaluated method or variant."""
    return VARIANTS[method][0] if method in VARIANTS else method


def alpha_of(alphas: dict[str, float], method: str) -> float:
    """The alpha a method is evaluated at: its xai_core method's pick (a variant that fixes its own alpha
    overrides it in method_options); 0.0 for a method without one (it is not read)."""
    return float(alphas.get(base_method(method), 0.0))


def method_options(cfg: Any, method: str, alpha: float, seed: int = 0, model: torch.nn.Module | None = None,
                   raw: bool = False, tuned: dict[str, float] | None = None) -> dict[str, Any]:
    """explain() options of a method or variant under this config (one place for evaluate, sweep and report).

    ``raw``: no per-map normalisation (D-WSOL compares one image's maps for several classes on one scale).
    ``model`` resolves the layers of variants over TIF's layers (when model.layers is not configured).
    ``tuned``: the sweep's picks (``tuned_settings``); a HAF reading's "<method>:steps" and "<method>:lr"
    replace evaluate.haf_steps and evaluate.haf_lr."""
    tuned = tuned or {}
    e = cfg.evaluate
    layers = cfg.model.layers
    base, extra = VARIANTS.get(method, (method, {}))
    extra = dict(extra)
    if extra.get("layers") in ("tif", "last"):
        tif_layers = list(layers or getattr(model, "default_layers", None) or [])
        if not tif_layers:
            raise ValueError(f"method {method!r} needs TIF's layers: set model.layers or use a model with "
                             "default_layers")
        extra["layers"] = tif_layers[-1:] if extra["layers"] == "last" else tif_layers
    if base == "integrated_gradients":
        opts: dict[str, Any] = {"n_steps": e.ig_steps}  # passes sized by the library's default
    elif base == "smoothgrad":
        opts = {"n_samples": e.smoothgrad_samples, "generator": torch.Generator().manual_seed(seed)}
    elif base == "tif":
        opts = {"base": e.tif_base, "alpha": alpha, **({"layers": layers} if layers else {})}
    elif base == "gradcam_thresholded":
        opts = {"alpha": alpha}
    elif base == "haf":
        opts = {"steps": int(tuned.get(f"{method}:steps", e.haf_steps)),
                "lr": float(tuned.get(f"{method}:lr", e.haf_lr)), **({"layers": layers[-2:]} if layers else {})}
    else:
        opts = {}
    opts.update(extra)
    if raw and base in NORMALIZED:
        opts["normalize"] = False
    return opts


def explain_fn(cfg: Any, method: str, alphas: dict[str, float], seed: int = 0, raw: bool = False) -> Any:
    """fn(model, x, target) -> maps of a method or variant at its alpha (``alpha_of(alphas, method)``) and, for
    HAF, the steps and lr the sweep calibrated (``alphas`` holds every setting the sweep tuned)."""
    from xai_core.attribution import explain

    alpha = alpha_of(alphas, method)

    def fn(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Maps [B,H,W]; for a multi-label target (multi-hot [B,K] or Pairs), one per (image, class) pair."""
        opts = method_options(cfg, method, alpha, seed, model=model, raw=raw, tuned=alphas)
        res = explain(model, x, target, method=base_method(method), **opts)
        return (res.maps if isinstance(res, PairMaps) else res).detach()
    return fn


def draw_absent(idx: np.ndarray, label_a: np.ndarray, label_b: np.ndarray, background: np.ndarray,
                num_classes: int) -> np.ndarray:
    """D-WSOL's absent class per image, drawn (seeded by the image's idx) among the classes present neither
    as an object nor as the background (class k's background family is k, METHODS §7); with too few classes
    for that, among those that are not an object."""
    out = np.empty(len(idx), np.int64)
    for i, (n, a, b, bg) in enumerate(zip(idx, label_a, label_b, background)):
        free = [c for c in range(num_classes) if c not in (a, b, bg)] or [c for c in range(num_classes)
                                                                         if c not in (a, b)]
        out[i] = np.random.default_rng([int(n), 2020]).choice(free)
    return out


def draw_generator(first_idx: int, model_key: str, purpose: str) -> torch.Generator:
    """The generator of one evaluate batch (named by its first sample), model and purpose ("pgd_8",
    "deletion_random"): a model's drawn columns (PGD start, the random deletion order that every method's
    row shares) do not change with the other models or methods evaluated beside it, nor with their order."""
    return seeded_generator(first_idx, model_key, purpose)


class EvalActor:
    """Ray Data class UDF: loads every model once; one output row per (sample, model, method)."""

    def __init__(self, cfg_json: dict, storage: list, models: dict[str, str], alphas: dict[str, float], split: str,
                 threads: int = 1, attribute: list[int] | None = None) -> None:
        from pipelines.common import load_model, pick_device
        from pipelines.config import Config
        from xai_core.models import inference_copy

        torch.set_num_threads(max(1, threads))
        self.cfg = Config.model_validate(cfg_json)
        self.device = pick_device(self.cfg.train.device)
        store = st.Storage(*storage)
        self.models = {k: load_model(self.cfg, store.read_bytes(p), p).to(self.device) for k, p in models.items()}
        self.fast = {k: inference_copy(m) for k, m in self.models.items()}  # see INPUT_GRADIENT
        self.alphas, self.split = alphas, split
        # idx of the test images that get PGD and attribution rows; the others get clean accuracy only
        self.attribute = None if attribute is None else np.asarray(attribute, dtype=np.int64)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.common import pause_point

        pause_point(f"evaluate-{self.split}-batch{int(batch['idx'][0])}")
        t0 = time.perf_counter()
        with torch.enable_grad():
            out = self._dwsol(batch) if self.split == "dwsol" else self._test(batch)
        print(f"[evaluate {self.split}] {len(batch['idx'])} images x {len(self.models)} models x "
              f"{len(self.cfg.evaluate.methods)} methods in {time.perf_counter() - t0:.0f} s", flush=True)
        return out

    def _for(self, key: str, method: str) -> torch.nn.Module:
        """The copy of model ``key`` that ``method`` runs on (INPUT_GRADIENT methods: the inference copy)."""
        return self.fast[key] if base_method(method) in INPUT_GRADIENT else self.models[key]

    def _accuracy(self, model: torch.nn.Module, x: torch.Tensor, t: dict[str, torch.Tensor]) -> dict:
        """Clean correctness ([B], top-1 among the labels on multi-label data) and, on multi-label data, the
        logits and label sets (score_k, label_k columns: the report's mAP)."""
        from pipelines.train import top1_correct

        with torch.no_grad():
            logits = model(x)
        cols = {"correct": top1_correct(logits.argmax(1), t).float()}
        if "labels" in t:
            cols.update({f"score_{k}": logits[:, k] for k in range(logits.shape[1])})
            cols.update({f"label_{k}": t["labels"][:, k].float() for k in range(logits.shape[1])})
        return cols

    def _rows(self, batch: dict, key: str, method: str, cols: dict[str, torch.Tensor]) -> dict:
        n = len(batch["idx"])
        mode, seed = key.rsplit("_s", 1)
        return {"idx": batch["idx"], "group": batch.get("group", np.full(n, -1)),
                "label": batch["label"], "background": batch.get("background", np.full(n, -1)),
                "model": np.array([key] * n), "mode": np.array([mode] * n), "seed": np.full(n, int(seed)),
                "method": np.array([method] * n),
                **{k: v.detach().float().cpu().numpy() for k, v in cols.items()}}

    def _test(self, batch: dict) -> dict:
        from pipelines.common import to_tensors
        from xai_core.metrics import (
            Curve,
            energy_pointing_game,
            gini,
            localisation_iou,
            perturbation_curve_set,
            pointing_game,
            pxap,
            wsss_miou,
        )
        from xai_core.perturb import pgd

        e = self.cfg.evaluate
        attr = np.ones(len(batch["idx"]), bool) if self.attribute is None else np.isin(batch["idx"], self.attribute)
        out: list[dict] = []
        rest_rows: list[dict] = []
        if not attr.all():  # clean accuracy (forwards only) for the images beyond the attribution subset
            rest = {k: v[~attr] for k, v in batch.items()}
            r = to_tensors(rest, self.device)
            xr, yr = r["image"], r["label"].long()
            nan = torch.full((len(yr),), float("nan"))
            for key, model in self.models.items():
                cols = {**self._accuracy(model, xr, r), **{f"robust_acc_{round(eps * 255)}": nan for eps in e.pgd_eps},
                        **{c: nan for c in METRIC_COLUMNS}}
                rows = self._rows(rest, key, "none", cols)
                for c in ("deletion_curve", "insertion_curve"):  # every block has the same columns
                    rows[c] = np.full((len(yr), e.deletion_steps + 1), np.nan, np.float32)
                rest_rows.append(rows)
        if not attr.any():
            return _concat(rest_rows)
        batch = {k: v[attr] for k, v in batch.items()}
        t = to_tensors(batch, self.device)
        x, y, mask = t["image"], t["label"].long(), t["mask"].bool()
        first = int(batch["idx"][0])
        # multi-label data: every method explains each (image, class) pair, against that class's own mask;
        # the pair rows carry the class explained as "label" (xai_core.targets.label_pairs order)
        pairs = label_pairs(t["labels"], len(y)) if "labels" in t else None
        xp, yp = (x, y) if pairs is None else (pairs.rows(x), pairs.target.to(self.device))
        maskp = mask if pairs is None else pairs.class_masks(t["class_masks"].bool())
        pair_batch = batch if pairs is None else {**{k: v[pairs.image.numpy()] for k, v in batch.items()},
                                                  "label": pairs.target.numpy()}
        target = y if pairs is None else pairs  # explain takes the pairs themselves: the rows above, by construction
        for key, model in self.models.items():
            acc_cols = self._accuracy(model, x, t)
            for eps in e.pgd_eps:  # multi-label data: the attack is on the first object's class
                xa = pgd(self.fast[key], x, y, eps=eps, step_size=eps / 4, steps=e.pgd_steps,
                         generator=draw_generator(first, key, f"pgd_{round(eps * 255)}"))
                acc_cols[f"robust_acc_{round(eps * 255)}"] = self._accuracy(model, xa, t)["correct"]
            out.append(self._rows(batch, key, "none", acc_cols))
            correct = acc_cols["correct"] if pairs is None else acc_cols["correct"][pairs.image.to(self.device)]
            methods = methods_of(self.cfg, key)
            maps = {m: explain_fn(self.cfg, m, self.alphas)(self._for(key, m), x, target) for m in methods}
            # every curve of the model in one set: the points all curves share (x, its blurred copy) run once,
            # and the random-order deletion curve does not depend on the map, so one serves every method
            series: dict = {(m, mode): Curve(mode, maps[m]) for m in methods for mode in ("deletion", "insertion")}
            if methods:
                series["random"] = Curve("deletion", order="random",
                                         generator=draw_generator(first, key, "deletion_random"))
            curves, frac = perturbation_curve_set(self.fast[key], xp, yp, series, n_steps=e.deletion_steps)
            auc = {k: torch.trapezoid(c, frac, dim=1) for k, c in curves.items()}
            for method in methods:
                m = maps[method]
                cols = {"pointing_game": pointing_game(m, maskp),
                        "energy_pointing_game": energy_pointing_game(m, maskp),
                        "pxap": pxap(m, maskp), "iou": localisation_iou(m, maskp), "gini": gini(m),
                        "deletion_auc": auc[(method, "deletion")], "insertion_auc": auc[(method, "insertion")],
                        "deletion_auc_random": auc["random"], "wsss_miou": wsss_miou(m, maskp), "correct": correct}
                if pairs is not None:  # TorchRay's per-class pointing game: strictly within the tolerance
                    cols["pointing_game_strict"] = pointing_game(m, maskp, strict=True)
                if "difficult" in t and pairs is not None:  # VOC: the class's objects are all "difficult"
                    cols["difficult"] = t["difficult"][pairs.image.to(self.device), pairs.target.to(self.device)]
                if "subset" in t and pairs is not None:  # TorchRay's difficult subset (data.difficult_subset)
                    cols["difficult_subset"] = t["subset"][pairs.image.to(self.device), pairs.target.to(self.device)]
                rows = self._rows(pair_batch, key, method, cols)
                if e.wsol_boxes and pairs is None:
                    rows["box_iou_levels"] = self._box_levels(m, t["box"])
                rows["deletion_curve"] = curves[(method, "deletion")].float().cpu().numpy()
                rows["insertion_curve"] = curves[(method, "insertion")].float().cpu().numpy()
                out.append(rows)
        return _concat(out + rest_rows)

    @staticmethod
    def _box_levels(maps: torch.Tensor, boxes: torch.Tensor) -> np.ndarray:
        """box_iou_levels [B,LEVELS] of the images with a box (x0 >= 0), NaN rows for the others."""
        from xai_core.metrics import box_iou_levels
        from xai_core.metrics.boxes import LEVELS

        out = np.full((len(maps), LEVELS), np.nan, np.float32)
        has = (boxes >= 0).all(1)
        if bool(has.any()):
            out[has.cpu().numpy()] = box_iou_levels(maps[has], boxes[has]).float().cpu().numpy()
        return out

    def _dwsol(self, batch: dict) -> dict:
        from pipelines.common import to_tensors
        from xai_core.metrics.dwsol import dwsol

        t = to_tensors(batch, self.device)
        n = len(batch["idx"])
        absent = draw_absent(batch["idx"], batch["label"], batch["label2"], batch.get("background", np.full(n, -1)),
                             self.cfg.data.num_classes)
        out = []
        for key in self.models:
            for method in methods_of(self.cfg, key):
                # raw maps: the three query classes of an image on one scale (METHODS §3)
                fn = explain_fn(self.cfg, method, self.alphas, raw=True)
                res = dwsol(self._for(key, method), t["image"], t["label"].long(), t["label2"].long(), t["mask"].bool(),
                            t["mask2"].bool(), fn, absent=torch.from_numpy(absent).to(self.device))
                rows = self._rows(batch, key, method, {k: v for k, v in res.items()})
                rows["absent"] = absent
                out.append(rows)
        return _concat(out)


def _concat(parts: list[dict]) -> dict[str, np.ndarray]:
    keys = list(dict.fromkeys(k for p in parts for k in p))
    n = [len(p["idx"]) for p in parts]
    out = {}
    for k in keys:
        chunks = []
        for p, m in zip(parts, n):
            if k in p:
                chunks.append(np.asarray(p[k]))
            else:
                ref = next(q[k] for q in parts if k in q)
                chunks.append(np.full((m, *np.asarray(ref).shape[1:]), np.nan, np.float32))
        out[k] = np.concatenate(chunks)
    return out


def methods_of(cfg: Any, key: str) -> list[str]:
    """The methods evaluated on model ``key`` (<mode>_s<seed>, random_s<seed>): evaluate.mode_methods[mode]
    where given (in evaluate.methods' order), else every method; the random-weight copies are ERM's baseline."""
    mode = split_key(key)[0]
    only = cfg.evaluate.mode_methods.get("erm" if mode == "random" else mode)
    return [m for m in cfg.evaluate.methods if only is None or m in only]


def config_hash(cfg: Any, alphas: dict[str, float]) -> str:
    from pipelines.train import trained_sections

    return cfg.section_hash(*trained_sections(cfg), "evaluate") + "".join(
        f"-{m}{alphas[m]:.4f}" for m in sorted(alphas))


def run(cfg: Any, store: st.Storage, ingest_manifest: dict, train_manifest: dict, alphas: dict[str, float],
        tracker: Any, stage_run: str, plan: Any, force: bool = False) -> tuple[dict, bool]:

    h = config_hash(cfg, alphas)
    if not force and (m := st.committed(store, STAGE, h)):
        return m, False
    _begin_keeping_shards(store, h, force)
    models = evaluated_checkpoints(cfg, train_manifest)
    evaluated = {**models, **(random_models(cfg, store) if cfg.evaluate.random_baseline else {})}
    files, rows = {}, {}
    e = cfg.evaluate
    n_test_rows = ingest_manifest["rows"]["test"]
    n_attr = min(e.n_test, n_test_rows)
    n_acc = n_test_rows if e.n_accuracy == 0 else min(max(e.n_accuracy, n_attr), n_test_rows)
    head = ingest.read_split_numpy(store, ingest_manifest, "test", limit=n_attr,
                                   columns=["idx"] + (["labels"] if cfg.data.multilabel else []))
    attribute = [int(i) for i in head["idx"]]
    # method rows per attribution image: one, or (multi-label data) one per class the image holds
    per_image = dict(zip(attribute, head["labels"].sum(1).tolist() if cfg.data.multilabel else [1] * n_attr))
    splits = [("test", n_acc, n_attr)] + ([("dwsol", min(e.n_dwsol, ingest_manifest["rows"]["dwsol"]), None)]
                                          if e.n_dwsol and "dwsol" in ingest_manifest["files"] else [])
    size = -(-e.shard_images // e.batch_size) * e.batch_size  # whole batches: the same batches as unsharded
    for split, n, n_methods in splits:
        files[split], rows[split] = [], 0
        split_ds = None  # read once (lazily: not at all when every shard is committed), cut per shard
        for lo in range(0, n, size):
            hi = min(lo + size, n)
            shard = f"{STAGE}/{split}/{lo:06d}"
            if split == "test":  # accuracy rows for every image, method rows for the attribution subset
                method_rows = sum(per_image.get(i, 0) for i in range(lo, min(hi, n_methods)))
                expected = sum((hi - lo) + method_rows * len(methods_of(cfg, k)) for k in evaluated)
            else:
                expected = (hi - lo) * sum(len(methods_of(cfg, k)) for k in evaluated)
            if (done := st.committed(store, shard, h)) is not None:
                log.info("evaluate: %s images %d-%d already committed, skipped", split, lo, hi - 1)
            else:
                st.begin(store, shard)
                if split_ds is None:
                    split_ds = ingest.read_split(store, ingest_manifest, split)  # rows in idx order (in_order)
                src = split_ds.limit(hi) if lo == 0 else split_ds.filter(expr=f"idx >= {lo} and idx < {hi}")
                out = pool_map(src, EvalActor, {
                    "cfg_json": cfg.model_dump(mode="json"), "models": evaluated, "alphas": alphas, "split": split,
                    "storage": store.args(), "attribute": attribute if split == "test" else None},
                    rows=hi - lo, plan=plan, batch_size=e.batch_size)
                written = ingest.write_split(store, f"{STAGE}/{split}", f"{lo:06d}", out, 1)
                got = sum(int(r) for r in _rows_of(store, written))
                if got != expected:  # a retried batch must not be counted twice, nor one lost
                    raise RuntimeError(f"evaluate {split} images {lo}-{hi - 1}: wrote {got} rows, expected {expected}")
                done = st.commit(store, shard, h, files=written, rows=got)
                log.info("evaluate: %s images %d-%d committed (%d of %d)", split, lo, hi - 1, hi, n)
            files[split] += done["files"]
            rows[split] += done["rows"]
    summary = dataset_checks(cfg, store, ingest_manifest, models, alphas, h)
    store.write_json(summary, STAGE, "summary.json")
    manifest = st.commit(store, STAGE, h, files=files, rows=rows, alphas=alphas, models=sorted(evaluated),
                         images={"accuracy": n_acc, "attribution": n_attr})
    table = summarise(store, manifest)
    for key, metrics in table.items():
        tracker.log_metrics(stage_run, {f"{key}/{k}": v for k, v in metrics.items()})
    tracker.log_metrics(stage_run, _flat_summary(summary))
    return manifest, True


def _begin_keeping_shards(store: st.Storage, h: str, force: bool) -> None:
    """Start the stage again, keeping the split shards committed under this config hash (unless forced):
    a killed evaluate resumes after its last committed shard. Everything else of the stage is removed."""
    import pyarrow.fs as pafs

    if force or not store.exists(STAGE):
        st.begin(store, STAGE)
        return
    if store.exists(STAGE, st.MANIFEST):
        store.fs.delete_file(store.path(STAGE, st.MANIFEST))
    for info in store.fs.get_file_info(pafs.FileSelector(store.path(STAGE))):
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        if info.type == pafs.FileType.Directory and name in ("test", "dwsol", CHECKS):
            for shard in store.fs.get_file_info(pafs.FileSelector(info.path)):
                lo = shard.path.rstrip("/").rsplit("/", 1)[-1]
                if shard.type != pafs.FileType.Directory or st.committed(store, f"{STAGE}/{name}/{lo}", h) is None:
                    (store.fs.delete_dir if shard.type == pafs.FileType.Directory else store.fs.delete_file)(shard.path)
        elif info.type == pafs.FileType.Directory:
            store.fs.delete_dir(info.path)
        else:
            store.fs.delete_file(info.path)


def evaluated_checkpoints(cfg: Any, train_manifest: dict) -> dict[str, str]:
    """{model: checkpoint path} of the checkpoint ``evaluate.checkpoint`` names (train.select_checkpoints)."""
    which = cfg.evaluate.checkpoint
    if which == "last":
        return dict(train_manifest["files"])
    missing = [k for k in train_manifest["files"] if which not in train_manifest.get("checkpoints", {}).get(k, {})]
    if missing:
        raise ValueError(f"evaluate.checkpoint={which!r}: the train manifest has no such checkpoint for "
                         f"{missing} (trained before checkpoint selection existed: rerun with --force train)")
    return {k: train_manifest["checkpoints"][k][which]["path"] for k in train_manifest["files"]}


def random_models(cfg: Any, store: st.Storage) -> dict[str, str]:
    """The sanity baseline: per training seed, the architecture with fresh (untrained) weights drawn with
    that seed, evaluated beside the trained models ("random_s<seed>": if it localises as well, say so)."""
    from pipelines.common import make_model, state_bytes

    paths = {}
    for seed in cfg.train.seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = make_model(cfg, pretrained=False).state_dict()
        key = f"random_s{seed}"
        paths[key] = f"{STAGE}/models/{key}.pt"
        store.write_bytes(state_bytes({"model": state}), paths[key])
    return paths


def _rows_of(store: st.Storage, files: list[str]) -> list[int]:
    import pyarrow.parquet as pq

    return [pq.ParquetFile(store.fs.open_input_file(store.path(f))).metadata.num_rows for f in files]


def _flat_summary(summary: dict) -> dict[str, float]:
    out = {}
    for key, val in summary.items():
        for k, v in val.items():
            if isinstance(v, (int, float)):
                out[f"{key}/{k}"] = float(v)
    return out


CHECKS = "checks"  # evaluate/checks/<model>: one committed unit per model's dataset checks


def dataset_checks(cfg: Any, store: st.Storage, ingest_manifest: dict, models: dict[str, str],
                   alphas: dict[str, float], h: str | None = None) -> dict:
    """Adversarial detection AUROC (§3b) from HAF, Grad-CAM and saliency maps; model randomisation (§6). With
    the stage's hash ``h``, each model's result is committed on its own (evaluate/checks/<model>): a killed
    evaluate does not redo the models already checked (in the paper run they took 41 min after the shards)."""
    from pipelines.common import load_model, to_tensors
    from xai_core.metrics import model_randomisation
    from xai_core.metrics.detection import detection_cv

    e = cfg.evaluate
    out: dict[str, dict] = {}
    n = max(e.detection_images, e.randomisation_images)
    seg = segmented_splits(store, ingest_manifest, e.wsss_images) if e.wsss_images else None
    if n == 0 and not seg:
        return out
    data = to_tensors(ingest.read_split_numpy(store, ingest_manifest, "test", limit=n)) if n else {}
    checked = {k: p for k, p in models.items() if e.check_modes is None or split_key(k)[0] in e.check_modes}
    for i, (key, path) in enumerate(checked.items()):
        unit = f"{STAGE}/{CHECKS}/{key}"
        if h is not None and (done := st.committed(store, unit, h)) is not None:
            out[key] = done["result"]
            continue
        t0 = time.perf_counter()
        model = load_model(cfg, store.read_bytes(path), path)
        res: dict[str, float] = {}
        if e.detection_images:
            # METHODS §3b, 5-fold cross-validated: only images right when clean and flipped by the attack
            x, y = data["image"][: e.detection_images], data["label"][: e.detection_images].long()
            for eps in e.pgd_eps:
                tag = f"eps{round(eps * 255)}"
                for method in [m for m in DETECTION_METHODS if m in methods_of(cfg, key)]:
                    d = detection_cv(model, x, y, explain_fn(cfg, method, alphas), eps=eps,
                                     steps=e.pgd_steps, folds=5, seed=0)
                    for k in ("auroc", "low", "high"):
                        res[f"detection_{k}_{method}_{tag}"] = float(d[k])
                    res[f"detection_images_{tag}"] = float(d["n_images"])
                    res[f"attack_success_{tag}"] = float(d["attack_success"])
        if e.randomisation_images:
            x, y = data["image"][: e.randomisation_images], data["label"][: e.randomisation_images].long()
            for method in [m for m in ("gradcam", "saliency", "tif", "haf") if m in methods_of(cfg, key)]:
                constant: dict[str, torch.Tensor] = {}
                corr = model_randomisation(model, x, y, explain_fn(cfg, method, alphas), constant=constant)
                # a constant map has no ranks: the Spearman mean is over the images where both maps vary, and
                # the share of constant maps (a mask collapsed to empty) is reported beside it
                res[f"randomisation_{method}_trained_constant"] = float(constant["trained"].float().mean())
                for layer, rho in corr.items():
                    res[f"randomisation_{method}_{layer}"] = float(torch.nanmean(rho))
                    res[f"randomisation_{method}_{layer}_constant"] = float(constant[layer].float().mean())
        if seg:
            res.update(wsss_scores(cfg, model, seg, methods_of(cfg, key), alphas))
        out[key] = res
        if h is not None:
            st.begin(store, unit)
            st.commit(store, unit, h, result=res)
        print(f"[evaluate checks] {key} ({i + 1}/{len(checked)}): detection on {e.detection_images} images, "
              f"randomisation on {e.randomisation_images} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def segmented_splits(store: st.Storage, manifest: dict, n: int) -> dict[str, dict[str, torch.Tensor]] | None:
    """The first ``n`` images of the val and test splits that carry a segmentation mask (a ``seg`` pixel
    other than ignore: VOC's SegmentationClass), as tensors (image, labels, seg); None when the data have no
    ``seg`` column or either split has no segmented image (a warning says which)."""
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401 - registers the tensor extension type

    from pipelines.common import to_tensors
    from xai_core.metrics.segmentation import IGNORE

    out = {}
    for split in ("val", "test"):
        parts, got = [], 0
        for f in manifest["files"][split]:
            if got >= n:
                break
            if not {"seg", "labels"} <= set(pq.read_schema(store.path(f), filesystem=store.fs).names):
                log.warning("evaluate.wsss_images=%d: the %s split has no segmentation masks (seg): WSSS left out",
                            n, split)
                return None
            t = pq.read_table(store.path(f), filesystem=store.fs, columns=["image", "labels", "seg"])
            cols = {c: t.column(c).combine_chunks().to_numpy() for c in t.column_names}
            keep = np.flatnonzero((cols["seg"] != IGNORE).reshape(len(cols["seg"]), -1).any(1))[: n - got]
            parts.append({c: v[keep] for c, v in cols.items()})
            got += len(keep)
        if not got:
            log.warning("evaluate.wsss_images=%d: no %s image has a segmentation mask: WSSS left out", n, split)
            return None
        out[split] = to_tensors({c: np.concatenate([p[c] for p in parts]) for c in ("image", "labels", "seg")})
    return out


def wsss_scores(cfg: Any, model: torch.nn.Module, data: dict[str, dict[str, torch.Tensor]], methods: list[str],
                alphas: dict[str, float]) -> dict[str, float]:
    """WSSS per method (xai_core.metrics.segmentation): pseudo-labels from the maps of each image's labels at
    every threshold of evaluate.wsss_thresholds; the background threshold of the best validation mIoU, and the
    test mIoU at it with a bootstrap 95% CI over the test images."""
    from xai_core.metrics.segmentation import (
        best_background_threshold,
        miou,
        miou_interval,
        segmentation_counts,
        wsss_labels,
    )
    from xai_core.targets import label_pairs

    e, k = cfg.evaluate, cfg.data.num_classes + 1
    thr = list(e.wsss_thresholds)
    dev = next(model.parameters()).device
    res: dict[str, float] = {f"wsss_images_{s}": float(len(d["seg"])) for s, d in data.items()}
    for method in methods:
        fn = explain_fn(cfg, method, alphas)
        counts = {}
        for split, d in data.items():
            parts = []
            for lo in range(0, len(d["seg"]), e.batch_size):
                x = d["image"][lo:lo + e.batch_size].to(dev)
                pairs = label_pairs(d["labels"][lo:lo + e.batch_size], len(x))
                maps = fn(model, x, pairs).detach()
                lab = wsss_labels(maps, pairs.image, pairs.target, len(x), thr)
                gt = d["seg"][lo:lo + e.batch_size].to(dev)
                parts.append(torch.stack([torch.stack(segmentation_counts(lab[t], gt, k)) for t in range(len(thr))]))
            counts[split] = torch.cat(parts, 2).cpu()  # [T, 2 (inter, union), N, C]
        best, curve = best_background_threshold(counts["val"][:, 0], counts["val"][:, 1], thr)
        t = thr.index(best)
        inter, union = counts["test"][t, 0], counts["test"][t, 1]
        low, high = miou_interval(inter, union, seed=0)
        res.update({f"wsss_bg_threshold_{method}": best, f"wsss_val_miou_{method}": curve[t],
                    f"wsss_miou_{method}": miou(inter, union)[0], f"wsss_miou_low_{method}": low,
                    f"wsss_miou_high_{method}": high})
    return res


def summarise(store: st.Storage, manifest: dict) -> dict[str, dict[str, float]]:
    """Means per (model, method) of every metric column: {"<model>/<method>": {metric: mean}}."""
    import pandas as pd

    frames = []
    for split in manifest["files"]:
        df = read_frame(store, manifest, split)
        frames.append(df.assign(split=split))
    df = pd.concat(frames, ignore_index=True)
    keys = ("idx", "group", "label", "background", "model", "mode", "seed", "method", "split")
    num = [c for c in df.columns if c not in keys and df[c].dtype.kind in "fi"]
    agg = df.groupby(["model", "method"])[num].mean()
    return {f"{m}/{meth}": {k: float(v) for k, v in row.items() if v == v} for (m, meth), row in agg.iterrows()}


def read_frame(store: st.Storage, manifest: dict, split: str, curves: bool = False) -> Any:
    """A split of the evaluate output as a pandas DataFrame (curve columns dropped unless asked)."""
    import pandas as pd
    import pyarrow.parquet as pq

    frames = []
    for f in manifest["files"][split]:
        t = pq.read_table(store.path(f), filesystem=store.fs)
        keep = [c for c in t.column_names if curves or not c.endswith("_curve")]
        frames.append(t.select(keep).to_pandas())
    return pd.concat(frames, ignore_index=True)
