"""NLVR2 models: the text attends to the two images of a pair in two consecutive fusion blocks.

Structure (ALBEF): the text encoder has ``fusion_layer + 2 * (L - fusion_layer)`` layers; fusion layer k reads image
``(k - fusion_layer) % 2``; the two blocks of each pair start from the same pretrained fusion layer and share their
cross-attention key/value projections (the same nn.Linear modules, so both official key names exist).

Key surgery (``checkpoint_filter_fn``) from a pretraining checkpoint (ALBEF.pth): ``text_encoder.bert.*`` ->
``text_encoder.*``; pretrained fusion layer l (l >= fusion_layer) -> layers f + 2(l - f) and f + 2(l - f) + 1.
Checkpoints of these models (pretrain_model_nlvr.pth, the NLVR2 fine-tuned ones) already have that layout and only get
the ``bert.`` prefix stripped.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from models.albef import SpecialTokens, resample_image_pos_embeds, strip_bert_prefix
from models.heads import mlp_head
from models.model_ve import AlbefClassifier
from models.xbert import BertConfig

_LAYER_KEY = re.compile(r"^(text_encoder(?:_m)?)\.encoder\.layer\.(\d+)\.(.*)$")


def nlvr_bert_config(config: BertConfig) -> BertConfig:
    fusion, layers = config.fusion_layer, config.num_hidden_layers
    return config.replace(num_hidden_layers=fusion + 2 * (layers - fusion), num_image_streams=2)


class AlbefNLVRBase(AlbefClassifier):
    """Image-pair encoder shared by NLVR2 fine-tuning and its text-assignment pretraining."""

    def __init__(self, cfg: dict[str, Any], special: SpecialTokens) -> None:
        super().__init__(cfg, special)
        self.pretrained_layers = self.bert_config.num_hidden_layers
        self.bert_config = nlvr_bert_config(self.bert_config)
        self.text_encoder = self._new_text_encoder(with_mlm_head=False)
        self._share_cross_attention_kv(self.text_encoder)

    @staticmethod
    def _share_cross_attention_kv(encoder) -> None:
        layers = [layer for layer in encoder.encoder.layer if layer.has_cross_attention]
        for first, second in zip(layers[0::2], layers[1::2], strict=True):
            second.crossattention.self.key = first.crossattention.self.key
            second.crossattention.self.value = first.crossattention.self.value

    def pair_logits(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, momentum: bool = False
                    ) -> Tensor:
        """``images`` (2B, 3, H, W): the B first images then the B second images -> fused [CLS] (B, D)."""
        suffix = "_m" if momentum else ""
        image_embeds = getattr(self, "visual_encoder" + suffix)(images)
        first, second = torch.split(image_embeds, input_ids.shape[0])
        fused = getattr(self, "text_encoder" + suffix)(input_ids, attention_mask,
                                                       encoder_hidden_states=[first, second])
        return fused[:, 0, :]

    @staticmethod
    def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: AlbefNLVRBase,
                             notes: list[str] | None = None) -> dict[str, Tensor]:
        state_dict = strip_bert_prefix(state_dict, notes=notes)
        fusion = model.bert_config.fusion_layer
        has_pairs = any(k.startswith(f"text_encoder.encoder.layer.{model.bert_config.num_hidden_layers - 1}.")
                        for k in state_dict)
        if not has_pairs:  # a single-image checkpoint: duplicate each fusion layer into its pair
            out: dict[str, Tensor] = {}
            for key, value in state_dict.items():
                match = _LAYER_KEY.match(key)
                if match and int(match.group(2)) >= fusion:
                    name, layer, rest = match.group(1), int(match.group(2)), match.group(3)
                    for new_layer in (fusion + 2 * (layer - fusion), fusion + 2 * (layer - fusion) + 1):
                        out[f"{name}.encoder.layer.{new_layer}.{rest}"] = value
                else:
                    out[key] = value
            if notes is not None and len(out) > len(state_dict):
                notes.append(f"each fusion layer l >= {fusion} copied into the image-pair layers "
                             f"{fusion} + 2(l - {fusion}) and the next")
            state_dict = out
        return resample_image_pos_embeds(state_dict, model, notes)


class AlbefNLVR(AlbefNLVRBase):
    """NLVR2 fine-tuning: binary head on the fused [CLS]."""

    num_classes = 2

    def __init__(self, cfg: dict[str, Any], special: SpecialTokens) -> None:
        super().__init__(cfg, special)
        self._build_classifier()

    def logits(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, momentum: bool = False) -> Tensor:
        return getattr(self, "cls_head_m" if momentum else "cls_head")(
            self.pair_logits(images, input_ids, attention_mask, momentum))


class AlbefNLVRPretrain(AlbefNLVRBase):
    """Text-assignment pretraining: for a text and an image pair, is the text about the first image (0), the
    second (1), or neither (2)? Pairs are built from a batch of matching (image, text) pairs."""

    def __init__(self, cfg: dict[str, Any], special: SpecialTokens) -> None:
        super().__init__(cfg, special)
        self.ta_head = mlp_head(self.bert_config.hidden_size, 3)

    def forward(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor,
                labels: Tensor | None = None, others: Tensor | None = None) -> dict[str, Tensor]:
        """``image`` (B, ...) matches text b. ``labels`` (B,) in {0, 1, 2} and ``others`` (B, 2) indices of other
        images are drawn here (vectorised) unless given."""
        batch = image.shape[0]
        if labels is None:
            labels = torch.randint(3, (batch,), device=image.device)
        if others is None:  # two images different from b: b + offset, offsets in [1, B-1]
            offsets = torch.randint(1, max(batch, 2), (batch, 2), device=image.device)
            others = (torch.arange(batch, device=image.device)[:, None] + offsets) % batch
        own = torch.arange(batch, device=image.device)
        first = torch.where(labels == 0, own, others[:, 0])
        second = torch.where(labels == 1, own, others[:, 1])
        images = torch.cat([image[first], image[second]])
        logits = self.ta_head(self.pair_logits(images, input_ids, attention_mask))
        return {"loss_ta": F.cross_entropy(logits, labels)}
