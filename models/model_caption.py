"""Captioning model (BLIP-style on the ALBEF backbone): the image encoder and an image-grounded text decoder, our BERT
with causal self-attention and cross-attention to the image tokens in every layer (``fusion_layer=0``).

Training: language-modelling loss with label smoothing, averaged over the scored tokens; the first
``prompt_length`` tokens ([CLS] + the prompt, e.g. "a picture of ") are context, never scored. Generation
(``generate``) runs ``models.generation`` over a key/value cache: the image key/values of every cross-attention are
projected once per image, the self-attention keys/values grow by one token per step.

Key surgery from a pretraining / retrieval checkpoint (``checkpoint_filter_fn``): the decoder layer ``l`` takes the
text encoder's layer ``l`` (``text_encoder[.bert].encoder.layer.{l}`` -> ``text_decoder.bert.encoder.layer.{l}``,
embeddings and the MLM head ``text_encoder.cls`` likewise). The layers below ``fusion_layer`` have no cross-attention
in the encoder; they borrow that of the fusion layer ``fusion_layer + l % (L - fusion_layer)``, so every layer starts
from pretrained image-text attention rather than from noise. The image encoder loads as it is; momentum copies,
queues, projections and the ITM head are not used (reported as unused keys). A captioning checkpoint loads as it is.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from models.albef import AlbefBase, SpecialTokens, resample_image_pos_embeds
from models.generation import GenerationSettings, generate
from models.xbert import decoder_nll

_ENCODER_LAYER = re.compile(r"^text_encoder\.(?:bert\.)?encoder\.layer\.(\d+)\.(.*)$")
_ENCODER_REST = re.compile(r"^text_encoder\.(?:bert\.)?(embeddings\..*)$")


class AlbefCaption(AlbefBase):
    def __init__(self, cfg: dict[str, Any], special: SpecialTokens) -> None:
        super().__init__(cfg, special)
        decoder_config = self.bert_config.replace(fusion_layer=0, encoder_width=self.vision_width)
        self.text_decoder = self._new_text_encoder(with_mlm_head=True, bert_config=decoder_config, causal=True)

    def forward(self, image: Tensor, text_ids: Tensor, text_mask: Tensor, prompt_length: int,
                label_smoothing: float = 0.0) -> dict[str, Tensor]:
        """``text_ids`` (B, L): [CLS] prompt caption [SEP] padding; the first ``prompt_length`` tokens are not scored.
        Returns the token-averaged (label-smoothed) negative log-likelihood as ``loss_caption``."""
        image_embeds = self.encode_image(image)  # (B, 1+P, D_v)
        labels = text_ids.masked_fill(text_mask == 0, -100)
        labels[:, :prompt_length] = -100
        logits = self.text_decoder(text_ids, text_mask, encoder_hidden_states=image_embeds)  # (B, L, V)
        nll = decoder_nll(logits, labels, label_smoothing=label_smoothing)  # (B,)
        scored = (labels[:, 1:] != -100).sum().clamp(min=1)
        return {"loss_caption": nll.sum() / scored}

    # ---- generation ------------------------------------------------------------------------------------------------
    def decode_step(self, new_ids: Tensor, image_kv: list[tuple[Tensor, Tensor]],
                    cache: list[tuple[Tensor, Tensor]] | None) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Next-token logits (N, V) after ``new_ids`` (N, t), with the self-attention key/values of the earlier
        tokens in ``cache`` (one (key, value) of shape (N, nh, T, hd) per layer; None before the first call).
        Same numbers as a full causal forward pass over the whole sequence (the layers' own modules are reused)."""
        bert = self.text_decoder.bert
        past = 0 if cache is None else cache[0][0].shape[2]
        if cache is not None and new_ids.shape[1] != 1:
            raise ValueError(f"decode_step extends a cached sequence by one token, got {new_ids.shape[1]}")
        hidden = bert.embeddings(new_ids, past_length=past)  # (N, t, D)
        batch, length, _ = hidden.shape
        new_cache = []
        for index, layer in enumerate(bert.encoder.layer):
            attention = layer.attention.self
            key, value = attention.project_kv(hidden)  # (N, nh, t, hd)
            if cache is not None:
                key = torch.cat([cache[index][0], key], dim=2)
                value = torch.cat([cache[index][1], value], dim=2)
            new_cache.append((key, value))
            query = attention.query(hidden).view(batch, length, attention.num_heads, attention.head_dim).transpose(1, 2)
            # The prompt attends causally; a single new token sees every cached position.
            context = F.scaled_dot_product_attention(query, key, value, is_causal=cache is None and length > 1)
            context = context.transpose(1, 2).reshape(batch, length, -1)  # (N, t, D)
            hidden = layer.attention.output(context, hidden)
            hidden = layer.crossattention(hidden, None, kv=image_kv[index])
            hidden = layer.output(layer.intermediate(hidden), hidden)
        return self.text_decoder.cls(hidden[:, -1, :]), new_cache

    @torch.no_grad()
    def generate(self, image: Tensor, prompt_ids: Tensor, settings: GenerationSettings,
                 generator: torch.Generator | None = None) -> Tensor:
        """Caption word pieces (B * n, max_length) for normalised images (B, 3, H, W), padded after the end token;
        n = ``settings.num_return_sequences`` captions per image, rows b * n .. b * n + n - 1 for image b.
        ``prompt_ids`` (P,) or (B, P): [CLS] + the prompt's word pieces, without an end token."""
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None, :].expand(image.shape[0], -1)
        image_embeds = self.encode_image(image)
        rows = settings.rows_per_prompt  # decoder rows per image: its beams or its samples
        image_kv = [(key.repeat_interleave(rows, dim=0), value.repeat_interleave(rows, dim=0))
                    for key, value in self.text_decoder.bert.precompute_image_kv(image_embeds)]

        def step(new_ids: Tensor, cache: Any) -> tuple[Tensor, Any]:
            return self.decode_step(new_ids, image_kv, cache)

        return generate(step, prompt_ids, settings, eos_id=self.special.sep, pad_id=self.special.pad,
                        generator=generator)

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    @staticmethod
    def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: AlbefCaption,
                             notes: list[str] | None = None) -> dict[str, Tensor]:
        if any(key.startswith("text_decoder.") for key in state_dict):  # already a captioning checkpoint
            return resample_image_pos_embeds(dict(state_dict), model, notes)
        fusion = model.bert_config.fusion_layer
        num_layers = model.bert_config.num_hidden_layers
        out: dict[str, Tensor] = {}
        cross: dict[int, dict[str, Tensor]] = {}
        for key, value in state_dict.items():
            layer = _ENCODER_LAYER.match(key)
            rest = _ENCODER_REST.match(key)
            if layer is not None:
                index, name = int(layer.group(1)), layer.group(2)
                out[f"text_decoder.bert.encoder.layer.{index}.{name}"] = value
                if name.startswith("crossattention."):
                    cross.setdefault(index, {})[name] = value
            elif rest is not None:
                out[f"text_decoder.bert.{rest.group(1)}"] = value
            elif key.startswith("text_encoder.cls."):
                out[key.replace("text_encoder", "text_decoder", 1)] = value
            else:
                out[key] = value
        if cross and fusion < num_layers:
            for index in range(fusion):
                source = cross.get(fusion + index % (num_layers - fusion), {})
                for name, value in source.items():
                    out[f"text_decoder.bert.encoder.layer.{index}.{name}"] = value
        if notes is not None and any(key.startswith("text_decoder.") for key in out):
            notes.append("decoder text_decoder.* from the text encoder, layer l from layer l"
                         + (f", cross-attention of layers 0-{fusion - 1} from the fusion layers" if cross else ""))
        return resample_image_pos_embeds(out, model, notes)
