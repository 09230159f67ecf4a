"""Pieces every stage shares: Ray resource plan, device choice, model checkpoints, batch conversion."""

from __future__ import annotations

import builtins
import io
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from xai_core.models import build_model, load_state_dict_checked, with_weights


@dataclass(frozen=True)
class ResourcePlan:
    """Ray resources for every stage, computed in one place from the cluster's CPU count.

    RAY_NOTES: an actor pool or a trainer that takes every CPU starves Ray Data's read tasks and hangs.
    """

    cluster_cpus: float
    train_worker_cpus: float
    actors: int
    actor_cpus: float
    tune_concurrency: int
    tune_trial_cpus: float
    knob_concurrency: int = 1  # training-knob trials at once: each holds KNOB_TRIAL_CPUS + its train workers


KNOB_TRIAL_CPUS = 0.25  # a training-knob trial's own process (it only drives its TorchTrainer)


def resource_plan(cluster_cpus: float, num_workers: int, actors: int = 0) -> ResourcePlan:
    """Leave at least one CPU for Ray Data reads; train workers and actors take fractions."""
    spare = max(cluster_cpus - 1.0, 0.5)
    worker_cpus = max(min(1.0, spare / max(num_workers, 1)), 0.25)
    n_actors = actors or max(1, int(cluster_cpus) - 1)
    actor_cpus = max(min(1.0, spare / n_actors), 0.25)
    concurrency = max(1, int(spare))
    knob = max(1, int(spare // (max(num_workers, 1) * worker_cpus + KNOB_TRIAL_CPUS)))
    return ResourcePlan(cluster_cpus, worker_cpus, n_actors, actor_cpus, concurrency,
                        max(min(1.0, spare / concurrency), 0.25), knob)


def progress(message: str) -> None:
    """One progress line on this process's stdout, once. Ray Train patches ``print`` in its workers to log
    through ``logging`` and, when stdout is wrapped, to print as well: every epoch line reached the driver's
    console twice. Where ``print`` is not the builtin, the line goes to the process's own stdout directly."""
    patched = getattr(builtins.print, "__module__", "builtins") != "builtins"
    print(message, file=(sys.__stdout__ or sys.stdout) if patched else sys.stdout, flush=True)


RAY_LOGS_ENV = "XAI_RAY_LOGS"  # "1": Ray's INFO-level console lines as Ray prints them (see quiet_ray_console)


def ray_logs() -> bool:
    """Whether Ray's own INFO-level console lines are wanted (XAI_RAY_LOGS=1); by default they are left out."""
    return os.environ.get(RAY_LOGS_ENV) == "1"


def train_log_level() -> str:
    """Ray Train's console level (its ``LoggingConfig``): without it, every fit prints its worker-group start
    (5 lines) and every epoch "Checkpoint successfully created" and "Reporting training result" (2 lines);
    its log files under the session directory keep every level either way."""
    return "INFO" if ray_logs() else "WARNING"


def quiet_train_worker() -> None:
    """In a Ray Train worker, unless XAI_RAY_LOGS=1: Ray Train's "Reporting training result N: ..." line per
    epoch at WARNING (its logger is named after its file, so ``LoggingConfig`` does not reach it)."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a Ray without that module: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.NOTSET if ray_logs() else logging.WARNING)


def quiet_ray_console() -> None:
    """This process's Ray Data console handler at WARNING, or INFO (Ray Data's default) with XAI_RAY_LOGS=1.
    Where stdout is not a terminal (``make run``'s log, a job's log) Ray Data logs a progress table of every
    operator each 10 s and each dataset's plan: 386 of the 1,829 lines of a fresh-clone ``make run``; its
    ray-data.log file keeps them. Our stages log their own progress (committed shards, rounds, epochs)."""
    import logging

    import ray.data  # noqa: F401 - configures Ray Data's logging at import; the level is set after it

    for h in logging.getLogger("ray.data").handlers:
        if h.get_name() == "console":
            h.setLevel(logging.INFO if ray_logs() else logging.WARNING)  # INFO: Ray Data's own default


PAUSE_DIR_ENV = "XAI_PAUSE_DIR"


def pause_point(name: str, timeout_s: float = 600.0) -> None:
    """A fault-test hook: where ``$XAI_PAUSE_DIR/<name>`` exists, write this process's PID to
    ``<name>.reached`` and wait until the file ``<name>`` is gone (at most ``timeout_s``).

    The fault tests kill a training worker, an actor or the driver at a named point (after a checkpointed
    epoch, inside a batch) instead of racing a timer against the work. Unset, as everywhere outside the
    tests, it costs one environment lookup. Names: ``train-<mode>-s<seed>-epoch<global epoch>`` (rank 0,
    after the epoch's checkpoint is reported and logged), ``precompute-batch<first idx>``,
    ``evaluate-<split>-batch<first idx>`` (before the batch's work)."""
    folder = os.environ.get(PAUSE_DIR_ENV)
    if not folder or not os.path.exists(gate := os.path.join(folder, name)):
        return
    import time

    reached = os.path.join(folder, name + ".reached")
    with open(reached + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(reached + ".tmp", reached)  # whole or absent: the test reads the PID from it
    deadline = time.monotonic() + timeout_s
    while os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)


ACTOR_RESTARTS = 3  # per actor of a pool stage, and retries per batch: a killed actor restarts, its batch reruns


def actor_pool(size: int) -> Any:
    """The compute strategy of the actor-pool stages (precompute, evaluate): ``size`` actors, each given one
    block at a time. Ray Data's default queues several blocks on the first actor that is ready; with as
    many blocks as actors that actor then ran two of three while the others sat idle (paper run, evaluate),
    and a batch here is seconds to minutes of model work, so there is nothing to gain from queueing."""
    import ray.data

    return ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1)


def in_order(ds: Any) -> Any:
    """``ds`` with Ray Data's ``preserve_order`` on (for it and every dataset derived from it; the process's
    DataContext is left alone). Without it blocks reach the next operator in the order their tasks finish:
    in two smoke runs the same 192 training rows left the precompute stage in different orders, its batches
    (and so their seeded PGD starts) differed and E differed by up to 0.04; ``limit(n)`` after a read
    kept whichever rows came first. Every stage input is read through ``ingest.read_split``, which sets it."""
    ds.context.execution_options.preserve_order = True
    return ds


def ingest_config() -> Any:
    """Ray Train's DataConfig for the training set, with ``preserve_order`` on: Ray Train replaces a
    dataset's execution options with its defaults (the driver's DataContext), so the flag set by
    ``in_order`` does not reach the workers' shards without this. With one worker the first epoch's
    (seeded, local-buffer) shuffle then sees the rows in the same order every run."""
    import ray.train

    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = True
    return ray.train.DataConfig(execution_options=opts)


def trainer_input(data: Any) -> tuple[dict | None, dict]:
    """How ``ingest.fit_input``'s result reaches a TorchTrainer: (the loop config's ``input``, the trainer's
    ``datasets``/``dataset_config`` keywords). Files the workers read go into the loop config; a Ray Dataset
    is the trainer's "train" dataset, with ``ingest_config()``."""
    if isinstance(data, dict):
        return data, {"datasets": None, "dataset_config": None}
    return None, {"datasets": {"train": data}, "dataset_config": ingest_config()}


def shard_limit(cfg: Any) -> int:
    """The bytes of training rows a worker keeps in memory (``train.cache_shard_mb``)."""
    return cfg.train.cache_shard_mb * 2**20


def batch_count(rows: int, batch_size: int) -> int:
    """How many batches (and blocks: ``pool_map`` cuts one per batch) ``rows`` rows make, at least one."""
    return -(-max(1, rows) // max(1, batch_size))


def pool_map(src: Any, udf: type, ctor_kwargs: dict, *, rows: int, plan: Any, batch_size: int) -> Any:
    """``src.map_batches(udf)`` on the actor pool of ``plan`` (``actors``, ``actor_cpus``), as every
    actor-pool stage runs it: one block per batch.

    ``src`` (``rows`` rows, in order) is cut into ceil(rows / batch_size) equal blocks and each block is one
    batch (``batch_size=None``). So which samples share a batch, and with it every per-batch random draw
    (seeded by the batch's first sample), depends on the data and ``batch_size`` only, not on the cluster's
    size; and no batch spans two blocks, which would make Ray Data bundle blocks into one task (paper run:
    one actor ran 100 + 33 images while another had nothing). read_parquet packs small files into one read
    task, so without the cut one actor got all the work; parallelism is up to the number of batches, so the
    pool has no more actors than batches (the smoke config's evaluate split is one batch: two of three actors
    started, loaded every model and sat idle, on a 2-core machine beside the one that worked). Killed
    actors restart and retry their batch, at most ACTOR_RESTARTS times."""
    with warnings.catch_warnings():
        # Ray 2.60 has no named map_batches parameter for max_restarts / max_task_retries and warns on the
        # ray_remote_args they travel in. Without them Ray Data restarts a killed actor without end (a batch
        # that kills its actor every time, e.g. out of memory, would hang the stage): bounded here.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        batches = batch_count(rows, batch_size)
        return src.repartition(batches).map_batches(
            udf, fn_constructor_kwargs={**ctor_kwargs, "threads": max(1, int(plan.actor_cpus))},
            compute=actor_pool(min(plan.actors, batches)), num_cpus=plan.actor_cpus, batch_size=None,
            batch_format="numpy", max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)


def pick_device(choice: str = "auto") -> torch.device:
    """cuda if asked for (or available under "auto"), else cpu; a missing GPU asked for is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible to this worker")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def make_model(cfg: Any, pretrained: bool = True) -> torch.nn.Module:
    """The configured architecture, with the config's layer choices attached for explain(), its input
    normalisation inside, and model.weights loaded unless ``pretrained`` is False (a checkpoint follows)."""
    arch = cfg.model.arch
    kw: dict[str, Any] = {}
    if arch == "small_resnet":
        kw = {"width": cfg.model.width}
    elif arch == "vit_tiny" or arch.startswith("vit_"):  # a ViT's position embeddings fix its input size
        kw = {"image_size": cfg.data.size}
    model = with_weights(build_model(arch, cfg.data.num_classes, **kw), arch, cfg.model.weights, cfg.model.normalize,
                         load=pretrained)
    if cfg.model.layers:
        model.default_layers = list(cfg.model.layers)
    if cfg.model.cam_layer:
        model.cam_layer = cfg.model.cam_layer
    return model


def state_bytes(obj: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_state(data: bytes | str, source: str = "checkpoint") -> dict:
    """torch.load with weights_only=True (no pickle execution); errors name the source."""
    try:
        f = io.BytesIO(data) if isinstance(data, bytes) else data
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"cannot load {source}: {type(e).__name__}: {e}") from e


def load_model(cfg: Any, data: bytes | str, source: str = "checkpoint") -> torch.nn.Module:
    """A model of the configured architecture with weights from a checkpoint, in eval mode."""
    state = load_state(data, source)
    model = make_model(cfg, pretrained=False)
    try:
        load_state_dict_checked(model, state["model"] if "model" in state else state)
    except ValueError as e:
        raise ValueError(f"{source} does not fit model.arch={cfg.model.arch!r}: {e}") from e
    return model.eval()


def to_tensors(batch: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A numpy batch from Ray Data/Parquet -> tensors; uint8 images -> float in [0,1]."""
    out = {}
    for k, v in batch.items():
        if not isinstance(v, np.ndarray) or v.dtype == object:
            continue
        a = np.ascontiguousarray(v)
        t = torch.from_numpy(a if a.flags.writeable else a.copy())  # Arrow buffers are read-only
        if k in ("image", "x_adv") and t.dtype == torch.uint8:
            t = t.float() / 255.0
        out[k] = t.to(device)
    return out


def set_threads(n: int, workers_per_node: int = 1) -> int:
    """Intra-op threads of a training worker: n, or (n=0) this node's physical cores shared by its
    workers. Ray sets OMP_NUM_THREADS to the worker's (fractional, logical) CPUs, which on a small box
    leaves cores idle while the trainer is the only busy process."""
    if n <= 0:
        n = max(1, (os.cpu_count() or 1) // max(1, workers_per_node))
    torch.set_num_threads(n)
    return n


def model_key(mode: str, seed: int) -> str:
    return f"{mode}_s{seed}"


def split_key(key: str) -> tuple[str, int]:
    """(mode, seed) of a model key, ``model_key``'s inverse."""
    mode, seed = key.rsplit("_s", 1)
    return mode, int(seed)


# Settings that change how a model is trained but not what it learns: a model is not retrained for them.
_RUNTIME_KEYS = {"modes", "seeds", "max_failures", "placement", "threads_per_worker", "cache_shard_mb"}


def model_hash(cfg: Any, mode: str, seed: int) -> str:
    """What one (mode, seed) model depends on: data, model, the training settings and its mode's own
    section (consistency starts from the ERM warm-up, whose inputs are the same). Changing a SCAAT knob
    retrains only the SCAAT models; adding a seed trains only the new ones."""
    from pipelines.config import ADV_MODES, digest, section_dump

    payload = {"data": section_dump(cfg, "data"), "model": section_dump(cfg, "model"),
               "train": section_dump(cfg, "train", exclude=_RUNTIME_KEYS), "mode": mode, "seed": seed}
    if mode in ("consistency", "jtt"):
        payload[mode] = section_dump(cfg, mode)
    elif mode in ADV_MODES:  # SCAAT and its controls: SCAAT's loss and budgets, their own attack region
        payload["scaat"] = section_dump(cfg, "scaat")
    return digest(payload)


THRESHOLDED = ("tif", "gradcam_thresholded")  # the methods with an alpha, each swept on its own grid


def default_alphas(cfg: Any) -> dict[str, float]:
    """Every thresholded method at evaluate.tif_alpha: what evaluate uses when no sweep ran."""
    return {m: cfg.evaluate.tif_alpha for m in THRESHOLDED}
