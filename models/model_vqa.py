"""VQA model: the question is encoded with image fusion (all text-encoder layers); a causal answer decoder with
``L - fusion_layer`` layers cross-attends to the question states and generates the answer.

Training loss: per-answer summed negative log-likelihood weighted by the answer's annotator share, summed over the
flattened answers of the batch and divided by the number of questions (ALBEF), with optional momentum distillation.
Evaluation ranks a fixed answer list: first-token probabilities pick ``k`` candidates, then the full-sequence
likelihood re-ranks them (``rank_answers``), batched over every question and candidate at once.

Key surgery from a pretraining checkpoint (documented, ALBEF's): ``text_encoder.bert.*`` -> ``text_encoder.*`` for the
question encoder; the decoder starts from the pretrained fusion layers: ``text_encoder.bert.encoder.layer.{l}`` (l >=
fusion_layer) -> ``text_decoder.bert.encoder.layer.{l - fusion_layer}``, embeddings and the MLM head ->
``text_decoder.bert.embeddings`` / ``text_decoder.cls``; the same for the ``_m`` copies. vqa.pth loads as it is.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from models.albef import AlbefBase, SpecialTokens, distilling, resample_image_pos_embeds
from models.xbert import decoder_nll

_ENCODER_KEY = re.compile(r"^(text_encoder(?:_m)?)\.bert\.(.*)$")
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.*)$")


class AlbefVQA(AlbefBase):
    def __init__(self, cfg: dict[str, Any], special: SpecialTokens) -> None:
        super().__init__(cfg, special)
        self.text_encoder = self._new_text_encoder(with_mlm_head=False)
        fusion = self.bert_config.fusion_layer
        decoder_config = self.bert_config.replace(
            fusion_layer=0, num_hidden_layers=self.bert_config.num_hidden_layers - fusion,
            encoder_width=self.bert_config.hidden_size)
        self.text_decoder = self._new_text_encoder(with_mlm_head=True, bert_config=decoder_config, causal=True)
        if self.distill:
            self._build_momentum(["visual_encoder", "text_encoder", "text_decoder"])

    def encode_question(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, momentum: bool = False
                        ) -> Tensor:
        suffix = "_m" if momentum else ""
        image_embeds = getattr(self, "visual_encoder" + suffix)(image)
        return getattr(self, "text_encoder" + suffix)(input_ids, attention_mask, encoder_hidden_states=image_embeds)

    def forward(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, answer_ids: Tensor,
                answer_mask: Tensor, answer_weights: Tensor, answers_per_question: Tensor,
                alpha: float = 0.0) -> dict[str, Tensor]:
        """``answer_ids`` (N, La): every question's candidate answers, flattened; ``answers_per_question`` (B,) how
        many belong to each question; ``answer_weights`` (N,) their weights."""
        question_states = self.encode_question(image, input_ids, attention_mask)
        states = question_states.repeat_interleave(answers_per_question, dim=0)  # (N, Lq, D)
        states_mask = attention_mask.repeat_interleave(answers_per_question, dim=0)
        labels = answer_ids.masked_fill(answer_ids == self.special.pad, -100)
        soft_labels = None
        if self.distill and distilling(alpha):
            with torch.no_grad():
                self.momentum_update()
                states_m = self.encode_question(image, input_ids, attention_mask, momentum=True)
                states_m = states_m.repeat_interleave(answers_per_question, dim=0)
                logits_m = self.text_decoder_m(answer_ids, answer_mask, encoder_hidden_states=states_m,
                                               encoder_attention_mask=states_mask)
                soft_labels = F.softmax(logits_m[:, :-1, :], dim=-1)
        logits = self.text_decoder(answer_ids, answer_mask, encoder_hidden_states=states,
                                   encoder_attention_mask=states_mask)
        nll = decoder_nll(logits, labels, soft_labels=soft_labels, alpha=alpha)  # (N,)
        return {"loss_vqa": (answer_weights * nll).sum() / image.shape[0]}

    @torch.no_grad()
    def rank_answers(self, question_states: Tensor, question_mask: Tensor, answer_ids: Tensor, answer_mask: Tensor,
                     k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` answers per question: (indices into the answer list (B, k), probabilities (B, k)).

        Stage 1: the decoder's first-step distribution (from the start token) picks the ``k`` answers whose first
        token is likeliest. Stage 2: for those, log p(first token) + log p(whole answer) (the sequence NLL includes the
        first token again, as ALBEF computes it), softmax over the k, sorted."""
        num_questions = question_states.shape[0]
        k = min(k, answer_ids.shape[0])
        start_ids = answer_ids[:1, :1].expand(num_questions, 1)  # the [CLS] start token
        first_logits = self.text_decoder(start_ids, None, encoder_hidden_states=question_states,
                                         encoder_attention_mask=question_mask)[:, 0, :]  # (B, V)
        first_probs = F.softmax(first_logits, dim=1).index_select(1, answer_ids[:, 1])  # (B, A)
        topk_probs, topk_ids = first_probs.topk(k, dim=1)  # (B, k)
        cand_ids = answer_ids[topk_ids.view(-1)]  # (B*k, La)
        cand_mask = answer_mask[topk_ids.view(-1)]
        labels = cand_ids.masked_fill(cand_ids == self.special.pad, -100)
        states = question_states.repeat_interleave(k, dim=0)
        states_mask = question_mask.repeat_interleave(k, dim=0)
        logits = self.text_decoder(cand_ids, cand_mask, encoder_hidden_states=states,
                                   encoder_attention_mask=states_mask)
        nll = decoder_nll(logits, labels).view(num_questions, k)
        scores = topk_probs.log() - nll  # (B, k) log-probabilities of the candidates
        probs = F.softmax(scores, dim=-1)
        probs, order = probs.topk(k, dim=1)
        return torch.gather(topk_ids, 1, order), probs

    @staticmethod
    def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: AlbefVQA,
                             notes: list[str] | None = None) -> dict[str, Tensor]:
        if any(key.startswith("text_decoder.") for key in state_dict):  # already a VQA checkpoint
            return resample_image_pos_embeds(dict(state_dict), model, notes)
        fusion = model.bert_config.fusion_layer
        out: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            match = _ENCODER_KEY.match(key)
            if match is None:
                name, _, rest = key.partition(".")
                if name in ("text_encoder", "text_encoder_m") and rest.startswith("cls."):
                    out[key.replace("text_encoder", "text_decoder", 1)] = value
                else:
                    out[key] = value
                continue
            encoder, rest = match.group(1), match.group(2)
            decoder = encoder.replace("text_encoder", "text_decoder")
            out[f"{encoder}.{rest}"] = value  # question encoder: every layer
            layer = _LAYER.match(rest)
            if layer is None:  # embeddings
                out[f"{decoder}.bert.{rest}"] = value
            elif int(layer.group(1)) >= fusion:
                out[f"{decoder}.bert.encoder.layer.{int(layer.group(1)) - fusion}.{layer.group(2)}"] = value
        if notes is not None and any(key.startswith("text_decoder.bert.") for key in out):
            notes.append("text_encoder.bert.* -> text_encoder.*; answer decoder text_decoder.* from the pretrained "
                         f"embeddings, fusion layers {fusion}+ and MLM head")
        return resample_image_pos_embeds(out, model, notes)
