"""Batched text generation for the caption decoder: beam search and sampling over a key/value cache.

Why our own loop instead of ``transformers``' ``generate``: that needs a ``PreTrainedModel`` with its cache classes,
and our decoder (``models.xbert``) is not one. What does fit is reused: the logits processors of
``transformers.generation`` (repetition penalty, n-gram blocking, minimum length) and its sampling warpers, applied in
its order (temperature, then top-k, then top-p).

``num_return_sequences`` (n) sequences come back per prompt, rows ``b * n .. b * n + n - 1`` for prompt b: the n best
finished beams in score order, or n independent samples. The knobs match those of ``transformers``' ``generate``;
note that BLIP's nucleus sampling went through it with transformers' default ``top_k=50`` besides ``top_p=0.9`` (and
``repetition_penalty=1.1``), where our ``top_k`` default is 0 (off).

The decoder is seen through one function, ``step(new_ids (N, t), cache) -> (logits (N, V), cache)``: the first call
gets the whole prompt and ``cache=None``, the next ones one new token per row; ``cache`` is any nest of tensors whose
dim 0 is the row (``reorder_cache`` follows the beams with it).

Lengths count generated word pieces only: neither the prompt nor the end token. A sequence stops at ``eos_id``; one
that reaches ``max_length`` tokens is ended there. Beam scores are summed log-probabilities divided by
``(length + 1) ** length_penalty`` (the + 1 is the end token), compared the way transformers' beam search does
(``early_stopping=False``): a batch row is done when it holds ``num_beams`` finished hypotheses and its best live beam
cannot beat the worst of them at the current length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

StepFn = Callable[[Tensor, Any], tuple[Tensor, Any]]

# The `generation:` config block (its one home): the same settings for evaluation and for captioning a folder.
GENERATION_DEFAULTS: dict[str, Any] = {
    "num_beams": 3,  # beams per image (1 = greedy); ignored when sample is true
    "max_length": 20,  # at most this many generated word pieces (prompt and end token not counted)
    "min_length": 5,  # the end token is forbidden before this many generated word pieces
    "repetition_penalty": 1.0,  # > 1 discourages tokens already in the sequence (CTRL's rule, 1 = off)
    "no_repeat_ngram_size": 0,  # forbid repeating any n-gram of this size (0 = off)
    "length_penalty": 1.0,  # beam score = sum log p / (length + 1) ** length_penalty
    "sample": False,  # sampling instead of beam search
    "top_p": 0.9,  # sampling: draw from the smallest token set with this much probability mass (1 = off)
    "top_k": 0,  # sampling: draw from the k likeliest tokens only (0 = off)
    "temperature": 1.0,  # sampling: logits divided by this before top-k / top-p (< 1 sharper, > 1 flatter)
    "num_return_sequences": 1,  # sequences per image: the n best beams (n <= num_beams) or n independent samples
}


@dataclass(frozen=True)
class GenerationSettings:
    """Validated ``generation:`` settings (see ``GENERATION_DEFAULTS`` for each field)."""

    num_beams: int = 3
    max_length: int = 20
    min_length: int = 5
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0
    sample: bool = False
    top_p: float = 0.9
    top_k: int = 0
    temperature: float = 1.0
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"generation.num_beams must be >= 1, got {self.num_beams}")
        if self.max_length < 1 or not 0 <= self.min_length <= self.max_length:
            raise ValueError(f"generation needs 0 <= min_length <= max_length and max_length >= 1, got min_length "
                             f"{self.min_length}, max_length {self.max_length}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"generation.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"generation.no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"generation.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"generation.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not self.temperature > 0.0:
            raise ValueError(f"generation.temperature must be > 0, got {self.temperature}")
        if self.num_return_sequences < 1:
            raise ValueError(f"generation.num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if not self.sample and self.num_return_sequences > self.num_beams:
            raise ValueError(f"generation.num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                             f"({self.num_beams}) in beam search: it returns that many of the beams")

    @property
    def rows_per_prompt(self) -> int:
        """Decoder rows per prompt that ``step`` sees: the beams, or the samples drawn."""
        return self.num_return_sequences if self.sample else self.num_beams

    @classmethod
    def from_config(cls, block: Any) -> GenerationSettings:
        names = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(block) - set(names))
        if unknown:
            raise ValueError(f"unknown generation keys {unknown}; valid keys: {sorted(names)}")
        casts = {"int": int, "float": float, "bool": bool}
        return cls(**{key: casts[names[key]](value) for key, value in block.items()})


def reorder_cache(cache: Any, index: Tensor) -> Any:
    """Rows ``index`` of every tensor in a nest of lists / tuples of tensors."""
    if isinstance(cache, Tensor):
        return cache.index_select(0, index)
    if isinstance(cache, list | tuple):
        return type(cache)(reorder_cache(item, index) for item in cache)
    return cache


def build_processors(settings: GenerationSettings, prompt_length: int, eos_id: int) -> LogitsProcessorList:
    """transformers' processors for the settings; they see the whole sequence, prompt included."""
    processors = LogitsProcessorList()
    if settings.min_length > 0:
        processors.append(MinLengthLogitsProcessor(prompt_length + settings.min_length, eos_id))
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(settings.no_repeat_ngram_size))
    return processors


def build_warpers(settings: GenerationSettings) -> LogitsProcessorList:
    """transformers' sampling warpers for the settings, in its order: temperature, top-k, top-p."""
    warpers = LogitsProcessorList()
    if settings.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k > 0:
        warpers.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(settings.top_p))
    return warpers


def _only_eos(scores: Tensor, eos_id: int) -> Tensor:
    """Scores where the end token is the only choice (a sequence that reached max_length)."""
    forced = torch.full_like(scores, float("-inf"))
    forced[:, eos_id] = 0.0
    return forced


@torch.no_grad()
def generate(step: StepFn, prompt_ids: Tensor, settings: GenerationSettings, eos_id: int, pad_id: int,
             generator: torch.Generator | None = None) -> Tensor:
    """Generated word pieces (B * n, max_length) for prompts ``prompt_ids`` (B, P), padded with ``pad_id`` after the
    end; n = ``settings.num_return_sequences``, rows b * n + j for prompt b. Beam search, or sampling when
    ``settings.sample``. ``step`` must see each prompt's rows ``settings.rows_per_prompt`` times in a row."""
    if settings.sample:
        prompts = prompt_ids.repeat_interleave(settings.num_return_sequences, dim=0)  # (B * n, P)
        return nucleus_sample(step, prompts, settings, eos_id, pad_id, generator)
    return beam_search(step, prompt_ids, settings, eos_id, pad_id)[0]


@torch.no_grad()
def beam_search(step: StepFn, prompt_ids: Tensor, settings: GenerationSettings, eos_id: int, pad_id: int
                ) -> tuple[Tensor, Tensor]:
    """Batched beam search. ``step`` must see the prompts repeated ``num_beams`` times (row b * K + k is beam k of
    prompt b). Returns the n = ``num_return_sequences`` best hypotheses per prompt (B * n, max_length), best first,
    and their scores (B * n,)."""
    batch, prompt_length = prompt_ids.shape
    beams, max_length, device = settings.num_beams, settings.max_length, prompt_ids.device
    processors = build_processors(settings, prompt_length, eos_id)
    seqs = prompt_ids.repeat_interleave(beams, dim=0)  # (B*K, P)
    # Only beam 0 is live at the start, otherwise the K identical beams would fill the first top-k.
    beam_scores = torch.full((batch, beams), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0
    done_seqs = torch.full((batch, beams, max_length), pad_id, dtype=torch.long, device=device)
    done_scores = torch.full((batch, beams), float("-inf"), device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)[:, None] * beams  # (B, 1) first row of each prompt
    logits, cache = step(seqs, None)
    for length in range(max_length + 1):  # length = tokens generated so far
        scores = processors(seqs, F.log_softmax(logits.float(), dim=-1))  # (B*K, V)
        if length == max_length:
            scores = _only_eos(scores, eos_id)
        vocab = scores.shape[-1]
        candidates = (beam_scores.view(-1, 1) + scores).view(batch, beams * vocab)
        # 2K candidates: at most K of them end (one end token per beam), so K live ones always remain.
        top_scores, top_index = candidates.topk(2 * beams, dim=1)  # (B, 2K)
        source, token = top_index // vocab, top_index % vocab
        ends = token == eos_id
        # Finished hypotheses: ended candidates ranked among the top K, for rows still searching.
        new_done = ends & (torch.arange(2 * beams, device=device) < beams) & ~done[:, None]
        new_scores = torch.where(new_done, top_scores / (length + 1) ** settings.length_penalty,
                                 torch.full_like(top_scores, float("-inf")))
        generated = seqs[:, prompt_length:][(rows + source).view(-1)].view(batch, 2 * beams, length)
        generated = F.pad(generated, (0, max_length - length), value=pad_id)  # (B, 2K, max_length)
        pool_scores = torch.cat([done_scores, new_scores], dim=1)  # (B, 3K)
        done_scores, keep = pool_scores.topk(beams, dim=1)
        pool_seqs = torch.cat([done_seqs, generated], dim=1)
        done_seqs = pool_seqs.gather(1, keep[:, :, None].expand(-1, -1, max_length))
        if length == max_length:
            break
        # Live beams: the first K candidates that did not end, in score order.
        live = ends.to(torch.int8).argsort(dim=1, stable=True)[:, :beams]  # (B, K)
        beam_scores = top_scores.gather(1, live)
        parent = (rows + source.gather(1, live)).view(-1)  # (B*K,)
        next_token = token.gather(1, live).view(-1, 1)
        seqs = torch.cat([seqs[parent], next_token], dim=1)
        best_live = beam_scores.max(dim=1).values / (length + 2) ** settings.length_penalty
        done |= torch.isfinite(done_scores).all(dim=1) & (best_live <= done_scores.min(dim=1).values)
        if bool(done.all()):
            break
        logits, cache = step(next_token, reorder_cache(cache, parent))
    n = settings.num_return_sequences
    return done_seqs[:, :n].reshape(batch * n, max_length), done_scores[:, :n].reshape(batch * n)


@torch.no_grad()
def nucleus_sample(step: StepFn, prompt_ids: Tensor, settings: GenerationSettings, eos_id: int, pad_id: int,
                   generator: torch.Generator | None = None) -> Tensor:
    """One sampled sequence per prompt row (B, max_length): processors, then the warpers (temperature, top-k, top-p),
    then a multinomial draw."""
    batch, prompt_length = prompt_ids.shape
    processors = build_processors(settings, prompt_length, eos_id)
    warpers = build_warpers(settings)
    out = torch.full((batch, settings.max_length), pad_id, dtype=torch.long, device=prompt_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    seqs = prompt_ids
    logits, cache = step(seqs, None)
    for length in range(settings.max_length + 1):
        scores = processors(seqs, logits.float())
        if length == settings.max_length:
            scores = _only_eos(scores, eos_id)
        probs = F.softmax(warpers(seqs, scores), dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
        token = token.masked_fill(finished, pad_id)
        finished |= token == eos_id
        if length == settings.max_length or bool(finished.all()):
            break
        out[:, length] = token.masked_fill(finished, pad_id)
        seqs = torch.cat([seqs, token[:, None]], dim=1)
        logits, cache = step(token[:, None], cache)
    return out
