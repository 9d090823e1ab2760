"""ViECap-style prefix captioner: an aligned feature -> mapping Transformer -> soft prompt of GPT-2, which then writes
the caption after an optional entity hard prompt.

Trained on captions only: the feature is the caption's own text feature in an image-text space (our ITC space, or
CLIP's), L2-normalised, with Gaussian noise of variance ``noise_variance`` added in training (ViECap: 0.016), which
bridges the gap between text and image features; at inference the image's feature (no noise) takes its place.

- `MappingNetwork`: the feature is mapped linearly to ``prefix_length`` tokens of the language model's width, which a
  Transformer encoder (``mapping_layers``) reads together with ``prefix_length`` learnt constant tokens; the outputs at
  the constant tokens are the soft prompt (ClipCap's transformer mapper, which ViECap uses).
- The language model is transformers' ``GPT2LMHeadModel`` (``gpt2`` weights, or random init from a config for tests
  and the demo). The loss is the cross-entropy of the caption tokens and the end token; prompt positions carry the
  label IGNORE_INDEX (dataset.prefix_text.prompt_sequences lays the rows out).
- Generation goes through transformers' ``generate(inputs_embeds=...)`` (beam search, sampling, repetition penalty,
  n-gram blocking, minimum length): GPT-2 is a ``PreTrainedModel``, so no second hand-written search is needed. Its
  processors see the generated tokens only (the prompt is given as embeddings); models.generation's own loop, used by
  the ALBEF decoder, lets them see the prompt too.
- Feature sources (frozen, outside the trained model, never in its checkpoint): `AlbefFeatures` (the ITC features of
  an ALBEF / AlignFuse checkpoint: text_proj of the text [CLS], vision_proj of the image [CLS]) and `OpenClipFeatures`
  (an open_clip model). `zero_shot_entities` finds an image's entities against the entity vocabulary.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.generation import GenerationSettings

SOFT_PROMPT_SLOT = -1  # = dataset.prefix_text.SOFT_PROMPT_SLOT (models do not import the dataset package)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class PrefixCfg:
    """The mapping network and noise settings (the ``prefix:`` keys of Caption.py's prefix_lm family)."""

    feature_dim: int  # width of the aligned features (512 for CLIP ViT-B/32, model.embed_dim for ALBEF)
    prefix_length: int = 10  # soft prompt tokens
    mapping_layers: int = 8  # Transformer layers of the mapping network
    mapping_heads: int = 8  # attention heads of the mapping network (must divide the language model's width)
    noise_variance: float = 0.016  # variance of the Gaussian noise added to the feature in training (0 = none)

    def __post_init__(self) -> None:
        if self.prefix_length < 1 or self.mapping_layers < 1 or self.mapping_heads < 1:
            raise ValueError(f"prefix.prefix_length, mapping_layers and mapping_heads must be >= 1, got "
                             f"{self.prefix_length}, {self.mapping_layers}, {self.mapping_heads}")
        if self.noise_variance < 0:
            raise ValueError(f"prefix.noise_variance must be >= 0, got {self.noise_variance}")


class MappingNetwork(nn.Module):
    """feature (B, D_f) -> soft prompt (B, prefix_length, D_lm)."""

    def __init__(self, feature_dim: int, width: int, prefix_length: int, layers: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"prefix.mapping_heads {heads} must divide the language model's width {width}")
        self.prefix_length = prefix_length
        self.project = nn.Linear(feature_dim, prefix_length * width)
        self.constant = nn.Parameter(torch.randn(prefix_length, width))
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, feature: Tensor) -> Tensor:
        batch = feature.shape[0]
        mapped = self.project(feature).view(batch, self.prefix_length, -1)  # (B, P, D)
        tokens = torch.cat([mapped, self.constant.expand(batch, -1, -1)], dim=1)  # (B, 2P, D)
        return self.transformer(tokens)[:, self.prefix_length :]  # (B, P, D)


class PrefixCaptioner(nn.Module):
    """Mapping network + GPT-2. ``forward`` gives the caption loss; ``generate`` the captions of features."""

    def __init__(self, cfg: PrefixCfg, language_model: nn.Module, freeze_language_model: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.language_model = language_model
        width = language_model.config.n_embd
        self.mapping = MappingNetwork(cfg.feature_dim, width, cfg.prefix_length, cfg.mapping_layers,
                                      cfg.mapping_heads)
        if freeze_language_model:
            self.language_model.requires_grad_(False)

    def add_noise(self, feature: Tensor) -> Tensor:
        """Training only: the feature plus N(0, noise_variance) in every dimension (ViECap's noise injection)."""
        if not self.training or self.cfg.noise_variance == 0:
            return feature
        return feature + torch.randn_like(feature) * math.sqrt(self.cfg.noise_variance)

    def embed(self, feature: Tensor, token_ids: Tensor) -> Tensor:
        """Input embeddings (B, L, D): the word embeddings of ``token_ids``, the soft prompt at its slots."""
        soft = self.mapping(self.add_noise(feature))  # (B, P, D)
        embeds = self.language_model.get_input_embeddings()(token_ids.clamp(min=0))  # (B, L, D)
        slots = token_ids == SOFT_PROMPT_SLOT  # P slots per row, in order
        return embeds.masked_scatter(slots[..., None], soft.to(embeds.dtype))

    @staticmethod
    def position_ids(attention_mask: Tensor) -> Tensor:
        """Positions counted over the real tokens (0 on padding), as transformers' generate counts them, so that
        left-padded generation and right-padded training place every token at the same position."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def forward(self, feature: Tensor, token_ids: Tensor, attention_mask: Tensor, labels: Tensor
                ) -> dict[str, Tensor]:
        embeds = self.embed(feature, token_ids)
        logits = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                     position_ids=self.position_ids(attention_mask)).logits  # (B, L, V)
        # Position t predicts token t + 1; only caption tokens (and the end token) carry a label.
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX)
        return {"loss_caption": loss}

    @torch.no_grad()
    def generate(self, feature: Tensor, token_ids: Tensor, attention_mask: Tensor, settings: GenerationSettings,
                 eos_id: int) -> Tensor:
        """Generated tokens (B * n, settings.max_length), padded with the end token, for left-padded prompt rows
        (soft prompt slots and hard prompt, no caption); n = settings.num_return_sequences, rows b * n + j."""
        embeds = self.embed(feature, token_ids)
        config = generation_config(settings, eos_id)
        out = self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                           generation_config=config)
        out = out[:, -settings.max_length :] if out.shape[1] > settings.max_length else out
        return F.pad(out, (0, settings.max_length - out.shape[1]), value=eos_id)


def generation_config(settings: GenerationSettings, eos_id: int) -> Any:
    """transformers' GenerationConfig for our ``generation:`` settings (lengths count new tokens only)."""
    from transformers import GenerationConfig

    sample = settings.sample
    return GenerationConfig(
        max_new_tokens=settings.max_length, min_new_tokens=settings.min_length, do_sample=sample,
        num_beams=1 if sample else settings.num_beams, num_return_sequences=settings.num_return_sequences,
        repetition_penalty=settings.repetition_penalty, no_repeat_ngram_size=settings.no_repeat_ngram_size,
        length_penalty=settings.length_penalty, early_stopping=False,
        top_p=settings.top_p if sample else None, top_k=settings.top_k if sample else None,
        temperature=settings.temperature if sample else None,
        eos_token_id=eos_id, pad_token_id=eos_id, bos_token_id=eos_id,
    )


def build_language_model(name_or_path: str, overrides: dict[str, Any], vocab_size: int, eos_id: int) -> nn.Module:
    """GPT-2: pretrained weights by hub name or folder (``gpt2``), or, with ``name_or_path`` "", random init from
    GPT2Config(**overrides) (tests and the demo; nothing is downloaded) with the tokenizer's vocabulary size."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if name_or_path:
        model = GPT2LMHeadModel.from_pretrained(name_or_path, **overrides)
        if model.config.vocab_size < vocab_size:
            raise ValueError(f"prefix.language_model {name_or_path} has {model.config.vocab_size} tokens, fewer than "
                             f"its tokenizer's {vocab_size}: use the tokenizer the model was trained with")
        return model
    unknown = sorted(set(overrides) - set(GPT2Config().to_dict()))
    if unknown:
        raise ValueError(f"prefix.language_model_overrides: unknown GPT2Config keys {unknown}")
    ids = {"vocab_size": vocab_size, "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    return GPT2LMHeadModel(GPT2Config(**{**ids, **overrides}))


# ---------------------------------------------------------------------------------------------------- feature sources


class FeatureSource(nn.Module, abc.ABC):
    """A frozen encoder into an aligned image-text space: normalised text and image features of width ``dim``, and
    the logit scale of its contrastive similarities (1 / temperature), for zero-shot classification."""

    dim: int

    @abc.abstractmethod
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """(N, dim) normalised features of the texts."""

    @abc.abstractmethod
    def encode_image(self, image: Tensor) -> Tensor:
        """(B, dim) normalised features of normalised images (B, 3, H, W)."""

    @abc.abstractmethod
    def logit_scale(self) -> float:
        """The factor of the cosine similarities before a softmax over classes."""


class AlbefFeatures(FeatureSource):
    """ITC features of an ALBEF-family model: ``text_feat`` (text_proj of the text-only encoder's [CLS]) and
    ``image_feat`` (vision_proj of the image [CLS]); ``tokenize(texts) -> (ids, mask)`` is the model's tokenizer."""

    def __init__(self, model: nn.Module, tokenize: Callable[[Sequence[str]], tuple[Tensor, Tensor]]) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenize = tokenize
        self.dim = int(model.text_proj.out_features)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        device = self.model.temp.device
        ids, mask = self.tokenize(texts)
        return self.model.text_feat(self.model.encode_text(ids.to(device), mask.to(device))).float()

    @torch.no_grad()
    def encode_image(self, image: Tensor) -> Tensor:
        return self.model.image_feat(self.model.encode_image(image)).float()

    def logit_scale(self) -> float:
        return 1.0 / float(self.model.temp)


class OpenClipFeatures(FeatureSource):
    """An open_clip model's normalised text and image features; ``tokenizer`` is open_clip's for that model."""

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], Tensor]) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        with torch.no_grad():
            self.dim = int(model.encode_text(tokenizer(["a"])).shape[-1])

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        device = next(self.model.parameters()).device
        return F.normalize(self.model.encode_text(self.tokenizer(list(texts)).to(device)).float(), dim=-1)

    @torch.no_grad()
    def encode_image(self, image: Tensor) -> Tensor:
        return F.normalize(self.model.encode_image(image).float(), dim=-1)

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())


def zero_shot_entities(image_feat: Tensor, entity_feats: Tensor, logit_scale: float, names: Sequence[str],
                       top_k: int, threshold: float) -> list[list[str]]:
    """Each image's entities: the ``top_k`` most probable entities (softmax over the vocabulary of the scaled cosine
    similarities of (B, D) image and (E, D) entity-prompt features) whose probability is at least ``threshold``, most
    probable first."""
    probs = (logit_scale * image_feat @ entity_feats.t()).softmax(dim=-1)  # (B, E)
    top = probs.topk(min(top_k, probs.shape[1]), dim=-1)
    return [[names[int(j)] for p, j in zip(row_p.tolist(), row_j.tolist(), strict=True) if p >= threshold]
            for row_p, row_j in zip(top.values, top.indices, strict=True)]
