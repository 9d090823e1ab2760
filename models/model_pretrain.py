"""ALBEF pretraining model: ITC + ITM + MLM with momentum distillation.

Official checkpoints ALBEF.pth / ALBEF_4M.pth load as they are: ``visual_encoder.*``, ``text_encoder.bert.*``,
``text_encoder.cls.*``, ``vision_proj``, ``text_proj``, ``temp``, ``itm_head``, the ``*_m`` momentum copies,
``image_queue``, ``text_queue``, ``queue_ptr``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from models.albef import AlbefBase, SpecialTokens, mask_tokens
from models.heads import itm_head
from models.layers import defer_gradient
from models.vit import resample_pos_embed


class AlbefPretrain(AlbefBase):
    def __init__(self, cfg: dict[str, Any], special: SpecialTokens) -> None:
        super().__init__(cfg, special)
        self.text_encoder = self._new_text_encoder(with_mlm_head=True)
        self._build_projections()
        self.itm_head = itm_head(self.bert_config.hidden_size)
        self._build_momentum(["visual_encoder", "vision_proj", "text_encoder", "text_proj"])
        self._build_queues()
        self.mlm_probability = float(self.cfg["mlm_probability"])
        # forward's loss reaches the word embeddings through the tied MLM decoder too, so during forward the lookup's
        # gradient can be sparse rows added into the decoder's table (one 94 MB table less in backward, BERT-base).
        self.sparse_word_grad = True

    def forward(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, alpha: float = 0.0,
                neg_image_for_text: Tensor | None = None, neg_text_for_image: Tensor | None = None,
                mlm_input_ids: Tensor | None = None, mlm_labels: Tensor | None = None) -> dict[str, Tensor]:
        """One pretraining step's losses. Negatives and MLM masks are drawn here unless passed in. The masked texts
        share the text and fusion passes of ITC/ITM (``itc_itm``)."""
        if mlm_input_ids is None or mlm_labels is None:
            mlm_input_ids, mlm_labels = mask_tokens(input_ids, self.special, self.mlm_probability)
        embeddings = self.text_encoder.bert.embeddings
        weight = self.text_encoder.cls.predictions.decoder.weight
        decoder_weight = None
        if (self.sparse_word_grad and torch.is_grad_enabled() and weight.requires_grad
                and weight is embeddings.word_embeddings.weight and not torch.compiler.is_compiling()):
            # Recorded before the embedding lookup, so the decoder's dense gradient reaches the weight after the
            # lookup's sparse one, and the two add in place (models.layers, defer_gradient).
            decoder_weight = defer_gradient(weight)
            embeddings.sparse_word_grad = True  # only here: this loss always has the decoder's dense part
        try:
            out = self.itc_itm(image, input_ids, attention_mask, alpha, neg_image_for_text=neg_image_for_text,
                               neg_text_for_image=neg_text_for_image, mlm_input_ids=mlm_input_ids)
        finally:
            embeddings.sparse_word_grad = False
        loss_mlm = self.mlm_loss(mlm_input_ids, mlm_labels, attention_mask, out["image_embeds"],
                                 out["image_embeds_m"], alpha, hidden=out["mlm_hidden"],
                                 decoder_weight=decoder_weight)
        return {"loss_ita": out["loss_ita"], "loss_itm": out["loss_itm"], "loss_mlm": loss_mlm}

    @staticmethod
    def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: AlbefPretrain,
                             notes: list[str] | None = None) -> dict[str, Tensor]:
        """Official pretraining checkpoints need no key surgery; only ``pos_embed`` is resampled for another
        image_res (both encoders)."""
        state_dict = resample_pos_embed(state_dict, model.visual_encoder, "visual_encoder.", notes)
        return resample_pos_embed(state_dict, model.visual_encoder_m, "visual_encoder_m.", notes)
