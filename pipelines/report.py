"""Stage report: comparison tables (model x method x metric) and figures (heatmap grids, deletion/insertion
curves, alpha curve, consistency weights by bias group), logged to MLflow and written as one
self-contained HTML file (report/report.html).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import evaluate, ingest, sweep
from pipelines import storage as st
from pipelines.common import default_alphas, split_key

log = logging.getLogger("xai.report")
STAGE = "report"
TEST_METRICS = ["pxap", "pointing_game", "energy_pointing_game", "iou", "wsss_miou", "gini", "deletion_auc",
                "deletion_auc_random", "insertion_auc"]
DWSOL_METRICS = ["hit_a", "hit_b", "false_response", "accuracy"]


def accuracy_table(df: Any) -> Any:
    """Per model: accuracy on aligned/conflicting groups, worst group, PGD robust accuracy."""
    import pandas as pd

    from pipelines.results import with_bias

    acc = with_bias(df[df.method == "none"])
    rows = []
    for model, g in acc.groupby("model"):
        row = {"model": model, "accuracy": g.correct.mean()}
        for grp, name in ((0, "aligned"), (1, "conflicting")):
            sel = g[g.bias == grp] if "bias" in g.columns else g.iloc[:0]  # without backgrounds: n/a
            row[f"acc_{name}"] = sel.correct.mean() if len(sel) else np.nan
        both = [v for v in (row["acc_aligned"], row["acc_conflicting"]) if v == v]
        row["worst_group"] = min(both) if both else np.nan  # NaN without groups (a real dataset's images)
        for c in sorted(c for c in g.columns if c.startswith("robust_acc_")):
            row[c.replace("robust_acc_", "pgd_acc_eps") + "/255"] = g[c].mean()
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def metric_table(df: Any, metrics: list[str]) -> Any:
    sub = df[df.method != "none"]
    cols = [m for m in metrics if m in sub.columns]
    return sub.groupby(["model", "method"])[cols].mean()


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def heatmap_grid(cfg: Any, store: st.Storage, ingest_manifest: dict, models: dict[str, str],
                 alphas: dict[str, float]) -> Any:
    """Same images, every method (columns) for one model per mode, its first seed (row blocks), object outline
    drawn; a method not evaluated on a mode (evaluate.mode_methods) is left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from pipelines.common import load_model, to_tensors

    k = cfg.evaluate.figure_images
    data = to_tensors(ingest.read_split_numpy(store, ingest_manifest, "test", limit=k))
    x, y, mask = data["image"], data["label"].long(), data["mask"].bool()
    methods = cfg.evaluate.methods
    first: dict[str, tuple[int, str]] = {}
    for key in models:
        mode, seed = split_key(key)
        first[mode] = min(first.get(mode, (seed, key)), (seed, key))
    models = {key: models[key] for _, key in first.values()}
    fig, axes = plt.subplots(len(models) * k, len(methods) + 1,
                             figsize=(1.3 * (len(methods) + 1), 1.3 * len(models) * k), squeeze=False)
    for mi, (key, path) in enumerate(sorted(models.items())):
        model = load_model(cfg, store.read_bytes(path), path)
        maps = {m: evaluate.explain_fn(cfg, m, alphas)(model, x, y) for m in evaluate.methods_of(cfg, key)}
        for i in range(k):
            r = mi * k + i
            axes[r, 0].imshow(x[i].permute(1, 2, 0).numpy())
            axes[r, 0].set_ylabel(f"{key}\n#{i} y={int(y[i])}", fontsize=6)
            for j, m in enumerate(methods, start=1):
                if r == 0:
                    axes[r, j].set_title(m, fontsize=6)
                if m not in maps:
                    continue
                axes[r, j].imshow(maps[m][i].numpy(), cmap="jet")
                axes[r, j].contour(mask[i].float().numpy(), levels=[0.5], colors="white", linewidths=0.6)
            for ax in axes[r]:
                ax.set_xticks([])
                ax.set_yticks([])
        del model, maps
        torch.set_grad_enabled(True)
    fig.tight_layout()
    return fig


def curves_figure(store: st.Storage, manifest: dict) -> Any:
    """Deletion and insertion curves, averaged over test images and seeds: every method on the ERM models
    (top row), and ERM vs. consistency vs. SCAAT for saliency and Grad-CAM (bottom row)."""
    import matplotlib.pyplot as plt

    df = evaluate.read_frame(store, manifest, "test", curves=True)
    df = df[df.method != "none"]
    from pipelines.config import MODES

    modes = [m for m in MODES if m in set(df["mode"])]
    base = "erm" if "erm" in modes else modes[0]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False)
    panels = [(axes[0], df[df["mode"] == base], "method", f"{base} models, every method"),
              (axes[1], df[df.method.isin(["saliency", "gradcam"])], ["mode", "method"],
               "saliency and Grad-CAM, by training mode")]
    for row, sub, by, title in panels:
        for key, g in sub.groupby(by):
            label = key if isinstance(key, str) else "/".join(key)
            for ax, col in zip(row, ("deletion_curve", "insertion_curve")):
                c = np.stack(g[col].to_numpy()).mean(0)
                ax.plot(np.linspace(0, 1, len(c)), c, label=label, lw=1.2)
        for ax, t in zip(row, ("deletion (lower is better)", "insertion (higher is better)")):
            ax.set_title(f"{t}: {title}", fontsize=9)
            ax.set_xlabel("fraction of pixels")
            ax.set_ylabel("p(target), mean over images and seeds")
        row[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return fig


def alpha_figure(sweep: dict) -> Any:
    import matplotlib.pyplot as plt

    metrics = [m for m in ("pxap", "energy_pointing_game", "deletion_auc", "gini") if m in sweep["rows"][0]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3), squeeze=False)
    best = sweep.get("best_alphas") or {"tif": sweep["best_alpha"]}
    for ax, metric in zip(axes[0], metrics):
        for method in sorted({r["method"] for r in sweep["rows"]}):
            rows = sorted((r for r in sweep["rows"] if r["method"] == method), key=lambda r: r["alpha"])
            line, = ax.plot([r["alpha"] for r in rows], [r[metric] for r in rows], marker="o", label=method)
            if method in best:  # each method's own pick, in its colour
                ax.axvline(best[method], ls="--", c=line.get_color(), lw=0.8)
        ax.set_xlabel("alpha")
        ax.set_title(metric + (" (lower is better)" if metric == "deletion_auc" else ""))
    axes = axes[0]
    axes[0].legend(fontsize=7)
    return fig


def haf_figure(haf: dict) -> Any:
    """HAF's objective curves from the sweep's calibration: one panel per HAF reading, one line per learning
    rate (mean over validation images of the objective of the masks kept after each step), the pick marked."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(haf), figsize=(4.6 * len(haf), 3.4), squeeze=False)
    for ax, (method, c) in zip(axes[0], sorted(haf.items())):
        for lr, curve in sorted(c["curves"].items(), key=lambda kv: float(kv[0])):
            ax.plot(range(len(curve)), curve, label=f"lr {lr}", lw=1.2)
        ax.plot([c["steps"]], [c["curves"][f"{c['lr']:g}"][c["steps"]]], "ko", ms=5,
                label=f"pick: lr {c['lr']:g}, {c['steps']} steps")
        ax.set_yscale("log")
        ax.set_xlabel("Adam steps")
        ax.set_ylabel("objective P_c + lam * sparsity (mean)")
        ax.set_title(f"{method}: objective curve (validation)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def reweighting_rounds(cfg: Any, store: st.Storage) -> list[dict]:
    """The committed precompute rounds of this config: seed, round, the weight statistics by bias group
    and the weights file (stale rounds of another config are left out)."""
    from pipelines import precompute

    out = []
    if "consistency" not in cfg.train.modes:
        return out
    for seed in cfg.train.seeds:
        for rnd in range(1, cfg.consistency.rounds):
            m = st.committed(store, f"{precompute.STAGE}/s{seed}_round{rnd}", precompute.config_hash(cfg, seed, rnd))
            if m and m["files"].get("weights"):
                out.append({"seed": seed, "round": rnd, **m.get("stats", {}), "weights": m["files"]["weights"][0]})
    return out


def weights_figure(store: st.Storage, rounds: list[dict]) -> Any | None:
    """Per-sample consistency weights against the bias group, for every precompute round."""
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    if not rounds:
        return None
    fig, axes = plt.subplots(1, len(rounds), figsize=(3.5 * len(rounds), 3), squeeze=False)
    for ax, r in zip(axes[0], rounds):
        t = pq.read_table(store.path(r["weights"]), filesystem=store.fs).to_pandas()
        for grp, name in ((0, "aligned"), (1, "conflicting")):
            ax.hist(t.w[t.group == grp], bins=30, alpha=0.6, density=True, label=name)
        ax.set_title(f"seed {r['seed']}, round {r['round']}", fontsize=8)
        ax.set_xlabel("weight w")
        ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    return fig


def checkpoint_table(cfg: Any, train_manifest: dict) -> Any:
    """Per model: the last epoch and the epoch of best validation worst-group accuracy, their validation
    accuracies, and which of the two was evaluated (evaluate.checkpoint)."""
    import pandas as pd

    rows = {}
    for key in sorted(train_manifest["files"]):
        ck = train_manifest.get("checkpoints", {}).get(key, {})
        row = {}
        for which, label in (("last", "last"), ("best_val_worst_group", "best val worst group")):
            c = ck.get(which, {})
            row.update({f"{label}: epoch": c.get("epoch"), f"{label}: val acc": c.get("val_acc"),
                        f"{label}: val worst group": c.get("val_worst_group_acc")})
        row["evaluated"] = cfg.evaluate.checkpoint
        rows[key] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def _table_html(df: Any, title: str) -> str:
    return f"<h2>{html.escape(title)}</h2>" + df.to_html(float_format=lambda v: f"{v:.3f}", border=0)


def tune_results(cfg: Any, store: st.Storage) -> dict[str, dict]:
    """The training-knob sweep's results.json of every swept mode that has one (``sweep.run_knobs``)."""
    from pipelines.sweep import KNOBS_STAGE

    return {m: store.read_json(KNOBS_STAGE, m, "results.json") for m in cfg.tune.spaces
            if store.exists(KNOBS_STAGE, m, "results.json")}


def config_hash(cfg: Any, evaluate_manifest: dict) -> str:
    return evaluate_manifest["config_hash"] + "-" + cfg.section_hash("evaluate")[:6]


def run(cfg: Any, store: st.Storage, ingest_manifest: dict, train_manifest: dict, eval_manifest: dict,
        sweep_result: dict | None, tracker: Any, stage_run: str, force: bool = False) -> tuple[dict, bool]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = config_hash(cfg, eval_manifest)
    if not force and (m := st.committed(store, STAGE, h)):
        return m, False
    st.begin(store, STAGE)
    test = evaluate.read_frame(store, eval_manifest, "test")
    tables = {f"Checkpoints (validation worst group: >= {cfg.train.val_min_group} images per group)":
              checkpoint_table(cfg, train_manifest),
              "Accuracy, worst group and PGD robustness": accuracy_table(test),
              "Attribution metrics on the test split (mean per model and method)": metric_table(test, TEST_METRICS)}
    from pipelines.results import multilabel_table

    ml = multilabel_table(test)
    if ml is not None:
        tables["Multi-label: mAP and top-1 accuracy (attribution rows above are per (image, class) pair, "
               "against that class's mask: a per-class pointing game)"] = ml
    from pipelines.results import group_weighted_accuracy, pointing_game_table, wsol_table

    if (wt := wsol_table(test)) is not None:
        tables["WSOL: MaxBoxAcc (IoU 0.3/0.5/0.7) and MaxBoxAccV2 with a bootstrap 95% CI over images "
               "(Choe et al. CVPR 2020)"] = wt
    if (pt := pointing_game_table(test, cfg.data.num_classes)) is not None:
        tables["Per-class pointing game, TorchRay's protocol (classes whose objects are all difficult left out; "
               "published reference on VOC07 test with ResNet-50, another split than VOC 2012 val: Grad-CAM "
               "90.4 all / 82.3 difficult)"] = pt
    if cfg.data.source == "waterbirds":
        groups = ingest.read_split_numpy(store, ingest_manifest, "train", columns=["group"])["group"]
        if (gt := group_weighted_accuracy(test, groups)) is not None:
            from pipelines.results import JTT_PUBLISHED

            tables["Groups: worst-group accuracy and the average weighted by the training groups (published "
                   f"reference {JTT_PUBLISHED})"] = gt
    summary = store.read_json(evaluate.STAGE, "summary.json") if store.exists(evaluate.STAGE, "summary.json") else {}
    from pipelines.results import WSSS_PREFIX, wsss_table

    if (wt := wsss_table(summary)) is not None:
        tables["WSSS: pseudo-mask mIoU, background threshold chosen on the validation split (held out of the "
               "training list), test mIoU with a bootstrap 95% CI over images"] = wt
    if "dwsol" in eval_manifest["files"]:
        tables["D-WSOL (METHODS §3a)"] = metric_table(evaluate.read_frame(store, eval_manifest, "dwsol"),
                                                      DWSOL_METRICS)
    alphas = eval_manifest.get("alphas") or default_alphas(cfg)
    evaluated = evaluate.evaluated_checkpoints(cfg, train_manifest)
    figures = {"heatmaps": heatmap_grid(cfg, store, ingest_manifest, evaluated, alphas),
               "deletion_insertion_curves": curves_figure(store, eval_manifest)}
    if sweep_result:
        figures["alpha_curve"] = alpha_figure(sweep_result)
        if sweep_result.get("haf"):
            figures["haf_objective_curve"] = haf_figure(sweep_result["haf"])
    rounds = reweighting_rounds(cfg, store)
    wf = weights_figure(store, rounds)
    if wf is not None:
        figures["consistency_weights_by_group"] = wf
    parts = [f"<html><head><meta charset='utf-8'><title>xai-ray report: {html.escape(cfg.name)}</title>"
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
             "td,th{padding:2px 8px;text-align:right}img{max-width:100%}</style></head><body>",
             f"<h1>xai-ray report: {html.escape(cfg.name)}</h1>",
             f"<p>Settings tuned on validation and used in evaluation (alphas; HAF's steps and lr): "
             f"{', '.join(f'{m} {a:g}' for m, a in sorted(alphas.items()))}; "
             f"models: {', '.join(sorted(train_manifest['files']))}</p>"]
    for title, df in tables.items():
        parts.append(_table_html(df, title))
    tune = tune_results(cfg, store)
    for mode, res in tune.items():
        import pandas as pd

        frame = pd.DataFrame([{"setting": ", ".join(f"{k}={v}" for k, v in sorted(t["knobs"].items())),
                               "chosen": t["knobs"] == res["best"],
                               **{k: t[k] for k in sweep.TUNE_SCORES}} for t in res["trials"]]).set_index("setting")
        parts.append(_table_html(frame, f"Knob sweep for {mode} (seeds {res['seeds']}, validation split, chosen by "
                                        f"{res['metric']}, {res['direction']})"))
    checks = {m: {k: v for k, v in r.items() if not k.startswith(WSSS_PREFIX)} for m, r in summary.items()}
    if checks := {m: r for m, r in checks.items() if r}:
        import pandas as pd
        parts.append(_table_html(pd.DataFrame(checks), "Adversarial detection AUROC (§3b) and model "
                                 "randomisation Spearman (§6)"))
        from pipelines.results import randomisation_notes

        parts += [f"<p>{html.escape(line.lstrip('- '))}</p>"
                  for line in randomisation_notes(checks, cfg.evaluate.randomisation_images) if line]
    with tempfile.TemporaryDirectory() as d:
        for name, fig in figures.items():
            title = html.escape(name.replace("_", " "))
            parts.append(f"<h2>{title}</h2><img src='data:image/png;base64,{_png(fig)}'/>")
            with tracker.active(stage_run):
                import mlflow
                mlflow.log_figure(fig, f"figures/{name}.png")
            plt.close(fig)
        parts.append("</body></html>")
        page = "\n".join(parts)
        store.write_bytes(page.encode(), STAGE, "report.html")
        path = Path(d) / "report.html"
        path.write_text(page)
        tracker.log_artifact(stage_run, str(path))
        for i, (_title, df) in enumerate(tables.items()):
            p = Path(d) / f"table_{i}.csv"
            df.to_csv(p)
            tracker.log_artifact(stage_run, str(p), "tables")
    from pipelines.results import results_markdown

    dwsol = evaluate.read_frame(store, eval_manifest, "dwsol") if "dwsol" in eval_manifest["files"] else None
    command = f"python pipelines/full.py --config configs/{cfg.name}.yaml"
    results = results_markdown(cfg, test, dwsol, summary, sweep_result, command, rounds, tune)
    store.write_bytes(results.encode(), STAGE, "RESULTS.md")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "RESULTS.md").write_text(results)
        tracker.log_artifact(stage_run, str(Path(d) / "RESULTS.md"))
    manifest = st.commit(store, STAGE, h, rows={"tables": len(tables)},
                         files={"report": [f"{STAGE}/report.html"], "results": [f"{STAGE}/RESULTS.md"]})
    return manifest, True
