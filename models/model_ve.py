"""SNLI-VE model: 3-way classification (contradiction 0, neutral 1, entailment 2 - the official label order) from
the fused [CLS] through an MLP head, with optional momentum distillation.

Official SNLI-VE checkpoints load as they are; from a pretraining checkpoint ``text_encoder.bert.*`` ->
``text_encoder.*`` and the head starts at random.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from models.albef import AlbefBase, SpecialTokens, distilling, resample_image_pos_embeds, strip_bert_prefix
from models.heads import mlp_head


class AlbefClassifier(AlbefBase):
    """Fused [CLS] -> MLP head, cross-entropy, optional distillation from momentum copies (VE and NLVR2).
    A subclass defines ``logits(image, input_ids, attention_mask, momentum=False) -> (B, num_classes)``."""

    num_classes = 2

    def _build_classifier(self) -> None:
        self.cls_head = mlp_head(self.bert_config.hidden_size, self.num_classes)
        if self.distill:
            self._build_momentum(["visual_encoder", "text_encoder", "cls_head"])

    def forward(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, targets: Tensor,
                alpha: float = 0.0) -> dict[str, Tensor]:
        prediction = self.logits(image, input_ids, attention_mask)
        loss = F.cross_entropy(prediction, targets)
        if self.distill and distilling(alpha):
            self.momentum_update()
            prediction_m = self.logits(image, input_ids, attention_mask, momentum=True).detach()
            soft = -(F.log_softmax(prediction, dim=1) * F.softmax(prediction_m, dim=1)).sum(dim=1).mean()
            loss = (1 - alpha) * loss + alpha * soft
        return {"loss_cls": loss}


class AlbefVE(AlbefClassifier):
    num_classes = 3

    def __init__(self, cfg: dict[str, Any], special: SpecialTokens) -> None:
        super().__init__(cfg, special)
        self.text_encoder = self._new_text_encoder(with_mlm_head=False)
        self._build_classifier()

    def logits(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, momentum: bool = False) -> Tensor:
        suffix = "_m" if momentum else ""
        image_embeds = getattr(self, "visual_encoder" + suffix)(image)
        fused = getattr(self, "text_encoder" + suffix)(input_ids, attention_mask, encoder_hidden_states=image_embeds)
        return getattr(self, "cls_head" + suffix)(fused[:, 0, :])

    @staticmethod
    def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: AlbefVE,
                             notes: list[str] | None = None) -> dict[str, Tensor]:
        return resample_image_pos_embeds(strip_bert_prefix(state_dict, notes=notes), model, notes)
