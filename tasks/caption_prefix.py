"""Caption.py's ``prefix_lm`` family: ViECap-style captioning trained on captions only (models/prefix_caption.py).

    python Caption.py --config configs/Caption_prefix_coco.yaml --output_dir output/caption_prefix
    python Caption.py --config configs/Caption_prefix_coco.yaml --evaluate \
        --checkpoint output/caption_prefix/checkpoint_best.pth --output_dir output/caption_prefix_eval

Training reads only the captions of ``data.train_file`` (``[{image, caption, image_id}]``; the images are never
opened): each caption is encoded once by the frozen feature source (``prefix.feature_source``: ``alignfuse``, the ITC
space of ``prefix.feature_checkpoint``, or ``open_clip``) and the features are cached in ``prefix.feature_cache_dir``
("" = ``<output_dir>/feature_cache``) as ``caption_features_<hash>.safetensors`` (row i = caption i; the hash covers
the captions and the source, so a change of either makes a new file). Evaluation encodes the images of
``data.{val,test}_file`` with the same source, finds their entities by zero-shot classification against
``prefix.entity_vocabulary`` and scores the captions exactly like the other families (tasks.captioning.CaptionScoring:
result files ``caption_<split>_eval<N>.json``, COCO metrics, ``score``, ``constant_CIDEr``); ``data.image_folder``
captions a folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from dataset.annotations import load_json_annotations
from dataset.datasets import ImageTextCollator
from dataset.prefix_text import (
    EntityMatcher,
    PrefixCollator,
    PrefixTextDataset,
    hard_prompt,
    load_lm_tokenizer,
    prompt_sequences,
    read_entity_vocabulary,
)
from dataset.text import pre_caption
from dataset.transforms import normalize
from engine import Task, dist
from models.generation import GENERATION_DEFAULTS, GenerationSettings
from models.prefix_caption import (
    AlbefFeatures,
    FeatureSource,
    OpenClipFeatures,
    PrefixCaptioner,
    PrefixCfg,
    build_language_model,
    zero_shot_entities,
)
from tasks.base import AlbefTask, task_defaults, unwrap
from tasks.captioning import CaptionScoring, ImageFolderDataset, caption_loader

log = logging.getLogger("alignfuse")

FEATURE_SOURCES = ("alignfuse", "open_clip")

# The `prefix:` block (its one home).
PREFIX_DEFAULTS: dict[str, Any] = {
    # Language model: GPT-2 weights by hub name or folder ("gpt2"), or "" = random init from GPT2Config with
    # language_model_overrides (tests and the demo); its tokenizer by hub name or folder (dataset.prefix_text).
    "language_model": "gpt2",
    "language_model_overrides": {},  # GPT2Config keys, e.g. {n_layer: 2, n_embd: 64, n_head: 2} for a tiny model
    "tokenizer": "gpt2",
    "freeze_language_model": False,  # true: train only the mapping network (ViECap fine-tunes GPT-2)
    "prefix_length": 10,  # soft prompt tokens
    "mapping_layers": 8,  # Transformer layers of the mapping network
    "mapping_heads": 8,  # its attention heads (must divide the language model's width)
    "noise_variance": 0.016,  # Gaussian noise added to the caption feature in training (variance; 0 = none)
    "soft_prompt_first": True,  # order: soft prompt, hard prompt, caption (false: hard prompt first)
    # Feature source: alignfuse = the ITC space of an ALBEF / AlignFuse checkpoint built with this config's model:
    # block (feature_checkpoint); open_clip = open_clip_model with the local weights file open_clip_weights ("" =
    # random init, tests only), open_clip_config a JSON model config registered under open_clip_model's name.
    "feature_source": "alignfuse",
    "feature_checkpoint": "",
    "open_clip_model": "ViT-B-32",
    "open_clip_weights": "",
    "open_clip_config": "",
    "feature_cache_dir": "",  # "" = <output_dir>/feature_cache
    "feature_batch_size": 256,  # captions per batch while extracting their features
    # Entities: vocabulary file (one a line; "" = no hard prompt), masking in training, zero-shot at inference.
    "entity_vocabulary": "",
    "entity_mask_probability": 0.4,
    "entity_prompt": "a photo of {}.",
    "entity_top_k": 3,
    "entity_threshold": 0.2,
}


class PrefixCaptionTask(CaptionScoring, AlbefTask):
    name = "caption"
    config_defaults = task_defaults(
        model={"arch": "prefix_lm"},  # the captioner family (Caption.py); the ALBEF keys serve feature_source alignfuse
        data={
            "train_file": [],  # [{image, caption, image_id}] files: only the captions are read
            "val_file": "",  # [{image, caption: [..]}]; "" = no validation
            "test_file": "",  # [{image, caption: [..]}]; "" = no test evaluation
            "val_gt_file": "",  # COCO-format ground truth of val_file ("" = the captions of val_file)
            "test_gt_file": "",  # COCO-format ground truth of test_file ("" = the captions of test_file)
            "image_folder": "",  # caption every image in this folder instead of evaluating (with --evaluate)
        },
        prefix=dict(PREFIX_DEFAULTS),
        generation=dict(GENERATION_DEFAULTS),
        eval={
            "score_metrics": ["CIDEr"],  # 'score' = mean of these metrics (best checkpoint, early stopping)
            "meteor": True,  # METEOR (needs Java)
            "spice": False,  # SPICE (needs Java and the Stanford CoreNLP jars already installed)
            "constant_caption_candidates": 0,  # > 0: <split>/constant_CIDEr, the best constant caption (Caption.py)
        },
    )
    open_config_keys = (*AlbefTask.open_config_keys, "prefix.language_model_overrides")
    best_metric = "score"

    def __init__(self, config, device) -> None:
        Task.__init__(self, config, device)  # not AlbefTask's: the BERT tokenizer is built only for alignfuse
        self.skipped_eval_images: dict[str, int] = {}
        self._broken_eval_entries: dict[tuple, dict[int, str]] = {}
        self.constant_captions: dict = {}
        prefix = config.prefix
        if prefix.feature_source not in FEATURE_SOURCES:
            raise ValueError(f"prefix.feature_source: {prefix.feature_source!r} is not one of {FEATURE_SOURCES}")
        self.settings = GenerationSettings.from_config(config.generation)
        self.lm_tokenizer = load_lm_tokenizer(str(prefix.tokenizer))
        self.entities = read_entity_vocabulary(prefix.entity_vocabulary) if prefix.entity_vocabulary else None
        self._features: FeatureSource | None = None
        self._entity_feats: torch.Tensor | None = None
        self.tokenizer = None  # the BERT tokenizer of the alignfuse source (set when it is built)

    # ---- feature source --------------------------------------------------------------------------------------------
    @property
    def features(self) -> FeatureSource:
        if self._features is None:
            self._features = self.build_feature_source().to(self.device)
        return self._features

    def build_feature_source(self) -> FeatureSource:
        prefix = self.config.prefix
        if prefix.feature_source == "alignfuse":
            from dataset.tokenizer import build_tokenizer, tokenize
            from models import create_model, load_checkpoint_detailed

            if not prefix.feature_checkpoint:
                raise ValueError("prefix.feature_checkpoint is empty: the alignfuse feature source needs a pretraining "
                                 "or retrieval checkpoint (ours or an official ALBEF one) whose ITC space it uses")
            self.tokenizer = build_tokenizer(self.config.model.tokenizer)
            model = create_model("retrieval", self.config.model, tokenizer=self.tokenizer)
            done = load_checkpoint_detailed(model, prefix.feature_checkpoint)
            needed = ("visual_encoder.", "vision_proj.", "text_encoder.", "text_proj.", "temp")
            missing = [key for key in done.missing if key.startswith(needed)]
            if missing:
                raise ValueError(f"prefix.feature_checkpoint {prefix.feature_checkpoint} lacks {len(missing)} weights "
                                 f"of the ITC encoders (e.g. {missing[:3]}): give a pretraining or retrieval "
                                 "checkpoint, with the model: block it was trained with")
            log.info("feature source: ITC space of %s", prefix.feature_checkpoint)
            return AlbefFeatures(model, functools.partial(tokenize, self.tokenizer,
                                                          max_length=int(self.config.data.max_tokens)))
        import open_clip

        name = str(prefix.open_clip_model)
        if prefix.open_clip_config:
            path = Path(prefix.open_clip_config)
            if not path.is_file() or path.stem != name:
                raise ValueError(f"prefix.open_clip_config {path} must be an existing JSON file named "
                                 f"{name}.json (open_clip registers a model config under its file name)")
            open_clip.add_model_config(path)
        if name not in open_clip.list_models():
            raise ValueError(f"prefix.open_clip_model {name!r} is not an open_clip model; known e.g. "
                             f"{open_clip.list_models()[:5]} (or register one with prefix.open_clip_config)")
        weights = str(prefix.open_clip_weights)
        if weights and not Path(weights).is_file():
            raise FileNotFoundError(f"prefix.open_clip_weights {weights} does not exist (a local weights file)")
        if not weights:
            log.warning("prefix.open_clip_weights is empty: %s is randomly initialised (tests only)", name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.config.seed))  # a random-init source (tests) is the same on every rank
            model = open_clip.create_model(name, pretrained=weights or None)
        image_size = model.visual.image_size
        image_size = image_size[0] if isinstance(image_size, tuple | list) else image_size
        if int(image_size) != int(self.config.model.image_res):
            raise ValueError(f"model.image_res {self.config.model.image_res} differs from the image size {image_size} "
                             f"of open_clip model {name}: set model.image_res={image_size}")
        log.info("feature source: open_clip %s (%s)", name, weights or "random init")
        return OpenClipFeatures(model, open_clip.get_tokenizer(name))

    def source_description(self) -> dict[str, Any]:
        """What the caption features depend on besides the captions (the cache key)."""
        prefix = self.config.prefix

        def stamp(path: str) -> list:
            stat = os.stat(path) if path and os.path.exists(path) else None
            return [str(Path(path).resolve()) if path else "", stat.st_size if stat else 0,
                    stat.st_mtime_ns if stat else 0]

        if prefix.feature_source == "alignfuse":
            return {"source": "alignfuse", "checkpoint": stamp(prefix.feature_checkpoint),
                    "tokenizer": str(self.config.model.tokenizer), "max_tokens": int(self.config.data.max_tokens)}
        config = Path(prefix.open_clip_config).read_text() if prefix.open_clip_config else ""
        return {"source": "open_clip", "model": prefix.open_clip_model, "weights": stamp(prefix.open_clip_weights),
                "config": config, "seed": int(self.config.seed) if not prefix.open_clip_weights else None}

    def caption_features(self, captions: list[str]) -> torch.Tensor:
        """(N, D) normalised features of ``captions`` from the cache, extracted there first when missing (by the main
        rank, with a progress bar; the other ranks wait for it)."""
        prefix = self.config.prefix
        folder = Path(prefix.feature_cache_dir or Path(self.output_dir or "output") / "feature_cache")
        digest = hashlib.sha256(json.dumps({"source": self.source_description(), "captions": captions},
                                           sort_keys=True).encode()).hexdigest()[:20]
        path = folder / f"caption_features_{digest}.safetensors"
        if dist.is_main() and not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            size = int(prefix.feature_batch_size)
            if size < 1:
                raise ValueError(f"prefix.feature_batch_size must be >= 1, got {size}")
            chunks = []
            for start in tqdm(range(0, len(captions), size), desc="caption features", unit="batch",
                              disable=None):
                chunks.append(self.features.encode_text(captions[start : start + size]).cpu())
            tmp = path.with_name(path.name + ".tmp")
            save_file({"features": torch.cat(chunks).contiguous()}, str(tmp),
                      metadata={"num_captions": str(len(captions)), "source": json.dumps(self.source_description())})
            os.replace(tmp, path)  # atomic: a killed extraction leaves no half file that a later run would trust
            log.info("caption features of %d captions -> %s", len(captions), path)
        elif dist.is_main():
            log.info("caption features: reusing %s", path)
        dist.barrier()
        features = load_file(str(path))["features"]
        if features.shape[0] != len(captions):
            raise ValueError(f"feature cache {path} holds {features.shape[0]} rows for {len(captions)} captions: "
                             "delete it and run again")
        return features

    # ---- model -----------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        prefix = self.config.prefix
        cfg = PrefixCfg(feature_dim=self.features.dim, prefix_length=int(prefix.prefix_length),
                        mapping_layers=int(prefix.mapping_layers), mapping_heads=int(prefix.mapping_heads),
                        noise_variance=float(prefix.noise_variance))
        language_model = build_language_model(str(prefix.language_model), dict(prefix.language_model_overrides),
                                              len(self.lm_tokenizer), self.lm_tokenizer.eos_token_id)
        return PrefixCaptioner(cfg, language_model, freeze_language_model=bool(prefix.freeze_language_model))

    def load_pretrained(self, model: nn.Module, path: str | Path, evaluate: bool = False,
                        allow_partial: bool = False) -> None:
        Task.load_pretrained(self, model, path, evaluate, allow_partial)  # our own checkpoints, by key

    # ---- training --------------------------------------------------------------------------------------------------
    def build_train_loader(self):
        data, prefix = self.config.data, self.config.prefix
        if not data.train_file:
            raise ValueError("data.train_file is empty: give the captioning training files [{image, caption, "
                             "image_id}] (only their captions are read)")
        entries = load_json_annotations(list(data.train_file), "caption_train")
        captions = [pre_caption(entry["caption"], int(data.max_words)) for entry in entries]
        features = self.caption_features(captions)
        entities = None
        if self.entities is not None:
            match = EntityMatcher(self.entities)
            entities = [match(caption) for caption in captions]
        dataset = PrefixTextDataset(captions, features, entities, float(prefix.entity_mask_probability),
                                    seed=int(self.config.seed))
        collator = PrefixCollator(self.lm_tokenizer, int(prefix.prefix_length), int(data.max_tokens),
                                  bool(prefix.soft_prompt_first))
        return self.loader(dataset, train=True, collate_fn=collator)

    def train_step(self, model, batch: dict[str, Any], progress) -> dict[str, Any]:
        batch = self.to_device(batch)
        return model(batch["feature"], batch["token_ids"], batch["attention_mask"], batch["labels"])

    # ---- evaluation ------------------------------------------------------------------------------------------------
    def image_entities(self, image_feat: torch.Tensor) -> list[list[str]]:
        """Zero-shot entities of images (B, D): prefix.entity_prompt around every entity of the vocabulary."""
        prefix = self.config.prefix
        if self._entity_feats is None:
            prompts = [str(prefix.entity_prompt).format(entity) for entity in self.entities]
            self._entity_feats = self.features.encode_text(prompts).to(image_feat.device)
        return zero_shot_entities(image_feat, self._entity_feats, self.features.logit_scale(), self.entities,
                                  int(prefix.entity_top_k), float(prefix.entity_threshold))

    @torch.no_grad()
    def caption_images(self, model: nn.Module, image: torch.Tensor) -> list[str]:
        """B * n captions of uint8 images (B, 3, H, W)."""
        prefix = self.config.prefix
        image_feat = self.features.encode_image(normalize(image.to(self.device, non_blocking=True)))
        prompts = [hard_prompt(found) for found in self.image_entities(image_feat)] if self.entities else None
        rows = prompt_sequences(self.lm_tokenizer, int(prefix.prefix_length), prompts, None, 0,
                                bool(prefix.soft_prompt_first), pad_left=True, count=image.shape[0])
        tokens = unwrap(model).generate(image_feat, rows["token_ids"].to(self.device),
                                        rows["attention_mask"].to(self.device), self.settings,
                                        self.lm_tokenizer.eos_token_id)
        texts = self.lm_tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)
        return [text.strip() for text in texts]

    def run_captioning(self, model: nn.Module, loader, id_key: str) -> list[dict[str, Any]]:
        # transformers' sampling draws from torch's global generator: seeded per rank, restored afterwards.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(int(self.config.seed) + dist.get_rank())
            return caption_loader(loader, lambda batch: self.caption_images(model, batch["image"]),
                                  self.settings.num_return_sequences, id_key)

    def evaluate(self, model, split: str) -> dict[str, float]:
        if split == "folder":
            return self.caption_folder(model)
        dataset = self.eval_dataset(split)
        loader = self.loader(dataset, train=False, collate_fn=ImageTextCollator(None))
        results = self.run_captioning(model, loader, "image_id")
        metrics = self.score_split(split, dataset, results) if dist.is_main() else None
        return dist.broadcast_object(metrics)

    def caption_folder(self, model) -> dict[str, float]:
        data = self.config.data
        dataset = ImageFolderDataset(data.image_folder, self.transform("test"), int(data.max_image_pixels))
        loader = self.loader(dataset, train=False, collate_fn=ImageFolderDataset.collate)
        results = self.run_captioning(model, loader, "index")
        if dist.is_main():
            self.write_folder_captions(dataset, results)
        return {"num_images": float(len(results))}
