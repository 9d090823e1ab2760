"""Our BERT text / fusion encoder and decoder, in ALBEF's structure and with ALBEF's state_dict key names.

Why our own code instead of transformers' BertModel: ALBEF puts cross-attention to the image only in the layers from
``fusion_layer`` up, runs the text-only layers and the fusion layers as separate calls (``mode='text'`` then
``mode='fusion'``, the fusion call starting from the text embeddings), lets NLVR2's layer pairs attend to two images in
turn, and shares the image key/value projections between passes. transformers' BertModel adds cross-attention to every
layer or none and has none of these entry points. Everything else (tokenizer, BertConfig, loading bert-base-uncased
weights) comes from transformers.

Key names follow BERT / ALBEF so official checkpoints load as they are:
``bert.embeddings.*``, ``bert.encoder.layer.{i}.attention.self.{query,key,value}``,
``...attention.output.{dense,LayerNorm}``, ``...crossattention.*`` (fusion layers only), ``...intermediate.dense``,
``...output.{dense,LayerNorm}``, and for the language-model head ``cls.predictions.{transform.dense,
transform.LayerNorm,decoder,bias}`` (decoder weight tied to the word embeddings, decoder bias tied to ``bias``).

Masks are ALBEF's additive masks ((1 - mask) * -10000) so that numbers match the reference; attention runs through
``F.scaled_dot_product_attention`` unless an attention map is being captured for Grad-CAM. The modules here are the
plain maths; their memory-efficient variants (models.layers) replace some of them when the model is built with
``model.memory_efficient`` on. ``BertModel.fuse_pairs`` is the fusion pass of retrieval re-ranking, with its
evaluation shortcuts (image key/values projected once, text-only work once per text, the last layer for [CLS] only).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
MASK_VALUE = -10000.0  # ALBEF / BERT additive mask value; kept for numerical parity with official checkpoints


@dataclass
class BertConfig:
    """The fields of a BERT config.json that the model uses, plus ALBEF's ``fusion_layer`` and ``encoder_width``."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    fusion_layer: int = 6  # layers [0, fusion_layer) are text-only; [fusion_layer, L) add cross-attention
    encoder_width: int = 768  # width of the image tokens the cross-attention reads
    num_image_streams: int = 1  # 2 for NLVR2: fusion layers alternate between two images
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BertConfig:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        return cls(**{k: v for k, v in values.items() if k in known},
                   extra={k: v for k, v in values.items() if k not in known})

    @classmethod
    def from_json_file(cls, path: str | Path) -> BertConfig:
        path = Path(path)
        if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
            path = REPO_ROOT / path  # configs name it relative to the repository (configs/config_bert.json)
        if not path.is_file():
            raise FileNotFoundError(f"BERT config file not found: {path} (relative paths are tried from the current "
                                    f"directory, then from {REPO_ROOT})")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> BertConfig:
        values = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        values.update(changes)
        return BertConfig(**values, extra=dict(self.extra))


def _activation(name: str):
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported hidden_act {name!r} (expected gelu, gelu_new or relu)")


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, S) 1/0 padding mask -> (B, 1, 1, S) additive mask; None when nothing is masked is not decided here."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE


def causal_additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, L) padding mask -> (B, 1, L, L) additive mask that also hides future positions (decoder)."""
    length = mask.shape[1]
    causal = torch.tril(torch.ones(length, length, device=mask.device, dtype=dtype))
    combined = causal[None, None, :, :] * mask[:, None, None, :].to(dtype)  # (B, 1, L, L)
    return (1.0 - combined) * MASK_VALUE


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Persistent: official checkpoints carry it.
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None, :], persistent=True)

    def forward(self, input_ids: Tensor, past_length: int = 0) -> Tensor:
        length = input_ids.shape[1]
        position_ids = self.position_ids[:, past_length:past_length + length]
        words = self.word_embeddings(input_ids)
        # Same summation order as BERT (word + token type, then position): bit-level parity with the reference.
        embeds = words + self.token_type_embeddings.weight[0]  # token types are all 0
        embeds = embeds + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeds))


def gather_rows(tensor: Tensor, rows: Tensor | None) -> Tensor:
    """``tensor[rows]`` along dim 0, or ``tensor`` when ``rows`` is None."""
    return tensor if rows is None else tensor.index_select(0, rows)


class GroupedImageKV(NamedTuple):
    """One fusion layer's image key/values (N, nh, S, hd) for query rows sorted by image (``BertModel.fuse_pairs``):
    row b reads image ``rows[b]``. With ``runs`` [(image, number of rows)] each image's rows are folded into one
    query sequence against its key/values, read in place (CPU: memory traffic is what costs); with ``runs`` None each
    row's key/values are copied and attention runs over ``chunk_rows`` rows per call (GPU: launches are what cost).
    Evaluation only: no mask (every image token is real), no dropout."""

    key: Tensor
    value: Tensor
    rows: Tensor
    runs: list[tuple[int, int]] | None
    chunk_rows: int

    def attend(self, query: Tensor) -> Tensor:
        """Context (B, nh, Lq, hd) of query heads (B, nh, Lq, hd)."""
        if self.runs is None:
            return torch.cat([F.scaled_dot_product_attention(query[s:s + self.chunk_rows],
                                                             self.key[self.rows[s:s + self.chunk_rows]],
                                                             self.value[self.rows[s:s + self.chunk_rows]])
                              for s in range(0, query.shape[0], self.chunk_rows)])
        contexts, start = [], 0
        _, heads, query_len, head_dim = query.shape
        for image, count in self.runs:
            folded = query[start:start + count].transpose(0, 1).reshape(1, heads, count * query_len, head_dim)
            context = F.scaled_dot_product_attention(folded, self.key[image:image + 1], self.value[image:image + 1])
            contexts.append(context.reshape(heads, count, query_len, head_dim).transpose(0, 1))
            start += count
        assert start == query.shape[0], "runs must cover every query row"
        return torch.cat(contexts)


class BertSelfAttention(nn.Module):
    """Multi-head attention; as cross-attention its key/value read ``encoder_width``-wide image tokens."""

    def __init__(self, config: BertConfig, is_cross_attention: bool) -> None:
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        kv_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        # Grad-CAM: when set, attention is computed explicitly and its probabilities (and their gradient) are kept.
        self.save_attention = False
        self.attention_map: Tensor | None = None
        self.attention_grad: Tensor | None = None

    def _split(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, L, hd)

    def project_kv(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """Key and value heads for ``states`` (B, S, D_kv) -> 2 x (B, nh, S, hd); computed once, reusable.

        Stored head-major (contiguous): attention by explicit matmuls (models.layers' dropout attention, Grad-CAM)
        then reads them as they are, where the (B, S, nh, hd) layout made it keep a copy of each for backward."""
        return self._split(self.key(states)).contiguous(), self._split(self.value(states)).contiguous()

    def _keep_grad(self, grad: Tensor) -> None:
        self.attention_grad = grad

    def forward(self, hidden_states: Tensor, mask: Tensor | None, kv: tuple | GroupedImageKV | None = None,
                kv_states: Tensor | None = None) -> Tensor:
        """``kv``: precomputed key/value heads, (key, value) or (key, value, rows) (``select_image_kv``), or a
        ``GroupedImageKV``; else they are projected from ``kv_states``, or from ``hidden_states`` (self-attention)."""
        query = self._split(self.query(hidden_states))  # (B, nh, L, hd)
        if isinstance(kv, GroupedImageKV):
            context = kv.attend(query)
        else:
            if kv is None:
                kv = self.project_kv(hidden_states if kv_states is None else kv_states)
            key, value, rows = kv if len(kv) == 3 else (*kv, None)
            context = self.attend(query, key, value, None if mask is None else mask.to(query.dtype), rows)
        batch, _, length, _ = context.shape
        return context.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, rows: Tensor | None) -> Tensor:
        """softmax(q k^T / sqrt(hd) + mask) v with dropout on the probabilities in training; query b reads key/value
        row ``rows[b]`` when given. Heads (B, nh, L|S, hd) -> (B, nh, L, hd)."""
        key, value = gather_rows(key, rows), gather_rows(value, rows)
        if not self.save_attention:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                  dropout_p=self.dropout_p if self.training else 0.0)
        scores = query @ key.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, nh, L, S)
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(dim=-1)
        self.attention_map = probs
        if probs.requires_grad:
            probs.register_hook(self._keep_grad)
        return F.dropout(probs, self.dropout_p, self.training) @ value


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, is_cross_attention: bool = False) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, is_cross_attention)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states: Tensor, mask: Tensor | None, kv: tuple[Tensor, Tensor] | None = None,
                kv_states: Tensor | None = None) -> Tensor:
        return self.output(self.self(hidden_states, mask, kv, kv_states), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _activation(config.hidden_act)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.act(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: Tensor, residual: Tensor) -> Tensor:
        return self.add_norm(self.dense(hidden_states), residual)

    def add_norm(self, projected: Tensor, residual: Tensor) -> Tensor:
        """Dropout, residual, LayerNorm after ``dense``."""
        return self.LayerNorm(self.dropout(projected) + residual)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig, has_cross_attention: bool) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.has_cross_attention = has_cross_attention
        if has_cross_attention:
            self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states: Tensor, self_mask: Tensor | None, image_states: Tensor | None = None,
                image_mask: Tensor | None = None, image_kv: tuple | GroupedImageKV | None = None) -> Tensor:
        return self.attend_image(self.self_attend(hidden_states, self_mask), image_states, image_mask, image_kv)

    def self_attend(self, hidden_states: Tensor, self_mask: Tensor | None, cls_only: bool = False) -> Tensor:
        """Self-attention + add & norm. ``cls_only``: the [CLS] position alone (B, 1, D), still reading every token."""
        if cls_only:
            return self.attention(hidden_states[:, :1], self_mask, kv_states=hidden_states)
        return self.attention(hidden_states, self_mask)

    def attend_image(self, hidden_states: Tensor, image_states: Tensor | None = None, image_mask: Tensor | None = None,
                     image_kv: tuple | GroupedImageKV | None = None) -> Tensor:
        """Cross-attention to the image (fusion layers), then the MLP."""
        if self.has_cross_attention:
            if image_states is None and image_kv is None:
                raise ValueError("a fusion layer needs image states (encoder_hidden_states) or their key/values")
            hidden_states = self.crossattention(hidden_states, image_mask, image_kv, image_states)
        return self.feed_forward(hidden_states)

    def feed_forward(self, hidden_states: Tensor) -> Tensor:
        return self.output(self.intermediate(hidden_states), hidden_states)


ImageInput = Tensor | list[Tensor] | None


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(
            [BertLayer(config, has_cross_attention=i >= config.fusion_layer) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def layer_range(self, mode: str) -> range:
        if mode == "text":
            return range(0, self.config.fusion_layer)
        if mode == "fusion":
            return range(self.config.fusion_layer, self.config.num_hidden_layers)
        if mode == "multi_modal":
            return range(0, self.config.num_hidden_layers)
        raise ValueError(f"mode must be 'text', 'fusion' or 'multi_modal', got {mode!r}")

    def forward(self, hidden_states: Tensor, self_mask: Tensor | None, mode: str, image_states: ImageInput = None,
                image_mask: ImageInput = None, image_kv: list | None = None) -> Tensor:
        for i in self.layer_range(mode):
            layer = self.layer[i]
            states = mask = kv = None
            if layer.has_cross_attention:
                # NLVR2: fusion layers alternate between the images of a pair ((i - fusion_layer) % streams).
                stream = (i - self.config.fusion_layer) % self.config.num_image_streams
                if image_kv is not None:
                    kv = image_kv[i - self.config.fusion_layer]
                else:
                    states = image_states[stream] if isinstance(image_states, list | tuple) else image_states
                mask = image_mask[stream] if isinstance(image_mask, list | tuple) else image_mask
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden_states = checkpoint(layer, hidden_states, self_mask, states, mask, kv, use_reentrant=False)
            else:
                hidden_states = layer(hidden_states, self_mask, states, mask, kv)
        return hidden_states


class BertModel(nn.Module):
    """BERT without pooler. ``mode``: 'text' (layers below fusion_layer), 'fusion' (from text embeddings, the
    cross-attending layers), 'multi_modal' (all layers). ``causal`` makes self-attention causal (decoder)."""

    def __init__(self, config: BertConfig, causal: bool = False) -> None:
        super().__init__()
        self.config = config
        self.causal = causal
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def fusion_layers(self) -> list[BertLayer]:
        return [layer for layer in self.encoder.layer if layer.has_cross_attention]

    def precompute_image_kv(self, image_states: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Key/value heads of the image tokens for every fusion layer, so several fusion passes over the same images
        (positive pair, hard negatives, MLM) project them once. Index the result with ``select_image_kv``."""
        if self.config.num_image_streams != 1:
            raise ValueError("precomputed image key/values support one image stream")
        return [layer.crossattention.self.project_kv(image_states) for layer in self.fusion_layers()]

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                encoder_embeds: Tensor | None = None, encoder_hidden_states: ImageInput = None,
                encoder_attention_mask: ImageInput = None, mode: str = "multi_modal",
                image_kv: list | None = None) -> Tensor:
        """Returns the last hidden state (B, L, D)."""
        if input_ids is not None:
            hidden_states = self.embeddings(input_ids)
        elif encoder_embeds is not None:
            hidden_states = encoder_embeds
        else:
            raise ValueError("BertModel needs input_ids or encoder_embeds")
        batch, length = hidden_states.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, device=hidden_states.device, dtype=torch.long)
        dtype = hidden_states.dtype
        if self.causal:
            self_mask = causal_additive_mask(attention_mask, dtype)
        else:
            self_mask = additive_mask(attention_mask, dtype)
        if isinstance(encoder_attention_mask, list | tuple):
            image_mask = [additive_mask(m, dtype) for m in encoder_attention_mask]
        else:
            image_mask = additive_mask(encoder_attention_mask, dtype)
        return self.encoder(hidden_states, self_mask, mode, encoder_hidden_states, image_mask, image_kv)

    @torch.no_grad()
    def fuse_pairs(self, text_embeds: Tensor, text_mask: Tensor, texts: Tensor, image_kv: list[tuple[Tensor, Tensor]],
                   images: Tensor, gathered_kv_bytes: int | None = None) -> Tensor:
        """Fused [CLS] states (B, D) of the pairs (text ``texts[b]``, image ``images[b]``) in evaluation: the fusion
        layers of ``mode='fusion'``, to float rounding, with re-ranking's shortcuts. ``text_embeds`` (U, l, D) /
        ``text_mask`` (U, l): text-layer output of the distinct texts; ``image_kv``: ``precompute_image_kv`` of the
        images (each projected once). The first layer's self-attention runs once per distinct text, the last layer
        for [CLS] only (the ITM head reads nothing else). Cross-attention per image over its rows read in place
        (``gathered_kv_bytes`` None: CPU), or over per-row copies, at most ``gathered_kv_bytes`` per call (GPU);
        see ``GroupedImageKV``."""
        by_image = torch.argsort(images, stable=True)  # cross-attention wants the rows of one image together
        images, texts = images[by_image], texts[by_image]
        runs, chunk_rows = None, images.shape[0]
        if gathered_kv_bytes is None:
            run_images, run_counts = torch.unique_consecutive(images, return_counts=True)
            runs = list(zip(run_images.tolist(), run_counts.tolist(), strict=True))
        else:
            key = image_kv[0][0]
            chunk_rows = max(1, gathered_kv_bytes // (2 * key[0].numel() * key.element_size()))
        layers = self.fusion_layers()
        text_mask = additive_mask(text_mask, text_embeds.dtype)  # (U, 1, 1, l)
        self_mask = text_mask[texts]  # (B, 1, 1, l)
        states = layers[0].self_attend(text_embeds, text_mask)[texts]  # (B, l, D), computed per distinct text
        for depth, (layer, (key, value)) in enumerate(zip(layers, image_kv, strict=True)):
            last = depth == len(layers) - 1
            if depth > 0:
                states = layer.self_attend(states, self_mask, cls_only=last)
            elif last:
                states = states[:, :1]
            states = layer.attend_image(states, image_kv=GroupedImageKV(key, value, images, runs, chunk_rows))
        return torch.empty_like(states[:, 0]).index_copy_(0, by_image, states[:, 0])  # back in the caller's order


def select_image_kv(image_kv: list[tuple[Tensor, Tensor]], rows: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Rows ``rows`` of precomputed image key/values (fusion input b attends to image ``rows[b]``), as
    (key, value, rows) per layer: cross-attention gathers them where it reads them (the memory-efficient attention of
    models.layers does not keep the gathered copies for backward)."""
    return [(key, value, rows) for key, value in image_kv]


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = _activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.LayerNorm(self.act(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = self.decoder.bias  # same Parameter under both official key names

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden_states))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.predictions(hidden_states)


class BertLMHeadModel(nn.Module):
    """``bert`` + ``cls`` language-model head. Bidirectional for masked language modelling (ALBEF's
    BertForMaskedLM), causal for the answer / caption decoder (ALBEF's BertLMHeadModel): same keys, same layout."""

    def __init__(self, config: BertConfig, causal: bool = False) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config, causal=causal)
        self.cls = BertOnlyMLMHead(config)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight  # tied, as in BERT

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                encoder_hidden_states: ImageInput = None, encoder_attention_mask: ImageInput = None,
                mode: str = "multi_modal", image_kv: list | None = None) -> Tensor:
        """Logits over the vocabulary for every position (B, L, V)."""
        hidden = self.bert(input_ids, attention_mask, encoder_hidden_states=encoder_hidden_states,
                           encoder_attention_mask=encoder_attention_mask, mode=mode, image_kv=image_kv)
        return self.cls(hidden)


def decoder_nll(logits: Tensor, labels: Tensor, soft_labels: Tensor | None = None, alpha: float = 0.0,
                label_smoothing: float = 0.0) -> Tensor:
    """Per-sequence summed negative log-likelihood of a causal decoder (B,).

    ``logits`` (B, L, V) predict the next token, so position t is scored against ``labels[:, t + 1]``; labels of -100
    are ignored. With ``soft_labels`` (B, L - 1, V) (momentum distillation) the loss is
    (1 - alpha) * NLL + alpha * soft cross-entropy, summed over the scored positions.
    """
    shifted = logits[:, :-1, :]  # (B, L-1, V)
    targets = labels[:, 1:]  # (B, L-1)
    nll = F.cross_entropy(shifted.transpose(1, 2), targets, ignore_index=-100, reduction="none",
                          label_smoothing=label_smoothing)  # (B, L-1)
    loss = nll.sum(dim=1)
    if soft_labels is not None:
        scored = (targets != -100).to(shifted.dtype)
        soft = -(F.log_softmax(shifted, dim=-1) * soft_labels).sum(dim=-1)  # (B, L-1)
        loss = (1.0 - alpha) * loss + alpha * (soft * scored).sum(dim=1)
    return loss


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation (normal(0, std) linears/embeddings, unit LayerNorm); used for random-init runs."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear | nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if isinstance(sub, nn.Linear) and sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
