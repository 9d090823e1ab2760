"""Image encoder: timm's VisionTransformer in ALBEF's configuration (ViT-B/16, LayerNorm eps 1e-6, qkv bias).

``visual_encoder(image)`` returns every token after the final norm, (B, 1 + N, D). Weight surgery for another
``image_res`` (resampling the position embedding) lives here, in ``resample_pos_embed``.

Each block's MLP is ``GeluMlp`` (timm's ``Mlp`` maths and parameter names): it keeps the fc1 output for backward
and recomputes the GELU there (``models.layers``), instead of keeping both (a quarter of the image encoder's
activation memory). Each block is a ``LeanBlock``: timm's ``Block`` maths and names, with its two LayerNorms fused
into the linears that read them and recomputed in backward (another sixth of the encoder's activations).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch.nn.functional as F
from timm.layers import Mlp, resample_abs_pos_embed
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

from models.layers import layer_norm_linear, linear_gelu_linear

log = logging.getLogger(__name__)

VIT_DEFAULTS: dict[str, Any] = {
    "patch_size": 16,  # pixels per patch side
    "width": 768,  # token width (vision_width)
    "depth": 12,  # transformer blocks
    "heads": 12,
    "mlp_ratio": 4.0,
    "drop_path_rate": 0.0,
    "pretrained": "",  # timm model name whose weights initialise the encoder in real runs (e.g. deit_base_patch16_224)
}


class GeluMlp(nn.Module):
    """timm's ``Mlp`` (fc1 -> GELU -> fc2, no dropout or inner norm) with the GELU recomputed in backward; same
    parameter names (``fc1``, ``fc2``), so checkpoints load unchanged."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    @classmethod
    def from_timm(cls, mlp: nn.Module) -> nn.Module:
        """``GeluMlp`` sharing ``mlp``'s layers when it is a plain timm Mlp with exact GELU; ``mlp`` otherwise."""
        plain = (type(mlp) is Mlp and isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"
                 and isinstance(mlp.norm, nn.Identity) and mlp.drop1.p == 0 and mlp.drop2.p == 0
                 and mlp.fc1.bias is not None and mlp.fc2.bias is not None)
        return cls(mlp.fc1, mlp.fc2) if plain else mlp

    def forward(self, x: Tensor) -> Tensor:
        return linear_gelu_linear(x, self.fc1, self.fc2)


class LeanBlock(nn.Module):
    """timm's pre-norm ``Block`` (x + attn(norm1(x)), then x + mlp(norm2(x))) whose norms run inside the linears
    that read them (``models.layers``): backward recomputes them from x, which it keeps anyway. Same submodules and
    parameter names as the block it is built from, so checkpoints load unchanged."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp

    @classmethod
    def from_timm(cls, block: nn.Module) -> nn.Module:
        """A ``LeanBlock`` sharing ``block``'s modules when it is a plain timm Block (no layer scale, drop path,
        attention dropout, q/k norm or gate; affine LayerNorms; a ``GeluMlp``); ``block`` otherwise."""
        attn = getattr(block, "attn", None)
        plain = (type(block) is Block and type(attn) is Attention and isinstance(block.mlp, GeluMlp)
                 and all(isinstance(getattr(block, n), nn.Identity) for n in ("ls1", "ls2", "drop_path1", "drop_path2"))
                 and all(isinstance(getattr(attn, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
                 and getattr(attn, "gate", None) is None and attn.attn_drop.p == 0 and attn.proj_drop.p == 0
                 and attn.qkv.bias is not None and attn.num_heads * attn.head_dim == attn.qkv.in_features
                 and all(type(n) is nn.LayerNorm and n.weight is not None and n.bias is not None
                         for n in (block.norm1, block.norm2)))
        return cls(block) if plain else block

    def forward(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, N, C)
        attn = self.attn
        if not attn.fused_attn:  # timm's explicit-probabilities path, which Grad-CAM hooks (models.gradcam)
            x = x + attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        batch, tokens, width = x.shape
        qkv = layer_norm_linear(x, self.norm1, attn.qkv)
        q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        x = x + attn.proj(out.transpose(1, 2).reshape(batch, tokens, width))
        return x + linear_gelu_linear(x, self.mlp.fc1, self.mlp.fc2, norm=self.norm2)


class VisualEncoder(VisionTransformer):
    """timm ViT whose forward returns all tokens after the final norm (ALBEF's image embeddings)."""

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, 1 + N, D)
        return self.forward_features(x)


def create_vit(vit_cfg: dict[str, Any], image_res: int) -> VisualEncoder:
    """Build the image encoder; loads timm pretrained weights (resampled to ``image_res``) when ``pretrained`` names
    a model - real runs only, it downloads."""
    cfg = {**VIT_DEFAULTS, **dict(vit_cfg or {})}
    model = VisualEncoder(
        img_size=image_res, patch_size=cfg["patch_size"], embed_dim=cfg["width"], depth=cfg["depth"],
        num_heads=cfg["heads"], mlp_ratio=cfg["mlp_ratio"], qkv_bias=True, num_classes=0, global_pool="",
        norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=cfg["drop_path_rate"])
    for index, block in enumerate(model.blocks):
        block.mlp = GeluMlp.from_timm(block.mlp)
        model.blocks[index] = LeanBlock.from_timm(block)
    if cfg["pretrained"]:
        import timm

        source = timm.create_model(cfg["pretrained"], pretrained=True, num_classes=0)
        state = {k: v for k, v in source.state_dict().items() if not k.startswith(("head", "fc_norm"))}
        state = resample_pos_embed(state, model, prefix="")
        missing, unexpected = model.load_state_dict(state, strict=False)
        log.info("image encoder initialised from timm %s (missing %s, unexpected %s)",
                 cfg["pretrained"], missing, unexpected)
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


