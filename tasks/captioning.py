"""Captioning pieces shared by Caption.py's captioner families and any inference script: the prompt collator, a
dataset over a folder of images, batched caption generation split across ranks and merged in memory, and the scoring
of the captions (result file, COCO metrics, score, best constant caption)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dataset.annotations import load_json_annotations
from dataset.datasets import CaptionEvalDataset, ImageTextCollator
from dataset.tokenizer import tokenize
from dataset.transforms import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTransform, load_image, normalize
from engine import dist
from metrics.caption import ConstantCaption, best_constant_caption, caption_metrics, load_coco_references
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
    being the first of them (the one the metrics score). See `caption_loader`."""
    model = unwrap(model)
    context = prompt_ids(tokenizer, prompt).to(device)
    generator = torch.Generator(device=device).manual_seed(seed + dist.get_rank())  # nucleus sampling only

    def caption_batch(batch: dict[str, Any]) -> list[str]:
        image = normalize(batch["image"].to(device, non_blocking=True))
        tokens = model.generate(image, context, settings, generator=generator)  # (B * n, max_length)
        return [text.strip() for text in tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)]

    return caption_loader(loader, caption_batch, settings.num_return_sequences, id_key)


@torch.no_grad()
def caption_loader(loader: DataLoader, caption_batch: Callable[[dict[str, Any]], list[str]], n: int,
                   id_key: str) -> list[dict[str, Any]]:
    """The captions of every item of an evaluation loader, by any captioner family: ``caption_batch(batch)`` gives
    B * n texts (rows b * n .. b * n + n - 1 for item b). Returns ``[{id_key: id, "caption": text}]`` sorted by id, on
    every rank, plus ``"captions"`` (all n) when n > 1.

    Each rank captions its share in batches; the shares are gathered in memory and de-duplicated by id (the
    evaluation sampler pads the last share with repeats). Items with ``ok`` False are left out."""
    results: list[tuple[Any, list[str]]] = []
    for batch in loader:
        texts = caption_batch(batch)
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


class CaptionScoring:
    """What every captioner family (Caption.py's model.arch) does with its captions: the result file, COCO metrics,
    ``score`` and the best constant caption (eval.* keys of Caption.py's schema), and the evaluation splits they share.
    Mixed into an AlbefTask (before it) that has a ``constant_captions`` dict."""

    config: Any
    constant_captions: dict[str, ConstantCaption]

    def eval_splits(self) -> list[str]:
        data = self.config.data
        if data.image_folder:
            return ["folder"]
        return [split for split in ("val", "test") if data[f"{split}_file"]]

    def build_eval_dataset(self, split: str, **options: Any) -> CaptionEvalDataset | None:
        data = self.config.data
        if split == "folder":
            return None  # data.image_folder: captions of the images in a folder, no annotation file
        return CaptionEvalDataset(data[f"{split}_file"], self.transform("test"), self.image_root(),
                                  max_words=int(data.max_words), **options)

    def score_split(self, split: str, dataset: Any, results: list[dict[str, Any]]) -> dict[str, float]:
        """On the main rank: write ``caption_<split>_eval<N>.json``, score ``results`` against data.<split>_gt_file
        (or the captions of ``dataset``, a CaptionEvalDataset) and add the best constant caption's CIDEr."""
        data = self.config.data
        path = self.write_result(f"caption_{split}_eval{{n}}.json", results)
        log.info("%s captions -> %s", split, path)
        gt_file = data[f"{split}_gt_file"]
        references = (load_coco_references(gt_file) if gt_file else
                      {image_id: entry["caption"] for image_id, entry in zip(dataset.image_ids, dataset.entries,
                                                                             strict=True)})
        metrics = self.scores(caption_metrics(references, results, meteor=bool(self.config.eval.meteor),
                                              spice=bool(self.config.eval.spice)))
        constant = self.constant_caption(split, {item["image_id"]: references[item["image_id"]] for item in results})
        if constant is not None:
            metrics["constant_CIDEr"] = constant.cider
            log.info("%s CIDEr %.4f = %.2fx the best constant caption's %.4f (%r, the best of the %d most "
                     "frequent training captions, for every image)", split, metrics["CIDEr"],
                     metrics["CIDEr"] / max(constant.cider, 1e-12), constant.cider, constant.caption,
                     constant.num_candidates)
        return metrics

    def write_folder_captions(self, dataset: ImageFolderDataset, results: list[dict[str, Any]]) -> None:
        """On the main rank: ``captions_folder.json`` (``[{image, caption}]``) for data.image_folder."""
        named = [{"image": dataset.files[item["index"]], **{k: v for k, v in item.items() if k != "index"}}
                 for item in results]
        path = self.write_result("captions_folder.json", named)
        log.info("captioned %d of %d images of %s -> %s", len(named), len(dataset), dataset.folder, path)

    def constant_caption(self, split: str, references: dict) -> ConstantCaption | None:
        """The best constant caption of ``split`` (eval.constant_caption_candidates > 0 and training files given),
        scored on the images of ``references``; computed at the first evaluation of the split, then reused."""
        top_n = int(self.config.eval.constant_caption_candidates)
        if top_n <= 0 or not self.config.data.train_file:
            return None
        if split not in self.constant_captions:
            entries = load_json_annotations(list(self.config.data.train_file), "caption_train")
            self.constant_captions[split] = best_constant_caption((entry["caption"] for entry in entries),
                                                                  references, top_n=top_n)
        return self.constant_captions[split]

    def scores(self, raw: dict[str, float | str]) -> dict[str, float]:
        """Numeric metrics plus 'score'; a metric that could not be computed is logged with its reason, not made up."""
        metrics = {key: float(value) for key, value in raw.items() if not isinstance(value, str)}
        for key, reason in raw.items():
            if isinstance(reason, str) and not reason.endswith("not requested"):
                log.warning("caption metric %s: %s", key.removesuffix("_unavailable"), reason)
        wanted = list(self.config.eval.score_metrics)
        missing = [name for name in wanted if name not in metrics]
        if not wanted or missing:
            raise ValueError(f"eval.score_metrics {wanted}: {missing or 'empty'} not among the computed metrics "
                             f"{sorted(metrics)}")
        metrics["score"] = sum(metrics[name] for name in wanted) / len(wanted)
        return metrics
