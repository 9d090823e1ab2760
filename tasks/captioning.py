"""Captioning pieces shared by Caption.py and any inference script: the prompt collator, a dataset over a folder of
images, and batched caption generation split across ranks and merged in memory."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dataset.datasets import ImageTextCollator
from dataset.tokenizer import tokenize
from dataset.transforms import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTransform, load_image, normalize
from engine import dist
from models.generation import GenerationSettings
from tasks.base import unwrap

log = logging.getLogger("alignfuse")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def prompt_ids(tokenizer: Any, prompt: str) -> Tensor:
    """[CLS] + the prompt's word pieces (P,), no end token: the decoder's context before the caption."""
    ids, _ = tokenize(tokenizer, [prompt.strip()], max_length=512, padding="longest")
    return ids[0]


class PromptCaptionCollator(ImageTextCollator):
    """Captions prefixed with the prompt and ended with [SEP]: text_ids = [CLS] prompt caption [SEP] (B, L)."""

    def __init__(self, tokenizer: Any, max_length: int, prompt: str, padding: str = "longest") -> None:
        super().__init__(tokenizer, max_length, padding=padding, add_eos=True)
        self.prompt = prompt

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        return super().__call__([{**item, "text": self.prompt + item["text"]} for item in items])


class ImageFolderDataset(Dataset):
    """Every image file directly inside ``folder`` (sorted by name), for captioning new images. Items: image (uint8
    (3, res, res)), index, ok (False for an unreadable file, which gets a grey placeholder and no caption)."""

    def __init__(self, folder: str | os.PathLike, transform: ImageTransform, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"data.image_folder {self.folder} is not a directory")
        self.files = sorted(p.name for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"data.image_folder {self.folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng(index)  # the test transform draws nothing; kept for the transform's signature
        try:
            image, ok = load_image(self.folder / self.files[index], self.max_pixels), True
        except ImageDecodeError as error:
            log.warning("%s: no caption for this file", error)
            image, ok = np.full((32, 32, 3), 128, dtype=np.uint8), False
        return {"image": self.transform(image, rng), "index": index, "ok": ok}

    @staticmethod
    def collate(items: list[dict]) -> dict[str, Any]:
        return {"image": torch.stack([item["image"] for item in items]),
                "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
                "ok": torch.tensor([item["ok"] for item in items], dtype=torch.bool)}


@torch.no_grad()
def generate_captions(model: nn.Module, tokenizer: Any, loader: DataLoader, device: torch.device, prompt: str,
                      settings: GenerationSettings, id_key: str, seed: int = 0) -> list[dict[str, Any]]:
    """``[{id_key: id, "caption": text}]`` for every item of an evaluation loader, sorted by id, on every rank; with
    ``settings.num_return_sequences`` n > 1 also ``"captions"``: all n (best beam first, or n samples), ``"caption"``
    being the first of them (the one the metrics score).

    Each rank captions its share in batches; the shares are gathered in memory and de-duplicated by id (the
    evaluation sampler pads the last share with repeats). Items with ``ok`` False are left out."""
    model = unwrap(model)
    context = prompt_ids(tokenizer, prompt).to(device)
    generator = torch.Generator(device=device).manual_seed(seed + dist.get_rank())  # nucleus sampling only
    n = settings.num_return_sequences
    results: list[tuple[Any, list[str]]] = []
    for batch in loader:
        image = normalize(batch["image"].to(device, non_blocking=True))
        tokens = model.generate(image, context, settings, generator=generator)  # (B * n, max_length)
        texts = [text.strip() for text in tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)]
        captions = [texts[row : row + n] for row in range(0, len(texts), n)]  # B lists of n
        ids = batch[id_key].tolist()
        keep = batch["ok"].tolist() if "ok" in batch else [True] * len(ids)
        results += [(key, texts) for key, texts, ok in zip(ids, captions, keep, strict=True) if ok]
    merged: dict[Any, list[str]] = {}
    for share in dist.all_gather_object(results):
        for key, texts in share:
            merged.setdefault(key, texts)
    if n == 1:
        return [{id_key: key, "caption": merged[key][0]} for key in sorted(merged)]
    return [{id_key: key, "caption": merged[key][0], "captions": merged[key]} for key in sorted(merged)]
