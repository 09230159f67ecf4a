"""Explanation metrics (METHODS §6): torch-native, batched, each returns per-sample values [B]."""

from xai_core.metrics.boxes import box_hits, box_iou_levels, max_box_acc, max_box_acc_from_levels, max_box_acc_v2
from xai_core.metrics.complexity import gini
from xai_core.metrics.detection import adversarial_examples, auroc, detection_auroc, train_detector
from xai_core.metrics.dwsol import dwsol, false_response
from xai_core.metrics.faithfulness import Curve, deletion_auc, insertion_auc, perturbation_curve_set
from xai_core.metrics.groups import group_accuracy
from xai_core.metrics.localisation import (
    energy_pointing_game,
    localisation_iou,
    pointing_game,
    pointing_game_per_class,
    pseudo_masks,
    wsol_top1_loc,
    wsss_miou,
)
from xai_core.metrics.multilabel import average_precision_per_class, mean_average_precision
from xai_core.metrics.sanity import constant_maps, model_randomisation, spearman
from xai_core.metrics.segmentation import (
    best_background_threshold,
    miou,
    miou_interval,
    segmentation_counts,
    wsss_labels,
)
from xai_core.metrics.wsol import best_threshold, dataset_pxap, iou_at, pxap

__all__ = [
    "best_background_threshold",
    "miou",
    "miou_interval",
    "segmentation_counts",
    "wsss_labels",
    "Curve",
    "adversarial_examples",
    "auroc",
    "average_precision_per_class",
    "best_threshold",
    "box_hits",
    "box_iou_levels",
    "constant_maps",
    "dataset_pxap",
    "deletion_auc",
    "detection_auroc",
    "dwsol",
    "energy_pointing_game",
    "false_response",
    "gini",
    "group_accuracy",
    "insertion_auc",
    "iou_at",
    "localisation_iou",
    "max_box_acc",
    "max_box_acc_from_levels",
    "max_box_acc_v2",
    "mean_average_precision",
    "model_randomisation",
    "perturbation_curve_set",
    "pointing_game",
    "pointing_game_per_class",
    "pseudo_masks",
    "pxap",
    "spearman",
    "train_detector",
    "wsol_top1_loc",
    "wsss_miou",
]
