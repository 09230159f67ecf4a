"""The pipeline's one typed config: YAML file + ``--set a.b=c`` overrides, validated before Ray starts.

Every default lives here (or in the xai_core function signatures the fields are passed to).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ROOT = Path(__file__).resolve().parents[1]  # the checkout (site-packages when installed: nothing lives there)
CONFIGS = Path(__file__).resolve().parent / "configs"  # the shipped configs, inside the package
STAGES = ("ingest", "tune", "train", "sweep", "evaluate", "report")
# erm, the two papers' training methods, and their baselines and controls (issue 20): jtt (Just Train Twice),
# group_balanced (group-oracle reweighting), adv_whole / adv_random (SCAAT's loss attacking the whole image /
# a random region of the size of SCAAT's low-saliency region)
MODES = ("erm", "consistency", "scaat", "jtt", "group_balanced", "adv_whole", "adv_random")
Mode = Literal["erm", "consistency", "scaat", "jtt", "group_balanced", "adv_whole", "adv_random"]
ADV_MODES = {"scaat": "saliency", "adv_whole": "whole", "adv_random": "random"}  # mode -> scaat_loss region
WEIGHTED_MODES = ("consistency", "jtt", "group_balanced")  # modes whose training rows carry a weight w
EVAL_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "gradcam",
                "gradcam_pp", "layercam", "gradcam_thresholded", "tif", "haf",
                # ablations and controls (pipelines/evaluate.py VARIANTS, METHODS §2-3)
                "tif_fusion_only", "tif_one_layer", "tif_uniform", "tif_base_fused", "gradcam_fused",
                "haf_one_sided")


class ConfigError(ValueError):
    """A config that cannot run: names the key, the bad value and what is allowed."""


DATASETS = ("cub", "waterbirds", "voc")  # data.source values read from data.root (xai_core.data.datasets)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    # biased_shapes (METHODS §7), folder (an ImageFolder), or a dataset as distributed under data.root: cub
    # (CUB-200-2011), waterbirds, voc (PASCAL VOC 2012, multi-label); xai_core/data/datasets.py
    source: Literal["biased_shapes", "folder", "cub", "waterbirds", "voc"] = "biased_shapes"
    n_train: int = Field(4000, ge=8)
    n_val: int = Field(256, ge=4)
    n_test: int = Field(512, ge=4)
    n_dwsol: int = Field(128, ge=0)
    # multi-label BiasedShapes: train/val/test images hold 1-3 objects of distinct classes, each with its mask
    # (train.loss bce; evaluate explains every (image, class) pair and reports mAP and per-class pointing game)
    multilabel: bool = False
    size: int = Field(64, ge=16, le=1024)
    num_classes: int = Field(6, ge=2)  # biased_shapes: at most 6; cub/waterbirds/voc: from the data
    bias: float = Field(0.9, ge=0.0, le=1.0)
    contrast: float | None = Field(None, gt=0.0, le=1.0)
    seed: int = 0
    folder: str | None = None  # ImageFolder root (source: folder); test split = a held-out fraction
    mask_dir: str | None = None
    boxes_file: str | None = None
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    root: str | None = None  # cub / waterbirds / voc: the dataset's folder as distributed
    # folder, cub, voc: the validation split, held out of train (seeded by data.seed; never out of test)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    on_bad_input: Literal["fail", "skip"] = "fail"
    rows_per_shard: int = Field(2048, ge=16)
    # voc: the ImageSets/Main list that is the test split (val: VOC 2012's public one; test: VOC 2007 test),
    # and TorchRay's pointing-game "difficult" subset flags (pointing_game_ebp_voc07_difficult.txt, for VOC 2007
    # test): the report's pointing game gets a column for the subset
    test_list: Literal["val", "test"] = "val"
    difficult_subset: str | None = None

    @model_validator(mode="after")
    def _folder_needs_path(self) -> DataConfig:
        if self.source == "folder" and not self.folder:
            raise ValueError("data.folder must name an image folder when data.source is 'folder'")
        if self.source == "biased_shapes" and self.num_classes > 6:
            raise ValueError(f"data.num_classes={self.num_classes}: biased_shapes draws at most 6 shapes")
        if self.source != "voc" and (self.difficult_subset is not None or self.test_list != "val"):
            raise ValueError(f"data.difficult_subset and data.test_list are for data.source 'voc', not "
                             f"{self.source!r}")
        if self.source in DATASETS and not self.root:
            raise ValueError(f"data.root must name the {self.source} dataset's folder when data.source is "
                             f"{self.source!r}")
        return self


class ModelConfig(_Section):
    # small_resnet (width: its first stage's channels), vit_tiny (a 4-block ViT, patch 8, for CPU runs), or
    # a torchvision classification model (vit_*/swin_* token layers are read as grids by every method)
    arch: str = "small_resnet"
    width: int = Field(16, ge=4, le=256)
    layers: list[str] | None = None  # TIF/HAF layers; None -> the model's default_layers
    cam_layer: str | None = None
    # initial weights: a torchvision weights name of the arch (e.g. IMAGENET1K_V2; downloaded to torch's cache
    # where the machine may download) or a local state-dict file (.pt/.pth); the classifier head is fresh when
    # its number of classes differs. Checked before Ray starts.
    weights: str | None = None
    # the input normalisation inside the model (inputs, attributions, PGD eps and masks stay in [0,1] pixels):
    # auto = ImageNet statistics when model.weights is set, none otherwise
    normalize: Literal["auto", "imagenet", "none"] = "auto"

    @model_validator(mode="after")
    def _weights_exist(self) -> ModelConfig:
        if self.weights is None:
            return self
        from xai_core.models import weights_source

        weights_source(self.arch, self.weights)  # ValueError naming the file or the allowed names
        return self

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v in ("small_resnet", "vit_tiny"):
            return v
        from xai_core.models import available_archs  # imports torchvision: only for its architectures

        allowed = available_archs()
        if v not in allowed:
            raise ValueError(f"unknown architecture {v!r}; allowed: {', '.join(allowed)}")
        return v


class TrainConfig(_Section):
    modes: list[Mode] = ["erm", "consistency", "scaat"]
    loss: Literal["ce", "bce"] = "ce"  # bce: one sigmoid per class, for multi-label data (data.multilabel)
    seeds: list[int] = [0]
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    num_workers: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = False
    placement: Literal["PACK", "SPREAD"] = "PACK"
    max_failures: int = Field(2, ge=0)
    threads_per_worker: int = Field(0, ge=0)  # 0: the node's cores / its training workers
    # A worker keeps its shard in memory after the first epoch when it is at most this size (0: stream every
    # epoch from Ray Data). Later epochs then shuffle in-process instead of re-reading Parquet. A training
    # split of at most this size and storage.driver_io_mb is read by each worker itself (ingest.fit_input).
    cache_shard_mb: int = Field(2048, ge=0)
    # Checkpoint selection (declared, docs/EVALUATION.md): after every epoch rank 0 measures validation accuracy
    # and worst-group accuracy (the lowest over (class, background) groups with >= val_min_group validation
    # images; class groups for data without backgrounds); both the last epoch and the epoch of best
    # validation worst-group accuracy are kept (evaluate.checkpoint picks the one evaluated).
    val_min_group: int = Field(20, ge=1)


class ConsistencyConfig(_Section):
    """METHODS §5a; round 0 is the ERM model at epoch `train.epochs - (rounds-1) * round_epochs`."""

    rounds: int = Field(3, ge=2)
    round_epochs: int = Field(2, ge=1)
    mask_source: Literal["cam", "ground_truth"] = "cam"
    tau: float = Field(0.5, ge=0, le=1)
    eps: float = Field(8 / 255, ge=0, le=1)
    step_size: float = Field(2 / 255, gt=0, le=1)
    steps: int = Field(5, ge=1)
    similarity: Literal["cosine", "pearson", "js"] = "cosine"
    power: float = Field(1.0, gt=0)
    w_min: float = Field(0.1, ge=0, lt=1)
    w_max: float | None = Field(None, ge=1)  # cap on a weight (mean 1); None: no cap (the paper)
    # a sample whose clean or adversarial Grad-CAM is flat: legacy (the first version: attacked over the whole
    # image, similarity weight), keep (not attacked, similarity weight), one (weight 1), exclude (weight 0);
    # counted per round and group either way (xai_core.objectives.DEGENERATE)
    degenerate: Literal["legacy", "keep", "one", "exclude"] = "legacy"
    # the reweighted rounds: their learning rate (None: train.lr), whether each round starts with a fresh Adam
    # state instead of the checkpoint's, and whether it fine-tunes the previous round's model or retrains a
    # fresh one (seeded like every model) for round_epochs with the round's weights
    lr: float | None = Field(None, gt=0)
    reset_optimizer: bool = False
    init: Literal["finetune", "scratch"] = "finetune"


class ScaatConfig(_Section):
    """METHODS §5b."""

    keep: float = Field(0.5, gt=0, lt=1)
    eps: float = Field(8 / 255, ge=0, le=1)
    eps_min: float = Field(1 / 255, ge=0, le=1)
    steps: int = Field(3, ge=1)
    lam: float = Field(1.0, ge=0)


class JttConfig(_Section):
    """Just Train Twice (Liu et al., ICML 2021): ERM for ``epochs`` (T), the training samples it gets wrong
    are the error set, then a fresh model trains train.epochs with the error set weighted lambda_up x the
    rest (weights scaled to mean 1)."""

    epochs: int = Field(3, ge=1)
    lambda_up: float = Field(6.0, ge=1)


class PrecomputeConfig(_Section):
    actors: int = Field(0, ge=0)  # 0: one fewer than the cluster's CPUs (RAY_NOTES), at least 1
    batch_size: int = Field(128, ge=1)


WSSS_THRESHOLDS = [round(0.05 * i, 2) for i in range(1, 20)]  # evaluate.wsss_thresholds' default grid


class EvaluateConfig(_Section):
    methods: list[str] = list(EVAL_METHODS)
    # which checkpoint of each model is evaluated: the last epoch, or the epoch of best validation worst-group
    # accuracy (train.val_min_group); both are in the train manifest and MLflow whichever is chosen
    checkpoint: Literal["last", "best_val_worst_group"] = "last"
    # images per committed shard of a split (rounded up to a multiple of batch_size, so batches are the
    # same as unsharded): a killed evaluate resumes after its last committed shard
    shard_images: int = Field(1024, ge=1)
    n_test: int = Field(256, ge=1)  # test images with PGD and attribution rows (first n of the test split)
    n_accuracy: int = Field(0, ge=0)  # test images for clean accuracy and groups (forwards only); 0: all
    random_baseline: bool = True  # also evaluate the architecture with fresh weights, one per seed (sanity)
    n_dwsol: int = Field(64, ge=0)
    batch_size: int = Field(64, ge=1)
    tif_base: Literal["gradient", "input_x_gradient", "integrated_gradients", "smoothgrad"] = \
        "input_x_gradient"
    tif_alpha: float = Field(0.25, ge=0, le=1)  # replaced by the sweep's best alpha when it ran
    haf_steps: int = Field(30, ge=1)  # HAF's Adam steps and learning rate when the sweep did not calibrate them
    haf_lr: float = Field(0.05, gt=0)
    ig_steps: int = Field(16, ge=1)
    smoothgrad_samples: int = Field(16, ge=1)
    deletion_steps: int = Field(32, ge=1)
    pgd_eps: list[float] = [2 / 255, 8 / 255]
    pgd_steps: int = Field(10, ge=1)
    detection_images: int = Field(128, ge=0)  # METHODS §3b; 0 turns it off
    randomisation_images: int = Field(16, ge=0)  # METHODS §6 sanity check; 0 turns it off
    figure_images: int = Field(4, ge=1, le=16)
    # WSOL (CUB, ...): per method row, the best contour-box IoU at each of the 256 map levels (box_iou_levels),
    # from which the report computes MaxBoxAccV2 over the test split; images without a box get NaN
    wsol_boxes: bool = False
    # mode -> the methods evaluated on its models (a subset of `methods`; a mode not named gets them all): the
    # training comparison needs only the maps its table and claims read (e.g. saliency and gradcam), the
    # attribution comparison runs every method on the ERM models (and their random-weight copies)
    mode_methods: dict[Mode, list[str]] = {}
    # the modes whose models get the dataset checks (detection AUROC, model randomisation; None: every mode):
    # 4-5 min a model in the paper run, so the training comparison's models can go without
    check_modes: list[Mode] | None = None
    # WSSS (data with segmentation masks, VOC's SegmentationClass): pseudo-labels from every method's maps of
    # an image's labels; the background threshold is chosen per model and method by mIoU on up to this many
    # segmented validation images (held out of the training list, never test), the mIoU reported on as many
    # segmented test images with a bootstrap 95% CI; 0 turns it off. wsss_thresholds: the grid searched
    wsss_images: int = Field(0, ge=0)
    wsss_thresholds: list[float] = WSSS_THRESHOLDS

    @field_validator("wsss_thresholds")
    @classmethod
    def _unit_thresholds(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 <= t <= 1 for t in v) or len(set(v)) != len(v):
            raise ValueError(f"expected distinct thresholds in [0, 1], got {v}")
        return v

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in EVAL_METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; allowed: {', '.join(EVAL_METHODS)}")
        return v

    @model_validator(mode="after")
    def _mode_methods_evaluated(self) -> EvaluateConfig:
        for mode, methods in self.mode_methods.items():
            bad = [m for m in methods if m not in self.methods]
            if bad:
                raise ValueError(f"evaluate.mode_methods.{mode}: {bad} not in evaluate.methods {self.methods}")
        return self


class SweepConfig(_Section):
    enabled: bool = True
    alphas: list[float] = [0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9]
    # the objective each thresholded method's alpha is picked by (higher is better). pxap is threshold-free
    # (Choe et al. 2020); the IoU of the half-max region cannot see any alpha <= 0.5 (METHODS §2)
    metric: Literal["pxap", "iou", "energy_pointing_game", "pointing_game"] = "pxap"
    n_val: int = Field(128, ge=4)
    model: Mode = "erm"
    # The first version's training-knob sweep (its own per-batch algorithm, from scratch, ASHA on val_acc) is
    # gone: the tune section sweeps train.py's own training. The keys stay at these values only so that runs
    # committed before keep their stage keys; setting them is an error that says where the sweep went.
    train_mode: None = None
    train_space: dict[str, list[Any]] = {}
    train_trials: int = 4
    train_epochs: int = 4
    # HAF's steps and learning rate from its objective curve (METHODS §3): each HAF reading in evaluate.methods
    # runs haf_max_steps Adam steps at every lr in haf_lrs on the first haf_images validation images of the
    # sweep model; the lr with the lowest final mean objective wins, and steps = the first step whose mean
    # objective is within haf_tol of that final value (relative). An empty haf_lrs keeps evaluate.haf_steps/lr.
    haf_lrs: list[float] = [0.05, 0.2, 0.5]
    haf_max_steps: int = Field(100, ge=1)
    haf_tol: float = Field(0.1, ge=0)
    haf_images: int = Field(64, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _old_knob_sweep(cls, data: Any) -> Any:
        old = {"train_mode": None, "train_space": {}, "train_trials": 4, "train_epochs": 4}
        if isinstance(data, dict) and any(k in data and data[k] != v for k, v in old.items()):
            raise ValueError("sweep.train_mode / train_space / train_trials / train_epochs: the training-knob sweep "
                             "moved to the tune section and runs train.py's own training: tune.spaces: "
                             "{consistency: {consistency.power: [1, 2]}}, tune.seeds, tune.metric, tune.search, "
                             "tune.trials (README, 'Sweeping training knobs')")
        return data

    @field_validator("haf_lrs")
    @classmethod
    def _lrs_positive(cls, v: list[float]) -> list[float]:
        bad = [a for a in v if not a > 0]
        if bad:
            raise ValueError(f"haf_lrs {bad} out of range: each learning rate must be > 0")
        return v

    @field_validator("alphas")
    @classmethod
    def _alphas_in_range(cls, v: list[float]) -> list[float]:
        bad = [a for a in v if not 0.0 <= a <= 1.0]
        if bad or not v:
            raise ValueError(f"alphas {bad or v} out of range: each alpha must be in [0, 1], at least one")
        return v


class StorageConfig(_Section):
    uri: str = "runs"  # local directory (relative to the repo root) or s3://bucket/prefix
    s3_endpoint: str | None = None  # e.g. http://127.0.0.1:9000 for a test endpoint
    s3_region: str = "us-east-1"
    # A stage's input split of at most this many MB (its Parquet files) is read by the driver with pyarrow
    # and handed to Ray Data as in-memory blocks; a larger one streams through Ray Data's Parquet reader.
    # Ingest writes splits of at most this many MB (arrays in memory) with pyarrow, larger ones with Ray Data.
    # Each streamed read starts a listing task, a footer-reader actor and a read task (Python processes):
    # on the 2-core machine the smoke split took 2.57 s that way against 0.06 s (bench/reads.py,
    # docs/BENCHMARKS.md). A training split of at most this size (and train.cache_shard_mb) is read by each
    # training worker itself, with no Ray Data split coordinator (ingest.fit_input). 0: always stream.
    driver_io_mb: float = Field(256.0, ge=0)


class TrackingConfig(_Section):
    uri: str | None = None  # None: sqlite:///<repo>/mlflow.db
    experiment: str = "xai-ray"
    register_models: bool = True


TUNE_METRICS = {"val_conflicting_acc": "max", "val_worst_group_acc": "max", "val_acc": "max",
                "val_saliency_gini": "max", "val_deletion_auc": "min"}
TuneMetric = Literal["val_conflicting_acc", "val_worst_group_acc", "val_acc", "val_saliency_gini", "val_deletion_auc"]
# which config sections a mode's knobs may live in (train.* is every mode's)
KNOB_SECTIONS = {"consistency": ("consistency", "train"), "jtt": ("jtt", "train"), "erm": ("train",),
                 "group_balanced": ("train",), **{m: ("scaat", "train") for m in ADV_MODES}}


class TuneConfig(_Section):
    """The training-knob sweep (``pipelines.sweep.run_knobs``, before train): per mode, Ray Tune trials of
    train.py's own per-model function (``train.train_model``: warm-up, rounds, precompute, weights) on the
    validation split; each trial averages ``seeds`` (kept apart from train.seeds) and is scored by ``metric``
    at the checkpoint evaluate.checkpoint selects. The best setting of each mode then trains train.seeds.
    SCAAT's controls (adv_whole, adv_random) take SCAAT's chosen setting unless swept themselves."""

    spaces: dict[str, dict[str, list[Any]]] = {}  # mode -> {"section.key": [values]}
    search: Literal["grid", "random"] = "grid"  # grid: every combination; random: `trials` draws per mode
    trials: int = Field(4, ge=1)
    search_seed: int = 0  # random search: the draws' seed
    seeds: list[int] = [100, 101]
    # val_conflicting_acc: accuracy on the bias-conflicting validation images (the debiasing claim's group);
    # val_worst_group_acc: the lowest (class x background) group with >= train.val_min_group images, 0 for every
    # model of the paper run's first trials (36 groups of ~30 images: some group is always all wrong here)
    metric: TuneMetric = "val_worst_group_acc"
    # a mode's own objective where its claim is another (SCAAT: sparser maps, val_saliency_gini)
    mode_metrics: dict[Mode, TuneMetric] = {}
    explain_images: int = Field(128, ge=1)  # validation images for val_saliency_gini / val_deletion_auc
    keep_models: bool = False  # keep each trial's models (else only their manifests and weights)

    @field_validator("spaces")
    @classmethod
    def _spaces_known(cls, v: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        owner: dict[str, str] = {}
        for mode, space in v.items():
            if mode not in MODES:
                raise ValueError(f"tune.spaces: unknown mode {mode!r}; allowed: {', '.join(MODES)}")
            for key, values in space.items():
                section = key.split(".", 1)[0]
                if "." not in key or section not in KNOB_SECTIONS[mode]:
                    raise ValueError(f"tune.spaces.{mode}: knob {key!r} must be a key of section "
                                     f"{' or '.join(KNOB_SECTIONS[mode])} (e.g. {KNOB_SECTIONS[mode][0]}.<key>)")
                if not isinstance(values, list) or not values:
                    raise ValueError(f"tune.spaces.{mode}.{key}: expected a non-empty list of values, got {values!r}")
                if key in owner:
                    raise ValueError(f"tune.spaces: {key!r} is swept for both {owner[key]!r} and {mode!r}; one "
                                     "config trains every mode, so a knob can have one chosen value (SCAAT's "
                                     "controls take SCAAT's setting when they are not swept)")
                owner[key] = mode
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds_present(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"tune.seeds {v}: expected distinct seeds, at least one (two or more to average)")
        return v


class RayConfig(_Section):
    address: str | None = None  # None: RAY_ADDRESS / a job's cluster, else a local one
    num_cpus: int | None = Field(None, ge=1)  # logical CPUs of a local cluster; None: 2x physical


class Config(_Section):
    name: str = Field("quick", pattern=r"^[A-Za-z0-9_.-]+$")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    consistency: ConsistencyConfig = ConsistencyConfig()
    scaat: ScaatConfig = ScaatConfig()
    jtt: JttConfig = JttConfig()
    precompute: PrecomputeConfig = PrecomputeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    sweep: SweepConfig = SweepConfig()
    tune: TuneConfig = TuneConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _rounds_fit(self) -> Config:
        c = self.consistency
        if "consistency" in self.train.modes:
            if "erm" not in self.train.modes:
                raise ValueError("train.modes: 'consistency' starts from the ERM model, so 'erm' must be "
                                 "in train.modes too")
            if (c.rounds - 1) * c.round_epochs >= self.train.epochs:
                raise ValueError(f"consistency.rounds={c.rounds} x consistency.round_epochs={c.round_epochs}"
                                 f" leaves no ERM warm-up within train.epochs={self.train.epochs}: need "
                                 "(rounds - 1) * round_epochs < train.epochs")
        if self.data.multilabel or self.train.loss == "bce":
            if not (self.data.multilabel and self.train.loss == "bce" and self.data.source in ("biased_shapes", "voc")):
                raise ValueError("multi-label training needs data.multilabel=true, data.source=biased_shapes or voc "
                                 f"and train.loss=bce together (got multilabel={self.data.multilabel}, source="
                                 f"{self.data.source!r}, loss={self.train.loss!r})")
            if self.train.modes != ["erm"]:
                raise ValueError(f"train.modes={self.train.modes}: with multi-label data only 'erm' trains "
                                 "(consistency reweighting and SCAAT attack one class per image); set "
                                 "train.modes=[erm]")
        if "group_balanced" in self.train.modes and self.data.source not in ("biased_shapes", "waterbirds"):
            raise ValueError(f"train.modes: group_balanced weights the training rows by their group; "
                             f"data.source={self.data.source!r} has none (biased_shapes and waterbirds have)")
        if self.data.source == "voc" and not self.data.multilabel:
            raise ValueError("data.source=voc is multi-label: set data.multilabel=true and train.loss=bce")
        patch = re.fullmatch(r"vit_[a-z]+_(\d+)", self.model.arch)
        if patch and self.data.size % int(patch[1]):
            raise ValueError(f"model.arch={self.model.arch!r} has patch size {patch[1]}: data.size="
                             f"{self.data.size} must be a multiple of it")
        if self.tune.spaces:
            overlap = sorted(set(self.tune.seeds) & set(self.train.seeds))
            if overlap:
                raise ValueError(f"tune.seeds {self.tune.seeds} and train.seeds {self.train.seeds} share {overlap}: "
                                 "the sweep's seeds are kept apart from the final models' ones")
            untrained = sorted(set(self.tune.spaces) - set(self.train.modes))
            if untrained:
                raise ValueError(f"tune.spaces sweeps {untrained}, which train.modes={self.train.modes} does not train")
        if self.sweep.model not in self.train.modes:
            raise ValueError(f"sweep.model={self.sweep.model!r} is not trained: train.modes="
                             f"{self.train.modes}")
        return self

    def section_hash(self, *sections: str) -> str:
        """A short hash of the named sections: a stage's output is valid only for the same inputs."""
        return digest({s: section_dump(self, s) for s in sections})


# Keys added after runs were committed: at their default they stay out of every hash (a committed stage stays
# valid when the code learns an option it did not use); set to anything else, they enter it.
LATER_DEFAULTS: dict[str, dict[str, Any]] = {"data": {"multilabel": False, "root": None, "val_fraction": 0.1,
                                                      "test_list": "val", "difficult_subset": None},
                                             "model": {"weights": None, "normalize": "auto"},
                                             "evaluate": {"wsol_boxes": False, "mode_methods": {}, "check_modes": None,
                                                          "wsss_images": 0,
                                                          "wsss_thresholds": WSSS_THRESHOLDS},
                                             "consistency": {"degenerate": "legacy", "lr": None,
                                                             "reset_optimizer": False, "init": "finetune"},
                                             "train": {"loss": "ce"}}


def section_dump(cfg: Config, section: str, exclude: set[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A config section as the hashes see it: JSON values, ``exclude`` and LATER_DEFAULTS at default left out."""
    d = getattr(cfg, section).model_dump(mode="json", exclude=set(exclude))
    for k, v in LATER_DEFAULTS.get(section, {}).items():
        if k in d and d[k] == v:
            del d[k]
    return d


def with_knobs(cfg: Config, knobs: dict[str, Any]) -> Config:
    """``cfg`` with dotted keys set (a knob-sweep setting, e.g. {"consistency.power": 2}), validated again."""
    data = cfg.model_dump(mode="json")
    for key, value in knobs.items():
        *head, last = key.split(".")
        node = data
        for p in head:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            raise ConfigError(f"knob {key!r}: no such config key")
        node[last] = value
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, f"knobs {knobs}")) from None


def digest(payload: Any) -> str:
    """A short, order-independent hash of a JSON-able payload (what a stage output was made from)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value, e.g. train.epochs=3")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {assignment!r}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = _parse_value(raw)


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = _section_for(e["loc"][:-1])
            allowed = ", ".join(parent.model_fields) if parent else "see configs/quick.yaml"
            lines.append(f"  {loc}: unknown key; allowed keys here: {allowed}")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _section_for(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for p in loc:
        field = model.model_fields.get(str(p))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def resolve_config(path: str | Path) -> Path:
    """A config path as given, or a shipped config by name ("quick", "paper.yaml") when no such file exists."""
    p = Path(path)
    if not p.is_file() and len(p.parts) == 1 and (CONFIGS / f"{p.stem}.yaml").is_file() and p.suffix in ("", ".yaml"):
        return CONFIGS / f"{p.stem}.yaml"
    return p


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults), apply overrides, validate; ConfigError names bad keys."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = resolve_config(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; shipped configs (by name or path): "
                              f"{', '.join(sorted(x.stem for x in CONFIGS.glob('*.yaml')))}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got "
                              f"{type(data).__name__}")
        source = str(p)
    for ov in overrides or []:
        apply_override(data, ov)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None
    return _classes_from_data(cfg, data, source)


def _classes_from_data(cfg: Config, data: dict, source: str) -> Config:
    """cub / waterbirds / voc: data.num_classes from the dataset's own class list (read here, where the job
    starts; workers get the resolved config and never read data.root). A data.num_classes the user set and
    the data contradict is an error."""
    d = cfg.data
    if d.source not in DATASETS:
        return cfg
    from xai_core.data.datasets import classes_of

    try:
        n = len(classes_of(d.source, d.root))  # fails naming the missing index file
    except ValueError as e:
        raise ConfigError(f"invalid config ({source}):\n  data.root: {e}") from None
    given = (data.get("data") or {}).get("num_classes")
    if given is not None and int(given) != n:
        raise ConfigError(f"invalid config ({source}):\n  data.num_classes={given} but {d.source} under "
                          f"{d.root!r} has {n} classes (leave data.num_classes out: it is taken from the data)")
    if d.num_classes != n:
        d.num_classes = n
    return cfg
