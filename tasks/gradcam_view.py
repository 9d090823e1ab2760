"""Grad-CAM pictures of one image and one text, shared by Predict.py and the demo: a model loaded for inference from
a checkpoint, the heat map of every word and of the whole sentence (models.gradcam), and a PNG that lays them out
as OpenCV overlays, one tile of the image's size each.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from dataset.text import pre_caption
from dataset.tokenizer import build_tokenizer, tokenize
from dataset.transforms import build_transform, load_image, normalize
from engine import dist
from engine.checkpoint import load_checkpoint_file
from engine.config import _load_layers, deep_update
from models import create_model, load_checkpoint, read_state_dict
from models.gradcam import GRADCAM_MODES, compute_gradcam

log = logging.getLogger("alignfuse")

HEAT_GAMMA = 0.7  # heat ** gamma weights the colour map over the photo: faint heat stays visible
MAX_COLUMNS = 6  # tiles per row of the PNG


@dataclass
class Explanation:
    """Grad-CAM of one (image, text) pair on the (h, w) patch grid."""

    text: str
    words: list[str]  # every word of the (cleaned) text, as the tokenizer's pre-tokenizer splits it
    word_maps: np.ndarray  # (len(words), h, w) float32; empty in itc mode
    sentence_map: np.ndarray  # (h, w) float32
    itm_prob: float  # probability of 'match' from the ITM head
    mode: str
    unknown_words: list[str] = field(default_factory=list)  # words the vocabulary lacks ([UNK]: their map is its map)


@dataclass
class Predictor:
    """A model ready for Grad-CAM, its tokenizer and the preprocessing numbers of its config."""

    model: nn.Module
    tokenizer: Any
    image_res: int
    max_words: int
    max_tokens: int
    device: torch.device

    def explain(self, image_rgb: np.ndarray, text: str, mode: str = "itm", block_num: int | None = None,
                vit_block: int = -1) -> Explanation:
        """Heat maps of ``text`` on ``image_rgb`` (H, W, 3) uint8 RGB (resized to image_res as in evaluation)."""
        if mode not in GRADCAM_MODES:
            raise ValueError(f"mode must be one of {GRADCAM_MODES}, got {mode!r}")
        pixels = build_transform("test", self.image_res)(image_rgb, np.random.default_rng(0))  # uint8 (3, res, res)
        image = normalize(pixels[None].to(self.device))  # (1, 3, res, res)
        cleaned = pre_caption(text, self.max_words)
        ids, mask = tokenize(self.tokenizer, [cleaned], self.max_tokens, padding="longest")
        ids, mask = ids.to(self.device), mask.to(self.device)
        maps = compute_gradcam(self.model, image, ids, mask, mode, block_num, vit_block)
        itm_prob = maps.match_prob
        if itm_prob is None:
            with torch.no_grad():
                fused = self.model.fuse(self.model.encode_text(ids, mask), mask, self.model.encode_image(image))
                itm_prob = self.model.itm_head(fused[:, 0, :]).float().softmax(dim=-1)[:, 1]
        words, word_maps = [], np.zeros((0, *maps.text_map.shape[1:]), dtype=np.float32)
        unknown: list[str] = []
        if maps.token_maps is not None:
            words, word_maps, unknown = text_words(self.tokenizer, cleaned, ids[0], maps.token_maps[0])
            if unknown:
                log.warning("Grad-CAM: word(s) not in the tokenizer's vocabulary: %s (each shown with the map of "
                            "its [UNK] token)", ", ".join(repr(word) for word in unknown))
        return Explanation(text=text, words=words, word_maps=word_maps,
                           sentence_map=maps.text_map[0].float().cpu().numpy(), itm_prob=float(itm_prob[0]),
                           mode=mode, unknown_words=unknown)


def text_words(tokenizer: Any, text: str, input_ids: Tensor, token_maps: Tensor
               ) -> tuple[list[str], np.ndarray, list[str]]:
    """The words of ``text`` (as tokenized into input_ids (L,): [CLS], its tokens, padding) with their maps.

    Words are the tokenizer's own split of the text (its pre-tokenizer: whitespace and punctuation), spelled as in
    the text, so that none is lost: a word made of several WordPiece tokens gets the mean of their maps, a word the
    vocabulary lacks (one [UNK] token) keeps its spelling and the [UNK] token's map. Returns (words, maps (n_words,
    h, w), the unknown words); only the words inside max_tokens are there."""
    length = int((input_ids != tokenizer.pad_token_id).sum()) - 1  # the text's tokens, after [CLS]
    encoding = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max(length, 1),
                         return_offsets_mapping=True)
    if encoding["input_ids"][:length] != input_ids[1:1 + length].tolist():
        raise ValueError(f"input_ids are not the tokens of {text!r}")
    spans: list[list[int]] = []  # [start, end] of each word in text
    groups: list[list[int]] = []  # positions in input_ids of each word's tokens
    unknown_ids: set[int] = set()  # words with an [UNK] token
    previous = None
    for token, (word_id, (start, end)) in enumerate(zip(encoding.word_ids()[:length],
                                                       encoding["offset_mapping"][:length], strict=True)):
        if word_id != previous or not spans:
            spans.append([start, end])
            groups.append([])
        spans[-1][1] = end  # the pieces of one word are contiguous in the text
        groups[-1].append(1 + token)
        if encoding["input_ids"][token] == tokenizer.unk_token_id:
            unknown_ids.add(len(spans) - 1)
        previous = word_id
    words = [text[start:end] for start, end in spans]
    unknown = [words[index] for index in sorted(unknown_ids)]
    maps = [token_maps[group].float().mean(dim=0).cpu().numpy() for group in groups]
    height, width = token_maps.shape[1:]
    return words, np.stack(maps) if maps else np.zeros((0, height, width), dtype=np.float32), unknown


def model_config(checkpoint: dict[str, Any], config_path: str | Path | None) -> dict[str, Any]:
    """The config of a checkpoint (its ``model:`` block, data.max_words / max_tokens): from ``config_path`` (a task
    YAML, its ``base:`` files included) when given, else the config our checkpoints carry (official files have none)."""
    if config_path:
        merged: dict[str, Any] = {}
        for layer, _source in _load_layers(Path(config_path)):
            deep_update(merged, layer)
    elif isinstance(checkpoint.get("config"), dict):
        merged = checkpoint["config"]
    else:
        raise ValueError("the checkpoint carries no config (an official ALBEF file?): give --config, e.g. "
                         "configs/Grounding.yaml")
    if not isinstance(merged.get("model"), dict):
        raise ValueError(f"config {config_path or '(from the checkpoint)'} has no 'model:' block")
    return merged


def load_predictor(checkpoint_path: str | Path, config_path: str | Path | None = None, tokenizer: str | None = None,
                   device: str | torch.device = "cpu") -> Predictor:
    """The grounding (ITC + ITM) model with weights from ``checkpoint_path``: an AlignFuse checkpoint of any ALBEF
    task that has the ITM head (pretraining, retrieval, grounding) or ALBEF's ALBEF.pth / refcoco.pth / mscoco.pth."""
    checkpoint_path = Path(checkpoint_path)
    device = torch.device(device)
    if device.type == "cuda":  # before the minutes of loading, and instead of torch's driver error
        dist.check_cuda(f"--device {device}", device.index)
    raw = load_checkpoint_file(checkpoint_path)  # weights_only, with our message for a refused file
    config = model_config(raw, config_path)
    model_cfg = dict(config["model"])
    tokenizer_obj = build_tokenizer(tokenizer or model_cfg.get("tokenizer", "bert-base-uncased"))
    model_cfg["text_encoder"] = ""  # the checkpoint holds the text encoder: nothing to download
    model_cfg["vit"] = {**dict(model_cfg.get("vit", {})), "pretrained": ""}
    model = create_model("grounding", model_cfg, tokenizer=tokenizer_obj)
    missing, _unused = load_checkpoint(model, read_state_dict(raw))
    needed = [key for key in missing if not key.endswith("_queue") and "_m." not in key and key != "queue_ptr"]
    if needed:
        raise ValueError(f"{checkpoint_path}: weights missing for {len(needed)} parameters the Grad-CAM needs "
                         f"(e.g. {needed[:5]}); is it an ALBEF-family checkpoint with an ITM head?")
    data = config.get("data", {})
    return Predictor(model=model.to(device).eval(), tokenizer=tokenizer_obj, image_res=int(model.cfg["image_res"]),
                     max_words=int(data.get("max_words", 30)), max_tokens=int(data.get("max_tokens", 30)),
                     device=device)


def overlay(image_rgb: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The heat map (h, w) stretched to [0, 1], resized bicubically to the image and blended over it as a JET
    colour map, weighted by heat ** HEAT_GAMMA -> (H, W, 3) uint8 RGB."""
    height, width = image_rgb.shape[:2]
    heat = heat.astype(np.float32) - float(heat.min())
    if float(heat.max()) > 0:
        heat /= float(heat.max())
    heat = np.clip(cv2.resize(heat, (width, height), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
    colours = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    weight = (heat ** HEAT_GAMMA)[..., None]
    return (image_rgb.astype(np.float32) * (1 - weight) + colours.astype(np.float32) * weight).round().astype(np.uint8)


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    """Write ``text`` on a darkened strip along the top of the tile (the tile keeps its size)."""
    tile = tile.copy()
    height, width = tile.shape[:2]
    scale = max(0.25, min(width, height) / 500)
    thickness = max(1, round(scale * 2))
    (_, text_h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    strip = min(height, text_h + baseline + 2)
    tile[:strip] = (tile[:strip] * 0.45).astype(np.uint8)
    cv2.putText(tile, text, (1, text_h + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness,
                cv2.LINE_AA)
    return tile


def render(image_rgb: np.ndarray, explanation: Explanation) -> np.ndarray:
    """Tiles of the image's size: the image, the whole-sentence map, then one map per word; up to MAX_COLUMNS per
    row, the last row padded with white -> (rows * H, columns * W, 3) uint8 RGB."""
    tiles = [_label(image_rgb, f"ITM {explanation.itm_prob:.2f}"),
             _label(overlay(image_rgb, explanation.sentence_map), "sentence")]
    tiles += [_label(overlay(image_rgb, word_map), word)
              for word, word_map in zip(explanation.words, explanation.word_maps, strict=True)]
    columns = min(len(tiles), MAX_COLUMNS)
    tiles += [np.full_like(image_rgb, 255)] * (-len(tiles) % columns)
    rows = [np.concatenate(tiles[start:start + columns], axis=1) for start in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=0)


def write_explanation(image_path: str | Path, explanation: Explanation, out_png: str | Path,
                      save_npy: bool = False) -> Path:
    """Write the PNG (see render) of an explanation of the image at ``image_path``; with ``save_npy`` also
    ``<out>.npy`` (1 + n_words, h, w): the sentence map then the word maps, named in ``<out>.json``."""
    image_rgb = load_image(image_path)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    picture = render(image_rgb, explanation)
    if not cv2.imwrite(str(out_png), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
        raise ValueError(f"could not write {out_png} (is the suffix .png?)")
    if save_npy:
        maps = np.concatenate([explanation.sentence_map[None], explanation.word_maps]).astype(np.float32)
        np.save(out_png.with_suffix(".npy"), maps)
        out_png.with_suffix(".json").write_text(json.dumps(
            {"text": explanation.text, "mode": explanation.mode, "itm_prob": explanation.itm_prob,
             "maps": ["<sentence>", *explanation.words], "unknown_words": explanation.unknown_words}, indent=1),
            encoding="utf-8")
    return out_png


def explain_image(predictor: Predictor, image_path: str | Path, text: str, out_png: str | Path, mode: str = "itm",
                  block_num: int | None = None, save_npy: bool = False) -> tuple[Path, Explanation]:
    """Load an image, explain ``text`` on it and write the PNG (and maps); returns (png path, explanation)."""
    explanation = predictor.explain(load_image(image_path), text, mode, block_num)
    return write_explanation(image_path, explanation, out_png, save_npy), explanation
