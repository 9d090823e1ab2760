"""Grad-CAM of a text on an image from an ALBEF-family checkpoint: a PNG with the image (and its ITM match
probability), the whole-sentence heat map and one heat map per word, as OpenCV overlays; prints the ITM score.

    python Predict.py --checkpoint output/grounding/checkpoint_best.pth --image cat.jpg --text "the cat on the left" \
        --out cam.png
    python Predict.py --checkpoint refcoco.pth --config configs/Grounding.yaml --image cat.jpg --text "left cat" \
        --out cam.png --save_npy            # official weights carry no config: give the task's YAML
    python Predict.py --checkpoint ckpt.pth --batch pairs.json --out_dir cams/   # [{image, text, out (optional)}]

Runs on CPU by default (--device cuda for a GPU). --save_npy also writes <out>.npy (1 + n_words, h, w): the
sentence map then the word maps, named in <out>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from engine import errors
from models.gradcam import GRADCAM_MODES
from tasks.gradcam_view import explain_image, load_predictor


def read_batch(path: Path) -> list[dict]:
    """A JSON list of {image, text[, out]}; errors name the file and the entry."""
    if not path.is_file():
        raise FileNotFoundError(f"batch file not found: {path}")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty list of {{image, text}} objects")
    for index, item in enumerate(items):
        if not (isinstance(item, dict) and isinstance(item.get("image"), str) and isinstance(item.get("text"), str)):
            raise ValueError(f'{path}: entry {index}: expected {{"image": str, "text": str}}, got {item!r}')
    return items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="AlignFuse or official ALBEF checkpoint (.pth)")
    parser.add_argument("--config", default=None, help="task YAML with the model block (default: the checkpoint's)")
    parser.add_argument("--tokenizer", default=None, help="vocab.txt / folder / hub name (default: the config's)")
    parser.add_argument("--image", help="image file (single mode)")
    parser.add_argument("--text", help="text to ground (single mode)")
    parser.add_argument("--out", default="gradcam.png", help="output PNG (single mode)")
    parser.add_argument("--batch", default=None, help="JSON list [{image, text, out (optional)}] (batch mode)")
    parser.add_argument("--out_dir", default="gradcam", help="folder of the batch mode's PNGs")
    parser.add_argument("--mode", default="itm", choices=GRADCAM_MODES,
                        help="itm: cross-attention of a fusion block (per-word maps); itc: image encoder attention")
    parser.add_argument("--block_num", type=int, default=None,
                        help="itm: BERT layer of the cross-attention (default: the third fusion layer)")
    parser.add_argument("--save_npy", action="store_true", help="also write the maps as <out>.npy (+ <out>.json)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(errors.DEBUG_FLAG, action="store_true",
                        help=f"show the traceback of a user error (wrong file, device...); or {errors.DEBUG_ENV}=1")
    return parser


def main(argv: list[str] | None = None) -> list[Path]:
    """Write the PNG(s); returns their paths."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch is None and (args.image is None or args.text is None):
        parser.error("give --image and --text, or --batch")
    if args.batch is not None:
        out_dir = Path(args.out_dir)
        jobs = [(item["image"], item["text"], item.get("out") or out_dir / f"{index:04d}_{_slug(item['text'])}.png")
                for index, item in enumerate(read_batch(Path(args.batch)))]
    else:
        jobs = [(args.image, args.text, args.out)]
    predictor = load_predictor(args.checkpoint, args.config, args.tokenizer, args.device)
    written = []
    for image, text, out in jobs:
        png, explanation = explain_image(predictor, image, text, out, args.mode, args.block_num, args.save_npy)
        print(f"ITM score {explanation.itm_prob:.4f}  {image}  {text!r}  -> {png}", flush=True)
        written.append(png)
    return written


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "text"


if __name__ == "__main__":
    with errors.exit_on_user_error():  # a wrong file or device: one message, exit 2 (--debug: the traceback)
        main()
    sys.exit(0)
