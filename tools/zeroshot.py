"""Zero-shot image classification with a trained model: class names + prompt templates, no training.

    python -m tools.zeroshot --checkpoint output/retrieval/checkpoint_best.pth --images pets/ --out zeroshot/
    python -m tools.zeroshot ... --classnames "tabby cat" "golden retriever" --templates "a photo of a {}."

``--images`` is an ImageFolder-layout directory: one sub-folder per class (``class_x/img.jpg``), the classes sorted
by folder name. Each class is the mean of the normalised ITC features of its prompts (every template with the class
name; CLIP's prompt ensembling), normalised again; an image gets the class of the most similar one. Reported: top-1
and top-5 accuracy, the per-class accuracy and its mean, beside the trivial baselines (chance and the majority
class); written: ``<out>/zeroshot.json`` (metrics, confusion matrix, every image's prediction, skipped files) and
``<out>/confusion.png`` (rows: true class, columns: predicted; shaded by the share of the row).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from metrics.classification import accuracy, confusion_counts
from models.inference import Predictor
from tools.common import (
    ImageItem,
    add_model_args,
    encode_images,
    folder_images,
    load_predictor,
    report_skipped,
    run_command,
    write_json,
)

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "{}")


def image_folder_classes(root: str | Path) -> tuple[list[str], list[ImageItem], list[int]]:
    """(class folder names sorted, the images, their labels) of an ImageFolder-layout directory."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root} is not a directory (expected one sub-folder of images per class)")
    classes, items, labels = [], [], []
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        found = folder_images(folder)
        if not found:
            log.warning("%s holds no images: not a class", folder)
            continue
        classes.append(folder.name)
        items += [ImageItem(f"{folder.name}/{item.id}", item.path) for item in found]
        labels += [len(classes) - 1] * len(found)
    if len(classes) < 2:
        raise ValueError(f"--images {root}: zero-shot classification needs at least 2 class sub-folders with images, "
                         f"found {len(classes)} ({', '.join(classes) or 'none'})")
    return classes, items, labels


def class_names(folders: list[str], given: Sequence[str] | None) -> list[str]:
    """The text of each class: --classnames (names in folder order, or one file: a JSON list, a JSON object
    folder -> name, or a text file with one name a line), else the folder names with '_' as spaces."""
    if not given:
        return [folder.replace("_", " ") for folder in folders]
    if len(given) == 1 and Path(given[0]).is_file():
        path = Path(given[0])
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"--classnames {path}: not valid JSON ({err})") from None
            if isinstance(value, dict):
                missing = [folder for folder in folders if folder not in value]
                if missing:
                    raise ValueError(f"--classnames {path} has no name for the class folders {missing[:5]}")
                return [str(value[folder]) for folder in folders]
            given = [str(name) for name in value] if isinstance(value, list) else []
        else:
            given = [line.strip() for line in text.splitlines() if line.strip()]
    if len(given) != len(folders):
        raise ValueError(f"--classnames gives {len(given)} names for {len(folders)} class folders ({', '.join(folders)}"
                         "); give one name per folder, in the folders' sorted order")
    return list(given)


@torch.no_grad()
def class_features(predictor: Predictor, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, embed_dim): per class the normalised mean of its prompts' normalised ITC text features."""
    bad = [template for template in templates if "{}" not in template]
    if bad or not templates:
        raise ValueError(f"every --templates entry must hold '{{}}' for the class name, got {bad or list(templates)}")
    prompts = [template.format(name) for name in names for template in templates]
    feats = predictor.text_features(prompts).view(len(names), len(templates), -1)  # (C, T, E)
    return F.normalize(feats.mean(dim=1), dim=-1)


def draw_confusion(counts: np.ndarray, names: Sequence[str], path: str | Path) -> Path:
    """A PNG of the confusion matrix: rows true class, columns predicted, each cell shaded by its share of the row
    (viridis) with its count written in it; class names along both axes."""
    num = len(names)
    cell = int(np.clip(600 // num, 24, 64))
    label_px = 12 + 8 * min(max(len(name) for name in names), 24)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.45
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    colours = cv2.applyColorMap((shares * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)  # (C, C, 3) BGR
    grid = np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)
    for row in range(num):
        for column in range(num):
            text = str(int(counts[row, column]))
            (width, height), _ = cv2.getTextSize(text, font, scale, 1)
            ink = (0, 0, 0) if shares[row, column] > 0.6 else (255, 255, 255)
            cv2.putText(grid, text, (column * cell + (cell - width) // 2, row * cell + (cell + height) // 2), font,
                        scale, ink, 1, cv2.LINE_AA)
    margin = 30
    canvas = np.full((margin + label_px + num * cell + 10, margin + label_px + num * cell + 10, 3), 255, np.uint8)
    top, left = margin + label_px, margin + label_px
    canvas[top:top + num * cell, left:left + num * cell] = grid
    column_labels = np.full((label_px, num * cell, 3), 255, np.uint8)  # drawn rotated: written along the rows
    rotated = np.full((num * cell, label_px, 3), 255, np.uint8)
    for index, name in enumerate(names):
        short = name if len(name) <= 24 else name[:23] + "~"
        baseline = index * cell + cell // 2 + 5
        cv2.putText(canvas, short, (margin, top + baseline), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(rotated, short, (4, baseline), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    column_labels[:] = cv2.rotate(rotated, cv2.ROTATE_90_COUNTERCLOCKWISE)
    canvas[margin:margin + label_px, left:left + num * cell] = column_labels
    cv2.putText(canvas, "predicted", (left, 20), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    true_label = np.full((margin, 80, 3), 255, np.uint8)
    cv2.putText(true_label, "true", (4, 20), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    rotated_true = cv2.rotate(true_label, cv2.ROTATE_90_COUNTERCLOCKWISE)  # (80, margin)
    height = min(rotated_true.shape[0], canvas.shape[0] - top)
    canvas[top:top + height, :margin] = rotated_true[:height]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), canvas):
        raise ValueError(f"could not write {path}")
    return path


def classify(predictor: Predictor, root: str | Path, out: str | Path, names: Sequence[str] | None = None,
             templates: Sequence[str] = DEFAULT_TEMPLATES, num_workers: int = 2, top_k: int = 5) -> dict[str, Any]:
    """Zero-shot classification of an ImageFolder directory (see the module docstring); returns the metrics."""
    folders, items, labels = image_folder_classes(root)
    names = class_names(folders, names)
    classes = class_features(predictor, names, templates)  # (C, E)
    feats = torch.zeros(len(items), classes.shape[1])
    errors = [""] * len(items)
    for batch in encode_images(predictor, items, num_workers):
        feats[batch.indices] = batch.feats
        for index, error in zip(batch.indices, batch.errors, strict=True):
            errors[index] = error
    ok = [index for index, error in enumerate(errors) if not error]
    skipped = [{"image": items[index].id, "reason": errors[index]} for index, error in enumerate(errors) if error]
    report_skipped(skipped, len(items))
    if not ok:
        raise ValueError(f"--images {root}: none of the {len(items)} images could be read")
    logits = feats[ok] @ classes.T  # (N, C) cosine similarities
    targets = torch.tensor([labels[index] for index in ok])
    k = min(top_k, len(folders))
    topk = logits.topk(k, dim=1).indices  # (N, k)
    counts = confusion_counts(logits, targets, len(folders)).numpy()  # [true, predicted]
    support = counts.sum(axis=1)
    per_class = {folder: (100.0 * counts[index, index] / support[index] if support[index] else None)
                 for index, folder in enumerate(folders)}
    present = [value for value in per_class.values() if value is not None]
    metrics = {
        "top1": accuracy(logits, targets),
        f"top{k}": 100.0 * (topk == targets[:, None]).any(dim=1).double().mean().item(),
        "mean_per_class": float(np.mean(present)),
        "chance_top1": 100.0 / len(folders),
        "majority_top1": 100.0 * float(support.max()) / float(support.sum()),
        "images": len(ok),
        "classes": len(folders),
    }
    out = Path(out)
    predictions = [{"image": items[index].id, "label": folders[labels[index]], "predicted": folders[int(row[0])],
                    f"top{k}": [folders[int(c)] for c in row]} for index, row in zip(ok, topk.tolist(), strict=True)]
    write_json(out / "zeroshot.json", {"metrics": metrics, "per_class": per_class, "classes": folders,
                                       "class_names": list(names), "templates": list(templates),
                                       "confusion": counts.tolist(), "predictions": predictions,
                                       "skipped": skipped})
    draw_confusion(counts, names, out / "confusion.png")
    return {"metrics": metrics, "per_class": per_class}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.zeroshot", description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--images", required=True, help="ImageFolder directory: one sub-folder of images per class")
    parser.add_argument("--classnames", nargs="+", default=None,
                        help="class names in folder order, or a file (JSON list / object, or one name a line)")
    parser.add_argument("--templates", nargs="+", default=list(DEFAULT_TEMPLATES),
                        help="prompt templates with {} for the class name")
    parser.add_argument("--top_k", type=int, default=5, help="the k of top-k accuracy")
    parser.add_argument("--out", default="zeroshot", help="folder for zeroshot.json and confusion.png")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    predictor = load_predictor(args)
    result = classify(predictor, args.images, args.out, args.classnames, args.templates, args.num_workers,
                      args.top_k)
    metrics = result["metrics"]
    k = min(args.top_k, metrics["classes"])
    print(f"{metrics['images']} images, {metrics['classes']} classes: top-1 {metrics['top1']:.1f}%, top-{k} "
          f"{metrics[f'top{k}']:.1f}%, mean per-class {metrics['mean_per_class']:.1f}% (chance "
          f"{metrics['chance_top1']:.1f}%, majority class {metrics['majority_top1']:.1f}%)")
    for name, value in result["per_class"].items():
        print(f"  {name:<24} {'-' if value is None else f'{value:5.1f}%'}")
    print(f"wrote {Path(args.out) / 'zeroshot.json'} and {Path(args.out) / 'confusion.png'}")
    return result


if __name__ == "__main__":
    run_command(main, "tools.zeroshot")
