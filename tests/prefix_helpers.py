"""Tiny offline pieces for the prefix captioner tests (tests/test_caption_prefix.py): Caption.py arguments, a random
ALBEF checkpoint for the alignfuse feature source and a random-init open_clip config, nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# A 2-layer GPT-2 of width 32 and a 2-layer mapping network: seconds per epoch on a CPU core.
TINY_LM = ["prefix.language_model=", "prefix.language_model_overrides={n_layer: 2, n_embd: 32, n_head: 2, "
           "n_positions: 96}", "prefix.mapping_layers=2", "prefix.mapping_heads=2", "prefix.prefix_length=4"]
# The ALBEF feature model of test_task_vqa's TINY_MODEL (widths 32, 32-px images).
TINY_ALBEF = ["model.bert_overrides.hidden_size=32", "model.bert_overrides.intermediate_size=64",
              "model.bert_overrides.encoder_width=32", "model.vit.width=32", "model.image_res=32", "model.embed_dim=32"]
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                             "head_width": 16},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def prefix_argv(data: Path, out: Path, *opts: str, train: str = "coco_karpathy_train", val: str = "coco_karpathy_val",
                tiny: bool = True) -> list[str]:
    """Caption.py arguments of the prefix_lm family on synthetic data (demo config; with ``tiny`` a tinier language
    model), trained on the captions of ``<train>.json`` and evaluated on the images of ``<val>.json`` (+ ``_gt``)."""
    return ["--config", str(REPO / "configs/demo/Caption_prefix.yaml"), "--output_dir", str(out), "--device", "cpu",
            "--opts", f"model.tokenizer={data / 'vocab.txt'}", f"prefix.tokenizer={data / 'lm_tokenizer'}",
            f"prefix.entity_vocabulary={data / 'entities.txt'}", f"data.train_file=[{data / train}.json]",
            f"data.val_file={data / val}.json", f"data.val_gt_file={data / val}_gt.json",
            f"data.image_root={data / 'images'}", "data.num_workers=0", "eval.meteor=false",
            *(TINY_LM if tiny else []), *opts]


def random_albef_checkpoint(data: Path, path: Path) -> list[str]:
    """Save a random-init tiny ALBEF pretraining model to ``path``; returns the --opts that select it as the
    alignfuse feature source."""
    from dataset.tokenizer import build_tokenizer
    from engine.config import build_schema, load_config
    from models import create_model
    from tasks.caption_prefix import PrefixCaptionTask

    opts = [*TINY_ALBEF, f"model.tokenizer={data / 'vocab.txt'}"]
    schema = build_schema(PrefixCaptionTask.config_defaults)
    config = load_config(str(REPO / "configs/demo/Caption_prefix.yaml"), opts, schema,
                         PrefixCaptionTask.open_config_keys)
    torch.manual_seed(0)
    model = create_model("pretrain", config.model, tokenizer=build_tokenizer(data / "vocab.txt"))
    torch.save({"model": model.state_dict()}, path)
    return [*TINY_ALBEF, "prefix.feature_source=alignfuse", f"prefix.feature_checkpoint={path}"]


def tiny_open_clip(folder: Path) -> list[str]:
    """A random-init open_clip config registered from ``folder``; returns the --opts that select it."""
    path = folder / "tiny-clip-test.json"
    path.write_text(json.dumps({**TINY_CLIP}))
    return ["prefix.feature_source=open_clip", "prefix.open_clip_model=tiny-clip-test",
            f"prefix.open_clip_config={path}", "prefix.open_clip_weights=", "model.image_res=32"]
