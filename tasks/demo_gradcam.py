"""The demo's Grad-CAM check: after the tiny pretraining, where does the ITM heat of a referring expression lie?

It draws one picture (the same rendering as Predict.py) for a held-out expression of a scene with several shapes, and
plays the pointing game over the held-out expressions of the synthetic RefCOCO+ split: the share of expressions whose
hottest Grad-CAM cell lies inside the referred object's box, next to the chance level of a random point (the mean
share of the image the box covers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dataset.transforms import load_image
from models.inference import Predictor
from refTools import REFER, heat_peak_in_box
from tasks.gradcam_view import explain_image, explain_text, load_predictor

DEMO_REFER_DATASET = "refcoco+"


@dataclass
class PointingResult:
    accuracy: float  # % of expressions whose heat peak lies in the referred object's box
    chance: float  # % a random point would reach: the mean box area over the image area
    count: int  # expressions played


def _test_entries(data_dir: Path) -> list[dict]:
    test_file = data_dir / f"{DEMO_REFER_DATASET}_test.json"
    if not test_file.is_file():
        raise FileNotFoundError(f"held-out referring expressions not found: {test_file}")
    entries = json.loads(test_file.read_text(encoding="utf-8"))
    if not entries:
        raise ValueError(f"{test_file}: no referring expressions")
    return entries


def pointing_game(predictor: Predictor, data_dir: Path, limit: int = 200) -> PointingResult:
    """Pointing game of the ITM Grad-CAM (whole sentence) on the first ``limit`` held-out expressions of
    ``data_dir`` (synthetic data: ``refcoco+_test.json``, ``refcoco+/``, ``images/``)."""
    data_dir = Path(data_dir)
    refer = REFER(data_dir, DEMO_REFER_DATASET)
    hits, area_shares = [], []
    for entry in _test_entries(data_dir)[:limit]:
        image = load_image(data_dir / "images" / entry["image"])
        explanation = explain_text(predictor, image, entry["text"], "itm")
        box = refer.get_ref_box(entry["ref_id"])
        hits.append(heat_peak_in_box(torch.from_numpy(explanation.sentence_map), box, image.shape[:2]))
        area_shares.append(box[2] * box[3] / (image.shape[0] * image.shape[1]))
    return PointingResult(100.0 * sum(hits) / len(hits), 100.0 * sum(area_shares) / len(area_shares), len(hits))


def write_demo_gradcam(output_dir: Path, data_dir: Path) -> tuple[Path, PointingResult]:
    """Load ``output_dir/checkpoint_last.pth`` (its config from ``output_dir/config.yaml``), write
    ``output_dir/gradcam.png`` for the first held-out expression whose image holds several shapes, and play the
    pointing game; prints both."""
    output_dir, data_dir = Path(output_dir), Path(data_dir)
    predictor = load_predictor(output_dir / "checkpoint_last.pth", output_dir / "config.yaml")
    refer = REFER(data_dir, DEMO_REFER_DATASET)
    entries = _test_entries(data_dir)
    crowded = [e for e in entries if len(refer.imgToAnns[refer.get_ref(e["ref_id"])["image_id"]]) > 1]
    entry = (crowded or entries)[0]
    png, explanation = explain_image(predictor, data_dir / "images" / entry["image"], entry["text"],
                                     output_dir / "gradcam.png")
    image_size = load_image(data_dir / "images" / entry["image"]).shape[:2]
    on_object = heat_peak_in_box(torch.from_numpy(explanation.sentence_map), refer.get_ref_box(entry["ref_id"]),
                                 image_size)
    print(f"[demo] Grad-CAM of {entry['text']!r} on {entry['image']}: ITM match probability "
          f"{explanation.itm_prob:.2f}, heat peak {'on' if on_object else 'off'} the referred object -> {png}")
    result = pointing_game(predictor, data_dir)
    print(f"[demo] pointing game on {result.count} held-out expressions: the heat peak lies on the referred object "
          f"for {result.accuracy:.1f}% (chance {result.chance:.1f}%)")
    return png, result
