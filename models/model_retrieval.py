"""Image-text retrieval (and grounding fine-tuning) model: ITC with momentum distillation where every caption of the
same image counts as a positive, ITM with hard negatives that never pick another caption of the same image.

Official mscoco.pth / flickr30k.pth load as they are (``text_encoder.*`` without ``bert.``, ``idx_queue``).
From a pretraining checkpoint (ALBEF.pth): ``text_encoder.bert.*`` -> ``text_encoder.*`` (the MLM head is unused),
pos_embed resampled to image_res.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from models.albef import AlbefBase, SpecialTokens, resample_image_pos_embeds, strip_bert_prefix
from models.heads import itm_head


class AlbefRetrieval(AlbefBase):
    def __init__(self, cfg: dict[str, Any], special: SpecialTokens) -> None:
        super().__init__(cfg, special)
        self.text_encoder = self._new_text_encoder(with_mlm_head=False)
        self._build_projections()
        self.itm_head = itm_head(self.bert_config.hidden_size)
        self._build_momentum(["visual_encoder", "vision_proj", "text_encoder", "text_proj"])
        self._build_queues(with_idx=True)

    def forward(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, idx: Tensor, alpha: float = 0.0,
                neg_image_for_text: Tensor | None = None,
                neg_text_for_image: Tensor | None = None) -> dict[str, Tensor]:
        """``idx`` (B,): the image id of each pair; pairs that share it are positives of each other."""
        out = self.itc_itm(image, input_ids, attention_mask, alpha if self.distill else 0.0, idx=idx,
                           neg_image_for_text=neg_image_for_text, neg_text_for_image=neg_text_for_image,
                           negative_eps=0.0)
        return {"loss_ita": out["loss_ita"], "loss_itm": out["loss_itm"]}

    @torch.no_grad()
    def itm_scores(self, image_embeds: Tensor, text_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """Match score (ITM logit of 'match') for aligned rows of image tokens and text embeddings (N,)."""
        fused = self.fuse(text_embeds, attention_mask, image_embeds)
        return self.itm_head(fused[:, 0, :])[:, 1]

    @staticmethod
    def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: AlbefRetrieval,
                             notes: list[str] | None = None) -> dict[str, Tensor]:
        return resample_image_pos_embeds(strip_bert_prefix(state_dict, notes=notes), model, notes)
