"""The demo's Grad-CAM picture: after the tiny pretraining, the heat maps of one held-out caption on its image
(the same rendering as Predict.py)."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.gradcam_view import explain_image, load_predictor


def write_demo_gradcam(output_dir: Path, data_dir: Path) -> Path:
    """Load ``output_dir/checkpoint_last.pth`` (its config from ``output_dir/config.yaml``) and write
    ``output_dir/gradcam.png`` for the first caption of the first image of ``data_dir/retrieval_test.json``."""
    output_dir, data_dir = Path(output_dir), Path(data_dir)
    test_file = data_dir / "retrieval_test.json"
    if not test_file.is_file():
        raise FileNotFoundError(f"held-out captions not found: {test_file}")
    entries = json.loads(test_file.read_text(encoding="utf-8"))
    if not entries or not entries[0].get("caption"):
        raise ValueError(f"{test_file}: expected [{{image, caption: [..]}}] with at least one caption")
    entry = entries[0]
    caption = entry["caption"][0] if isinstance(entry["caption"], list) else entry["caption"]
    predictor = load_predictor(output_dir / "checkpoint_last.pth", output_dir / "config.yaml")
    png, explanation = explain_image(predictor, data_dir / "images" / entry["image"], caption,
                                     output_dir / "gradcam.png")
    print(f"[demo] Grad-CAM of {caption!r} on {entry['image']} (ITM match probability {explanation.itm_prob:.2f})")
    return png
