"""Grad-CAM sheets of a checkpoint's heads on your own images: a PNG with the image, the whole-text heat map and one
heat map per word (tiles of 256 px, labelled, with a colour bar); prints the score / caption / answer.

    --task itm (default; any checkpoint with the ITM head: pretraining, retrieval, grounding): the ITM Grad-CAM of a
        text (--mode itm: a fusion layer's cross-attention, a map per word; --mode itc: the image encoder's attention)
    --task caption (a Caption.py checkpoint): the caption it generates, a map per generated word (decoder
        cross-attention)
    --task vqa (a VQA.py checkpoint): its answer to the question --text, the regions the answer rests on and the map
        of each question word (the question encoder's cross-attention)

    python Predict.py --checkpoint output/grounding/checkpoint_best.pth --image cat.jpg --text "the cat on the left" \\
        --out cam.png
    python Predict.py --checkpoint refcoco.pth --config configs/Grounding.yaml --image cat.jpg --text "left cat" \\
        --out cam.png --save_npy            # official weights carry no config: give the task's YAML
    python Predict.py --task caption --checkpoint output/caption/checkpoint_best.pth --image cat.jpg --out cap.png
    python Predict.py --task vqa --checkpoint output/vqa/checkpoint_best.pth --image cat.jpg \\
        --text "what is on the sofa?" --answer_list data/answer_list.json --out vqa.png
    python Predict.py --checkpoint ckpt.pth --batch pairs.json --out_dir cams/   # [{image, text, out (optional)}]

Runs on CPU by default (--device cuda for a GPU). --save_npy also writes <out>.npy (1 + n_words, h, w): the
whole-text map then the word maps, named in <out>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from dataset.transforms import load_image
from engine import errors
from models.gradcam import GRADCAM_MODES
from tasks.gradcam_view import (
    Explanation,
    explain_answer,
    explain_caption,
    explain_text,
    load_predictor,
    write_explanation,
)

TASKS = ("itm", "caption", "vqa")
Explainer = Callable[[str, str | None], Explanation]  # (image path, text or None) -> explanation


def read_batch(path: Path, needs_text: bool = True) -> list[dict]:
    """A JSON list of {image[, text][, out]} (text required unless ``needs_text`` is False); errors name the file
    and the entry."""
    if not path.is_file():
        raise FileNotFoundError(f"batch file not found: {path}")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty list of {{image, text}} objects")
    for index, item in enumerate(items):
        ok = isinstance(item, dict) and isinstance(item.get("image"), str)
        ok = ok and (isinstance(item.get("text"), str) or (not needs_text and item.get("text") is None))
        if not ok:
            wanted = '{"image": str, "text": str}' if needs_text else '{"image": str}'
            raise ValueError(f"{path}: entry {index}: expected {wanted}, got {item!r}")
    return items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="AlignFuse or official ALBEF checkpoint (.pth)")
    parser.add_argument("--task", default="itm", choices=TASKS,
                        help="the head to explain: itm (a text), caption (the generated caption), vqa (the answer)")
    parser.add_argument("--config", default=None, help="task YAML with the model block (default: the checkpoint's)")
    parser.add_argument("--tokenizer", default=None, help="vocab.txt / folder / hub name (default: the config's)")
    parser.add_argument("--image", help="image file (single mode)")
    parser.add_argument("--text", help="itm: the text to ground; vqa: the question; caption: not used (single mode)")
    parser.add_argument("--out", default="gradcam.png", help="output PNG (single mode)")
    parser.add_argument("--batch", default=None, help="JSON list [{image, text, out (optional)}] (batch mode)")
    parser.add_argument("--out_dir", default="gradcam", help="folder of the batch mode's PNGs")
    parser.add_argument("--mode", default="itm", choices=GRADCAM_MODES,
                        help="--task itm: itm = cross-attention of a fusion block (per-word maps); itc = image "
                             "encoder attention")
    parser.add_argument("--block_num", type=int, default=None,
                        help="BERT layer of the cross-attention (default: the third fusion layer; caption: that "
                             "layer of the decoder)")
    parser.add_argument("--answer_list", default=None, help="--task vqa: JSON list of candidate answers (default: "
                        "the config's data.answer_list)")
    parser.add_argument("--prompt", default=None, help="--task caption: the decoder's prompt (default: the config's)")
    parser.add_argument("--num_beams", type=int, default=None, help="--task caption: beams (default: the config's)")
    parser.add_argument("--save_npy", action="store_true", help="also write the maps as <out>.npy (+ <out>.json)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(errors.DEBUG_FLAG, action="store_true",
                        help=f"show the traceback of a user error (wrong file, device...); or {errors.DEBUG_ENV}=1")
    return parser


# ---- one explainer per task: (image, text) -> Explanation, and the line printed for it ------------------------------
def itm_explainer(args: argparse.Namespace) -> Explainer:
    predictor = load_predictor(args.checkpoint, args.config, args.tokenizer, args.device)
    return lambda image, text: explain_text(predictor, load_image(image), text, args.mode, args.block_num)


def _loaded(args: argparse.Namespace, task: str):
    from engine import dist
    from models.inference import Predictor

    if args.device.startswith("cuda"):  # before the loading, and instead of torch's driver error
        dist.check_cuda(f"--device {args.device}", int(args.device.split(":")[1]) if ":" in args.device else None)
    return Predictor.from_checkpoint(args.checkpoint, task=task, config=args.config, tokenizer=args.tokenizer,
                                     device=args.device)


def caption_explainer(args: argparse.Namespace) -> Explainer:
    from tasks.caption_sat import attention_explainer, is_show_attend_tell_checkpoint

    if is_show_attend_tell_checkpoint(args.checkpoint):  # Caption.py's LSTM family: its soft attention per word
        return attention_explainer(args.checkpoint, args.device, args.prompt, args.num_beams)
    loaded = _loaded(args, "caption")
    generation = {} if args.num_beams is None else {"num_beams": args.num_beams}
    return lambda image, _text: explain_caption(loaded, image, args.block_num, args.prompt, **generation)


def vqa_explainer(args: argparse.Namespace) -> Explainer:
    loaded = _loaded(args, "vqa")
    return lambda image, text: explain_answer(loaded, image, text, args.answer_list, block_num=args.block_num)


EXPLAINERS: dict[str, Callable[[argparse.Namespace], Explainer]] = {
    "itm": itm_explainer, "caption": caption_explainer, "vqa": vqa_explainer}


def describe(explanation: Explanation, image: str) -> str:
    if explanation.mode == "caption":
        return f"caption {explanation.text!r} (mean log p {explanation.score:.3f})  {image}"
    if explanation.mode == "vqa":
        return f"answer {explanation.answer!r} (log p {explanation.score:.3f})  {image}  {explanation.text!r}"
    return f"ITM score {explanation.itm_prob:.4f}  {image}  {explanation.text!r}"


def main(argv: list[str] | None = None) -> list[Path]:
    """Write the PNG(s); returns their paths."""
    parser = build_parser()
    args = parser.parse_args(argv)
    needs_text = args.task != "caption"
    if args.batch is None and (args.image is None or (needs_text and args.text is None)):
        parser.error("give --image and --text, or --batch" if needs_text else "give --image, or --batch")
    if args.batch is not None:
        out_dir = Path(args.out_dir)
        jobs = [(item["image"], item.get("text"),
                 item.get("out") or out_dir / f"{index:04d}_{_slug(item.get('text') or Path(item['image']).stem)}.png")
                for index, item in enumerate(read_batch(Path(args.batch), needs_text))]
    else:
        jobs = [(args.image, args.text, args.out)]
    explain = EXPLAINERS[args.task](args)
    written = []
    for image, text, out in jobs:
        explanation = explain(image, text)
        png = write_explanation(image, explanation, out, args.save_npy)
        print(f"{describe(explanation, image)}  -> {png}", flush=True)
        written.append(png)
    return written


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "text"


if __name__ == "__main__":
    with errors.exit_on_user_error():  # a wrong file or device: one message, exit 2 (--debug: the traceback)
        main()
    sys.exit(0)
