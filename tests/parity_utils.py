"""Build our task models at the reference fixtures' micro size, through the public API, and load their weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models import create_model, load_checkpoint
from models.albef import SpecialTokens


def reference_model_cfg(ref: dict, tmp_path: Path) -> dict:
    """Our `model:` config block for a reference file (its BertConfig written next to the test's tmp files)."""
    size = ref["size"]
    bert_path = tmp_path / "config_bert.json"
    bert_path.write_text(json.dumps(ref["bert_config"]))
    config = ref["config"]
    return {
        "bert_config": str(bert_path),
        "text_encoder": "",
        "tokenizer": "",
        "vit": {"patch_size": size["vit_patch"], "width": size["vit_width"], "depth": size["vit_depth"],
                "heads": size["vit_heads"], "mlp_ratio": 4.0, "drop_path_rate": 0.0, "pretrained": ""},
        "image_res": size["image_res"],
        "embed_dim": size["embed_dim"],
        "temp": config.get("temp", 0.07),
        "queue_size": size["queue_size"],
        "momentum": config.get("momentum", 0.995),
        "alpha": config.get("alpha", 0.4),
        "distill": config.get("distill", True),
    }


def reference_special(ref: dict) -> SpecialTokens:
    vocab = ref["vocab"]
    return SpecialTokens(pad=vocab.index("[PAD]"), cls=vocab.index("[CLS]"), sep=vocab.index("[SEP]"),
                         mask=vocab.index("[MASK]"), vocab_size=len(vocab))


def build_reference_model(task: str, ref: dict, tmp_path: Path, **cfg_changes) -> torch.nn.Module:
    """Create ``task``'s model from the reference config and load the reference state_dict strictly."""
    cfg = {**reference_model_cfg(ref, tmp_path), **cfg_changes}
    torch.manual_seed(0)
    model = create_model(task, cfg, special=reference_special(ref))
    load_checkpoint(model, ref["state_dict"], strict=True)
    return model


ATOL, RTOL = 1e-5, 1e-4  # the fixtures' suggested tolerance on hidden states and logits


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL, rtol: float = RTOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@torch.no_grad()
def check_encoders(model: torch.nn.Module, ref: dict, image: torch.Tensor, ids: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs every ITC/ITM model shares (encoders, features, similarities, positive-pair fusion and ITM logits)
    against the reference; returns (image_embeds, text_embeds)."""
    image_embeds = model.encode_image(image)
    close(image_embeds, ref["outputs.image_embeds"])
    image_feat = model.image_feat(image_embeds)
    close(image_feat, ref["outputs.image_feat"])
    text_embeds = model.encode_text(ids, mask)
    close(text_embeds, ref["outputs.text_embeds"])
    text_feat = model.text_feat(text_embeds)
    close(text_feat, ref["outputs.text_feat"])
    close(image_feat @ text_feat.T / model.temp, ref["outputs.sim_i2t"])
    fused = model.fuse(text_embeds, mask, image_embeds)
    close(fused, ref["outputs.fusion_last_hidden_state_pos"])
    close(model.itm_head(fused[:, 0, :]), ref["outputs.itm_logits_pos"])
    return image_embeds, text_embeds
