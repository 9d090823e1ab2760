"""Weakly-supervised grounding evaluation in ALBEF's protocol.

A grounding model produces a heat map (e.g. Grad-CAM over the ViT patch grid) per referring expression. The map is
upsampled to the image size (bicubic, as ALBEF), every detector proposal of that image is scored by the heat inside
it divided by ``area ** alpha`` (alpha = 0.5 trades small, hot boxes against large ones), the best proposal is the
prediction, and it counts as correct when its IoU with the ground-truth box is >= 0.5. Accuracy is reported per
split (val, testA, testB for RefCOCO+ unc).

Boxes are ``[x, y, w, h]`` in pixels. IoU is the official one of the REFER toolkit (``computeIoU``, which ALBEF's
grounding evaluation calls), over inclusive pixel coordinates: ``x2 = x + w - 1``; the intersection is
``(ix2 - ix1 + 1) * (iy2 - iy1 + 1)`` when ``ix1 < ix2`` and ``iy1 < iy2`` (strictly: an overlap of a single pixel
row or column counts as none) and 0 otherwise; ``union = w1 * h1 + w2 * h2 - inter``. A pair whose union is 0 has
IoU 0 (the toolkit would divide by zero).

Results are counted per referring expression, as ALBEF does: a ref with several sentences has one result (one heat
map, one predicted box) per sentence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from dataset.annotations import read_json
from refTools.refer import REFER

IOU_THRESHOLD = 0.5
# ref_id -> (h, w) heat map, or (ref_id, map) pairs (one per sentence; a ref may repeat).
HeatMaps = Mapping[int, torch.Tensor] | Sequence[tuple[int, torch.Tensor]]


def paired_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """REFER's IoU of each row of ``boxes_a`` (N, 4) with the same row of ``boxes_b`` (N, 4), boxes ``[x, y, w, h]``
    (inclusive pixel coordinates, see the module docstring) -> (N,) float64."""
    boxes_a, boxes_b = boxes_a.double(), boxes_b.double()
    inter_x1 = torch.maximum(boxes_a[:, 0], boxes_b[:, 0])
    inter_y1 = torch.maximum(boxes_a[:, 1], boxes_b[:, 1])
    inter_x2 = torch.minimum(boxes_a[:, 0] + boxes_a[:, 2] - 1, boxes_b[:, 0] + boxes_b[:, 2] - 1)
    inter_y2 = torch.minimum(boxes_a[:, 1] + boxes_a[:, 3] - 1, boxes_b[:, 1] + boxes_b[:, 3] - 1)
    overlaps = (inter_x1 < inter_x2) & (inter_y1 < inter_y2)  # strict, as the toolkit
    inter = torch.where(overlaps, (inter_x2 - inter_x1 + 1) * (inter_y2 - inter_y1 + 1), torch.zeros_like(inter_x1))
    union = boxes_a[:, 2] * boxes_a[:, 3] + boxes_b[:, 2] * boxes_b[:, 3] - inter  # (N,)
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(union))


def compute_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """REFER's IoU of two ``[x, y, w, h]`` boxes (inclusive pixel coordinates, see the module docstring)."""
    row_a = torch.as_tensor(box_a, dtype=torch.float64).reshape(1, 4)
    row_b = torch.as_tensor(box_b, dtype=torch.float64).reshape(1, 4)
    return float(paired_iou(row_a, row_b)[0])


def box_heat_scores(heatmap: torch.Tensor, boxes: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Heat summed inside each box divided by ``(w * h) ** alpha``: (H, W), (N, 4) -> (N,) float64.

    Box pixels are rows ``int(y):int(y + h)`` and columns ``int(x):int(x + w)`` (ALBEF's slicing), clipped to the
    map. All boxes are scored at once from an integral image. Boxes without area score ``-inf``.
    """
    if heatmap.dim() != 2:
        raise ValueError(f"heatmap must be (H, W), got shape {tuple(heatmap.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] < 4:
        raise ValueError(f"boxes must be (N, 4) [x, y, w, h], got shape {tuple(boxes.shape)}")
    height, width = heatmap.shape
    boxes = boxes[:, :4].to(device=heatmap.device, dtype=torch.float64)
    # Integral image with a zero row/column in front: integral[i, j] = heat in rows < i, columns < j.
    integral = F.pad(heatmap.double().cumsum(0).cumsum(1), (1, 0, 1, 0))  # (H+1, W+1)
    x0 = boxes[:, 0].trunc().clamp(0, width).long()
    y0 = boxes[:, 1].trunc().clamp(0, height).long()
    x1 = torch.maximum((boxes[:, 0] + boxes[:, 2]).trunc().clamp(0, width).long(), x0)
    y1 = torch.maximum((boxes[:, 1] + boxes[:, 3]).trunc().clamp(0, height).long(), y0)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]  # (N,)
    area = boxes[:, 2] * boxes[:, 3]
    valid = (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    scores = inside / area.clamp(min=torch.finfo(torch.float64).tiny).pow(alpha)
    return torch.where(valid, scores, torch.full_like(scores, float("-inf")))


def pick_box(heatmap: torch.Tensor, boxes: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """The ``[x, y, w, h]`` box (4,) with the highest heat score (first one on ties)."""
    if boxes.numel() == 0:
        raise ValueError("pick_box: no candidate boxes")
    scores = box_heat_scores(heatmap, boxes, alpha)
    if not torch.isfinite(scores).any():
        raise ValueError("pick_box: every candidate box has zero width or height")
    return boxes[int(scores.argmax()), :4]


def heat_peak_in_box(heatmap: torch.Tensor, box: Sequence[float], image_size: tuple[int, int]) -> bool:
    """Pointing game (Zhang et al., 2016): does the hottest cell of ``heatmap`` (h, w), a grid laid over an image of
    ``image_size`` (H, W) pixels, have its centre inside ``box`` ``[x, y, w, h]`` (pixels, edges included)? A
    random point lands in the box with probability ``w * h / (W * H)``, the chance level. First cell on ties."""
    if heatmap.dim() != 2 or heatmap.numel() == 0:
        raise ValueError(f"heatmap must be a non-empty (h, w) grid, got shape {tuple(heatmap.shape)}")
    grid_h, grid_w = heatmap.shape
    row, col = divmod(int(heatmap.flatten().argmax()), grid_w)
    centre_x = (col + 0.5) * image_size[1] / grid_w
    centre_y = (row + 0.5) * image_size[0] / grid_h
    x, y, w, h = (float(v) for v in box[:4])
    return x <= centre_x <= x + w and y <= centre_y <= y + h


def grounding_accuracy(
    results: Sequence[Mapping], refer: REFER, iou_threshold: float = IOU_THRESHOLD
) -> dict[str, float]:
    """Accuracy (%) per split of ``[{ref_id, pred_box: [x, y, w, h]}]``: IoU with the ground truth >= threshold.

    One result per referring expression: a ref_id appears once per sentence evaluated (ALBEF's counting)."""
    if not results:
        raise ValueError("grounding_accuracy: no results")
    pred_boxes, gt_boxes, splits = [], [], []
    for index, item in enumerate(results):
        if "ref_id" not in item or "pred_box" not in item:
            raise ValueError(f'results[{index}]: expected keys "ref_id" and "pred_box", got {sorted(item)}')
        ref_id = item["ref_id"]
        pred_box = torch.as_tensor(item["pred_box"], dtype=torch.float64).flatten()
        if pred_box.numel() < 4:
            raise ValueError(f"results[{index}] (ref_id {ref_id}): pred_box needs [x, y, w, h], got {item['pred_box']}")
        pred_boxes.append(pred_box[:4].cpu())
        gt_boxes.append(torch.as_tensor(refer.get_ref_box(ref_id), dtype=torch.float64))
        splits.append(refer.Refs[ref_id]["split"])
    correct = paired_iou(torch.stack(pred_boxes), torch.stack(gt_boxes)) >= iou_threshold  # (N,)
    accuracy: dict[str, float] = {}
    for split in sorted(set(splits)):
        in_split = torch.tensor([s == split for s in splits])
        accuracy[split] = 100.0 * float(correct[in_split].double().mean())
    return accuracy


def _boxes_for_image(dets: Mapping, image_id: int) -> torch.Tensor:
    boxes = dets.get(image_id, dets.get(str(image_id)))
    if boxes is None:
        raise ValueError(f"no detection boxes for image_id {image_id}")
    # float64 so that int(x + w) truncates exactly as the Python arithmetic of the reference protocol.
    boxes = torch.as_tensor(boxes, dtype=torch.float64)
    if boxes.dim() != 2 or boxes.shape[0] == 0 or boxes.shape[1] < 4:
        raise ValueError(f"detection boxes of image_id {image_id} must be (N>=1, 4), got shape {tuple(boxes.shape)}")
    return boxes


def _heatmap_items(heatmaps: HeatMaps) -> list[tuple[int, torch.Tensor]]:
    return list(heatmaps.items()) if isinstance(heatmaps, Mapping) else list(heatmaps)


def predict_boxes(heatmaps: HeatMaps, dets: Mapping, refer: REFER, alpha: float = 0.5) -> list[dict]:
    """Best proposal per expression: ``[{ref_id, pred_box}]`` from (h, w) patch-grid heat maps (ref_id -> map, or
    ``(ref_id, map)`` pairs, one per sentence) and per-image proposals."""
    predictions = []
    for ref_id, heatmap in _heatmap_items(heatmaps):
        if heatmap.dim() != 2:
            raise ValueError(f"heat map of ref_id {ref_id} must be (h, w), got shape {tuple(heatmap.shape)}")
        image = refer.get_image(ref_id)
        # (h, w) -> (1, 1, H, W) at the image resolution, bicubic as ALBEF does.
        full = F.interpolate(
            heatmap.float()[None, None], size=(int(image["height"]), int(image["width"])), mode="bicubic"
        )[0, 0]
        boxes = _boxes_for_image(dets, image["id"])
        predictions.append({"ref_id": ref_id, "pred_box": pick_box(full, boxes, alpha).tolist()})
    return predictions


def evaluate_heatmaps(heatmaps: HeatMaps, dets: Mapping, refer: REFER, alpha: float = 0.5) -> dict[str, float]:
    """Grounding accuracy (%) per split from heat maps (see predict_boxes) and proposals (image_id -> (N, 4))."""
    return grounding_accuracy(predict_boxes(heatmaps, dets, refer, alpha), refer)


def load_dets(path: str | Path) -> dict[int, torch.Tensor]:
    """Read a detections file ``{image_id: [[x, y, w, h, ...], ...]}`` into image_id -> (N, 4) float64 tensors."""
    path = Path(path)
    raw = read_json(path, "detections file")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object image_id -> list of [x, y, w, h] boxes")
    dets: dict[int, torch.Tensor] = {}
    for key, boxes in raw.items():
        try:
            image_id = int(key)
        except ValueError:
            raise ValueError(f"{path}: key {key!r} is not an integer image id") from None
        if not isinstance(boxes, list) or not boxes:
            raise ValueError(f"{path}: key {key!r}: expected a non-empty list of [x, y, w, h] boxes")
        for index, box in enumerate(boxes):
            if (
                not isinstance(box, list)
                or len(box) < 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box[:4])
            ):
                raise ValueError(f"{path}: key {key!r}, box {index}: expected [x, y, w, h] numbers, got {box!r}")
        dets[image_id] = torch.tensor([box[:4] for box in boxes], dtype=torch.float64)  # (N, 4)
    return dets
