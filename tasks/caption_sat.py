"""Caption.py's ``model.arch: show_attend_tell`` family: a ResNet grid encoder and an LSTM decoder with soft attention
(models/show_attend_tell.py), trained and evaluated by the one engine with the data files, metrics, result files and
generation knobs of the ALBEF/BLIP-style captioner (tasks/caption_decoder.py's CaptionTask, which this
task extends).

    python Caption.py --config configs/Caption_lstm_coco.yaml --output_dir output/caption_lstm
    python Caption.py --config configs/Caption_lstm_coco.yaml --checkpoint output/caption_lstm/checkpoint_best.pth \
        --evaluate --output_dir output/caption_lstm_eval

The recipe (Xu et al. 2015, as the seed trains it): Adam at 4e-4 for the decoder and 1e-4 for the encoder (lr 4e-4,
``optimizer.lr_mult {encoder: 0.25}``), gradient norm clipped at 5, cross-entropy plus the doubly stochastic
attention term ``caption.alpha_c * ((1 - sum_t alpha_t)^2).mean()``, the lr x 0.8 after 8 evaluations without a
better val BLEU-4 (the engine's plateau scheduler) and a stop after 20 (train.early_stop_patience).

What differs from CaptionTask: the vocabulary is a word map built from the training captions (``caption.min_word_freq``;
or ``caption.word_map_file``), which the model's state_dict carries - a --checkpoint brings its own; training logs
``train/top5_accuracy`` beside the losses (a loss entry of weight 0 in train.loss_weights: logged, never optimised);
every evaluation also draws the per-word attention of the first ``caption.attention_maps`` images of the split into
``attention_<split>_eval<N>/<image_id>.png`` (one tile per generated word; ``caption.attention_npy`` adds the maps).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from dataset.annotations import load_json_annotations
from dataset.text import pre_caption
from dataset.transforms import build_transform, normalize
from engine import Progress, Task, dist
from engine.checkpoint import load_checkpoint_file
from engine.task import next_result_number, output_path
from models.generation import GENERATION_DEFAULTS, GenerationSettings
from models.show_attend_tell import SatCfg, ShowAttendTell, WordMap, caption_losses
from tasks.base import unwrap
from tasks.caption_decoder import CaptionTask
from tasks.captioning import prompt_ids
from tasks.gradcam_view import overlay

log = logging.getLogger("alignfuse")

TILE_MIN_SIZE = 224  # attention tiles are drawn at least this many pixels wide (the model's input may be smaller)
SHEET_COLUMNS = 6  # tiles per row of the attention PNG

SAT_DEFAULTS: dict[str, Any] = {
    "model": {"arch": "show_attend_tell", "image_res": 256, **asdict(SatCfg())},  # image_res: the input size (px)
    "data": {**copy.deepcopy(CaptionTask.config_defaults["data"]), "max_words": 50, "max_tokens": 52},
    "caption": {
        "prompt": "",  # words fed after <start> before the caption (never scored, not in the output); "" as the seed
        "min_word_freq": 5,  # training-caption words seen fewer times become <unk> (the seed: 5)
        "word_map_file": "",  # a {word: id} JSON to use instead of building the map ("" = from data.train_file)
        "alpha_c": 1.0,  # weight of the doubly stochastic attention term
        # Scheduled sampling: the probability of feeding the true previous word (else the model's own argmax), going
        # linearly from teacher_forcing at step 0 to teacher_forcing_final at the last step (null = constant).
        "teacher_forcing": 1.0,
        "teacher_forcing_final": None,
        "attention_maps": 8,  # per evaluation: attention PNGs of this many of the split's first images (0 = none)
        "attention_npy": False,  # also <image_id>.npy (words, grid, grid) and <image_id>.json (the words)
    },
    "generation": dict(GENERATION_DEFAULTS),
    "eval": {**copy.deepcopy(CaptionTask.config_defaults["eval"]), "score_metrics": ["Bleu_4"]},
    "optimizer": {"lr": 4e-4, "weight_decay": 0.0, "lr_mult": {"encoder": 0.25}},  # Adam; encoder at 1e-4
    # PlateauLR scales the lr once the metric has not improved for MORE than patience_evals evaluations: 7 gives
    # the seed's decay at the 8th evaluation without improvement (and the 16th, ...).
    "scheduler": {"name": "plateau", "min_lr": 1e-7, "plateau": {"patience_evals": 7, "factor": 0.8, "mode": "max"}},
    "train": {"epochs": 120, "clip_grad_norm": 5.0, "early_stop_patience": 20,
              "loss_weights": {"top5_accuracy": 0.0}},  # logged beside the losses, not optimised
}


class ShowAttendTellTask(CaptionTask):
    """CaptionTask with the LSTM captioner: its own model, vocabulary, losses and attention maps; the data, the
    metrics (``score`` = mean of eval.score_metrics, BLEU-4 by default), result files and folder captioning are
    CaptionTask's."""

    config_defaults = SAT_DEFAULTS
    open_config_keys = ()

    def __init__(self, config, device) -> None:
        self.sat_cfg = SatCfg.from_config(config.model)
        super().__init__(config, device)  # its tokenizer is the word map (build_tokenizer), prompt_length in its words
        for key in ("teacher_forcing", "teacher_forcing_final"):
            value = config.caption[key]
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"config key 'caption.{key}' must be a probability in [0, 1], got {value}")

    def build_tokenizer(self) -> WordMap:
        """The word map of caption.word_map_file, else built from the training captions (a --checkpoint brings its
        own: load_pretrained)."""
        caption, data = self.config.caption, self.config.data
        if caption.word_map_file:
            path = Path(caption.word_map_file)
            if not path.is_file():
                raise FileNotFoundError(f"caption.word_map_file {path} does not exist")
            return WordMap.from_json(path.read_text(encoding="utf-8"), f"caption.word_map_file {path}")
        if not data.train_file:  # evaluation of a --checkpoint, which brings its word map
            return WordMap.build([], 1)
        entries = load_json_annotations(list(data.train_file), "caption_train")
        word_map = WordMap.build((pre_caption(entry["caption"], int(data.max_words)) for entry in entries),
                                 int(caption.min_word_freq))
        log.info("word map: %d words seen >= %d times in %d training captions, + 4 special words",
                 len(word_map) - 4, int(caption.min_word_freq), len(entries))
        return word_map

    # ---- model -----------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return ShowAttendTell(self.sat_cfg, self.tokenizer)

    def load_pretrained(self, model: nn.Module, path: str | Path, evaluate: bool = False,
                        allow_partial: bool = False) -> None:
        """A show_attend_tell checkpoint, with its word map (the vocabulary layers are resized to it)."""
        state = load_checkpoint_file(path)
        weights = state["model"] if isinstance(state.get("model"), dict) else state
        if "word_map_bytes" in weights:
            word_map = WordMap.from_tensor(weights["word_map_bytes"])
            if word_map != self.tokenizer:
                log.info("using the word map of %s (%d words)", path, len(word_map))
            model.set_word_map(word_map)
            self.tokenizer = word_map
        Task.load_pretrained(self, model, path, evaluate, allow_partial)  # by key (no ALBEF key surgery)

    # ---- training --------------------------------------------------------------------------------------------------
    def teacher_forcing(self, progress: Progress) -> float:
        start, final = float(self.config.caption.teacher_forcing), self.config.caption.teacher_forcing_final
        if final is None:
            return start
        return start + (float(final) - start) * min(1.0, progress.global_step / max(1, progress.total_steps))

    def train_step(self, model, batch: dict[str, Any], progress) -> dict[str, Any]:
        batch = self.to_device(batch)
        ids, mask = batch["text_ids"], batch["text_mask"]  # <start> prompt caption <end> <pad>... (B, T)
        logits, alphas = model(batch["image"], ids, teacher_forcing=self.teacher_forcing(progress))
        scored = mask[:, 1:].clone()
        scored[:, : self.prompt_length - 1] = 0  # the prompt's words are context, not targets
        return caption_losses(logits, alphas, ids[:, 1:], scored, float(self.config.caption.alpha_c))

    # ---- evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self, model, split: str) -> dict[str, float]:
        metrics = super().evaluate(model, split)
        count = int(self.config.caption.attention_maps)
        if split != "folder" and count > 0 and dist.is_main():
            self.write_attention_maps(unwrap(model), split, count)
        return metrics

    def write_attention_maps(self, model: ShowAttendTell, split: str, count: int) -> Path:
        """The attention PNGs of the split's first ``count`` images, in a new numbered folder of the output."""
        dataset = self.eval_dataset(split)
        items = [dataset[index] for index in range(min(count, len(dataset)))]
        number = next_result_number(self.output_dir, f"attention_{split}_eval{{n}}")
        folder = output_path(self.output_dir, f"attention_{split}_eval{number}")
        folder.mkdir(parents=True)
        pixels = torch.stack([item["image"] for item in items])  # uint8 (N, 3, res, res)
        captions = caption_with_attention(model, pixels, self.settings, self.config.caption.prompt)
        for item, image, (words, alphas) in zip(items, pixels, captions, strict=True):
            write_attention(folder / f"{item['image_id']}.png", image.permute(1, 2, 0).numpy(), words, alphas,
                            save_npy=bool(self.config.caption.attention_npy))
        log.info("%s attention maps of %d images -> %s", split, len(items), folder)
        return folder


# ---- attention pictures (also for Predict.py) -----------------------------------------------------------------------


@torch.no_grad()
def caption_with_attention(model: ShowAttendTell, pixels: torch.Tensor, settings: GenerationSettings,
                           prompt: str = "") -> list[tuple[list[str], np.ndarray]]:
    """For uint8 images (N, 3, res, res): each caption's words (the first of num_return_sequences) and the
    attention that chose each of them, (len(words), grid, grid) float32, summing to 1 over the grid."""
    word_map = model.word_map
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    images = normalize(pixels.to(device))
    context = prompt_ids(word_map, prompt).to(device)
    generated = model.generate(images, context, settings)[:: settings.num_return_sequences]  # (N, max_length)
    alphas = model.attention_maps(images, context, generated).float().cpu().numpy()  # (N, max_length, g, g)
    model.train(was_training)
    out = []
    for row, maps in zip(generated.tolist(), alphas, strict=True):
        ids = row[: row.index(word_map.sep_token_id)] if word_map.sep_token_id in row else row
        ids = [index for index in ids if index != word_map.pad_token_id]
        out.append(([word_map.words[index] for index in ids], maps[: len(ids)]))
    return out


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    """``text`` on a dark strip along the top of the tile, sized to the tile (about 1/14 of its width high)."""
    tile = tile.copy()
    width = tile.shape[1]
    scale, thickness = width / 330, max(1, round(width / 160))
    (text_w, text_h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    if text_w > width - 4:  # a long word: shrink it to fit
        scale *= (width - 4) / text_w
        (_, text_h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    strip = text_h + baseline + 6
    tile[:strip] = (tile[:strip] * 0.35).astype(np.uint8)
    cv2.putText(tile, text, (3, text_h + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return tile


def attention_sheet(image_rgb: np.ndarray, words: list[str], alphas: np.ndarray) -> np.ndarray:
    """The image, then one tile per word with its attention (grid, grid) blended over the image (upscaled to at least
    TILE_MIN_SIZE px), SHEET_COLUMNS per row, the last row padded white -> (rows * S, columns * S', 3) uint8 RGB."""
    if len(words) != len(alphas):
        raise ValueError(f"attention_sheet: {len(words)} words but {len(alphas)} attention maps")
    height, width = image_rgb.shape[:2]
    factor = max(1.0, TILE_MIN_SIZE / min(height, width))
    image = cv2.resize(image_rgb, (round(width * factor), round(height * factor)), interpolation=cv2.INTER_CUBIC)
    tiles = [_label(image, "image")] + [_label(overlay(image, alpha), word)
                                        for word, alpha in zip(words, alphas, strict=True)]
    columns = min(len(tiles), SHEET_COLUMNS)
    tiles += [np.full_like(image, 255)] * (-len(tiles) % columns)
    rows = [np.concatenate(tiles[start:start + columns], axis=1) for start in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=0)


def write_attention(out_png: str | Path, image_rgb: np.ndarray, words: list[str], alphas: np.ndarray,
                    save_npy: bool = False) -> Path:
    """Write attention_sheet as a PNG; with ``save_npy`` also ``<out>.npy`` (len(words), grid, grid) and
    ``<out>.json`` (the caption and its words, in the order of the maps)."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet = attention_sheet(image_rgb, words, alphas)
    if not cv2.imwrite(str(out_png), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
        raise ValueError(f"could not write {out_png} (is the suffix .png?)")
    if save_npy:
        np.save(out_png.with_suffix(".npy"), np.asarray(alphas, dtype=np.float32))
        out_png.with_suffix(".json").write_text(json.dumps({"caption": " ".join(words), "words": words}),
                                                encoding="utf-8")
    return out_png


def load_captioner(checkpoint_path: str | Path, device: str | torch.device = "cpu"
                   ) -> tuple[ShowAttendTell, dict[str, Any]]:
    """A show_attend_tell model from one of its checkpoints (config and word map read from the file), in eval mode,
    and the checkpoint's config (for image_res, generation and caption.prompt)."""
    state = load_checkpoint_file(checkpoint_path)
    config = state.get("config")
    if not isinstance(config, dict) or config.get("model", {}).get("arch") != "show_attend_tell":
        raise ValueError(f"{checkpoint_path} is not a show_attend_tell checkpoint of Caption.py (its config has no "
                         "model.arch: show_attend_tell)")
    cfg = SatCfg.from_config({**config["model"], "pretrained": False})  # the weights come from the file
    weights = state["model"]
    model = ShowAttendTell(cfg, WordMap.from_tensor(weights["word_map_bytes"]))
    model.load_state_dict(weights)
    return model.to(device).eval(), config


def caption_image_file(model: ShowAttendTell, config: dict[str, Any], image_rgb: np.ndarray,
                       settings: GenerationSettings | None = None, prompt: str | None = None
                       ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Caption one (H, W, 3) uint8 RGB image as evaluation does (the checkpoint's generation settings and prompt
    unless given): (words, alphas (len(words), grid, grid), the model's input image (res, res, 3))."""
    res = int(config["model"]["image_res"])
    pixels = build_transform("test", res)(image_rgb, np.random.default_rng(0))  # uint8 (3, res, res)
    settings = settings or GenerationSettings.from_config(config.get("generation", {}))
    prompt = str(config.get("caption", {}).get("prompt", "")) if prompt is None else prompt
    [(words, alphas)] = caption_with_attention(model, pixels[None], settings, prompt)
    return words, alphas, pixels.permute(1, 2, 0).numpy()


def is_show_attend_tell_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a Caption.py checkpoint of this family (its config says model.arch show_attend_tell)."""
    config = load_checkpoint_file(path).get("config")
    return isinstance(config, dict) and (config.get("model") or {}).get("arch") == "show_attend_tell"


def attention_explainer(checkpoint_path: str | Path, device: str = "cpu", prompt: str | None = None,
                        num_beams: int | None = None):
    """For Predict.py --task caption: image path -> a tasks.gradcam_view.Explanation of the caption, whose word maps
    are the soft attention that chose each word (the sheet's summary tile: their mean), and whose score is the mean
    log-probability of the caption's words and its end."""
    from dataset.transforms import load_image
    from tasks.gradcam_view import Explanation

    model, config = load_captioner(checkpoint_path, device)
    block = dict(config.get("generation", {}))
    block.update({"num_return_sequences": 1, **({"num_beams": num_beams} if num_beams is not None else {})})
    settings = GenerationSettings.from_config(block)
    prompt = str(config.get("caption", {}).get("prompt", "")) if prompt is None else prompt

    def explain(image_path: str, _text: Any = None) -> Explanation:
        words, alphas, pixels = caption_image_file(model, config, load_image(image_path), settings, prompt)
        if not words:
            raise ValueError(f"the model generated an empty caption for {image_path}")
        word_map = model.word_map
        ids = [*prompt_ids(word_map, prompt).tolist(), *word_map.encode(" ".join(words)), word_map.sep_token_id]
        with torch.no_grad():
            image = normalize(torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device))
            logits, _ = model(image, torch.tensor([ids], device=device))
            scored = logits[0, len(ids) - len(words) - 2:].float().log_softmax(-1)  # the words and <end>
            score = float(scored.gather(1, torch.tensor(ids[-len(words) - 1:], device=device)[:, None]).mean())
        caption = " ".join(words)
        return Explanation(text=caption, words=words, word_maps=alphas, sentence_map=alphas.mean(axis=0),
                           itm_prob=None, mode="caption", summary_label="mean attention", score=score,
                           title=f'caption: "{caption}" (mean log p {score:.2f}; soft attention per word)')

    return explain
