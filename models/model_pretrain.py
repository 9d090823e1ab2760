"""ALBEF pretraining model: ITC + ITM + MLM with momentum distillation.

Official checkpoints ALBEF.pth / ALBEF_4M.pth load as they are: ``visual_encoder.*``, ``text_encoder.bert.*``,
``text_encoder.cls.*``, ``vision_proj``, ``text_proj``, ``temp``, ``itm_head``, the ``*_m`` momentum copies,
``image_queue``, ``text_queue``, ``queue_ptr``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from models.albef import AlbefBase, SpecialTokens, mask_tokens
from models.heads import itm_head
from models.vit import resample_pos_embed


class AlbefPretrain(AlbefBase):
    # Every forward's loss reads the tied MLM decoder: with model.memory_efficient the word lookup's gradient can be
    # sparse rows added into the decoder's (models.layers.tie_sparse_word_gradient).
    loss_reads_mlm_decoder = True

    def __init__(self, cfg: dict[str, Any], special: SpecialTokens) -> None:
        super().__init__(cfg, special)
        self.text_encoder = self._new_text_encoder(with_mlm_head=True)
        self._build_projections()
        self.itm_head = itm_head(self.bert_config.hidden_size)
        self._build_momentum(["visual_encoder", "vision_proj", "text_encoder", "text_proj"])
        self._build_queues()
        self.mlm_probability = float(self.model_cfg.mlm_probability)

    def forward(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, alpha: float = 0.0,
                neg_image_for_text: Tensor | None = None, neg_text_for_image: Tensor | None = None,
                mlm_input_ids: Tensor | None = None, mlm_labels: Tensor | None = None) -> dict[str, Tensor]:
        """One pretraining step's losses. Negatives and MLM masks are drawn here unless passed in. The masked texts
        share the text and fusion passes of ITC/ITM (``itc_itm``)."""
        if mlm_input_ids is None or mlm_labels is None:
            mlm_input_ids, mlm_labels = mask_tokens(input_ids, self.special, self.mlm_probability)
        out = self.itc_itm(image, input_ids, attention_mask, alpha, neg_image_for_text=neg_image_for_text,
                           neg_text_for_image=neg_text_for_image, mlm_input_ids=mlm_input_ids)
        loss_mlm = self.mlm_loss(mlm_input_ids, mlm_labels, attention_mask, out["image_embeds"],
                                 out["image_embeds_m"], alpha, hidden=out["mlm_hidden"])
        return {"loss_ita": out["loss_ita"], "loss_itm": out["loss_itm"], "loss_mlm": loss_mlm}

    @staticmethod
    def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: AlbefPretrain,
                             notes: list[str] | None = None) -> dict[str, Tensor]:
        """Official pretraining checkpoints need no key surgery; only ``pos_embed`` is resampled for another
        image_res (both encoders)."""
        state_dict = resample_pos_embed(state_dict, model.visual_encoder, "visual_encoder.", notes)
        return resample_pos_embed(state_dict, model.visual_encoder_m, "visual_encoder_m.", notes)
