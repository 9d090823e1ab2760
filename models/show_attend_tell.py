"""Show, Attend and Tell (Xu et al., 2015): a CNN grid encoder and an LSTM decoder with soft (additive) attention.

- Encoder: a timm ResNet without its head; the last stage's feature map is average-pooled to ``grid`` x ``grid``
  (14 x 14 for ResNet-101 at 256 px: 196 regions of 2048 channels). The stem and stage 1 are always frozen; stages
  2-4 train when ``fine_tune_encoder`` (else the whole encoder is frozen). Frozen stages also keep their batch-norm
  statistics (they stay in eval mode while the model trains).
- Decoder, per step t: attention over the regions from the previous hidden state (Bahdanau:
  ``alpha = softmax(w . relu(W_e feature + W_d h))``), the context ``sum_i alpha_i feature_i`` gated by
  ``sigmoid(f_beta(h))``, then ``h, c = LSTMCell([embedding(word_t); gated context], (h, c))`` and the logits of word
  t + 1 from ``fc(dropout(h))``. h and c start from the mean region feature through two linear layers.
- The vocabulary is a word map (``WordMap``) built from the training captions; the model keeps it as a buffer (its
  UTF-8 JSON bytes) so every state_dict - checkpoint, best weights, EMA - carries the words its logits are over.

``forward`` is teacher forcing with scheduled sampling; ``generate`` is beam search / sampling through
``models.generation`` (the same knobs as the other captioners); ``greedy`` is the plain argmax loop.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import timm
import torch
from torch import Tensor, nn

from models.generation import GenerationSettings, generate

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_WORDS = (PAD, START, END, UNK)
RESNET_STEM = ("conv1", "bn1", "act1", "maxpool")  # timm ResNet children before layer1
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


class WordMap:
    """word -> id, with ``<pad>`` ``<start>`` ``<end>`` ``<unk>``; in the seed's WORDMAP json layout (``{word: id}``,
    ``<pad>`` 0, the words 1..n, then ``<unk>``, ``<start>``, ``<end>``).

    It also answers the part of a Hugging Face tokenizer that ``dataset.tokenizer.tokenize`` and
    ``tasks.captioning.generate_captions`` use (``__call__``, ``batch_decode``, ``cls/sep/pad/unk_token_id``), with
    ``<start>`` as the sequence start and ``<end>`` as its end, so the captioning collators and the caption writer
    serve this vocabulary unchanged. Texts are split on whitespace (captions arrive cleaned by ``pre_caption``)."""

    def __init__(self, word_to_id: Mapping[str, int]) -> None:
        missing = [word for word in SPECIAL_WORDS if word not in word_to_id]
        if missing:
            raise ValueError(f"word map lacks the special words {missing} (it needs {list(SPECIAL_WORDS)})")
        ids = sorted(int(index) for index in word_to_id.values())
        if ids != list(range(len(ids))):
            raise ValueError(f"word map ids must be 0..{len(ids) - 1}, each once (got {len(ids)} words, ids from "
                             f"{ids[0]} to {ids[-1]})")
        self.word_to_id = {str(word): int(index) for word, index in word_to_id.items()}
        self.words = [""] * len(ids)
        for word, index in self.word_to_id.items():
            self.words[index] = word
        self.pad_token_id, self.cls_token_id = self.word_to_id[PAD], self.word_to_id[START]
        self.sep_token_id, self.unk_token_id = self.word_to_id[END], self.word_to_id[UNK]
        self.special_ids = frozenset(self.word_to_id[word] for word in SPECIAL_WORDS)

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int = 5) -> WordMap:
        """The words seen at least ``min_freq`` times in ``captions`` (sorted, for a map that does not depend on the
        order of the files), then the special words."""
        if min_freq < 1:
            raise ValueError(f"caption.min_word_freq must be >= 1, got {min_freq}")
        counts = Counter(word for caption in captions for word in caption.split())
        words = sorted(word for word, count in counts.items() if count >= min_freq and word not in SPECIAL_WORDS)
        order = [PAD, *words, UNK, START, END]
        return cls({word: index for index, word in enumerate(order)})

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordMap) and self.word_to_id == other.word_to_id

    def encode(self, text: str) -> list[int]:
        """The ids of the words of ``text`` (unknown words -> ``<unk>``), no start or end."""
        return [self.word_to_id.get(word, self.unk_token_id) for word in text.split()]

    def __call__(self, texts: Sequence[str], add_special_tokens: bool = False, truncation: bool = False,
                 max_length: int | None = None) -> dict[str, list[list[int]]]:
        """``{"input_ids": [...]}`` like a Hugging Face tokenizer (``add_special_tokens`` adds start and end)."""
        out = []
        for text in [texts] if isinstance(texts, str) else texts:
            ids = self.encode(text)
            if truncation and max_length is not None:
                ids = ids[: max(0, max_length - (2 if add_special_tokens else 0))]
            out.append([self.cls_token_id, *ids, self.sep_token_id] if add_special_tokens else ids)
        return {"input_ids": out}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The words of ``ids`` up to the first ``<end>``; special words dropped with ``skip_special_tokens``."""
        words = []
        for index in ids:
            if index == self.sep_token_id:
                break
            if skip_special_tokens and index in self.special_ids:
                continue
            words.append(self.words[index])
        return " ".join(words)

    def batch_decode(self, rows: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in rows]

    def to_json(self) -> str:
        return json.dumps(self.word_to_id, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, source: str = "word map") -> WordMap:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: not valid JSON ({err})") from None
        if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
            raise ValueError(f"{source}: expected a JSON object {{word: id}} (the WORDMAP_*.json layout)")
        return cls(data)

    def to_tensor(self) -> Tensor:
        """The map as its UTF-8 JSON bytes held in a float32 tensor (n,), the form the model's state_dict carries it
        in. Float, not uint8: the engine's EMA (torch's AveragedModel with use_buffers) lerps every buffer, which is
        exact for equal float values and garbles integer ones; byte values (<= 255) are exact in bf16 and fp16 too."""
        return torch.tensor(list(self.to_json().encode("utf-8")), dtype=torch.float32)

    @classmethod
    def from_tensor(cls, data: Tensor) -> WordMap:
        codes = data.detach().float().cpu().round().to(torch.uint8).tolist()
        try:
            text = bytes(codes).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"the model's word_map_bytes buffer is not UTF-8 text ({err})") from None
        return cls.from_json(text, "the model's word_map_bytes buffer")


@dataclass(frozen=True)
class SatCfg:
    """The ``model:`` keys of the show_attend_tell captioner (defaults: the paper's / the seed's)."""

    encoder: str = "resnet101"  # a timm ResNet (conv1 ... layer4)
    pretrained: bool = True  # timm's ImageNet weights (downloaded by timm; false = random init, offline)
    output_stride: int = 32  # 32 (plain ResNet), 16 or 8 (dilated last stages: more regions for small images)
    grid: int = 14  # the last stage's map is average-pooled to grid x grid regions
    fine_tune_encoder: bool = True  # train stages 2-4 (the stem and stage 1 stay frozen); false = frozen encoder
    embed_dim: int = 256  # word embedding size
    decoder_dim: int = 256  # LSTM cell size
    attention_dim: int = 256  # additive attention size
    dropout: float = 0.5  # before the vocabulary layer

    @classmethod
    def from_config(cls, block: Mapping[str, Any]) -> SatCfg:
        names = {f.name for f in fields(cls)}
        cfg = cls(**{key: value for key, value in block.items() if key in names})
        if cfg.grid < 1 or cfg.output_stride not in (8, 16, 32):
            raise ValueError(f"model.grid must be >= 1 and model.output_stride one of 8, 16, 32; got {cfg.grid}, "
                             f"{cfg.output_stride}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {cfg.dropout}")
        return cfg


class GridEncoder(nn.Module):
    """A timm ResNet's last feature map pooled to grid x grid: images (B, 3, H, W) -> regions (B, grid^2, C)."""

    def __init__(self, cfg: SatCfg) -> None:
        super().__init__()
        try:
            self.backbone = timm.create_model(cfg.encoder, pretrained=cfg.pretrained, num_classes=0, global_pool="",
                                              output_stride=cfg.output_stride)
        except OSError as err:  # pretrained weights neither cached nor downloadable
            raise OSError(f"model.encoder {cfg.encoder!r}: timm could not load its pretrained weights ({err}); "
                          "give the machine access to them (Hugging Face hub cache) or set model.pretrained=false "
                          "for a random init") from None
        except (TypeError, RuntimeError) as err:  # another architecture (no output_stride), an unknown name
            raise ValueError(f"model.encoder {cfg.encoder!r}: timm cannot build it as a ResNet with output_stride "
                             f"{cfg.output_stride} ({err}); use e.g. resnet101, resnet50 or resnet18") from None
        children = dict(self.backbone.named_children())
        if not all(name in children for name in (*RESNET_STEM, *RESNET_STAGES)):
            raise ValueError(f"model.encoder {cfg.encoder!r} is not a timm ResNet (conv1, bn1, layer1-4): use e.g. "
                             "resnet101, resnet50 or resnet18")
        self.pool = nn.AdaptiveAvgPool2d(cfg.grid)
        self.num_features = int(self.backbone.num_features)
        self.frozen = [*RESNET_STEM, "layer1"] if cfg.fine_tune_encoder else [*RESNET_STEM, *RESNET_STAGES]
        for name in self.frozen:
            children[name].requires_grad_(False)

    def train(self, mode: bool = True) -> GridEncoder:
        super().train(mode)
        for name in self.frozen:  # frozen stages keep their batch-norm statistics too
            getattr(self.backbone, name).eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        features = self.pool(self.backbone.forward_features(images))  # (B, C, grid, grid)
        return features.flatten(2).transpose(1, 2)  # (B, R, C)


class SoftAttention(nn.Module):
    """Additive attention of a decoder state over the regions."""

    def __init__(self, feature_dim: int, decoder_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.encoder_att = nn.Linear(feature_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)

    def forward(self, features: Tensor, features_proj: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """features (B, R, C), their encoder_att projection (B, R, A), h (B, H) -> context (B, C), alpha (B, R)."""
        scores = self.full_att(torch.relu(features_proj + self.decoder_att(h)[:, None])).squeeze(2)  # (B, R)
        alpha = scores.softmax(dim=1)
        return (features * alpha[:, :, None]).sum(dim=1), alpha


class ShowAttendTell(nn.Module):
    """The captioner: ``forward`` (training), ``generate`` / ``greedy`` (captions), ``attention_maps``."""

    def __init__(self, cfg: SatCfg, word_map: WordMap) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = GridEncoder(cfg)
        feature_dim = self.encoder.num_features
        self.attention = SoftAttention(feature_dim, cfg.decoder_dim, cfg.attention_dim)
        self.init_h = nn.Linear(feature_dim, cfg.decoder_dim)
        self.init_c = nn.Linear(feature_dim, cfg.decoder_dim)
        self.f_beta = nn.Linear(cfg.decoder_dim, feature_dim)
        self.lstm = nn.LSTMCell(cfg.embed_dim + feature_dim, cfg.decoder_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.register_buffer("word_map_bytes", torch.zeros(0))
        self._word_map: tuple[Tensor, WordMap] | None = None
        self.set_word_map(word_map)

    # ---- vocabulary ------------------------------------------------------------------------------------------------
    @property
    def word_map(self) -> WordMap:
        """The vocabulary of the logits (decoded from the buffer, which load_state_dict may have replaced)."""
        if self._word_map is None or not torch.equal(self._word_map[0], self.word_map_bytes.cpu()):
            self._word_map = (self.word_map_bytes.cpu().clone(), WordMap.from_tensor(self.word_map_bytes))
        return self._word_map[1]

    def set_word_map(self, word_map: WordMap) -> None:
        """Use ``word_map``: new (randomly initialised) embedding and vocabulary layers when its size differs."""
        device = self.init_h.weight.device
        if not hasattr(self, "embedding") or self.embedding.num_embeddings != len(word_map):
            self.embedding = nn.Embedding(len(word_map), self.cfg.embed_dim, device=device)
            self.fc = nn.Linear(self.cfg.decoder_dim, len(word_map), device=device)
            nn.init.uniform_(self.embedding.weight, -0.1, 0.1)  # the seed's initialisation of these two
            nn.init.uniform_(self.fc.weight, -0.1, 0.1)
            nn.init.zeros_(self.fc.bias)
        self.word_map_bytes = word_map.to_tensor().to(device)

    # ---- one decoder step ------------------------------------------------------------------------------------------
    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Regions (B, R, C) and their attention projection (B, R, A)."""
        features = self.encoder(images)
        return features, self.attention.encoder_att(features)

    def init_state(self, features: Tensor) -> tuple[Tensor, Tensor]:
        mean = features.mean(dim=1)  # (B, C)
        return self.init_h(mean), self.init_c(mean)

    def step(self, words: Tensor, state: tuple[Tensor, Tensor], features: Tensor, features_proj: Tensor
             ) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
        """Input words (B,) and the state -> logits of the next word (B, V), the new state, alpha (B, R)."""
        h, c = state
        context, alpha = self.attention(features, features_proj, h)
        gate = torch.sigmoid(self.f_beta(h))  # (B, C)
        h, c = self.lstm(torch.cat([self.embedding(words), gate * context], dim=1), (h, c))
        return self.fc(self.dropout(h)), (h, c), alpha

    # ---- training --------------------------------------------------------------------------------------------------
    def forward(self, images: Tensor, captions: Tensor, teacher_forcing: float = 1.0,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """captions (B, T) = <start> words <end> <pad>... -> logits (B, T-1, V) of words 1..T-1 and alphas
        (B, T-1, R). Step t is fed the true word t with probability ``teacher_forcing`` (drawn per caption and step),
        else the model's own argmax prediction of it (scheduled sampling); 1.0 = pure teacher forcing."""
        features, features_proj = self.encode(images)
        state = self.init_state(features)
        words = captions[:, 0]
        logits, alphas = [], []
        for t in range(captions.shape[1] - 1):
            if t > 0 and teacher_forcing < 1.0:
                truth = torch.rand(words.shape, device=words.device, generator=generator) < teacher_forcing
                words = torch.where(truth, captions[:, t], logits[-1].argmax(dim=-1))
            elif t > 0:
                words = captions[:, t]
            step_logits, state, alpha = self.step(words, state, features, features_proj)
            logits.append(step_logits)
            alphas.append(alpha)
        return torch.stack(logits, dim=1), torch.stack(alphas, dim=1)

    # ---- captions --------------------------------------------------------------------------------------------------
    def _step_fn(self, features: Tensor, features_proj: Tensor):
        """models.generation's ``step(new_ids, cache)``. The rows of one image (its beams or samples) never mix with
        another image's, so the regions stay outside the cache (no per-step copy of them): only (h, c) is reordered."""

        def step(new_ids: Tensor, cache: Any) -> tuple[Tensor, Any]:
            state = self.init_state(features) if cache is None else cache
            for t in range(new_ids.shape[1]):  # the prompt (<start> [prompt words]) first, then one word a call
                logits, state, _ = self.step(new_ids[:, t], state, features, features_proj)
            return logits, state

        return step

    @torch.no_grad()
    def generate(self, images: Tensor, prompt_ids: Tensor, settings: GenerationSettings,
                 generator: torch.Generator | None = None) -> Tensor:
        """Word ids (B * n, max_length) after ``prompt_ids`` (P,) = <start> [prompt words], padded after <end>; beam
        search or sampling as ``settings`` say (models.generation)."""
        features, features_proj = self.encode(images)
        rows = settings.rows_per_prompt
        features, features_proj = features.repeat_interleave(rows, 0), features_proj.repeat_interleave(rows, 0)
        prompts = prompt_ids.to(images.device)[None].expand(images.shape[0], -1)
        word_map = self.word_map
        return generate(self._step_fn(features, features_proj), prompts, settings, word_map.sep_token_id,
                        word_map.pad_token_id, generator=generator)

    @torch.no_grad()
    def greedy(self, images: Tensor, prompt_ids: Tensor, max_length: int, min_length: int = 0) -> Tensor:
        """The argmax word at every step (no <end> before ``min_length`` words), (B, max_length) padded after <end>."""
        word_map = self.word_map
        features, features_proj = self.encode(images)
        batch = images.shape[0]
        state = self.init_state(features)
        prompts = prompt_ids.to(images.device)[None].expand(batch, -1)
        for t in range(prompts.shape[1]):
            logits, state, _ = self.step(prompts[:, t], state, features, features_proj)
        out = torch.full((batch, max_length), word_map.pad_token_id, dtype=torch.long, device=images.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=images.device)
        for length in range(max_length):
            if length < min_length:
                logits[:, word_map.sep_token_id] = float("-inf")
            words = logits.argmax(dim=-1)
            finished |= words == word_map.sep_token_id
            out[:, length] = words.masked_fill(finished, word_map.pad_token_id)
            if bool(finished.all()):
                break
            logits, state, _ = self.step(words, state, features, features_proj)
        return out

    @torch.no_grad()
    def attention_maps(self, images: Tensor, prompt_ids: Tensor, words: Tensor) -> Tensor:
        """alphas (B, L, grid, grid): the attention that chose each of the generated ``words`` (B, L) (as returned by
        generate: the words after the prompt, padded after <end>), by re-running the decoder on them (eval mode: the
        same states as during decoding). Rows beyond a caption's end hold the steps after it (ignore them)."""
        batch = images.shape[0]
        prompts = prompt_ids.to(images.device)[None].expand(batch, -1)
        _, alphas = self.forward(images, torch.cat([prompts, words], dim=1))  # (B, P - 1 + L, R)
        grid = self.cfg.grid
        return alphas[:, prompts.shape[1] - 1:].reshape(batch, words.shape[1], grid, grid)


def caption_losses(logits: Tensor, alphas: Tensor, targets: Tensor, mask: Tensor, alpha_c: float = 1.0
                   ) -> dict[str, Tensor]:
    """logits (B, T, V), alphas (B, T, R), targets (B, T) word ids, mask (B, T) 1 where a target is scored ->
    ``caption_ce`` (mean over the scored words), ``doubly_stochastic`` = alpha_c * ((1 - sum_t alpha_t)^2).mean()
    (sum over each caption's scored steps, mean over captions and regions) and ``top5_accuracy`` (a share, no
    gradient): whether the target is among the 5 likeliest words."""
    mask = mask.bool()
    scored_logits, scored_targets = logits[mask], targets[mask]  # (N, V), (N,)
    ce = nn.functional.cross_entropy(scored_logits.float(), scored_targets)
    attention_sum = (alphas * mask[:, :, None]).sum(dim=1)  # (B, R)
    doubly_stochastic = alpha_c * ((1.0 - attention_sum) ** 2).mean()
    with torch.no_grad():
        top = scored_logits.topk(min(5, scored_logits.shape[-1]), dim=-1).indices  # (N, 5)
        top5 = (top == scored_targets[:, None]).any(dim=-1).float().mean()
    return {"caption_ce": ce, "doubly_stochastic": doubly_stochastic, "top5_accuracy": top5}
