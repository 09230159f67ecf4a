"""Stage sweep: Ray Tune over TIF's alpha (METHODS §2), objective = localisation on the validation split;
HAF's learning rate and steps from its objective curve (METHODS §3, ``calibrate_haf``); optionally over
training knobs (each trial a TorchTrainer under Tune, ASHA stops poor trials early).

Runs inside full.py, or on its own against a finished run's outputs (the entry point drives it; this stage
never imports the entry point):
    python pipelines/full.py --config configs/quick.yaml --only sweep --alphas 0 0.25 0.5 0.75
"""

from __future__ import annotations

import logging
from typing import Any

from pipelines import ingest
from pipelines import storage as st
from pipelines.common import KNOB_TRIAL_CPUS, THRESHOLDED, shard_limit, trainer_input

log = logging.getLogger("xai.sweep")
STAGE = "sweep"
SWEEP_METRICS = ("pxap", "iou", "energy_pointing_game", "pointing_game", "gini", "deletion_auc")


def alpha_trial(config: dict) -> None:
    """One Tune trial: one thresholded method at one alpha on the validation split; reports the sweep's
    localisation scores (PxAP, IoU, EPG, pointing game), Gini and deletion AUC: the alpha curves."""
    import ray.tune
    import torch

    from pipelines.common import load_model, to_tensors
    from pipelines.config import Config
    from pipelines.evaluate import method_options
    from xai_core.attribution import explain
    from xai_core.metrics import deletion_auc, energy_pointing_game, gini, localisation_iou, pointing_game, pxap

    torch.set_num_threads(1)
    cfg = Config.model_validate(config["cfg"])
    store = st.Storage(*config["storage"])
    model = load_model(cfg, store.read_bytes(config["model_path"]), config["model_path"])
    data = to_tensors(ingest.read_split_numpy(store, config["ingest"], "val", limit=cfg.sweep.n_val))
    x, y, mask = data["image"], data["label"].long(), data["mask"].bool()
    sums: dict[str, float] = {}
    for i in range(0, len(y), 64):
        maps = explain(model, x[i:i + 64], y[i:i + 64], method=config["method"],
                       **method_options(cfg, config["method"], config["alpha"])).detach()
        m = mask[i:i + 64]
        for k, v in {"pxap": pxap(maps, m), "iou": localisation_iou(maps, m),
                     "energy_pointing_game": energy_pointing_game(maps, m), "pointing_game": pointing_game(maps, m),
                     "gini": gini(maps), "deletion_auc": deletion_auc(model, x[i:i + 64], maps, y[i:i + 64],
                                                                       n_steps=cfg.evaluate.deletion_steps)}.items():
            sums[k] = sums.get(k, 0.0) + float(torch.nansum(v))
    ray.tune.report({k: v / len(y) for k, v in sums.items()})


def haf_trial(config: dict) -> None:
    """One Tune trial: a HAF reading (an evaluated method whose base is HAF) at one learning rate on the first
    sweep.haf_images validation images, sweep.haf_max_steps Adam steps; reports, per step, the mean over images
    of the objective P_c + lam * sparsity of the masks HAF would keep after that many steps (its per-image
    running minimum: HAF keeps each image's best evaluation with keep="loss", evaluate's setting), so step s is
    what ``steps=s`` returns."""
    import ray.tune
    import torch

    from pipelines.common import load_model, to_tensors
    from pipelines.config import Config
    from pipelines.evaluate import method_options
    from xai_core.attribution.registry import default_layers_for
    from xai_core.attribution.reliable import learn_masks

    torch.set_num_threads(1)
    cfg = Config.model_validate(config["cfg"])
    store = st.Storage(*config["storage"])
    model = load_model(cfg, store.read_bytes(config["model_path"]), config["model_path"])
    data = to_tensors(ingest.read_split_numpy(store, config["ingest"], "val", limit=cfg.sweep.haf_images))
    opts = method_options(cfg, config["method"], 0.0, model=model)
    layers = opts.get("layers") or default_layers_for(model, "last2")
    trace: list[torch.Tensor] = []
    learn_masks(model, data["image"], data["label"].long(), layers=layers, steps=cfg.sweep.haf_max_steps,
                lr=config["lr"], lam=opts.get("lam", 1.0), keep=opts.get("keep", "loss"),
                preserve=opts.get("preserve", "two_sided"), trace=trace)
    kept = torch.cummin(torch.stack(trace), dim=0).values.mean(1)
    for step, v in enumerate(kept.tolist()):
        ray.tune.report({"objective": v, "step": step})


def haf_pick(curve: list[float], tol: float) -> int:
    """The steps a HAF reading runs: the first step whose mean objective is within ``tol`` (relative) of the
    curve's last value, at least 1."""
    last = curve[-1]
    return max(1, next(s for s, v in enumerate(curve) if v <= last + tol * abs(last)))


def _grid_tuner(trial: Any, grid: dict[str, list], cfg: Any, store: st.Storage, ingest_manifest: dict,
                model_path: str, plan: Any, name: str, verbose: int) -> Any:
    """A Ray Tune grid over ``grid`` (every combination) of a validation-split trial on one model; each trial
    gets the config, the model's checkpoint path, the ingest manifest and the storage it reads them from."""
    import ray.tune

    return ray.tune.Tuner(
        ray.tune.with_resources(trial, {"cpu": plan.tune_trial_cpus}),
        param_space={**{k: ray.tune.grid_search(v) for k, v in grid.items()},
                     "cfg": cfg.model_dump(mode="json"), "model_path": model_path, "ingest": ingest_manifest,
                     "storage": store.args()},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=plan.tune_concurrency),
        run_config=ray.tune.RunConfig(name=name, storage_path=store.path("tune"),
                                      storage_filesystem=store.fs if store.is_s3 else None, verbose=verbose),
    )


def calibrate_haf(cfg: Any, store: st.Storage, ingest_manifest: dict, model_path: str, tracker: Any,
                  stage_run: str, plan: Any, h: str) -> dict:
    """HAF's steps and lr from its objective curves (sweep.haf_*): {method: {lr, steps, curves, final}}."""

    from pipelines.evaluate import base_method

    methods = [m for m in cfg.evaluate.methods if base_method(m) == "haf"]
    if not methods or not cfg.sweep.haf_lrs:
        return {}
    tuner = _grid_tuner(haf_trial, {"lr": list(cfg.sweep.haf_lrs), "method": methods}, cfg, store,
                        ingest_manifest, model_path, plan, f"{cfg.name}-haf-{h[:8]}", verbose=0)
    curves: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    for res in tuner.fit():
        if res.error:
            raise RuntimeError(f"HAF calibration trial failed: {res.error}") from res.error
        df = res.metrics_dataframe.sort_values("step")
        curve = [float(v) for v in df["objective"]]
        if len(curve) != cfg.sweep.haf_max_steps + 1:
            raise RuntimeError(f"HAF calibration trial {res.config['method']} lr={res.config['lr']:g} reported "
                               f"{len(curve)} steps, expected {cfg.sweep.haf_max_steps + 1}")
        curves[res.config["method"]][f"{float(res.config['lr']):g}"] = curve
    out = {}
    for m in methods:
        by_lr = curves[m]
        lr = min(by_lr, key=lambda k: (by_lr[k][-1], float(k)))  # lowest final objective (smaller lr on a tie)
        steps = haf_pick(by_lr[lr], cfg.sweep.haf_tol)
        out[m] = {"lr": float(lr), "steps": steps, "final": by_lr[lr][-1], "curves": by_lr}
        tracker.log_metric_series(stage_run, {f"haf_objective_{m}_lr{k}": c for k, c in by_lr.items()})
        tracker.log_metrics(stage_run, {f"haf_steps_{m}": steps, f"haf_lr_{m}": float(lr)})
        log.info("HAF %s: lr %s, %d steps (mean objective %.4g at %d steps, %.4g after %d)", m, lr, steps,
                 by_lr[lr][steps], steps, by_lr[lr][-1], cfg.sweep.haf_max_steps)
    return out


def tuned_settings(result: dict) -> dict[str, float]:
    """What evaluate takes from a sweep result: each thresholded method's alpha, and per HAF reading
    "<method>:steps" and "<method>:lr" (one flat dict: evaluate's config hash and manifest record it)."""
    out = {m: float(a) for m, a in result["best_alphas"].items()}
    for m, c in result.get("haf", {}).items():
        out[f"{m}:steps"], out[f"{m}:lr"] = float(c["steps"]), float(c["lr"])
    return out


# evaluate keys no sweep trial reads (sizes of the test-split work, its sharding, figures, PGD, the dataset
# checks): a change to them re-runs evaluate, not the sweep
NOT_SWEPT = ("shard_images", "n_test", "n_accuracy", "n_dwsol", "random_baseline", "pgd_eps", "pgd_steps",
             "detection_images", "randomisation_images", "figure_images", "checkpoint")


def config_hash(cfg: Any) -> str:
    from pipelines.config import digest, section_dump
    from pipelines.train import trained_sections

    payload = {s: section_dump(cfg, s) for s in (*trained_sections(cfg), "sweep")}
    payload["evaluate"] = section_dump(cfg, "evaluate", exclude=NOT_SWEPT)
    return digest(payload)


def run(cfg: Any, store: st.Storage, ingest_manifest: dict, train_manifest: dict, tracker: Any,
        stage_run: str, plan: Any, force: bool = False, alphas: list[float] | None = None) -> tuple[dict, bool]:
    """Sweep alpha for TIF and for the thresholded Grad-CAM control, each picking its own best alpha by
    ``sweep.metric`` on the validation split; returns (manifest, did_work)."""

    from pipelines.common import model_key

    h = config_hash(cfg) + ("" if alphas is None else "-" + "_".join(f"{a:g}" for a in alphas))
    if not force and (m := st.committed(store, STAGE, h)):
        return m, False
    st.begin(store, STAGE)
    alphas = alphas or cfg.sweep.alphas
    model_path = train_manifest["files"][model_key(cfg.sweep.model, cfg.train.seeds[0])]
    grid = _grid_tuner(alpha_trial, {"alpha": list(alphas), "method": list(THRESHOLDED)}, cfg, store,
                       ingest_manifest, model_path, plan, f"{cfg.name}-alpha-{h[:8]}", verbose=1).fit()
    rows = []
    for res in grid:
        if res.error:
            raise RuntimeError(f"sweep trial failed: {res.error}") from res.error
        c = res.config
        row = {"method": c["method"], "alpha": float(c["alpha"]),
               **{k: float(res.metrics[k]) for k in SWEEP_METRICS}}
        rows.append(row)
        run_id = tracker.find_or_create(f"sweep/{c['method']}/alpha={c['alpha']:g}",
                                        {"xai.stage": "sweep", "xai.trial": f"{c['method']}-{c['alpha']:g}"},
                                        parent_id=stage_run)
        tracker.log_params(run_id, {"method": c["method"], "alpha": c["alpha"], "model": cfg.sweep.model})
        tracker.log_metrics(run_id, {k: v for k, v in row.items() if k not in ("method", "alpha")})
        tracker.finish(run_id)
    rows.sort(key=lambda r: (r["method"], r["alpha"]))
    metric = cfg.sweep.metric
    best = {m: max((r for r in rows if r["method"] == m), key=lambda r: r[metric]) for m in THRESHOLDED}
    for r in rows:  # the alpha curves, one MLflow step per alpha (x100)
        tracker.log_metrics(stage_run, {f"{r['method']}_{k}_by_alpha": r[k] for k in SWEEP_METRICS},
                            step=int(round(r["alpha"] * 100)))
    best_alphas = {m: b["alpha"] for m, b in best.items()}
    tracker.log_metrics(stage_run, {**{f"best_alpha_{m}": a for m, a in best_alphas.items()},
                                    **{f"best_{metric}_{m}": b[metric] for m, b in best.items()}})
    haf = calibrate_haf(cfg, store, ingest_manifest, model_path, tracker, stage_run, plan, h)
    result = {"rows": rows, "best_alpha": best_alphas["tif"], "best_alphas": best_alphas, "metric": metric,
              "haf": haf}
    store.write_json(result, STAGE, "results.json")
    files = {"results": [f"{STAGE}/results.json"]}
    if cfg.sweep.train_mode:  # before the commit: the stage is done only when both sweeps are
        store.write_json(train_knob_sweep(cfg, store, ingest_manifest, tracker, stage_run, plan),
                         STAGE, "train_sweep.json")
        files["train_sweep"] = [f"{STAGE}/train_sweep.json"]
    manifest = st.commit(store, STAGE, h, best_alphas=best_alphas, tuned=tuned_settings(result), metric=metric,
                         files=files, rows={"trials": len(rows),
                                            "haf_trials": sum(len(c["curves"]) for c in haf.values())})
    return manifest, True


def train_trial(config: dict) -> None:
    """A Tune trial that trains with one knob setting through a TorchTrainer, reporting every epoch."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.config import Config, apply_override

    data = dict(config["cfg"])
    for key, val in config["knobs"].items():
        apply_override(data, f"{key}={val}")
    cfg = Config.model_validate(data)
    store = st.Storage(*config["storage"])
    data = ingest.fit_input(store, config["ingest"], "train", ["idx", "image", "label"], shard_limit(cfg))
    given, datasets = trainer_input(data)
    trainer = TorchTrainer(
        _train_trial_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "seed": cfg.train.seeds[0],
                           "storage": config["storage"], "ingest": config["ingest"],
                           "input": given},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": config["cpus"]}),
        **datasets,
        run_config=ray.train.RunConfig(name=f"trial-{ray.tune.get_context().get_trial_id()}",
                                       storage_path=store.path("tune"), callbacks=[TuneReportCallback()],
                                       storage_filesystem=store.fs if store.is_s3 else None),
    )
    trainer.fit()


def _train_trial_loop(lc: dict) -> None:
    """Train with the trial's knobs; after every epoch report validation accuracy (ASHA's signal)."""
    import ray.train
    import torch

    from pipelines.common import make_model, to_tensors
    from pipelines.config import Config
    from pipelines.train import batch_loss

    cfg = Config.model_validate(lc["cfg"])
    torch.manual_seed(lc["seed"])
    model = make_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    val = to_tensors(ingest.read_split_numpy(st.Storage(*lc["storage"]), lc["ingest"], "val"))
    mode = cfg.sweep.train_mode
    rows = ingest.worker_rows(st.Storage(*lc["storage"]), lc["input"], 0, 1) if lc.get("input") else None
    for epoch in range(cfg.sweep.train_epochs):
        model.train()
        if rows is None:  # a large split: streamed, in file order
            batches = ray.train.get_dataset_shard("train").iter_batches(batch_size=cfg.train.batch_size,
                                                                         batch_format="numpy")
        else:  # read by this worker (ingest.fit_input), in idx order
            n, b = len(rows["idx"]), cfg.train.batch_size
            batches = ({k: v[i:i + b] for k, v in rows.items()} for i in range(0, n, b))
        for raw in batches:
            batch = to_tensors(raw)
            if mode == "consistency":  # weights from the current model on this batch (METHODS §5a)
                from xai_core.objectives import consistency_weights
                c = cfg.consistency
                batch["w"] = consistency_weights(model, batch["image"], batch["label"].long(),
                                                 eps=c.eps, steps=c.steps, similarity=c.similarity,
                                                 power=c.power, w_min=c.w_min, w_max=c.w_max).w.detach()
            loss, _, _ = batch_loss(model, batch, mode, cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            pred = model(val["image"]).argmax(1)
        conf = val["group"] == 1
        ray.train.report({"epoch": epoch + 1, "val_acc": float((pred == val["label"]).float().mean()),
                          "val_conflicting_acc": float((pred == val["label"])[conf].float().mean())
                          if conf.any() else float("nan")})


def train_knob_sweep(cfg: Any, store: st.Storage, ingest_manifest: dict, tracker: Any, stage_run: str,
                     plan: Any) -> dict:
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    space = {k: ray.tune.choice(v) for k, v in cfg.sweep.train_space.items()}
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(train_trial, {"cpu": KNOB_TRIAL_CPUS}),
        param_space={"knobs": space, "cfg": cfg.model_dump(mode="json"), "ingest": ingest_manifest,
                     "storage": store.args(),
                     "cpus": plan.train_worker_cpus},
        tune_config=ray.tune.TuneConfig(metric="val_acc", mode="max", num_samples=cfg.sweep.train_trials,
                                        scheduler=ASHAScheduler(max_t=cfg.sweep.train_epochs, grace_period=1,
                                                                time_attr="epoch"),
                                        max_concurrent_trials=plan.knob_concurrency),
        run_config=ray.tune.RunConfig(name=f"{cfg.name}-train-knobs", storage_path=store.path("tune"),
                                      storage_filesystem=store.fs if store.is_s3 else None),
    )
    before = _live_placement_groups()
    try:
        grid = tuner.fit()
    finally:
        _release_trial_placement_groups(before)
    trials = []
    for res in grid:
        knobs = res.config["knobs"]
        metrics = {k: float(v) for k, v in (res.metrics or {}).items()
                   if k in ("val_acc", "val_conflicting_acc", "epoch")}
        trials.append({"knobs": knobs, **metrics})
        label = ",".join(f"{k}={v}" for k, v in sorted(knobs.items()))
        run_id = tracker.find_or_create(f"sweep/train/{label}"[:120], {"xai.stage": "sweep", "xai.trial": label},
                                        parent_id=stage_run)
        tracker.log_params(run_id, knobs)
        tracker.log_metrics(run_id, metrics)
        tracker.finish(run_id)
    best = grid.get_best_result()
    return {"trials": trials, "best": best.config["knobs"]}


def _live_placement_groups() -> set[str]:
    import ray._private.state

    return {k for k, v in ray._private.state.state.placement_group_table().items() if v["state"] != "REMOVED"}


def _release_trial_placement_groups(before: set[str], wait_s: float = 30.0) -> list[str]:
    """After the sweep every trial is over, so placement groups created during it must go.

    Ray Train's PlacementGroupCleaner removes the worker group of a trial that Tune stopped, but only where
    the state API answers (a cluster with a dashboard). Wait for it; remove what it leaves; return those."""
    import time

    from ray.util.placement_group import PlacementGroup, PlacementGroupID, remove_placement_group

    deadline = time.monotonic() + wait_s
    while (left := _live_placement_groups() - before) and time.monotonic() < deadline:
        time.sleep(1.0)
    for pg_id in sorted(left):
        log.warning("sweep: placement group %s of a finished trial is still held; removing it", pg_id)
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
    return sorted(left)
