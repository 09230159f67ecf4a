"""Stage train: Ray Train TorchTrainer, modes erm | consistency (METHODS §5a) | scaat (§5b).

One plain function per worker (``train_loop``); rank 0 logs to MLflow and writes checkpoints every
epoch; a restarted worker group resumes from the last checkpoint (FailureConfig). Models land in
train/<mode>_s<seed>/model.pt (each with its own manifest, so a rerun skips finished models).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines import ingest
from pipelines import storage as st
from pipelines.common import (
    load_model,
    load_state,
    make_model,
    model_hash,
    model_key,
    pause_point,
    pick_device,
    progress,
    quiet_train_worker,
    set_threads,
    shard_limit,
    state_bytes,
    to_tensors,
    train_log_level,
    trainer_input,
)
from pipelines.config import ADV_MODES, WEIGHTED_MODES

log = logging.getLogger("xai.train")
STAGE = "train"
STATE_FILE = "state.pt"
# ERM warm-ups of consistency training, named by their epoch and ERM config: the same file for every consistency
# model of a seed, and for every knob-sweep trial (a scoped store shares this folder with the run)
WARMUPS = "warmups"


def config_hash(cfg: Any) -> str:
    return cfg.section_hash(*trained_sections(cfg))


def trained_sections(cfg: Any) -> tuple[str, ...]:
    """The config sections the trained models depend on (jtt's only when a jtt model is trained: a run
    committed before the jtt mode existed keeps its key)."""
    return ("data", "model", "train", "consistency", "scaat") + (("jtt",) if "jtt" in cfg.train.modes else ())


def label_sets(cfg: Any) -> list[str]:
    """The multi-hot column the training and validation rows also need on multi-label data."""
    return ["labels"] if cfg.data.multilabel else []


def warmup_epochs(cfg: Any) -> int:
    """Epochs of plain training before consistency round 1 (round 0 = the ERM model at this epoch)."""
    return cfg.train.epochs - (cfg.consistency.rounds - 1) * cfg.consistency.round_epochs


# ------------------------------------------------------------------------------------------ worker
def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], mode: str, cfg: Any,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The training loss of one batch for a mode; returns (loss, logits, extra metrics)."""
    from xai_core.objectives import scaat_loss, weighted_cross_entropy

    x, y = batch["image"], batch["label"].long()
    if mode in ADV_MODES:
        # METHODS §5b on the unwrapped module; under DDP train_loop averages the gradients itself. adv_whole /
        # adv_random: the same loss and budgets, the attack over the whole image / a random region of SCAAT's size
        s = cfg.scaat
        res = scaat_loss(getattr(model, "module", model), x, y, keep=s.keep, eps=s.eps, eps_min=s.eps_min,
                         steps=s.steps, lam=s.lam, generator=generator, region=ADV_MODES[mode])
        return res.loss, res.logits, {"kl": float(res.kl), "eps_mean": float(res.eps_i.mean())}
    logits = model(x)
    if cfg.train.loss == "bce":  # multi-label: one sigmoid per class against the image's label set
        return F.binary_cross_entropy_with_logits(logits, batch["labels"].float()), logits, {}
    w = batch.get("w") if mode in WEIGHTED_MODES else None
    if w is None:
        return F.cross_entropy(logits, y), logits, {}
    return weighted_cross_entropy(logits, y, w.float()), logits, {"w_mean": float(w.mean())}


def top1_correct(pred: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Whether each predicted class is right: the label, or (multi-label data) one of the image's labels."""
    if "labels" in batch:
        return batch["labels"].bool().gather(1, pred.long()[:, None]).squeeze(1)
    return pred == batch["label"]


def val_metrics(model: torch.nn.Module, val: dict[str, torch.Tensor], min_group: int, num_backgrounds: int,
                batch_size: int) -> dict[str, float]:
    """Validation accuracy and worst-group accuracy of ``model`` (forwards only, eval mode, no gradients: the
    training trajectory is untouched). Groups are (class, background) pairs, or classes where the data
    have no backgrounds (-1); the worst is over groups of >= ``min_group`` images (NaN if none has).
    Multi-label data: accuracy is the top-1 class being one of the image's labels, groups are keyed by the
    first object's class, and ``val_map`` (mAP of the logits) is added."""
    from xai_core.metrics.groups import group_accuracy, group_ids

    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(val["image"][i:i + batch_size]) for i in range(0, len(val["label"]), batch_size)])
    model.train(was_training)
    pred = logits.argmax(1)
    correct = top1_correct(pred, val).cpu()
    labels, bgs = val["label"].cpu().long(), val["background"].cpu().long()
    groups = labels if bool((bgs < 0).any()) else group_ids(labels, bgs, num_backgrounds)
    acc = group_accuracy(correct, groups, min_size=min_group)
    out = {"val_acc": acc["mean"], "val_worst_group_acc": acc["worst"]}
    if "group" in val:  # bias groups given (the knob sweep's scoring): accuracy on the conflicting ones
        conflicting = val["group"].cpu() == 1
        out["val_conflicting_acc"] = float(correct[conflicting].float().mean()) if bool(conflicting.any()) \
            else float("nan")
    if "labels" in val:
        from xai_core.metrics import mean_average_precision

        out["val_map"] = mean_average_precision(logits.cpu(), val["labels"].cpu())
    return out


def make_optimizer(model: torch.nn.Module, cfg: Any, state: dict | None, lr: float | None = None,
                   reset: bool = False) -> torch.optim.Optimizer:
    """Adam at ``lr`` (None: train.lr), continuing ``state``'s optimizer unless ``reset`` (a reweighted round's
    ``consistency.reset_optimizer``); the lr is set after loading, which would bring the saved one back."""
    lr = lr or cfg.train.lr
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.train.weight_decay)
    if state is not None and "optimizer" in state and not reset:
        opt.load_state_dict(state["optimizer"])
        for group in opt.param_groups:
            group["lr"] = lr
    return opt


def round_start(cfg: Any, previous: str) -> str | None:
    """Where a reweighted round starts: the previous round's (or the warm-up's) checkpoint, or a fresh model
    (``consistency.init: scratch``, seeded like every model of the seed)."""
    return None if cfg.consistency.init == "scratch" else previous


def train_loop(lc: dict) -> None:
    """Per-worker training function (Ray Train). lc: cfg, mode, epochs, epoch_offset, init_path, run_id."""
    import ray.train
    import ray.train.torch

    from pipelines.config import Config

    quiet_train_worker()
    cfg = Config.model_validate(lc["cfg"])
    ctx = ray.train.get_context()
    set_threads(cfg.train.threads_per_worker, ctx.get_local_world_size())
    rank = ctx.get_world_rank()
    torch.manual_seed(lc["seed"])
    device = pick_device(cfg.train.device)
    model = make_model(cfg)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # a restarted worker group: continue after the last reported epoch
        with ckpt.as_directory() as d:
            state = load_state(os.path.join(d, STATE_FILE), "Ray Train checkpoint")
        start = int(state["epoch"])
    elif lc.get("init_path"):
        store = st.Storage(*lc["storage"])
        state = load_state(store.read_bytes(lc["init_path"]), lc["init_path"])
        state["epoch"] = 0
    else:
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
    # a restarted worker group always continues its own Adam state; a round's start may reset it
    opt = make_optimizer(model, cfg, state, lr=lc.get("lr"), reset=ckpt is None and bool(lc.get("reset_optimizer")))
    model = ray.train.torch.prepare_model(model)
    use_amp = cfg.train.mixed_precision and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    tracker = None
    if rank == 0 and lc.get("run_id"):
        from pipelines.tracking import Tracker
        tracker = Tracker(lc["tracking_uri"], cfg.tracking.experiment)
    nodes = _worker_nodes(ctx.get_world_size())  # a collective: every rank takes part
    logged = 0  # MLflow steps already in the run: a restarted worker never logs a step twice
    if tracker is not None:
        tracker.set_tags(lc["run_id"], {"worker_nodes": ",".join(nodes)})
        logged = tracker.last_step(lc["run_id"], "loss")
        if ckpt is not None:  # a lost worker (FailureConfig) or a rerun after the driver died (same run name)
            resumed = lc["epoch_offset"] + start
            if logged < resumed and state.get("metrics"):  # killed between checkpoint and log: log it now
                tracker.log_metrics(lc["run_id"], state["metrics"], step=resumed)
                logged = resumed
            tracker.log_metrics(lc["run_id"], {"resumed_from_epoch": resumed}, step=resumed)
            progress(f"[{lc['mode']} s{lc['seed']}] resumed from epoch {resumed} (Ray Train checkpoint)")
    val = None
    if rank == 0 and lc.get("val"):
        cols = ingest.read_split_numpy(st.Storage(*lc["storage"]), lc["val"], "val",
                                       columns=["image", "label", "background"] + label_sets(cfg))
        val = to_tensors(cols, device)
    gen = torch.Generator(device=device)
    cache = ShardCache(shard_limit(cfg))
    if lc.get("input") is not None:  # a small split: this worker reads its rows itself (ingest.fit_input)
        cache.hold(ingest.worker_rows(st.Storage(*lc["storage"]), lc["input"], rank, ctx.get_world_size()))
        shard = None
    else:
        shard = ray.train.get_dataset_shard("train")
    for epoch in range(start, lc["epochs"]):
        t0 = time.time()
        model.train()
        tot, correct, loss_sum, extra_sum, waited = 0, 0, 0.0, {}, 0.0
        gen.manual_seed((lc["seed"] * 1000 + rank) * 1000 + epoch)  # per epoch: a resumed run draws the same
        batches = cache.epoch(shard, cfg.train.batch_size, seed=lc["seed"] * 100 + epoch)
        while True:
            t_wait = time.time()
            raw = next(batches, None)  # the time blocked on input: how input-bound the epoch was
            waited += time.time() - t_wait
            if raw is None:
                break
            batch = to_tensors(raw, device)
            with torch.autocast(device.type, enabled=use_amp):
                loss, logits, extra = batch_loss(model, batch, lc["mode"], cfg, gen)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if lc["mode"] in ADV_MODES and ctx.get_world_size() > 1:
                sync_grads(model)
            scaler.step(opt)
            scaler.update()
            n = len(batch["label"])
            tot += n
            correct += int(top1_correct(logits.argmax(1), batch).sum())
            loss_sum += float(loss.detach()) * n
            for k, v in extra.items():
                extra_sum[k] = extra_sum.get(k, 0.0) + v * n
        step = lc["epoch_offset"] + epoch + 1
        metrics = {"loss": loss_sum / max(tot, 1), "train_acc": correct / max(tot, 1),
                   "epoch_seconds": time.time() - t0,
                   "input_wait_seconds": waited, **{k: v / max(tot, 1) for k, v in extra_sum.items()}}
        if val is not None:
            metrics.update(val_metrics(getattr(model, "module", model), val, cfg.train.val_min_group,
                                       cfg.data.num_classes, cfg.train.batch_size))
        if tracker is not None:
            progress(f"[{lc['mode']} s{lc['seed']}] epoch {step}: loss {metrics['loss']:.4f} "
                     f"train_acc {metrics['train_acc']:.3f} ({metrics['epoch_seconds']:.1f}s, "
                     f"{waited:.1f}s waiting for input)")
        report = {**metrics, "epoch": epoch + 1, "global_epoch": step}
        if rank == 0:
            core = getattr(model, "module", model)
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": core.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                            "metrics": metrics}, os.path.join(d, STATE_FILE))
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(report)
        # Logged once the epoch's checkpoint is persisted: a restart resumes from it and never re-logs a step.
        if tracker is not None and step > logged:
            tracker.log_metrics(lc["run_id"], metrics, step=step)
            logged = step
        if rank == 0:
            pause_point(f"train-{lc['mode']}-s{lc['seed']}-epoch{step}")


class ShardCache:
    """A training worker's shard, read from Ray Data once and kept in memory when it fits in
    ``limit_bytes`` (or read by the worker itself, ``hold``); every epoch then shuffles in-process: a full
    permutation, seeded per epoch, of the rows in ``idx`` order. Both ways give one worker the same batches.

    Streaming every epoch re-reads and re-converts Parquet through the split coordinator, which on a small
    CPU box costs more than the model's forward and backward (docs/BENCHMARKS.md). Because the order of an
    epoch depends only on the seed and the rows (not on the order Ray Data delivered blocks in), a run
    resumed from a checkpoint sees the same batches as an uninterrupted one and ends with the same model
    (one worker; tested by killing the driver). The first epoch's streamed order is reproducible too:
    the dataset is read in file order (``common.in_order``, ``common.ingest_config``) and the local shuffle
    is seeded; two smoke runs, even run side by side, ended with identical weights. A shard larger than
    the limit is streamed every epoch (``local_shuffle_buffer_size``, a seeded buffer over the rows in file order;
    not checked for reproducibility). Row counts per worker stay equal
    (``streaming_split(equal=True)``) and each epoch reads the shard at most once, so DDP workers keep
    taking the same number of steps.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.arrays: dict[str, np.ndarray] | None = None
        self.too_big = limit_bytes <= 0

    def hold(self, arrays: dict[str, np.ndarray]) -> None:
        """Keep rows read without Ray Data, in ``idx`` order (as ``ingest.worker_rows`` returns them): every
        epoch then shuffles them alone."""
        self.arrays = arrays

    def epoch(self, shard: Any, batch_size: int, seed: int) -> Any:
        if self.arrays is None:
            stream = iter(shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                             local_shuffle_buffer_size=min(4 * batch_size, 4096),
                                             local_shuffle_seed=seed))
            if self.too_big:
                yield from stream
                return
            kept: list[dict[str, np.ndarray]] = []
            size = 0
            for raw in stream:
                kept.append(raw)
                size += sum(v.nbytes for v in raw.values() if isinstance(v, np.ndarray))
                if size > self.limit:  # does not fit: train on this pass as it streams, and every later one
                    self.too_big = True
                    yield from kept
                    kept.clear()
                    yield from stream
                    return
            if not kept:
                return
            keys = [k for k, v in kept[0].items() if isinstance(v, np.ndarray) and v.dtype != object]
            self.arrays = {k: np.concatenate([b[k] for b in kept]) for k in keys}
            if "idx" in self.arrays:
                order = np.argsort(self.arrays["idx"], kind="stable")
                self.arrays = {k: v[order] for k, v in self.arrays.items()}
        n = len(next(iter(self.arrays.values())))
        order = np.random.default_rng(seed).permutation(n)
        for i in range(0, n, batch_size):
            idx = np.sort(order[i:i + batch_size])  # sorted: contiguous-ish gathers
            yield {k: v[idx] for k, v in self.arrays.items()}


def _worker_nodes(world: int) -> list[str]:
    """Node id of every worker (rank order): shows where the worker group landed (SPREAD placement)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    import torch.distributed as dist

    nodes: list = [None] * world
    dist.all_gather_object(nodes, node)
    return nodes


def sync_grads(model: torch.nn.Module) -> None:
    """Average gradients over workers by hand (SCAAT's extra forwards bypass DDP's reducer)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


# ------------------------------------------------------------------------------------------ driver
def fit(cfg: Any, store: st.Storage, data: Any, *, mode: str, seed: int, epochs: int, name: str,
        run_id: str | None, tracking_uri: str, plan: Any, init_path: str | None = None,
        epoch_offset: int = 0, val: dict | None = None, lr: float | None = None,
        reset_optimizer: bool = False) -> list[tuple[int, dict, bytes]]:
    """Run one TorchTrainer fit on ``data`` (``ingest.fit_input``: files the workers read, or a Ray Dataset
    streamed to them); returns its kept checkpoints as (global epoch = epoch_offset + the fit's epoch, the
    epoch's metrics, state bytes), in epoch order."""
    import ray.train
    from ray.train.torch import TorchTrainer

    use_gpu = cfg.train.device == "cuda" or (cfg.train.device == "auto" and _cluster_has_gpu())
    scaling = ray.train.ScalingConfig(
        num_workers=cfg.train.num_workers, use_gpu=use_gpu, placement_strategy=cfg.train.placement,
        resources_per_worker=None if use_gpu else {"CPU": plan.train_worker_cpus})
    given, datasets = trainer_input(data)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "mode": mode, "seed": seed,
                           "epochs": epochs, "epoch_offset": epoch_offset, "init_path": init_path,
                           "run_id": run_id, "tracking_uri": tracking_uri,
                           "storage": store.args(), "val": val, "input": given, "lr": lr,
                           "reset_optimizer": reset_optimizer},
        scaling_config=scaling,
        **datasets,
        run_config=ray.train.RunConfig(
            name=name, storage_path=store.path("ray"), storage_filesystem=store.fs if store.is_s3 else None,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            logging_config=ray.train.LoggingConfig(log_level=train_log_level())),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training {name} failed: {result.error}") from result.error
    records = []
    for ckpt, _metrics in result.best_checkpoints or [(result.checkpoint, {})]:
        with ckpt.as_directory() as d:
            data = open(os.path.join(d, STATE_FILE), "rb").read()
        state = load_state(data)
        records.append((epoch_offset + int(state["epoch"]), state.get("metrics", {}), data))
    return sorted(records, key=lambda r: r[0])


def _cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def _model_done(store: st.Storage, key: str, h: str) -> bool:
    return st.committed(store, f"{STAGE}/{key}", h) is not None


VAL_KEYS = ("val_acc", "val_worst_group_acc", "val_map")


def select_checkpoints(records: list[tuple[int, dict, bytes]]) -> dict[str, tuple[int, dict, bytes]]:
    """The last epoch and the epoch of best validation worst-group accuracy (the earliest of equal ones;
    the last where no epoch has a finite value: no validation group was large enough)."""
    last = records[-1]
    scored = [r for r in records if np.isfinite(r[1].get("val_worst_group_acc", float("nan")))]
    best = max(scored, key=lambda r: (r[1]["val_worst_group_acc"], -r[0])) if scored else last
    return {"last": last, "best_val_worst_group": best}


def _save_model(store: st.Storage, key: str, h: str, records: list[tuple[int, dict, bytes]],
                **fields: Any) -> dict:
    """Commit the model's last checkpoint (model.pt) and its best-validation one (best.pt, or model.pt when
    it is the last); returns the checkpoints' manifest entry {which: {epoch, path, val_acc, ...}}."""
    chosen = select_checkpoints(records)
    st.begin(store, f"{STAGE}/{key}")
    checkpoints = {}
    for which, (epoch, metrics, data) in chosen.items():
        name = "model.pt" if which == "last" or epoch == chosen["last"][0] else "best.pt"
        if name == "best.pt" or which == "last":
            store.write_bytes(data, STAGE, key, name)
        checkpoints[which] = {"epoch": epoch, "path": f"{STAGE}/{key}/{name}",
                              **{k: float(metrics[k]) if np.isfinite(metrics[k]) else None  # JSON: no NaN
                                 for k in VAL_KEYS if k in metrics}}
    st.commit(store, f"{STAGE}/{key}", h, files={"model": f"{STAGE}/{key}/model.pt"}, checkpoints=checkpoints,
              **fields)
    return checkpoints


def run(cfg: Any, store: st.Storage, ingest_manifest: dict, tracker: Any, stage_run: str,
        plan: Any, force: bool = False) -> tuple[dict, bool]:
    """Train every (mode, seed); returns (manifest, did_work)."""
    from pipelines import precompute

    h = config_hash(cfg)
    if not force and (m := st.committed(store, STAGE, h)):
        return m, False
    if force:
        st.begin(store, STAGE)
        store.remove_dir("ray")
        store.remove_dir(precompute.STAGE)
    elif store.exists(STAGE, st.MANIFEST):  # committed for another config: each model's own manifest
        store.fs.delete_file(store.path(STAGE, st.MANIFEST))  # decides whether it is trained again
    train_ds = ingest.fit_input(store, ingest_manifest, "train", ["idx", "image", "label"] + label_sets(cfg),
                                shard_limit(cfg))
    val = ingest.split_manifest(ingest_manifest, "val") if ingest_manifest["files"].get("val") else None
    models: dict[str, str] = {}
    checkpoints: dict[str, dict] = {}
    for seed in cfg.train.seeds:
        for mode in cfg.train.modes:
            key = model_key(mode, seed)
            models[key] = f"{STAGE}/{key}/model.pt"
            mh = model_hash(cfg, mode, seed)
            if _model_done(store, key, mh):
                log.info("train: %s already committed, skipped", key)
                checkpoints[key] = st.committed(store, f"{STAGE}/{key}", mh).get("checkpoints", {})
                continue
            checkpoints[key] = train_model(cfg, store, ingest_manifest, train_ds, tracker, stage_run, plan, val,
                                           mode, seed)[1]
    manifest = st.commit(store, STAGE, h, files=models, checkpoints=checkpoints, rows={"models": len(models)})
    return manifest, True


def train_model(cfg: Any, store: st.Storage, ingest_manifest: dict, train_ds: Any, tracker: Any, stage_run: str,
                plan: Any, val: dict | None, mode: str, seed: int, log_model: bool = True
                ) -> tuple[list[tuple[int, dict, bytes]], dict]:
    """Train, commit and log one (mode, seed) model as the train stage does; returns (its epochs' records, its
    checkpoints entry). The training-knob sweep's trials call it too (``log_model=False``: no MLflow model)."""
    key, mh = model_key(mode, seed), model_hash(cfg, mode, seed)
    run_id = tracker.find_or_create(f"train/{key}", {"xai.stage": "train", "xai.model": key, "xai.model_hash": mh},
                                    parent_id=stage_run)
    for split, context in (("train", "training"), ("val", "validation")):
        if ingest_manifest["files"].get(split):
            tracker.log_dataset(run_id, f"{cfg.name}-{cfg.data.source}-{split}", ingest_manifest["config_hash"],
                                store.uri(ingest.STAGE, split), ingest_manifest["rows"][split], context)
    section = "scaat" if mode in ADV_MODES else mode  # the config section the mode reads
    tracker.log_params(run_id, {"mode": mode, "seed": seed, "train": cfg.train.model_dump(),
                                section: getattr(cfg, section).model_dump() if hasattr(cfg, section) else {}})
    common = {"seed": seed, "run_id": run_id, "tracking_uri": tracker.uri, "plan": plan, "val": val}
    if mode == "consistency":
        records = _train_consistency(cfg, store, ingest_manifest, train_ds, tracker, mh, key, common)
    elif mode == "jtt":
        records = _train_jtt(cfg, store, ingest_manifest, train_ds, tracker, mh, key, common)
    elif mode == "group_balanced":
        groups = ingest.read_split_numpy(store, ingest_manifest, "train", columns=["idx", "group"])["group"]
        ds = ingest.fit_input(store, ingest_manifest, "train", ["idx", "image", "label"], shard_limit(cfg),
                              weights=group_weights(groups))
        records = fit(cfg, store, ds, mode=mode, epochs=cfg.train.epochs, name=f"{cfg.name}-{key}-{mh[:8]}", **common)
    else:
        records = fit(cfg, store, train_ds, mode=mode, epochs=cfg.train.epochs, name=f"{cfg.name}-{key}-{mh[:8]}",
                      **common)
        if mode == "erm":  # round 0 of consistency training starts here (METHODS §5a)
            for epoch, _metrics, data in records:
                if epoch == warmup_epochs(cfg):
                    store.write_bytes(data, warmup_path(cfg, seed))
    checkpoints = _save_model(store, key, mh, records, mode=mode, seed=seed)
    best = checkpoints["best_val_worst_group"]
    tracker.log_metrics(run_id, {f"best_val_worst_group_{k}": v for k, v in best.items()
                                 if k != "path" and v is not None})
    if log_model:
        _log_model(cfg, tracker, run_id, records[-1][2], key)
    tracker.finish(run_id)
    return records, checkpoints


def warmup_path(cfg: Any, seed: int) -> str:
    """Where the ERM checkpoint that starts consistency training lives (named by epoch and ERM config)."""
    return f"{WARMUPS}/{model_key('erm', seed)}_warmup_e{warmup_epochs(cfg)}_{model_hash(cfg, 'erm', seed)[:8]}.pt"


def _train_consistency(cfg: Any, store: st.Storage, ingest_manifest: dict, train_ds: Any, tracker: Any,
                       h: str, key: str, common: dict) -> list[tuple[int, dict, bytes]]:
    """Rounds 1..R-1: precompute weights with the latest checkpoint, then train round_epochs. Returns the
    reweighted epochs' records (as ``fit`` returns them): checkpoint selection is among the method's own epochs,
    not the ERM warm-up's."""
    from pipelines import precompute

    seed = common["seed"]
    init = warmup_path(cfg, seed)
    offset = warmup_epochs(cfg)
    if not store.exists(init):  # erm not among the modes, or trained under another consistency schedule
        log.info("train: %s: training the ERM warm-up (%d epochs) first", key, offset)
        warm = fit(cfg, store, train_ds, mode="erm", epochs=offset,
                   name=f"{cfg.name}-{model_key('erm', seed)}-warmup{offset}-{h[:8]}", **common)
        store.write_bytes(warm[-1][2], init)
    records: list[tuple[int, dict, bytes]] = []
    for r in range(1, cfg.consistency.rounds):
        pre_manifest, w = precompute.run_round(cfg, store, ingest_manifest, init, seed, r, tracker,
                                               common["run_id"], common["plan"])
        ds = precompute.weighted_input(store, pre_manifest, w, shard_limit(cfg))
        c = cfg.consistency
        rounds = fit(cfg, store, ds, mode="consistency", epochs=c.round_epochs, name=f"{cfg.name}-{key}-r{r}-{h[:8]}",
                     init_path=round_start(cfg, init), epoch_offset=offset, lr=c.lr,
                     reset_optimizer=c.reset_optimizer, **common)
        records += rounds
        init = f"{STAGE}/{key}_round{r}.pt"
        store.write_bytes(rounds[-1][2], init)
        offset += cfg.consistency.round_epochs
    return records


def group_weights(groups: np.ndarray) -> np.ndarray:
    """Group-oracle weights [N] (``group_balanced``): inverse group frequency, mean 1, so that every group
    carries the same total weight (on the biased shapes at bias 0.8: conflicting samples 4x the aligned)."""
    groups = np.asarray(groups)
    if len(groups) == 0 or (groups < 0).any():
        raise ValueError("train.modes group_balanced needs every training row's group (data.source biased_shapes "
                         f"or waterbirds); {int((groups < 0).sum())} of {len(groups)} rows have none")
    _, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return (len(groups) / (len(counts) * counts[inv])).astype(np.float32)


def jtt_weights(wrong: np.ndarray, lambda_up: float) -> np.ndarray:
    """JTT's weights [N]: lambda_up for the error set, 1 for the rest, scaled to mean 1 (the upsampling of
    Liu et al. as a weighted loss at the learning rate of the others)."""
    w = np.where(np.asarray(wrong, bool), float(lambda_up), 1.0)
    return (w / w.mean()).astype(np.float32)


def train_errors(cfg: Any, store: st.Storage, ingest_manifest: dict, state: bytes, source: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Which training samples (idx order) a checkpoint gets wrong: JTT's error set (forwards on the driver),
    and the samples' groups (-1 where the data have none), read in the same pass over the split."""
    model = load_model(cfg, state, source)
    rows = ingest.read_split_numpy(store, ingest_manifest, "train", columns=["idx", "image", "label", "group"])
    wrong = np.zeros(len(rows["idx"]), bool)
    bs = cfg.train.batch_size
    with torch.no_grad():
        for i in range(0, len(wrong), bs):
            x = torch.from_numpy(rows["image"][i:i + bs]).float() / 255
            wrong[i:i + bs] = (model(x).argmax(1).numpy() != rows["label"][i:i + bs])
    return wrong, rows["group"]


def _train_jtt(cfg: Any, store: st.Storage, ingest_manifest: dict, train_ds: Any, tracker: Any, h: str, key: str,
               common: dict) -> list[tuple[int, dict, bytes]]:
    """JTT: ERM for jtt.epochs, its error set on the training split, then a fresh model for train.epochs with
    the error set upweighted (jtt_weights); returns the second fit's records (global epochs after the first)."""
    j = cfg.jtt
    first = fit(cfg, store, train_ds, mode="erm", epochs=j.epochs, name=f"{cfg.name}-{key}-id{j.epochs}-{h[:8]}",
                **common)
    wrong, groups = train_errors(cfg, store, ingest_manifest, first[-1][2], f"{key} identification model")
    stats = {"jtt_error_set": int(wrong.sum()), "jtt_error_share": float(wrong.mean())}
    if (groups >= 0).all() and wrong.any():
        stats["jtt_error_set_conflicting_share"] = float((groups[wrong] == 1).mean())
    if common.get("run_id"):
        tracker.log_metrics(common["run_id"], stats, step=j.epochs)
    log.info("train: %s: JTT error set %d of %d (lambda_up %g)", key, stats["jtt_error_set"], len(wrong), j.lambda_up)
    ds = ingest.fit_input(store, ingest_manifest, "train", ["idx", "image", "label"], shard_limit(cfg),
                          weights=jtt_weights(wrong, j.lambda_up))
    return fit(cfg, store, ds, mode="jtt", epochs=cfg.train.epochs, name=f"{cfg.name}-{key}-{h[:8]}",
               epoch_offset=j.epochs, **common)


# What loading a logged model needs: it is a torch.export program (mlflow's pt2 format), so neither
# xai_core nor pipelines. Declared, not inferred: mlflow's inference loads the model in a subprocess to
# watch its imports, 18 s of a 19 s log_model per model on the 2-core machine (1.2 s declared).
MODEL_REQUIREMENTS = ("mlflow", "cloudpickle", "numpy", "torch")


def model_requirements() -> list[str]:
    """pip pins of MODEL_REQUIREMENTS at the installed versions (local tags such as +cu130 dropped)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in MODEL_REQUIREMENTS]


def _log_model(cfg: Any, tracker: Any, run_id: str, data: bytes, key: str) -> None:
    """Log the final model with mlflow.pytorch (and register it) under the model's run."""
    import mlflow

    from pipelines.common import load_model

    model = load_model(cfg, data, key)
    example = np.zeros((2, 3, cfg.data.size, cfg.data.size), np.float32)  # batch 2: a dynamic batch dim in pt2
    with tracker.active(run_id):
        mlflow.pytorch.log_model(
            model, name="model", input_example=example, pip_requirements=model_requirements(),
            registered_model_name=f"{cfg.name}-{key}" if cfg.tracking.register_models else None)


def final_state(store: st.Storage, manifest: dict, key: str) -> bytes:
    """The committed final model of (mode, seed) as checkpoint bytes."""
    return store.read_bytes(manifest["files"][key])


__all__ = ["batch_loss", "final_state", "fit", "run", "state_bytes", "to_tensors", "train_loop"]
