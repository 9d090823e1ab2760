"""Referring-expression data (REFER layout) and weakly-supervised grounding evaluation."""

from refTools.evaluation import (
    box_heat_scores,
    compute_iou,
    evaluate_heatmaps,
    grounding_accuracy,
    heat_peak_in_box,
    load_dets,
    paired_iou,
    pick_box,
    predict_boxes,
)
from refTools.refer import REFER
from refTools.safe_pickle import UnsafePickleError

__all__ = [
    "REFER",
    "UnsafePickleError",
    "box_heat_scores",
    "compute_iou",
    "evaluate_heatmaps",
    "grounding_accuracy",
    "heat_peak_in_box",
    "load_dets",
    "paired_iou",
    "pick_box",
    "predict_boxes",
]
