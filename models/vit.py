"""Image encoder: timm's VisionTransformer in ALBEF's configuration (ViT-B/16, LayerNorm eps 1e-6, qkv bias).

``visual_encoder(image)`` returns every token after the final norm, (B, 1 + N, D). Weight surgery for another
``image_res`` (resampling the position embedding) lives here, in ``resample_pos_embed``.

The blocks are timm's; with ``model.memory_efficient`` on, models.layers swaps them for ``LeanBlock`` (same maths and
parameter names, GELU and LayerNorms recomputed in backward) when the model is built.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

log = logging.getLogger(__name__)

@dataclass
class VisionCfg:
    """The ``model.vit`` config block: timm's VisionTransformer in ALBEF's configuration (the one home of these
    defaults; models.albef.MODEL_DEFAULTS is derived from it)."""

    patch_size: int = 16  # pixels per patch side
    width: int = 768  # token width (vision_width)
    depth: int = 12  # transformer blocks
    heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    pretrained: str = ""  # timm weights name for real runs (e.g. deit_base_patch16_224); "" = random init

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> VisionCfg:
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"model.vit: unknown keys {sorted(unknown)} (known: {sorted(cls.__dataclass_fields__)})")
        return cls(**values)


class VisualEncoder(VisionTransformer):
    """timm ViT whose forward returns all tokens after the final norm (ALBEF's image embeddings)."""

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, 1 + N, D)
        return self.forward_features(x)


def create_vit(cfg: VisionCfg, image_res: int) -> VisualEncoder:
    """Build the image encoder; loads timm pretrained weights (resampled to ``image_res``) when ``pretrained`` names
    a model - real runs only, it downloads."""
    model = VisualEncoder(
        img_size=image_res, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio, qkv_bias=True, num_classes=0, global_pool="",
        norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=cfg.drop_path_rate)
    if cfg.pretrained:
        import timm

        source = timm.create_model(cfg.pretrained, pretrained=True, num_classes=0)
        state = {k: v for k, v in source.state_dict().items() if not k.startswith(("head", "fc_norm"))}
        state = resample_pos_embed(state, model, prefix="")
        missing, unexpected = model.load_state_dict(state, strict=False)
        log.info("image encoder initialised from timm %s (missing %s, unexpected %s)",
                 cfg.pretrained, missing, unexpected)
    return model


def resample_pos_embed(state_dict: dict[str, Tensor], model: VisionTransformer, prefix: str,
                       notes: list[str] | None = None) -> dict[str, Tensor]:
    """Resample ``{prefix}pos_embed`` to ``model``'s patch grid (bicubic, [CLS] kept), as ALBEF does for another
    image_res; returns a new dict. ``notes`` receives a line saying so when it resampled."""
    key = f"{prefix}pos_embed"
    if key not in state_dict:
        return state_dict
    old = state_dict[key]
    new_len = model.pos_embed.shape[1]
    if old.shape[1] == new_len:
        return state_dict
    grid = model.patch_embed.grid_size
    resampled = resample_abs_pos_embed(old.float(), new_size=list(grid), num_prefix_tokens=1).to(old.dtype)
    log.info("resampled %s from %d to %d tokens", key, old.shape[1], new_len)
    if notes is not None:
        notes.append(f"{key} resampled {old.shape[1]} -> {new_len} tokens")
    return {**state_dict, key: resampled}


