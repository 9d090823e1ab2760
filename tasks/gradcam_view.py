"""Grad-CAM pictures of one image, shared by Predict.py, the web demo (tools/app.py) and the demo: the heat map of
every word and of the whole text (models.gradcam) for each head, and a readable PNG sheet of them.

- itm / itc: a text on an image, from any checkpoint with the ITM head (`load_predictor`, `explain_text`);
- caption: the caption a captioning checkpoint generates, one map per generated word (`explain_caption`);
- vqa: the answer a VQA checkpoint gives to a question, the answer's map and one per question word
  (`explain_answer`).

The sheet (`render`): a title line (the text, the score), then tiles of TILE_PX pixels high (the image upscaled, its
aspect kept): the image, the whole-text map, one map per word, each labelled in a strip under it, MAX_COLUMNS per row;
a colour bar at the bottom. Each map is stretched to its own [0, max] before colouring.
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
from torch import Tensor

from dataset.text import pre_caption
from dataset.tokenizer import tokenize
from dataset.transforms import load_image
from engine import dist
from engine.checkpoint import load_checkpoint_file
from models.gradcam import GRADCAM_MODES, caption_gradcam, vqa_gradcam
from models.inference import Predictor

log = logging.getLogger("alignfuse")

HEAT_GAMMA = 0.7  # heat ** gamma weights the colour map over the photo: faint heat stays visible
MAX_COLUMNS = 6  # tiles per row of the PNG
TILE_PX = 256  # tile height: the image upscaled (or downscaled) to it, its aspect kept
LABEL_PX = 40  # the label strip under each tile
LABEL_SCALE = 0.8  # Hershey simplex at 0.8: capitals about 17 px high
TITLE_PX = 48
TITLE_SCALE = 0.9
COLOUR_BAR_PX = 40
LABEL_MARGIN = 6
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass
class Explanation:
    """Grad-CAM of one (image, text) pair on the (h, w) patch grid."""

    text: str
    words: list[str]  # every word of the (cleaned) text, as the tokenizer's pre-tokenizer splits it
    word_maps: np.ndarray  # (len(words), h, w) float32; empty in itc mode
    sentence_map: np.ndarray  # (h, w) float32
    itm_prob: float | None  # probability of 'match' from the ITM head (itm / itc), else None
    mode: str  # itm | itc | caption | vqa
    unknown_words: list[str] = field(default_factory=list)  # words the vocabulary lacks ([UNK]: their map is its map)
    title: str = ""  # the sheet's headline (default: the ITM score and the text)
    summary_label: str = "sentence"  # the label of sentence_map's tile
    answer: str | None = None  # vqa: the answer explained
    score: float | None = None  # caption: mean token log-probability; vqa: the answer's log-likelihood


def explain_text(predictor: Predictor, image_rgb: np.ndarray, text: str, mode: str = "itm",
                 block_num: int | None = None, vit_block: int = -1) -> Explanation:
    """Heat maps of ``text`` on ``image_rgb`` (H, W, 3) uint8 RGB (resized to image_res as in evaluation), from a
    models.inference.Predictor of any checkpoint with the ITM head."""
    if mode not in GRADCAM_MODES:
        raise ValueError(f"mode must be one of {GRADCAM_MODES}, got {mode!r}")
    maps = predictor.gradcam(image_rgb, text, head=mode, block_num=block_num, vit_block=vit_block)
    itm_prob = maps.match_prob
    prob = float(itm_prob[0]) if itm_prob is not None else float(predictor.match([image_rgb], [text])[0])
    words, word_maps = [], np.zeros((0, *maps.text_map.shape[1:]), dtype=np.float32)
    unknown: list[str] = []
    if maps.token_maps is not None:
        cleaned = pre_caption(text, predictor.max_words)
        ids, _mask = predictor.tokens([text])
        words, word_maps, unknown = text_words(predictor.tokenizer, cleaned, ids[0], maps.token_maps[0])
        if unknown:
            log.warning("Grad-CAM: word(s) not in the tokenizer's vocabulary: %s (each shown with the map of "
                        "its [UNK] token)", ", ".join(repr(word) for word in unknown))
    return Explanation(text=text, words=words, word_maps=word_maps,
                       sentence_map=maps.text_map[0].float().cpu().numpy(), itm_prob=prob, mode=mode,
                       unknown_words=unknown, title=f'ITM match {prob:.2f} ({mode} Grad-CAM): "{text}"',
                       summary_label="sentence", score=prob)


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


def load_predictor(checkpoint_path: str | Path, config_path: str | Path | None = None, tokenizer: str | None = None,
                   device: str | torch.device = "cpu") -> Predictor:
    """A models.inference.Predictor of the grounding (ITC + ITM) model with weights from ``checkpoint_path``: an
    AlignFuse checkpoint of any ALBEF task that has the ITM head (pretraining, retrieval, grounding), or ALBEF's
    ALBEF.pth / refcoco.pth / mscoco.pth with ``config_path`` (the model config they were trained with)."""
    device = torch.device(device)
    if device.type == "cuda":  # before the minutes of loading, and instead of torch's driver error
        dist.check_cuda(f"--device {device}", device.index)
    raw = load_checkpoint_file(checkpoint_path)  # weights_only, with our message for a refused file
    if not config_path and not isinstance(raw.get("config"), dict):
        raise ValueError(f"{checkpoint_path}: the checkpoint carries no config (an official ALBEF file?): give "
                         "--config, e.g. configs/Grounding.yaml")
    return Predictor.from_checkpoint(raw, task="grounding", config=config_path, tokenizer=tokenizer, device=device)


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


def _fit_text(text: str, width: int, scale: float, thickness: int) -> tuple[str, float]:
    """``text`` and a font scale (down to 60% of ``scale``) that fit ``width`` pixels; still too wide: cut, '..'."""
    for factor in (1.0, 0.9, 0.8, 0.7, 0.6):
        if cv2.getTextSize(text, FONT, scale * factor, thickness)[0][0] <= width:
            return text, scale * factor
    scale *= 0.6
    while len(text) > 1 and cv2.getTextSize(text + "..", FONT, scale, thickness)[0][0] > width:
        text = text[:-1]
    return text + "..", scale


def _text_strip(text: str, width: int, height: int, scale: float, colour: tuple[int, int, int] = (255, 255, 255),
                background: tuple[int, int, int] = (32, 32, 32)) -> np.ndarray:
    """A (height, width, 3) strip with ``text`` centred vertically, written in Hershey simplex (ASCII only)."""
    strip = np.empty((height, width, 3), dtype=np.uint8)
    strip[:] = background
    text = text.encode("ascii", "replace").decode("ascii")
    thickness = max(1, round(scale * 2.2))
    text, scale = _fit_text(text, width - 2 * LABEL_MARGIN, scale, thickness)
    (_, text_h), baseline = cv2.getTextSize(text, FONT, scale, thickness)
    cv2.putText(strip, text, (LABEL_MARGIN, (height + text_h) // 2 - baseline // 2), FONT, scale, colour, thickness,
                cv2.LINE_AA)
    return strip


def tile_size(image_rgb: np.ndarray, tile_px: int = TILE_PX) -> tuple[int, int]:
    """(width, height) of a tile: ``tile_px`` high, the image's aspect kept (its width at most 2 x tile_px)."""
    height, width = image_rgb.shape[:2]
    return min(2 * tile_px, max(1, round(width * tile_px / height))), tile_px


def colour_bar(width: int, height: int = COLOUR_BAR_PX) -> np.ndarray:
    """The colour scale of the maps (JET, weighted over the photo as `overlay` does) with its ends labelled."""
    label_w = 3 * height
    bar_w = max(16, width - 2 * label_w - 2 * LABEL_MARGIN)
    ramp = np.linspace(0, 255, bar_w, dtype=np.float32).astype(np.uint8)[None].repeat(height // 2, axis=0)
    bar = cv2.cvtColor(cv2.applyColorMap(ramp, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    strip = np.full((height, width, 3), 255, dtype=np.uint8)
    top = height // 4
    strip[top:top + bar.shape[0], label_w + LABEL_MARGIN:label_w + LABEL_MARGIN + bar_w] = bar
    left = _text_strip("low", label_w, height, LABEL_SCALE, (0, 0, 0), (255, 255, 255))
    right = _text_strip("high", label_w, height, LABEL_SCALE, (0, 0, 0), (255, 255, 255))
    strip[:, :label_w] = left
    strip[:, width - label_w:] = right
    return strip


def render(image_rgb: np.ndarray, explanation: Explanation, tile_px: int = TILE_PX) -> np.ndarray:
    """The sheet of an explanation (see the module): title, tiles with labels, colour bar -> (H, W, 3) uint8 RGB.

    Tiles: the image, the whole-text map (``summary_label``), then one map per word; up to MAX_COLUMNS per row, the
    last row padded with white."""
    tile_w, tile_h = tile_size(image_rgb, tile_px)
    photo = cv2.resize(image_rgb, (tile_w, tile_h), interpolation=cv2.INTER_CUBIC)
    items = [(photo, "image"), (overlay(photo, explanation.sentence_map), explanation.summary_label)]
    items += [(overlay(photo, word_map), word)
              for word, word_map in zip(explanation.words, explanation.word_maps, strict=True)]
    tiles = [np.concatenate([picture, _text_strip(label, tile_w, LABEL_PX, LABEL_SCALE)]) for picture, label in items]
    columns = min(len(tiles), MAX_COLUMNS)
    tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % columns)
    rows = [np.concatenate(tiles[start:start + columns], axis=1) for start in range(0, len(tiles), columns)]
    grid = np.concatenate(rows, axis=0)
    width = grid.shape[1]
    title = explanation.title or explanation.text
    return np.concatenate([_text_strip(title, width, TITLE_PX, TITLE_SCALE), grid, colour_bar(width)])


def sheet_layout(explanation: Explanation, image_rgb: np.ndarray, tile_px: int = TILE_PX) -> tuple[int, int, int]:
    """(number of tiles, columns, rows) of the sheet `render` draws; its size is (TITLE_PX + rows * (tile_px +
    LABEL_PX) + COLOUR_BAR_PX, columns * tile width)."""
    count = 2 + len(explanation.words)
    columns = min(count, MAX_COLUMNS)
    return count, columns, -(-count // columns)


def write_sheet(picture: np.ndarray, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out_png), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
        raise ValueError(f"could not write {out_png} (is the suffix .png?)")
    return out_png


def write_explanation(image: str | Path | np.ndarray, explanation: Explanation, out_png: str | Path,
                      save_npy: bool = False) -> Path:
    """Write the sheet (see render) of an explanation of ``image`` (a path or an RGB array); with ``save_npy`` also
    ``<out>.npy`` (1 + n_words, h, w): the whole-text map then the word maps, named in ``<out>.json``."""
    image_rgb = load_image(image) if isinstance(image, str | Path) else image
    out_png = write_sheet(render(image_rgb, explanation), out_png)
    if save_npy:
        maps = np.concatenate([explanation.sentence_map[None], explanation.word_maps]).astype(np.float32)
        np.save(out_png.with_suffix(".npy"), maps)
        out_png.with_suffix(".json").write_text(json.dumps(
            {"text": explanation.text, "mode": explanation.mode, "itm_prob": explanation.itm_prob,
             "answer": explanation.answer, "score": explanation.score,
             "maps": [f"<{explanation.summary_label}>" if explanation.mode in ("caption", "vqa") else "<sentence>",
                      *explanation.words], "unknown_words": explanation.unknown_words}, indent=1),
            encoding="utf-8")
    return out_png


def explain_image(predictor: Predictor, image_path: str | Path, text: str, out_png: str | Path, mode: str = "itm",
                  block_num: int | None = None, save_npy: bool = False) -> tuple[Path, Explanation]:
    """Load an image, explain ``text`` on it and write the PNG (and maps); returns (png path, explanation)."""
    explanation = explain_text(predictor, load_image(image_path), text, mode, block_num)
    return write_explanation(image_path, explanation, out_png, save_npy), explanation


# ---- captioning and VQA heads (a models.inference.Predictor of a caption / VQA checkpoint) -------------------------
def decoded_words(tokenizer: Any, token_ids: list[int], token_maps: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Generated word pieces -> words and their maps: a WordPiece continuation ('##x') joins the word before it (the
    word's map is the mean of its pieces' maps); special tokens are dropped. token_maps (T, h, w)."""
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(token_ids)
    groups: list[list[int]] = []
    for index, (token_id, piece) in enumerate(zip(token_ids, pieces, strict=True)):
        if token_id in special:
            continue
        if piece.startswith("##") and groups:
            groups[-1].append(index)
        else:
            groups.append([index])
    words = [tokenizer.decode([token_ids[i] for i in group]).replace(" ", "") for group in groups]
    maps = [token_maps[group].mean(axis=0) for group in groups]
    return words, np.stack(maps) if maps else np.zeros((0, *token_maps.shape[1:]), dtype=np.float32)


def explain_caption(loaded: Any, image: Any, block_num: int | None = None, prompt: str | None = None,
                    **generation: Any) -> Explanation:
    """The caption a captioning checkpoint generates for ``image`` (any input models.inference accepts) and, for each
    of its words, the regions the decoder read for it (models.gradcam.caption_gradcam). ``generation``: the
    GenerationSettings fields (num_beams, max_length, ...), as Predictor.caption takes them."""
    from models.model_caption import AlbefCaption
    from tasks.captioning import prompt_ids

    if not isinstance(loaded.model, AlbefCaption):
        raise ValueError(f"caption Grad-CAM needs a captioning checkpoint (Caption.py, model.arch albef_decoder); the "
                         f"loaded model is {type(loaded.model).__name__}")
    generation = {**generation, "num_return_sequences": 1}
    caption = loaded.caption([image], prompt=prompt, **generation)[0]
    prompt = prompt if prompt is not None else (loaded.config.get("caption") or {}).get("prompt", "a picture of ")
    context = prompt_ids(loaded.tokenizer, prompt).tolist()  # [CLS] + prompt pieces
    pieces = loaded.tokenizer(caption, add_special_tokens=False)["input_ids"]
    if not pieces:
        raise ValueError(f"the model generated an empty caption for this image (prompt {prompt!r})")
    ids = torch.tensor([context + pieces], device=loaded.device)
    result = caption_gradcam(loaded.model, loaded.images_tensor([image]), ids, torch.ones_like(ids), len(context),
                             block_num)
    token_maps = result.token_maps.float().cpu().numpy()
    words, word_maps = decoded_words(loaded.tokenizer, result.token_ids, token_maps)
    mean_log_prob = float(result.log_probs.mean())
    return Explanation(text=caption, words=words, word_maps=word_maps, sentence_map=token_maps.mean(axis=0),
                       itm_prob=None, mode="caption", title=f'caption: "{caption}" (mean log p {mean_log_prob:.2f})',
                       summary_label="caption", score=mean_log_prob)


def explain_answer(loaded: Any, image: Any, question: str, answer_list: Any = None, k: int | None = None,
                   block_num: int | None = None) -> Explanation:
    """The answer a VQA checkpoint picks from ``answer_list`` (default: its config's data.answer_list) for
    ``question`` on ``image``, the regions it rests on (models.gradcam.vqa_gradcam: the answer's map) and the map of
    each question word for that answer."""
    from dataset.text import pre_question
    from models.model_vqa import AlbefVQA

    if not isinstance(loaded.model, AlbefVQA):
        raise ValueError(f"VQA Grad-CAM needs a VQA checkpoint (VQA.py); the loaded model is "
                         f"{type(loaded.model).__name__}")
    answer = loaded.answer([image], [question], answer_list=answer_list, k=k)[0]
    max_answer = int((loaded.config.get("data") or {}).get("max_answer_tokens", 10))
    answer_ids, answer_mask = tokenize(loaded.tokenizer, [answer], max_answer, add_eos=True)
    cleaned = pre_question(question, loaded.max_words)
    ids, mask = tokenize(loaded.tokenizer, [cleaned], loaded.max_tokens)
    ids, mask = ids.to(loaded.device), mask.to(loaded.device)
    maps = vqa_gradcam(loaded.model, loaded.images_tensor([image]), ids, mask, answer_ids.to(loaded.device),
                       answer_mask.to(loaded.device), block_num)
    words, word_maps, unknown = text_words(loaded.tokenizer, cleaned, ids[0], maps.token_maps[0])
    log_likelihood = float(maps.score[0])
    return Explanation(text=question, words=words, word_maps=word_maps,
                       sentence_map=maps.text_map[0].float().cpu().numpy(), itm_prob=None, mode="vqa",
                       unknown_words=unknown, answer=answer, score=log_likelihood,
                       title=f'Q: "{question}"  A: "{answer}" (log p {log_likelihood:.2f})',
                       summary_label=f"answer: {answer}")
