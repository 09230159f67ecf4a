"""Stage precompute (METHODS §5a): a Ray Data actor pool; each actor loads the checkpoint once and writes,
per training sample, the background mask, the adversarial image, both Grad-CAM maps, E and v.

The weights w = normalise(v) need the whole dataset, so the driver computes them from the v column and
writes them (idx, E, v, w, group) beside the shards before committing the round.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from pipelines import ingest
from pipelines import storage as st
from pipelines.common import model_hash, pool_map

log = logging.getLogger("xai.precompute")
STAGE = "precompute"


class ConsistencyActor:
    """Ray Data class UDF: consistency of Grad-CAM under a background-only PGD (METHODS §4, §5a)."""

    def __init__(self, cfg_json: dict, storage: list, ckpt_path: str, threads: int = 1) -> None:
        from pipelines.common import load_model, pick_device
        from pipelines.config import Config

        torch.set_num_threads(max(1, threads))
        self.cfg = Config.model_validate(cfg_json)
        self.device = pick_device(self.cfg.train.device)
        store = st.Storage(*storage)
        self.model = load_model(self.cfg, store.read_bytes(ckpt_path), ckpt_path).to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.common import pause_point, to_tensors
        from xai_core.objectives import explanation_consistency

        pause_point(f"precompute-batch{int(batch['idx'][0])}")
        c = self.cfg.consistency
        t = to_tensors(batch, self.device)
        # Seeded by the batch's first sample: a retried batch gives the same bytes (exactly-once output).
        gen = torch.Generator(device=self.device).manual_seed(int(batch["idx"][0]) + 7919)
        with torch.enable_grad():
            res = explanation_consistency(
                self.model, t["image"], t["label"].long(), mask_source=c.mask_source,
                object_mask=t["mask"].bool() if c.mask_source == "ground_truth" else None, tau=c.tau,
                eps=c.eps, step_size=c.step_size, steps=c.steps, similarity=c.similarity,
                layers=[self.model.cam_layer] if getattr(self.model, "cam_layer", None) else None,
                generator=gen, degenerate=c.degenerate)
        out = {k: batch[k] for k in ("idx", "image", "label", "group", "mask")}
        out["background"] = res.background[:, 0].cpu().numpy().astype(bool)
        out["x_adv"] = (res.x_adv * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        out["cam"] = res.cam.detach().cpu().numpy().astype(np.float16)
        out["cam_adv"] = res.cam_adv.detach().cpu().numpy().astype(np.float16)
        out["E"] = res.E.detach().cpu().numpy().astype(np.float32)
        out["v"] = res.v.detach().cpu().numpy().astype(np.float32)
        out["degenerate"] = res.degenerate.cpu().numpy().astype(bool)
        return out


def config_hash(cfg: Any, seed: int, rnd: int) -> str:
    return model_hash(cfg, "consistency", seed) + f"-r{rnd}"


def actor_kwargs(cfg: Any, store: st.Storage, ckpt_path: str) -> dict:
    """ConsistencyActor's constructor arguments (all but ``threads``, which the actor pool's plan sets)."""
    return {"cfg_json": cfg.model_dump(mode="json"), "storage": store.args(), "ckpt_path": ckpt_path}


def consistency_map(src: Any, cfg: Any, store: st.Storage, ckpt_path: str, plan: Any, rows: int,
                    udf: type | None = None) -> Any:
    """The stage's Ray Data map: ``src`` (``rows`` rows) -> per-sample precompute rows on an actor pool of
    ``plan.actors``, one block per batch of ``precompute.batch_size`` (measured in docs/BENCHMARKS.md, stages)."""
    return pool_map(src, udf or ConsistencyActor, actor_kwargs(cfg, store, ckpt_path), rows=rows, plan=plan,
                    batch_size=cfg.precompute.batch_size)


def write_samples(cfg: Any, store: st.Storage, ingest_manifest: dict, ckpt_path: str, plan: Any,
                  stage: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """The round's Ray Data part: read the training split, map it on the actor pool, write the per-sample
    rows under ``<stage>/samples/``; returns (files written, their idx/E/v/group columns), checked to hold
    every training sample once. Nothing is committed here (``run_round`` does that)."""
    n = ingest_manifest["rows"]["train"]
    src = ingest.read_split(store, ingest_manifest, "train").select_columns(
        ["idx", "image", "label", "group", "mask"])
    out = consistency_map(src, cfg, store, ckpt_path, plan, n)
    files = ingest.write_split(store, stage, "samples", out, max(1, -(-n // cfg.data.rows_per_shard)))
    cols = ingest.read_split_numpy(store, {"files": {"samples": files}, "stage": stage}, "samples",
                                   columns=["idx", "E", "v", "group", "degenerate"])
    if len(cols["idx"]) != n or len(np.unique(cols["idx"])) != n:
        raise RuntimeError(f"precompute {stage}: wrote {len(cols['idx'])} rows "
                           f"({len(np.unique(cols['idx']))} distinct) for {n} training samples")
    return files, cols


def run_round(cfg: Any, store: st.Storage, ingest_manifest: dict, ckpt_path: str, seed: int, rnd: int,
              tracker: Any, parent_run: str, plan: Any, force: bool = False) -> tuple[dict, np.ndarray]:
    """One precompute round with the checkpoint at ckpt_path; returns (manifest, w indexed by idx)."""

    from xai_core.objectives import degenerate_weights

    stage = f"{STAGE}/s{seed}_round{rnd}"
    h = config_hash(cfg, seed, rnd)
    manifest = None if force else st.committed(store, stage, h)
    if manifest is not None and manifest.get("kept_without"):  # restored by pipelines.keep without its samples
        manifest = None
    if manifest is None:
        st.begin(store, stage)
        files, cols = write_samples(cfg, store, ingest_manifest, ckpt_path, plan, stage)
        n = ingest_manifest["rows"]["train"]
        c = cfg.consistency
        w = degenerate_weights(torch.from_numpy(cols["v"]), torch.from_numpy(cols["degenerate"]), c.degenerate,
                               power=c.power, w_min=c.w_min, w_max=c.w_max).numpy()
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"idx": cols["idx"], "E": cols["E"], "v": cols["v"], "w": w.astype(np.float32),
                          "group": cols["group"], "degenerate": cols["degenerate"]})
        with store.fs.open_output_stream(store.path(stage, "weights.parquet")) as f:
            pq.write_table(table, f)
        stats = _round_stats(cols["E"], w, cols["group"], cols["degenerate"])
        manifest = st.commit(store, stage, h, files={"samples": files, "weights": [f"{stage}/weights.parquet"]},
                             rows={"samples": n}, checkpoint=ckpt_path, stats=stats)
        run_id = tracker.find_or_create(f"precompute/s{seed}/round{rnd}",
                                        {"xai.stage": "precompute", "xai.round": f"s{seed}-r{rnd}"},
                                        parent_id=parent_run)
        tracker.log_metrics(run_id, stats, step=rnd)
        tracker.log_metrics(parent_run, {f"precompute_{k}": v for k, v in stats.items()}, step=rnd)
        tracker.finish(run_id)
        log.info("precompute s%d round %d: %s", seed, rnd, stats)
    weights = ingest.read_split_numpy(store, manifest, "weights", columns=["idx", "w"])
    w_by_idx = np.zeros(int(weights["idx"].max()) + 1, np.float32)
    w_by_idx[weights["idx"]] = weights["w"]
    return manifest, w_by_idx


def _round_stats(E: np.ndarray, w: np.ndarray, group: np.ndarray, degenerate: np.ndarray | None = None
                 ) -> dict[str, float]:
    """Does reweighting find the bias-conflicting samples? Mean E and w per group, top-10% share; the samples
    with a flat map (degenerate): how many, how many of them conflicting, and their share of all weight."""
    stats = {"E_mean": float(E.mean()), "w_max": float(w.max())}
    if degenerate is not None:
        deg = np.asarray(degenerate, bool)
        stats.update(degenerate=int(deg.sum()), degenerate_weight_share=float(w[deg].sum() / max(w.sum(), 1e-12)))
        if (group >= 0).all():
            stats["degenerate_conflicting"] = int((deg & (group == 1)).sum())
    conf = group == 1
    if conf.any() and (~conf).any():
        stats.update(E_aligned=float(E[~conf].mean()), E_conflicting=float(E[conf].mean()),
                     w_aligned=float(w[~conf].mean()), w_conflicting=float(w[conf].mean()))
        stats["w_ratio_conflicting_aligned"] = stats["w_conflicting"] / max(stats["w_aligned"], 1e-12)
        top = np.argsort(-w, kind="stable")[: max(1, len(w) // 10)]
        stats["top10_conflicting_share"] = float(conf[top].mean())
    return stats


def weighted_input(store: st.Storage, manifest: dict, w_by_idx: np.ndarray, limit_bytes: int) -> Any:
    """The training rows of a round with their weight column, as ``fit`` reads them (``ingest.fit_input``)."""
    return ingest.fit_input(store, manifest, "samples", ["idx", "image", "label"], limit_bytes, weights=w_by_idx)
