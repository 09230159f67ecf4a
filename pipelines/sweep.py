"""Stage sweep: Ray Tune over TIF's alpha (METHODS §2), objective = localisation on the validation split;
HAF's learning rate and steps from its objective curve (METHODS §3, ``calibrate_haf``). Before train, the
training-knob sweep (``run_knobs``, config section ``tune``): per mode, trials of train.py's own per-model
function, each averaging seeds kept apart from the final ones, scored on validation.

Runs inside full.py, or on its own against a finished run's outputs (the entry point drives it; this stage
never imports the entry point):
    python pipelines/full.py --config configs/quick.yaml --only sweep --alphas 0 0.25 0.5 0.75
"""

from __future__ import annotations

import logging
from typing import Any

from pipelines import ingest
from pipelines import storage as st
from pipelines.common import KNOB_TRIAL_CPUS, THRESHOLDED, shard_limit

log = logging.getLogger("xai.sweep")
STAGE = "sweep"
SWEEP_METRICS = ("pxap", "iou", "energy_pointing_game", "pointing_game", "gini", "deletion_auc")


def alpha_trial(config: dict, fixed: dict | None = None) -> None:
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
    config = {**(fixed or {}), **config}
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


def haf_trial(config: dict, fixed: dict | None = None) -> None:
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
    config = {**(fixed or {}), **config}
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
    gets the config, the model's checkpoint path, the ingest manifest and the storage it reads them from as
    ``fixed`` (``tune.with_parameters``): the trial's config is the grid point only, so Tune's console and
    result tables show the swept keys (in the param space, the whole config printed as a ~110-line table at
    every trial's start)."""
    import ray.tune

    fixed = {"cfg": cfg.model_dump(mode="json"), "model_path": model_path, "ingest": ingest_manifest,
             "storage": store.args()}
    return ray.tune.Tuner(
        ray.tune.with_resources(ray.tune.with_parameters(trial, fixed=fixed), {"cpu": plan.tune_trial_cpus}),
        param_space={k: ray.tune.grid_search(v) for k, v in grid.items()},
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
             "detection_images", "randomisation_images", "figure_images", "checkpoint", "wsss_images",
             "wsss_thresholds")


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
    manifest = st.commit(store, STAGE, h, best_alphas=best_alphas, tuned=tuned_settings(result), metric=metric,
                         files=files, rows={"trials": len(rows),
                                            "haf_trials": sum(len(c["curves"]) for c in haf.values())})
    return manifest, True


# ------------------------------------------------------------------------------- training-knob sweep
KNOBS_STAGE = "tune"  # the training-knob sweep, before train: tune/<mode>/ per swept mode


def knob_label(knobs: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(knobs.items())) or "defaults"


def validation_scores(cfg: Any, model: Any, val: dict[str, Any]) -> dict[str, float]:
    """Accuracy of a model on the whole validation split, on its bias-conflicting images (group 1; NaN where
    the data have no groups) and on its worst (class x background) group (``train.val_metrics``)."""
    from pipelines.train import val_metrics

    out = val_metrics(model, val, cfg.train.val_min_group, cfg.data.num_classes, cfg.train.batch_size)
    return {k: out[k] for k in ("val_acc", "val_worst_group_acc", "val_conflicting_acc")}


def explanation_scores(cfg: Any, model: Any, val: dict[str, Any], n: int) -> dict[str, float]:
    """Saliency Gini (higher = sparser) and saliency deletion AUC (lower = more faithful) of a model on the
    first ``n`` validation images: the explanation objectives a SCAAT sweep can be scored by."""
    import torch

    from xai_core.attribution import explain
    from xai_core.metrics import deletion_auc, gini

    x, y = val["image"][:n], val["label"][:n].long()
    g, d = [], []
    for i in range(0, len(y), 64):
        maps = explain(model, x[i:i + 64], y[i:i + 64], method="saliency").detach()
        g.append(gini(maps))
        d.append(deletion_auc(model, x[i:i + 64], maps, y[i:i + 64], n_steps=cfg.evaluate.deletion_steps))
    return {"val_saliency_gini": float(torch.cat(g).mean()), "val_deletion_auc": float(torch.cat(d).mean())}


def knob_trial(config: dict) -> None:
    """One Tune trial of the training-knob sweep: train.py's own per-model function (``train.train_model``, so
    the ERM warm-up, rounds, precompute and weights of consistency, JTT's two fits, ...) with the trial's knobs,
    once per tune seed, in a store scoped to the trial (it reads the run's ingest and shares its ERM warm-ups);
    reports each seed's scores at the checkpoint evaluate.checkpoint selects and their mean."""
    import time

    import numpy as np
    import ray.tune
    import torch

    from pipelines import train
    from pipelines.common import ResourcePlan, load_model, to_tensors
    from pipelines.config import Config, with_knobs
    from pipelines.tracking import Tracker

    cfg = with_knobs(Config.model_validate(config["cfg"]), config["knobs"])
    mode, knobs = config["mode"], config["knobs"]
    store = st.Storage(*config["storage"]).scoped(trial_scope(mode, knobs), shared=(ingest.STAGE, train.WARMUPS))
    h = trial_hash(cfg, mode)
    if st.committed(store, "", h) is not None:  # a rerun of a finished trial (a killed sweep, a kept run)
        done = store.read_json(TRIAL_FILE)
        ray.tune.report({k: done[k] for k in TUNE_SCORES})
        return
    if store.exists(st.MANIFEST):  # finished under another trial key: nothing of it is this trial's
        store.remove_dir()
    # else a trial killed midway: its committed precompute rounds and Ray Train checkpoints carry on
    tracker = Tracker(config["tracking_uri"], cfg.tracking.experiment)
    plan = ResourcePlan(**config["plan"])
    man = config["ingest"]
    run_id = tracker.find_or_create(f"tune/{mode}/{knob_label(knobs)}"[:120],
                                    {"xai.stage": KNOBS_STAGE, "xai.trial": f"{mode}:{knob_label(knobs)}"},
                                    parent_id=config["parent_run"])
    tracker.log_params(run_id, {"mode": mode, "seeds": cfg.tune.seeds, **knobs})
    train_ds = ingest.fit_input(store, man, "train", ["idx", "image", "label"] + train.label_sets(cfg),
                                shard_limit(cfg))
    val_spec = ingest.split_manifest(man, "val")
    val = to_tensors(ingest.read_split_numpy(store, man, "val", columns=["image", "label", "background", "group"]))
    torch.set_num_threads(1)
    started, per_seed, curves = time.time(), [], []
    for seed in cfg.tune.seeds:
        records, checkpoints = train.train_model(cfg, store, man, train_ds, tracker, run_id, plan, val_spec, mode,
                                                 seed, log_model=False)
        chosen = checkpoints[cfg.evaluate.checkpoint]
        model = load_model(cfg, store.read_bytes(chosen["path"]), chosen["path"])
        scores = {**validation_scores(cfg, model, val), **explanation_scores(cfg, model, val, cfg.tune.explain_images),
                  "epoch": chosen["epoch"], "seed": seed}
        per_seed.append(scores)
        curves.append({e: {k: float(m[k]) for k in train.VAL_KEYS if k in m} for e, m, _ in records})
    epochs = sorted(set.intersection(*(set(c) for c in curves)))
    curve = {k: [_mean([c[e].get(k, np.nan) for c in curves]) for e in epochs]
             for k in ("val_acc", "val_worst_group_acc")}
    for i, e in enumerate(epochs):
        tracker.log_metrics(run_id, {f"mean_{k}": v[i] for k, v in curve.items() if np.isfinite(v[i])}, step=e)
    mean = {k: _mean([s[k] for s in per_seed]) for k in TUNE_SCORES}
    tracker.log_metrics(run_id, {k: v for k, v in mean.items() if np.isfinite(v)})
    tracker.finish(run_id)
    if not cfg.tune.keep_models:  # the trial's models and training images are scratch: its manifests stay
        for f in store.list_files("train", suffix=".pt") + store.list_files("ray"):
            store.fs.delete_file(f)
        for f in store.list_files("precompute"):  # a round without its samples is no longer committed (its
            if "/samples/" in f or f.endswith(st.MANIFEST):  # weights.parquet stays, for reading only)
                store.fs.delete_file(f)
    store.write_json({"mode": mode, "knobs": knobs, **mean, "per_seed": per_seed, "curve_epochs": epochs,
                      "curves": curve, "started_at": started, "ended_at": time.time()}, TRIAL_FILE)
    st.commit(store, "", h, files={"trial": [TRIAL_FILE]})  # the trial's folder is a committed unit from here
    ray.tune.report(mean)


TUNE_SCORES = ("val_conflicting_acc", "val_acc", "val_worst_group_acc", "val_saliency_gini", "val_deletion_auc")
TRIAL_FILE = "trial.json"  # a finished trial's scores, per seed and mean, and its mean validation curves


def _mean(values: list[float]) -> float:
    """The mean of the finite values (NaN where none is: no validation group large enough)."""
    import numpy as np

    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def trial_scope(mode: str, knobs: dict[str, Any]) -> str:
    """A trial's folder, named by its setting: a rerun of the same setting finds its finished trial there."""
    import re

    return f"{KNOBS_STAGE}/{mode}/trials/{re.sub(r'[^A-Za-z0-9._=,-]', '_', knob_label(knobs))}"


def trial_hash(cfg: Any, mode: str) -> str:
    """What a finished trial's scores depend on (its config with the knobs set, the seeds, the scoring)."""
    from pipelines.config import digest, section_dump
    from pipelines.train import trained_sections

    t = cfg.tune
    return digest({**{s: section_dump(cfg, s) for s in trained_sections(cfg)}, "mode": mode, "seeds": t.seeds,
                   "explain_images": t.explain_images, "checkpoint": cfg.evaluate.checkpoint,
                   "deletion_steps": cfg.evaluate.deletion_steps, "scores": TUNE_SCORES})


def knobs_hash(cfg: Any, mode: str) -> str:
    """What one mode's knob sweep depends on: what its trials do at the config's defaults (``trial_hash``),
    the space, the search and the metric that picks the best."""
    from pipelines.config import digest

    t = cfg.tune
    return digest({"trial": trial_hash(cfg, mode), "space": t.spaces[mode], "search": t.search,
                   "trials": [t.trials, t.search_seed] if t.search == "random" else None,
                   "metric": tune_metric(cfg, mode)})


def tune_metric(cfg: Any, mode: str) -> str:
    """The validation score a mode's trials are ranked by (tune.mode_metrics, else tune.metric)."""
    return cfg.tune.mode_metrics.get(mode, cfg.tune.metric)


def run_knobs(cfg: Any, store: st.Storage, ingest_manifest: dict, tracker: Any, stage_run: str,
              plan: Any, force: bool = False) -> tuple[dict[str, dict[str, Any]], bool]:
    """The training-knob sweep (tune.spaces), one committed unit per mode (tune/<mode>): a rerun skips the modes
    already swept. Returns ({mode: its best knobs}, did_work); the caller trains train.seeds with them."""
    from pipelines.config import TUNE_METRICS

    best, did = {}, False
    for mode in cfg.tune.spaces:
        unit, h = f"{KNOBS_STAGE}/{mode}", knobs_hash(cfg, mode)
        manifest = None if force else st.committed(store, unit, h)
        if manifest is None:  # its finished trials stay: each is committed under its own key
            if force:
                store.remove_dir(unit)
            elif store.exists(unit, st.MANIFEST):
                store.fs.delete_file(store.path(unit, st.MANIFEST))
            result = _sweep_mode(cfg, store, ingest_manifest, tracker, stage_run, plan, mode)
            store.write_json(result, unit, "results.json")
            manifest = st.commit(store, unit, h, files={"results": [f"{unit}/results.json"]}, best=result["best"],
                                 metric=tune_metric(cfg, mode), rows={"trials": len(result["trials"])})
            did = True
        best[mode] = manifest["best"]
        log.info("tune %s: best %s by %s (%s)", mode, knob_label(manifest["best"]), tune_metric(cfg, mode),
                 TUNE_METRICS[tune_metric(cfg, mode)])
    return best, did


def committed_knobs(cfg: Any, store: st.Storage) -> dict[str, dict[str, Any]] | None:
    """Each swept mode's best knobs from its committed unit, or None while one is missing."""
    out = {}
    for mode in cfg.tune.spaces:
        m = st.committed(store, f"{KNOBS_STAGE}/{mode}", knobs_hash(cfg, mode))
        if m is None:
            return None
        out[mode] = m["best"]
    return out


def merged_knobs(best: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One setting from every mode's best knobs (tune.spaces gives each knob one mode)."""
    return {k: v for knobs in best.values() for k, v in knobs.items()}


def tuned_config(cfg: Any, best: dict[str, dict[str, Any]]) -> Any:
    """The config the final models train with: every swept mode's best knobs set (their model keys change with
    them, so a new best retrains that mode only; SCAAT's controls read SCAAT's section and take its setting)."""
    from pipelines.config import with_knobs

    return with_knobs(cfg, merged_knobs(best))


def _sweep_mode(cfg: Any, store: st.Storage, ingest_manifest: dict, tracker: Any, stage_run: str, plan: Any,
                mode: str) -> dict:
    from dataclasses import asdict

    import ray.tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipelines.common import resource_plan
    from pipelines.config import TUNE_METRICS

    t = cfg.tune
    space = t.spaces[mode]
    if len(t.seeds) < 2:
        log.warning("tune: one seed per trial (tune.seeds=%s) cannot tell a knob from seed noise", t.seeds)
    if t.search == "grid":
        knobs, samples = {k: ray.tune.grid_search(v) for k, v in space.items()}, 1
    else:
        knobs, samples = {k: ray.tune.choice(v) for k, v in space.items()}, t.trials
    # the trial's own process holds KNOB_TRIAL_CPUS; its TorchTrainer and precompute actors plan with the rest
    # (an actor pool planned for the whole cluster left no CPU for Ray Data's reads inside a trial: it hung)
    inner = resource_plan(plan.cluster_cpus - KNOB_TRIAL_CPUS, cfg.train.num_workers, cfg.precompute.actors)
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(knob_trial, {"cpu": KNOB_TRIAL_CPUS}),
        param_space={"knobs": knobs, "mode": mode, "cfg": cfg.model_dump(mode="json"), "ingest": ingest_manifest,
                     "storage": store.args(), "plan": asdict(inner), "tracking_uri": tracker.uri,
                     "parent_run": stage_run},
        # random search draws from a seeded generator: a rerun (a resumed make paper) tries the same settings
        tune_config=ray.tune.TuneConfig(num_samples=samples, max_concurrent_trials=1,
                                        # one at a time (the limit must be the generator's own: Tune's
                                        # max_concurrent_trials did not hold it, and 4 trials ran at once,
                                        # each training the same ERM warm-up)
                                        search_alg=BasicVariantGenerator(random_state=t.search_seed,
                                                                         max_concurrent=1)),
        run_config=ray.tune.RunConfig(name=f"{cfg.name}-tune-{mode}", storage_path=store.path("ray", "tune"),
                                      storage_filesystem=store.fs if store.is_s3 else None, verbose=0),
    )
    before = _live_placement_groups()
    try:
        grid = tuner.fit()
    finally:
        _release_trial_placement_groups(before)
    trials = []
    for res in grid:
        if res.error:
            raise RuntimeError(f"tune {mode} trial {knob_label(res.config['knobs'])} failed: {res.error}") \
                from res.error
        done = store.read_json(trial_scope(mode, res.config["knobs"]), TRIAL_FILE)
        trials.append(done)
    # a setting drawn twice by random search ran once (its folder held the finished trial): listed once
    trials = list({knob_label(r["knobs"]): r for r in sorted(trials, key=lambda r: knob_label(r["knobs"]))}.values())
    metric = tune_metric(cfg, mode)
    sign = 1.0 if TUNE_METRICS[metric] == "max" else -1.0
    scored = [r for r in trials if r[metric] == r[metric]]  # not NaN
    if not scored:
        raise RuntimeError(f"tune {mode}: no trial has a finite {metric} (every validation group smaller than "
                           f"train.val_min_group={cfg.train.val_min_group}?)")
    best = max(scored, key=lambda r: sign * r[metric])  # the first of equal ones (sorted by label)
    tracker.log_metrics(stage_run, {f"tune_{mode}_best_{metric}": best[metric]})
    tracker.set_tags(stage_run, {f"tune_{mode}_best": knob_label(best["knobs"])})
    return {"mode": mode, "space": space, "metric": metric, "direction": TUNE_METRICS[metric],
            "seeds": t.seeds, "search": t.search, "trials": trials, "best": best["knobs"]}


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
