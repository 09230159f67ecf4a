"""RESULTS.md from a run's evaluate output: the papers' claims measured, mean +- std over seeds.

Every cell comes from the evaluate stage's per-sample rows (or its summary.json and the sweep's
results.json); nothing is typed by hand. Each claimed difference is A minus its comparator on the cells
both were measured on (training seed x test image), with a paired bootstrap 95% CI over seeds and images
(xai_core.stats, 2,000 resamples, seeded): supported / contradicted when the CI excludes 0 in / against the
claimed direction, else inconclusive.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from xai_core import stats

CLAIMS = {
    "000": "Explanation-consistency reweighting gives higher accuracy, better debiasing (conflicting "
           "group) and more precise localisation than plain training.",
    "001": "Learned reliable masks (HAF) do not respond to classes the image holds no evidence for "
           "(D-WSOL), unlike gradient/CAM maps; the masks detect adversarial examples.",
    "002": "SCAAT makes saliency maps sparser and more faithful without sacrificing accuracy.",
    "003": "TIF (threshold interception + multi-layer fusion) localises objects better than the base "
           "attribution it refines.",
}


def _where(df: Any, **where: Any) -> Any:
    """The rows of df whose columns equal the given values."""
    for k, v in where.items():
        df = df[df[k] == v]
    return df


def with_bias(df: Any) -> Any:
    """df with the column ``bias``: 0 where an image's background is its class (bias-aligned), 1 where it is
    another (bias-conflicting), -1 without a background (real datasets but Waterbirds). ``group`` is the
    dataset's own grouping (Waterbirds: 2 y + place, 4 groups); on biased_shapes the two are equal."""
    if "bias" in df.columns or not {"label", "background"} <= set(df.columns):
        return df
    return df.assign(bias=np.where(df.background < 0, -1, (df.label != df.background).astype(int)))


def _per_seed(df: Any, metric: str, agg: str = "mean", **where: str) -> np.ndarray:
    sel = _where(df, **where)
    if metric not in sel.columns:
        return np.array([])
    return sel.groupby("seed")[metric].agg(agg).to_numpy(dtype=float)


def _cell(vals: np.ndarray) -> str:
    if vals.size == 0 or np.all(np.isnan(vals)):
        return "n/a"
    if vals.size == 1:
        return f"{vals[0]:.3f}"
    return f"{np.nanmean(vals):.3f} ± {np.nanstd(vals, ddof=1):.3f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


_CHECKPOINT = {"last": "the last epoch",
               "best_val_worst_group": "the epoch of best validation worst-group accuracy"}
BOOTSTRAP_RESAMPLES = 2000
MIN_GROUP = 20  # a (class, background) group with fewer test images is too noisy to be the worst


def _worst_group(acc: Any, num_backgrounds: int) -> np.ndarray:
    """Per seed: the lowest accuracy among (class, background) groups with >= MIN_GROUP test images."""
    import torch

    from xai_core.metrics.groups import group_accuracy, group_ids

    if "background" not in acc.columns or (acc["background"] < 0).any():
        return np.array([])
    out = []
    for _, rows in acc.groupby("seed"):
        g = group_ids(torch.tensor(rows["label"].to_numpy()), torch.tensor(rows["background"].to_numpy()),
                      num_backgrounds)
        out.append(group_accuracy(torch.tensor(rows["correct"].to_numpy()), g, min_size=MIN_GROUP)["worst"])
    return np.array(out, dtype=float)


def _grid(df: Any, metric: str, **where: Any) -> Any:
    """The metric as a seeds x images table (pandas, index seed, columns idx) of the rows matching where."""
    sel = _where(df, **where)
    if metric not in sel.columns or sel.empty:
        return None
    return sel.pivot_table(index="seed", columns="idx", values=metric, aggfunc="mean", dropna=False)


def paired(df: Any, metric: str, a: dict, b: dict, higher_is_better: bool = True, seed: int = 0,
           statistic: str = "mean") -> stats.Difference:
    """A minus B on the cells (seed, test image) both were measured on, with a paired bootstrap 95% CI.

    a and b select rows (e.g. {"mode": "consistency", "method": "none"} against {"mode": "erm", ...}); a
    model comparison pairs each seed's models (they share the warm-up and the test images)."""
    ga, gb = _grid(df, metric, **a), _grid(df, metric, **b)
    kw = {"higher_is_better": higher_is_better, "statistic": statistic}
    seeds = sorted(set(ga.index) & set(gb.index)) if ga is not None and gb is not None else []
    items = sorted(set(ga.columns) & set(gb.columns)) if seeds else []
    if not items:  # nothing measured on both sides
        return stats.paired_difference(np.array([np.nan]), np.array([np.nan]), **kw)
    va = ga.loc[seeds, items].to_numpy(dtype=float)
    vb = gb.loc[seeds, items].to_numpy(dtype=float)
    return stats.paired_difference(va, vb, n_resamples=BOOTSTRAP_RESAMPLES, seed=seed, **kw)


def multilabel_table(df: Any) -> Any | None:
    """Multi-label data (score_k/label_k columns): per model, mAP of the logits over the test images and the
    top-1 accuracy (the top class is one of the image's labels); None for single-label runs."""
    import pandas as pd
    import torch

    from xai_core.metrics import average_precision_per_class

    acc = df[df.method == "none"]
    scores = sorted((c for c in acc.columns if c.startswith("score_")), key=lambda c: int(c.split("_")[1]))
    if not scores:
        return None
    rows = []
    for model, g in acc.groupby("model"):
        s = torch.from_numpy(g[scores].to_numpy(np.float64, copy=True))
        y = torch.from_numpy(g[[c.replace("score_", "label_") for c in scores]].to_numpy() > 0.5)
        ap = average_precision_per_class(s, y)
        rows.append({"model": model, "mAP": float(ap.nanmean()), "top1_acc": g.correct.mean(), "images": len(g),
                     **{f"AP_class{k}": float(v) for k, v in enumerate(ap)}})
    return pd.DataFrame(rows).set_index("model")


JTT_PUBLISHED = "on Waterbirds with ResNet-50, worst-group accuracy ERM 72.6, JTT 86.7 (Liu et al., ICML 2021)"
JTT_CONTEXT = f"Published context, another dataset (not to be matched on this benchmark): {JTT_PUBLISHED}."
WSSS_PREFIX = "wsss_"  # summary.json keys of evaluate.wsss_scores


def wsss_table(summary: dict) -> Any | None:
    """Per model and method, from the dataset checks' summary: the background threshold chosen on validation,
    the validation mIoU there and the test mIoU with its bootstrap 95% CI; None without WSSS results."""
    import pandas as pd

    rows = []
    for model, r in sorted(summary.items()):
        for method in sorted(k[len("wsss_miou_"):] for k in r if k.startswith("wsss_miou_")
                             and not k.startswith(("wsss_miou_low_", "wsss_miou_high_"))):
            rows.append({"model": model, "method": method, "bg_threshold (val)": r[f"wsss_bg_threshold_{method}"],
                         "val_mIoU": r[f"wsss_val_miou_{method}"], "test_mIoU": r[f"wsss_miou_{method}"],
                         "CI95_low": r[f"wsss_miou_low_{method}"], "CI95_high": r[f"wsss_miou_high_{method}"],
                         "val_images": r["wsss_images_val"], "test_images": r["wsss_images_test"]})
    return pd.DataFrame(rows).set_index(["model", "method"]) if rows else None


def wsol_table(df: Any, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Any | None:
    """WSOL (``evaluate.wsol_boxes``): per model and method, MaxBoxAcc at IoU 0.3/0.5/0.7 and MaxBoxAccV2 over
    the test images with a box (clovaai/wsolevaluation's protocol: the best of the CAM threshold grid), with a
    percentile bootstrap 95% CI of MaxBoxAccV2 over images (seeded); None without ``box_iou_levels`` rows."""
    import pandas as pd

    from xai_core.metrics.boxes import IOU_THRESHOLDS, LEVELS, default_cam_thresholds

    if "box_iou_levels" not in df.columns:
        return None
    used = np.unique(np.floor(default_cam_thresholds().numpy() * 255).astype(int).clip(0, LEVELS - 1))
    rng = np.random.default_rng(seed)
    rows = []
    for (model, method), g in df[df.method != "none"].groupby(["model", "method"]):
        lv = np.stack([np.asarray(v, np.float64) for v in g["box_iou_levels"]])
        lv = lv[~np.isnan(lv).any(1)][:, used]
        if not len(lv):
            continue
        hits = (lv[:, None, :] >= np.asarray(IOU_THRESHOLDS)[None, :, None]).astype(np.float64)  # [N,D,L]
        acc = hits.mean(0).max(-1)  # [D]
        counts = rng.multinomial(len(lv), np.full(len(lv), 1 / len(lv)), size=n_resamples)  # image resamples
        boot = (np.tensordot(counts, hits, axes=(1, 0)) / len(lv)).max(-1).mean(-1)  # [R] MaxBoxAccV2
        lo, hi = np.percentile(boot, [2.5, 97.5])
        rows.append({"model": model, "method": method, "images": len(lv),
                     **{f"MaxBoxAcc@{round(d * 100)}": a for d, a in zip(IOU_THRESHOLDS, acc)},
                     "MaxBoxAccV2": acc.mean(), "CI95_low": lo, "CI95_high": hi})
    return pd.DataFrame(rows).set_index(["model", "method"]) if rows else None


def pointing_game_table(df: Any, num_classes: int) -> Any | None:
    """Multi-label pairs with ``pointing_game_strict``: per model and method, TorchRay's per-class pointing game
    (strictly within the tolerance; a class whose objects in the image are all "difficult" left out), its mean
    over the classes that occur (TorchRay averages all classes, 0 for one never counted) and the pairs counted;
    with a ``difficult_subset`` column (data.difficult_subset), the same mean over the subset's pairs."""
    import pandas as pd

    if "pointing_game_strict" not in df.columns:
        return None
    rows = []
    for (model, method), g in df[(df.method != "none") & df.pointing_game_strict.notna()].groupby(["model", "method"]):
        if "difficult" in g.columns:
            g = g[g.difficult.fillna(0) < 0.5]
        per_class = g.groupby("label").pointing_game_strict.mean().reindex(range(num_classes))
        row = {"model": model, "method": method, "pairs": len(g), "mean_over_classes": per_class.mean()}
        if "difficult_subset" in g.columns and g.difficult_subset.notna().any():  # TorchRay's difficult subset
            h = g[g.difficult_subset.fillna(0) > 0.5]
            row.update(difficult_pairs=len(h),
                       difficult_mean_over_classes=h.groupby("label").pointing_game_strict.mean().mean())
        rows.append({**row, **{f"class{k}": v for k, v in per_class.items()}})
    return pd.DataFrame(rows).set_index(["model", "method"]) if rows else None


def group_weighted_accuracy(df: Any, train_groups: np.ndarray) -> Any | None:
    """Per model: test accuracy per group, the worst group, the mean accuracy and the average weighted by the
    training split's group shares (the debiasing literature's "average accuracy" on Waterbirds); None
    without groups."""
    import pandas as pd

    acc = df[df.method == "none"]
    if "group" not in acc.columns or (acc.group < 0).all() or not len(train_groups):
        return None
    share = pd.Series(train_groups).value_counts(normalize=True)
    rows = []
    for model, g in acc[acc.group >= 0].groupby("model"):
        per = g.groupby("group").correct.mean()
        rows.append({"model": model, "images": len(g), "mean_acc": g.correct.mean(), "worst_group_acc": per.min(),
                     "train_weighted_acc": float((per * share.reindex(per.index).fillna(0)).sum()
                                                 / share.reindex(per.index).fillna(0).sum()),
                     **{f"group{int(k)}": v for k, v in per.items()}})
    return pd.DataFrame(rows).set_index("model")


def tune_markdown(tune: dict[str, dict]) -> list[str]:
    """The training-knob sweep per mode: its space, every trial (mean over the tune seeds, and each seed), the
    chosen setting; the lines RESULTS.md and the HTML report show."""
    out = []
    for mode, res in tune.items():
        space = ", ".join(f"{k} in {v}" for k, v in res["space"].items())
        scores = ("val_conflicting_acc", "val_worst_group_acc", "val_acc", "val_saliency_gini", "val_deletion_auc")
        rows = []
        for t in res["trials"]:
            per = "; ".join(f"s{p['seed']}: " + ", ".join(f"{p[k]:.3f}" for k in scores) for p in t["per_seed"])
            chosen = " **(chosen)**" if t["knobs"] == res["best"] else ""
            rows.append([", ".join(f"{k}={v}" for k, v in sorted(t["knobs"].items())) + chosen,
                         *[f"{t[k]:.3f}" for k in scores], per])
        out += [f"Knob sweep for {mode} (Ray Tune, {res['search']} search over {space}; each trial is train.py's "
                f"training of {mode} on seeds {res['seeds']}, kept apart from the final seeds, scored on the "
                f"validation split at the evaluated checkpoint; chosen by {res['metric']} ({res['direction']}): "
                + ", ".join(f"{k}={v}" for k, v in sorted(res["best"].items())) + "):", "",
                _table(["setting", "val conflicting", "val worst group", "val acc", "val saliency Gini",
                        "val deletion AUC", "per seed (conflicting, worst group, acc, Gini, deletion)"], rows), ""]
    return out


def _quantity(key: str, value: float) -> str:
    """A cell of the dataset-checks table: image counts as integers, the rest to 3 decimals."""
    return f"{value:.0f}" if key.startswith("detection_images_") and np.isfinite(value) else f"{value:.3f}"


def randomisation_notes(summary: dict, images: int) -> list[str]:
    """What the randomisation rows cannot say: a constant map has no ranks, so its Spearman is undefined
    (``randomisation_<method>_<layer>`` is the mean over the images where both maps vary). One line per method
    whose maps were constant anywhere, from the ``..._constant`` shares (mean over the models)."""
    lines = []
    for method in sorted({k[len("randomisation_"):-len("_trained_constant")] for r in summary.values() for k in r
                          if k.startswith("randomisation_") and k.endswith("_trained_constant")}):
        pre = f"randomisation_{method}_"
        layers = sorted({k[len(pre):-len("_constant")] for r in summary.values() for k in r
                         if k.startswith(pre) and k.endswith("_constant") and k != f"{pre}trained_constant"})
        share = {w: float(np.mean([r[f"{pre}{w}_constant"] for r in summary.values() if f"{pre}{w}_constant" in r]))
                 for w in ["trained", *layers]}
        if max(share.values()) == 0:
            continue
        undefined = [w for w in layers if all(not np.isfinite(r.get(f"{pre}{w}", np.nan)) for r in summary.values())]
        lines.append(f"- {method}: its map is constant on {share['trained']:.0%} of the {images} images on the "
                     "trained models and, after re-initialising, on "
                     + ", ".join(f"{share[w]:.0%} ({w})" for w in layers) + " (mean over the models). "
                     + (f"The Spearman is undefined on every model for {', '.join(undefined)}: a map that turns "
                        "constant when the weights are re-drawn does depend on them, but no rank correlation "
                        "says how much." if undefined else "Its Spearman rows are means over the other images."))
    if not lines:
        return []
    return ["A constant map has no ranks, so its Spearman correlation is undefined (nan): each randomisation "
            "row is the mean over the images where both maps vary, and a `_constant` row is the share of images "
            "whose map (on the trained model, or after re-initialising that layer) is constant.", "", *lines, ""]


def results_markdown(cfg: Any, test: Any, dwsol: Any | None, summary: dict, sweep: dict | None,
                     command: str, rounds: list[dict] | None = None, tune: dict[str, dict] | None = None) -> str:
    """The whole RESULTS.md text."""
    from pipelines.config import MODES

    test = with_bias(test)

    modes = [m for m in MODES if m in set(test["mode"])]
    acc = test[test.method == "none"]
    seeds = sorted(set(test.seed))
    n_acc = int(acc.groupby(["mode", "seed"]).size().max()) if len(acc) else 0
    out = [f"# Results: the four papers' claims on the built-in benchmark ({cfg.name} config)", "",
           f"Generated by the report stage from run `{cfg.name}` (seeds {seeds}; {cfg.data.n_train} training "
           f"images, {cfg.train.epochs} epochs; test images per model: {n_acc} for accuracy and groups, "
           f"{cfg.evaluate.n_test} for PGD and attributions). Reproduce with:", "",
           f"    {command}", "", "Cells: mean ± std over seeds (a single value when one seed ran).",
           "Checkpoint evaluated (declared before the run, `evaluate.checkpoint`): "
           f"{_CHECKPOINT[cfg.evaluate.checkpoint]} (the other one's epoch and validation accuracies are in "
           "the report and in MLflow).", ""]
    # --- training (seeds 000, 002)
    rows = []
    for mode in modes:
        a = acc[acc["mode"] == mode]
        row = [mode, _cell(_per_seed(a, "correct", bias=0)), _cell(_per_seed(a, "correct", bias=1))]
        row += [_cell(_per_seed(a, "correct")), _cell(_worst_group(a, cfg.data.num_classes))]
        g = test[(test["mode"] == mode) & (test.method == "gradcam")]
        s = test[(test["mode"] == mode) & (test.method == "saliency")]
        row += [_cell(_per_seed(g, "pointing_game")), _cell(_per_seed(g, "energy_pointing_game")),
                _cell(_per_seed(s, "deletion_auc")), _cell(_per_seed(s, "insertion_auc")),
                _cell(_per_seed(s, "gini"))]
        row += [_cell(_per_seed(a, c)) for c in sorted(c for c in a.columns if c.startswith("robust_acc_"))]
        rows.append(row)
    robust = sorted(c for c in acc.columns if c.startswith("robust_acc_"))
    eps_cols = [f"PGD acc {c.split('_')[-1]}/255" for c in robust]
    out += ["## Training: ERM vs. consistency reweighting (000) vs. SCAAT (002), and their baselines and controls", "",
            _table(["model", "acc aligned", "acc conflicting", "acc (all)",
                    f"worst group (class x background, >= {MIN_GROUP} images)", "Grad-CAM PG", "Grad-CAM EPG",
                    "saliency deletion AUC", "saliency insertion AUC", "saliency Gini", *eps_cols], rows), ""]
    if "jtt" in modes:
        out += [JTT_CONTEXT, ""]
    out += tune_markdown(tune or {})
    if rounds:
        c = cfg.consistency
        rows = [[str(r["seed"]), str(r["round"])] + [f"{r[k]:.3f}" if k in r else "" for k in (
            "E_aligned", "E_conflicting", "w_aligned", "w_conflicting", "w_max", "top10_conflicting_share")]
            + ([str(r["degenerate"]), str(r.get("degenerate_conflicting", "")), f"{r['degenerate_weight_share']:.3f}"]
               if "degenerate" in r else ["not recorded (a round committed before flat maps were counted)", "", ""])
            for r in rounds]
        out += [f"Consistency weights by bias group (000): does reweighting find the conflicting samples? Each "
                f"round recomputes E with the latest model (mask {c.mask_source}, eps {c.eps:.4f}, {c.steps} PGD "
                f"steps; power {c.power:g}, floor {c.w_min:g}, cap {c.w_max if c.w_max is not None else 'none'}); "
                f"the training split is {1 - cfg.data.bias:.0%} conflicting.", "",
                _table(["seed", "round", "E aligned", "E conflicting", "w aligned", "w conflicting", "w max",
                        "conflicting share of the top 10% weights", "flat maps (degenerate)",
                        "of them conflicting", f"their share of all weight ({c.degenerate})"], rows), ""]
    # --- attribution (003) on the ERM models
    erm = test[test["mode"] == "erm"]
    methods = [m for m in cfg.evaluate.methods if m in set(erm.method)]
    rows = [[m] + [_cell(_per_seed(erm[erm.method == m], c))
                   for c in ("pxap", "iou", "energy_pointing_game", "pointing_game", "deletion_auc",
                             "deletion_auc_random", "wsss_miou", "gini")] for m in methods]
    out += ["## Attribution (003): base methods, TIF and the thresholded Grad-CAM control (ERM models)", "",
            _table(["method", "PxAP", "IoU", "EPG", "PG", "deletion AUC", "deletion AUC (random order)", "WSSS mIoU",
                    "Gini"], rows), ""]
    if sweep:
        cols = [c for c in ("pxap", "iou", "energy_pointing_game", "deletion_auc", "gini") if c in sweep["rows"][0]]
        rows = [[r["method"], f"{r['alpha']:g}"] + [f"{r[c]:.3f}" for c in cols] for r in sweep["rows"]]
        best = sweep.get("best_alphas") or {"tif": sweep["best_alpha"]}
        out += [f"Alpha sweep (Ray Tune, validation split, objective {sweep['metric']}, each method at its own "
                "best alpha): " + ", ".join(f"{m} **{a:g}**" for m, a in sorted(best.items())) + ":", "",
                _table(["method", "alpha", *[{"pxap": "PxAP", "iou": "IoU", "energy_pointing_game": "EPG",
                                              "deletion_auc": "deletion AUC", "gini": "Gini"}[c] for c in cols]],
                       rows), ""]
        same = {"gradcam_thresholded": "gradcam", "tif": "tif_fusion_only"}  # what each is at alpha 0
        for m, a in sorted(best.items()):
            if a == 0 and m in same:
                out += [f"At its best alpha, 0, {m} keeps every value: its maps are {same[m]}'s, so a comparison with "
                        f"it is a comparison with {same[m]} (no alpha of the grid raised its validation "
                        f"{sweep['metric']}); the alpha rows above show what thresholding trades instead.", ""]
        for m, c in sorted((sweep.get("haf") or {}).items()):
            curve = c["curves"][f"{c['lr']:g}"]
            by_lr = sorted(c["curves"].items(), key=lambda kv: float(kv[0]))
            finals = ", ".join(f"lr {lr}: {v[-1]:.4g}" for lr, v in by_lr)
            out += [f"HAF calibration ({m}, validation split, METHODS §3): **lr {c['lr']:g}, {c['steps']} steps**, "
                    f"the first step whose mean objective ({curve[c['steps']]:.4g}) is within "
                    f"{cfg.sweep.haf_tol:g} of its value after {len(curve) - 1} steps ({curve[-1]:.4g}); final "
                    f"objective by lr: {finals}. The curves are in the HTML report.", ""]
    # --- sanity baseline: the same architecture with fresh weights
    if "random" in set(test["mode"]):
        rows = []
        for m in methods:
            sel = {c: test[(test["mode"] == c) & (test.method == m)] for c in ("erm", "random")}
            d = paired(test, "pxap", {"mode": "erm", "method": m}, {"mode": "random", "method": m})
            pg = [_cell(_per_seed(sel[c], "pointing_game")) for c in ("erm", "random")]
            rows.append([m, _cell(_per_seed(sel["erm"], "pxap")), _cell(_per_seed(sel["random"], "pxap")),
                         d.text(), *pg])
        out += ["## Sanity baseline: the same architecture with re-initialised weights", "",
                "Each method on the ERM models and on untrained copies of the architecture (one per seed, "
                "weights drawn with that seed), same test images. Where the random model localises as well, the "
                "localisation says little about what the trained model learned.", "",
                _table(["method", "PxAP trained (ERM)", "PxAP random weights", "trained minus random",
                        "PG trained", "PG random"], rows), ""]
    # --- reliability (001)
    if dwsol is not None and len(dwsol):
        d = dwsol[dwsol["mode"] == "erm"]
        rows = [[m] + [_cell(_per_seed(d[d.method == m], c)) for c in ("hit_a", "hit_b")]
                + [_cell(_per_seed(d[d.method == m], "false_response", agg="median")),
                   _cell(_per_seed(d[d.method == m], "accuracy"))] for m in methods]
        out += ["## Reliability (001): D-WSOL (ERM models)", "",
                "Maps without per-map normalisation (one scale for an image's three query classes); the absent "
                "class is drawn per image among the classes present neither as object nor as background. The false "
                "response (mass of the absent class's map inside the objects over the mass of the class-a map) "
                "is heavy-tailed (its denominator can be near 0): its cell is the median over images.", "",
                _table(["method", "hit@a", "hit@b", "false response (absent class, median)", "D-WSOL accuracy"],
                       rows), ""]
    if (wt := wsss_table(summary)) is not None:
        out += ["## WSSS: pseudo-mask mIoU (background threshold chosen on the validation split, held out of the "
                "training list; test mIoU with a bootstrap 95% CI over images)", "",
                _table(["model", "method", "threshold", "val mIoU", "test mIoU [95% CI]", "images val/test"],
                       [[m, meth, f"{r['bg_threshold (val)']:.2f}", f"{r['val_mIoU']:.3f}",
                         f"{r['test_mIoU']:.3f} [{r['CI95_low']:.3f}, {r['CI95_high']:.3f}]",
                         f"{r['val_images']:.0f}/{r['test_images']:.0f}"] for (m, meth), r in wt.iterrows()]), ""]
        summary = {m: {k: v for k, v in r.items() if not k.startswith(WSSS_PREFIX)} for m, r in summary.items()}
        summary = {m: r for m, r in summary.items() if r}
    if summary:
        keys = sorted({k for v in summary.values() for k in v})
        models = sorted(summary)
        rows = [[k] + [_quantity(k, summary[m].get(k, float("nan"))) for m in models] for k in keys]
        out += ["Adversarial detection AUROC (§3b) and model-randomisation Spearman (§6: correlation of the map "
                "with the map after re-initialising the named layer and those above it; lower = the map depends "
                "more on the weights):", "", _table(["quantity", *models], rows), ""]
        out += randomisation_notes(summary, cfg.evaluate.randomisation_images)
    ml = multilabel_table(test)
    if ml is not None:
        rows = test[test.method != "none"]
        pg = rows.groupby([np.where(rows["mode"] == "random", "random", "trained"), "method"])[
            ["pointing_game", "pxap"]].mean().unstack(0)
        out += ["## Multi-label data: mAP and the per-class pointing game", "",
                "mAP: mean over classes of the average precision of each class's logit over the test images; "
                "top-1: the top class is one of the image's labels. Attribution rows are per (image, class) "
                "pair, each against that class's own mask (a hit when the map's maximum falls on it).", "",
                _table(["model", "mAP", "top-1 accuracy", "images"],
                       [[m, f"{r['mAP']:.3f}", f"{r['top1_acc']:.3f}", f"{int(r['images'])}"]
                        for m, r in ml.iterrows()]), "",
                _table(["method", "per-class pointing game", "PxAP", "pointing game, re-initialised model",
                        "PxAP, re-initialised model"],
                       [[m] + [f"{r.get((c, w), float('nan')):.3f}" for w in ("trained", "random")
                               for c in ("pointing_game", "pxap")] for m, r in pg.iterrows()]), ""]
    out += ["## The claims, one line each", ""]
    out += _claim_lines(test, dwsol, summary)
    c, sc = cfg.consistency, cfg.scaat
    calibrated = (sweep or {}).get("haf") or {}
    haf = (", ".join(f"{m} {v['steps']} steps at lr {v['lr']:g} (calibrated on validation)"
                     for m, v in sorted(calibrated.items())) if calibrated
           else f"HAF {cfg.evaluate.haf_steps} steps at lr {cfg.evaluate.haf_lr:g}")
    out += ["", f"Settings tried in this run: consistency {c.rounds} rounds (round 0 = ERM at epoch "
                f"{cfg.train.epochs - (c.rounds - 1) * c.round_epochs}, then {c.round_epochs} epochs per round), "
                f"power {c.power:g}, cap {c.w_max if c.w_max is not None else 'none'}, eps {c.eps:.4f}, mask "
                f"{c.mask_source}; SCAAT keep {sc.keep:g}, eps {sc.eps:.4f}, {sc.steps} PGD step(s), lambda "
                f"{sc.lam:g}; TIF base {cfg.evaluate.tif_base}; {haf}. "
                "A verdict holds for these settings on this benchmark only. Each difference is A minus its "
                "comparator over the (seed, test image) cells both were measured on, with a paired bootstrap "
                f"95% CI ({BOOTSTRAP_RESAMPLES} resamples of seeds and images); 'inconclusive' means the CI holds 0."]
    return "\n".join(out) + "\n"


def _claim_lines(test: Any, dwsol: Any | None, summary: dict) -> list[str]:
    """One line per paper: each claimed difference, A minus its comparator, with its CI and verdict."""
    lines = []
    test = with_bias(test)
    if {"deletion_auc", "deletion_auc_random"} <= set(test.columns):  # each model's own random-order baseline
        test = test.assign(deletion_vs_random=test["deletion_auc"] - test["deletion_auc_random"])
    modes, erm_methods = set(test["mode"]), set(test[test["mode"] == "erm"].method)
    acc = test[test.method == "none"]  # accuracy rows

    def line(pid: str, parts: list[str]) -> None:
        lines.append(f"- **{pid}** ({CLAIMS[pid]}) " + "; ".join(parts) + ".")

    def cmp(what: str, metric: str, a: dict, b: dict, frame: Any = test, higher: bool = True,
            statistic: str = "mean") -> str:
        return f"{what}: {paired(frame, metric, a, b, higher_is_better=higher, statistic=statistic).text()}"

    if {"erm", "consistency"} <= modes:
        parts = [cmp("conflicting-group accuracy, consistency vs. ERM", "correct",
                     {"mode": "consistency", "bias": 1}, {"mode": "erm", "bias": 1}, acc),
                 cmp("accuracy, consistency vs. ERM", "correct", {"mode": "consistency"}, {"mode": "erm"}, acc),
                 cmp("Grad-CAM EPG, consistency vs. ERM", "energy_pointing_game",
                     {"mode": "consistency", "method": "gradcam"}, {"mode": "erm", "method": "gradcam"})]
        for base in [b for b in ("jtt", "group_balanced") if b in modes]:  # the baselines it must reach
            parts.append(cmp(f"conflicting-group accuracy, consistency vs. {base}", "correct",
                             {"mode": "consistency", "bias": 1}, {"mode": base, "bias": 1}, acc))
        line("000", parts)
    if {"erm", "scaat"} <= modes:
        sal = {"method": "saliency"}
        parts = [cmp("saliency Gini, SCAAT vs. ERM", "gini", {"mode": "scaat", **sal}, {"mode": "erm", **sal}),
                 cmp("saliency deletion AUC minus the model's random-order one, SCAAT vs. ERM", "deletion_vs_random",
                     {"mode": "scaat", **sal}, {"mode": "erm", **sal}, higher=False),
                 cmp("accuracy, SCAAT vs. ERM", "correct", {"mode": "scaat"}, {"mode": "erm"}, acc)]
        for ctrl in [c for c in ("adv_whole", "adv_random") if c in modes]:  # saliency-guided, or adversarial?
            parts += [cmp(f"saliency Gini, SCAAT vs. {ctrl}", "gini", {"mode": "scaat", **sal},
                          {"mode": ctrl, **sal}),
                      cmp(f"saliency deletion AUC minus the model's random-order one, SCAAT vs. {ctrl}",
                          "deletion_vs_random", {"mode": "scaat", **sal}, {"mode": ctrl, **sal}, higher=False),
                      cmp(f"accuracy, SCAAT vs. {ctrl}", "correct", {"mode": "scaat"}, {"mode": ctrl}, acc)]
        line("002", parts)
    if dwsol is not None and len(dwsol) and "haf" in set(dwsol.method):
        det = []
        for model, r in sorted(summary.items()):
            for tag in sorted({k.rsplit("_", 1)[1] for k in r if k.startswith("detection_auroc_")}):
                cells = [f"{m} {r[f'detection_auroc_{m}_{tag}']:.3f} [{r[f'detection_low_{m}_{tag}']:.3f}, "
                         f"{r[f'detection_high_{m}_{tag}']:.3f}]" for m in ("haf", "haf_one_sided", "gradcam")
                         if f"detection_auroc_{m}_{tag}" in r]
                det.append(f"{model} at {tag[3:]}/255 ({int(r.get(f'detection_images_{tag}', 0))} images): "
                           + ", ".join(cells))
        d_methods = set(dwsol[dwsol["mode"] == "erm"].method)
        parts = []
        for haf in [m for m in ("haf", "haf_one_sided") if m in d_methods]:
            for other in [m for m in sorted(d_methods) if not m.startswith("haf")]:
                parts.append(cmp(f"false response, {haf} vs. {other}", "false_response",
                                 {"mode": "erm", "method": haf}, {"mode": "erm", "method": other}, dwsol,
                                 higher=False, statistic="median"))
        line("001", ["ERM models, absent class drawn per image, raw maps" + (": " if parts else "")
                     + "; ".join(parts),
                     "5-fold cross-validated detection AUROC with 95% CI over images (correctly classified "
                     "images the attack flipped): " + ("; ".join(det) or "not measured")])
    if "tif" in erm_methods:
        parts = []
        controls = ("tif_base_fused", "gradcam", "gradcam_thresholded", "gradcam_fused", "tif_fusion_only",
                    "tif_one_layer", "tif_uniform", "input_x_gradient")
        erm = {"mode": "erm", "method": "tif"}
        for ctrl in [c for c in controls if c in erm_methods]:
            parts.append(cmp(f"PxAP, TIF vs. {ctrl} (ERM models)", "pxap", erm, {"mode": "erm", "method": ctrl}))
        for ctrl in [c for c in ("tif_fusion_only", "gradcam_thresholded") if c in erm_methods]:
            parts.append(cmp(f"EPG, TIF vs. {ctrl}", "energy_pointing_game", erm, {"mode": "erm", "method": ctrl}))
        line("003", parts)
    return lines


# --- reproduction check: one RESULTS.md against another -------------------------------------------------

_PM = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*±\s*(\d+(?:\.\d+)?)\s*$")
# the phrases Difference.text writes, and those of RESULTS.md files written before the bootstrap CIs (a mean
# difference against the sum of the seeds' stds), so that an old reference can still be compared
LEGACY_VERDICTS = ("within seed-to-seed noise: inconclusive", "not better (1 seed: no spread, inconclusive)",
                   "better (1 seed: no spread, inconclusive)", "not supported")
_VERDICTS = re.compile("→ (" + "|".join(map(re.escape, LEGACY_VERDICTS + stats.VERDICTS)) + ")")


def mean_std_cells(markdown: str) -> dict[tuple[str, str, str], tuple[float, float]]:
    """Every "mean ± std" cell of a RESULTS.md, keyed by (section, row label, column)."""
    cells: dict[tuple[str, str, str], tuple[float, float]] = {}
    section, header = "", None
    for line in markdown.splitlines():
        if line.startswith("#"):
            section, header = line.lstrip("#").strip(), None
            continue
        if not line.startswith("|"):
            header = None
            continue
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = row
        elif not set(line.replace("|", "").strip()) <= {"-", ":"}:
            for col, cell in zip(header[1:], row[1:]):
                if m := _PM.match(cell):
                    cells[(section, row[0], col)] = (float(m.group(1)), float(m.group(2)))
    return cells


def claim_verdicts(markdown: str) -> dict[str, list[str]]:
    """The verdicts of each paper's claim line ("- **000** ... → supported; ..."), in order."""
    out = {}
    for line in markdown.splitlines():
        if m := re.match(r"- \*\*(\d{3})\*\*", line):
            out[m.group(1)] = _VERDICTS.findall(line)
    return out


def compare_results(reference: str, rerun: str) -> dict[str, Any]:
    """A rerun's RESULTS.md against the reference (docs/RESULTS.md): for every mean ± std cell in both, the
    difference of the means against the reference's std and against the sum of both stds (the test the
    verdicts use), and whether every claim got the same verdicts."""
    a, b = mean_std_cells(reference), mean_std_cells(rerun)
    rows = []
    for key in sorted(a.keys() & b.keys()):
        (m0, s0), (m1, s1) = a[key], b[key]
        d = m1 - m0
        rows.append({"section": key[0], "row": key[1], "column": key[2], "reference": m0, "reference_std": s0,
                     "rerun": m1, "rerun_std": s1, "diff": d, "within_reference_std": abs(d) <= s0 + 5e-4,
                     "within_sum_of_stds": abs(d) <= s0 + s1 + 1e-3})
    va, vb = claim_verdicts(reference), claim_verdicts(rerun)
    return {"cells": rows, "only_in_reference": sorted(map(list, a.keys() - b.keys())),
            "only_in_rerun": sorted(map(list, b.keys() - a.keys())),
            "within_reference_std": sum(r["within_reference_std"] for r in rows),
            "within_sum_of_stds": sum(r["within_sum_of_stds"] for r in rows),
            "verdicts": {k: {"reference": va.get(k), "rerun": vb.get(k), "same": va.get(k) == vb.get(k)}
                         for k in sorted(va.keys() | vb.keys())}}


def comparison_text(res: dict[str, Any]) -> str:
    """Readable summary of compare_results: the counts, every cell beyond the reference's std, the verdicts."""
    n = len(res["cells"])
    lines = [f"{n} mean ± std cells in both: {res['within_reference_std']} within the reference's std, "
             f"{res['within_sum_of_stds']} within the sum of both stds, "
             f"{n - res['within_sum_of_stds']} beyond."]
    for what in ("only_in_reference", "only_in_rerun"):
        if res[what]:
            lines.append(f"{len(res[what])} cells {what.replace('_', ' ')}, e.g. {res[what][0]}")
    beyond = [r for r in res["cells"] if not r["within_reference_std"]]
    if beyond:
        lines.append("\nCells beyond the reference's std (section | row | column: reference -> rerun):")
        for r in beyond:
            flag = "" if r["within_sum_of_stds"] else "   <- beyond the sum of both stds"
            lines.append(f"  {r['section'][:40]} | {r['row']} | {r['column']}: {r['reference']:.3f} ± "
                         f"{r['reference_std']:.3f} -> {r['rerun']:.3f} ± {r['rerun_std']:.3f}{flag}")
    lines.append("\nClaims:")
    for k, v in res["verdicts"].items():
        lines.append(f"  {k}: {'same verdicts' if v['same'] else 'DIFFERENT verdicts'}: "
                     f"reference {v['reference']}, rerun {v['rerun']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.results REFERENCE RERUN [--json OUT]``: does a rerun reproduce RESULTS.md?
    Exit status 0 when every shared cell is within the sum of both stds and every verdict is the same."""
    import argparse
    import json
    from pathlib import Path

    ap = argparse.ArgumentParser(description="Compare a rerun's RESULTS.md with the reference (docs/RESULTS.md).")
    ap.add_argument("reference")
    ap.add_argument("rerun")
    ap.add_argument("--json", default=None, help="also write the per-cell comparison here")
    args = ap.parse_args(argv)
    texts = []
    for path in (args.reference, args.rerun):
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise SystemExit(f"cannot read {path}: {e.strerror}; expected a RESULTS.md written by the "
                             "report stage") from None
    res = compare_results(*texts)
    if not res["cells"]:
        raise SystemExit(f"no 'mean ± std' cells in common between {args.reference} and {args.rerun}; "
                         "expected two RESULTS.md files of runs with several seeds")
    print(comparison_text(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1), encoding="utf-8")
    same = res["within_sum_of_stds"] == len(res["cells"]) and all(v["same"] for v in res["verdicts"].values())
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
