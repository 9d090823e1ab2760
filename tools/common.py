"""What the tools share: the model flags and loading, the image list of a folder or an annotation JSON, a dataset that
decodes those images for a DataLoader (unreadable files are reported, never a crash), and batched ITC features."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataset.transforms import DEFAULT_MAX_PIXELS, ImageDecodeError, build_transform, load_image, normalize
from engine import errors
from models.inference import Predictor
from tasks.captioning import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_args(parser: argparse.ArgumentParser, checkpoint_required: bool = True) -> None:
    """--checkpoint (a .pth or exported .safetensors) and how to load it; --batch_size, --num_workers, --device."""
    parser.add_argument("--checkpoint", required=checkpoint_required,
                        help="an AlignFuse checkpoint (.pth), an exported .safetensors file or an official ALBEF file")
    parser.add_argument("--task", default=None, help="model task, where the checkpoint does not tell (official files)")
    parser.add_argument("--config", default=None, help="task YAML for a checkpoint without a config (official files)")
    parser.add_argument("--tokenizer", default=None, help="replaces the config's model.tokenizer (hub name or vocab)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model weights' dtype")
    parser.add_argument("--batch_size", type=int, default=64, help="images (or texts) per forward pass")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes decoding images")
    parser.add_argument(errors.DEBUG_FLAG, action="store_true", help="show the traceback of a user error")


def load_predictor(args: argparse.Namespace, checkpoint: str | None = None) -> Predictor:
    if args.batch_size < 1 or args.num_workers < 0:
        raise ValueError(f"--batch_size must be >= 1 and --num_workers >= 0, got {args.batch_size}, "
                         f"{args.num_workers}")
    return Predictor.from_checkpoint(checkpoint or args.checkpoint, task=args.task, config=args.config,
                                     device=args.device, dtype=DTYPES[args.dtype], tokenizer=args.tokenizer,
                                     batch_size=args.batch_size)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)


def run_command(main: Callable[[Sequence[str] | None], Any], prog: str) -> None:
    """``python -m tools.X``: a user error (wrong file, flag, checkpoint) is one line on stderr and exit status 2;
    Ctrl-C one line and status 130."""
    setup_logging()
    try:
        with errors.exit_on_user_error(prog):
            main(None)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


# ---- image lists ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageItem:
    id: str  # the path relative to the folder (or as the JSON names it)
    path: Path


def folder_images(folder: Path) -> list[ImageItem]:
    """Every image file under ``folder`` (recursively; sorted), id = its path relative to the folder."""
    files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    return [ImageItem(path.relative_to(folder).as_posix(), path) for path in files]


def read_json_list(path: Path, flag: str, what: str) -> list[Any]:
    """The non-empty JSON list in ``path`` (given as ``flag``), or a ValueError saying it should hold ``what``."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{flag} {path}: not valid JSON ({err})") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{flag} {path}: expected a non-empty JSON list of {what}")
    return entries


def json_images(path: Path, image_root: str | None) -> list[ImageItem]:
    """The images a JSON file names: a list of paths, or ALBEF annotations ``[{"image": path, ...}]`` (each image
    once, in order of first appearance); relative paths under ``image_root`` (default: the JSON's folder)."""
    entries = read_json_list(path, "--images", "image paths or of {\"image\": ...}")
    root = Path(image_root) if image_root else path.parent
    items: dict[str, ImageItem] = {}
    for index, entry in enumerate(entries):
        name = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(name, str) or not name:
            raise ValueError(f"--images {path}: entry {index} has no image path (expected a string or "
                             f"{{\"image\": \"...\"}}, got {str(entry)[:80]})")
        items.setdefault(name, ImageItem(name, root / name))
    return list(items.values())


def collect_images(spec: str | Path, image_root: str | None = None) -> list[ImageItem]:
    """The images of ``--images``: a folder (every image file under it) or a JSON list (see `json_images`)."""
    spec = Path(spec)
    if spec.is_dir():
        items = folder_images(spec)
        if not items:
            raise ValueError(f"--images {spec} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return items
    if spec.is_file():
        return json_images(spec, image_root)
    raise FileNotFoundError(f"--images {spec} does not exist (expected a folder of images or a JSON list)")


class ImageFiles(Dataset):
    """The listed images decoded (dataset.transforms.load_image) and resized for evaluation: items image (uint8
    (3, res, res); grey for an unreadable file), index, error ('' or why the file cannot be used)."""

    def __init__(self, items: Sequence[ImageItem], image_res: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.items = list(items)
        self.transform = build_transform("test", image_res)
        self.image_res = image_res
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image = self.transform(load_image(self.items[index].path, self.max_pixels), np.random.default_rng(0))
            error = ""
        except ImageDecodeError as err:
            image, error = torch.full((3, self.image_res, self.image_res), 128, dtype=torch.uint8), err.reason
        return {"image": image, "index": index, "error": error}

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"image": torch.stack([item["image"] for item in items]),
                "index": [item["index"] for item in items], "error": [item["error"] for item in items]}


@dataclass
class ImageBatch:
    indices: list[int]  # positions in the image list
    feats: Tensor  # (B, embed_dim) normalised ITC features (rows of unreadable images are zeros)
    embeds: Tensor | None  # (B, 1 + patches, width) image encoder tokens, when asked for
    errors: list[str]  # '' or the reason the image was skipped


def encode_images(predictor: Predictor, items: Sequence[ImageItem], num_workers: int, embeds: bool = False,
                  desc: str = "images", done: int = 0, total: int | None = None) -> Iterator[ImageBatch]:
    """ITC features of ``items`` in order, ``predictor.batch_size`` at a time, decoded by ``num_workers`` workers,
    under a progress bar (``done`` of ``total`` already done before these)."""
    dataset = ImageFiles(items, predictor.transform.image_res)
    loader = DataLoader(dataset, batch_size=predictor.batch_size, num_workers=num_workers,
                        collate_fn=ImageFiles.collate, persistent_workers=False,
                        pin_memory=predictor.device.type == "cuda")
    with tqdm(total=total or len(items), initial=done, desc=desc, unit="img", disable=None, leave=False) as bar:
        for batch in loader:
            pixels = normalize(batch["image"].to(predictor.device, non_blocking=True))
            out = predictor.image_features(pixels, return_embeds=embeds)
            feats, tokens = out if embeds else (out, None)
            ok = torch.tensor([not error for error in batch["error"]])
            feats = feats * ok[:, None]
            yield ImageBatch(batch["index"], feats, tokens, batch["error"])
            bar.update(len(batch["index"]))


def report_skipped(skipped: Sequence[dict[str, str]], total: int) -> None:
    """Log the unreadable images (the first ten by name) and their count."""
    if skipped:
        shown = "; ".join(f"{item['image']}: {item['reason']}" for item in skipped[:10])
        more = f" (and {len(skipped) - 10} more)" if len(skipped) > 10 else ""
        log.warning("skipped %d of %d images that cannot be read: %s%s", len(skipped), total, shown, more)


def publish(tmp: Path, path: Path) -> Path:
    """Rename a finished temporary file onto ``path``, readable as the umask allows (safetensors writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Indented UTF-8 JSON, written to a temporary file first: the file is complete or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return path
