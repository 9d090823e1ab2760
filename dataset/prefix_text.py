"""Text-only training data of the prefix captioner (ViECap-style, ``Caption.py`` with ``model.arch: prefix_lm``).

Training never reads an image: an item is a caption, its feature in the aligned image-text space (computed once by a
frozen text encoder and cached, see tasks/caption_prefix.py) and its entities, the nouns of the caption found in an
entity vocabulary (one entity per line, e.g. COCO's category names). The entities form a hard prompt, "There are cat,
dog in the image.", each entity left out at random with probability ``mask_probability`` in training so that the
language model learns not to copy the prompt blindly.

Entities are found by matching the caption's words (and their singular form: "circles" -> "circle") against the
vocabulary, longest phrase first ("traffic light" before "light"); there is no part-of-speech tagger, so a vocabulary
word that the caption uses as another part of speech (e.g. "orange" as a colour in a fruit vocabulary) counts too.

Also here: the offline GPT-2 style tokenizer for tests and the demo (a byte-level BPE trained on a corpus with the
``tokenizers`` library, saved in transformers' format) and the layout of a prompt + caption sequence.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.datasets import split_index

EOS_TOKEN = "<|endoftext|>"  # GPT-2's end-of-text token, also its padding
SOFT_PROMPT_SLOT = -1  # token id marking the positions the soft prompt (the mapped feature) fills
IGNORE_INDEX = -100  # label of a position the loss does not score (cross_entropy's ignore_index)
_WORD = re.compile(r"[a-z0-9]+")


def read_entity_vocabulary(path: str | Path) -> list[str]:
    """One entity per line (lower-cased, blank lines and repeats dropped, order kept)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"entity vocabulary {path} does not exist (prefix.entity_vocabulary: a text file with "
                                "one entity per line, or \"\" for no entity prompts)")
    entities = [" ".join(_WORD.findall(line.lower())) for line in path.read_text(encoding="utf-8").splitlines()]
    entities = list(dict.fromkeys(entity for entity in entities if entity))
    if not entities:
        raise ValueError(f"entity vocabulary {path} holds no entity (expected one entity per line)")
    return entities


def _singular(word: str) -> str:
    if len(word) > 3 and word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 2 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


class EntityMatcher:
    """The vocabulary entities a caption mentions, in the order they first appear, each once."""

    def __init__(self, vocabulary: Sequence[str]) -> None:
        self.vocabulary = list(vocabulary)
        self.phrases = {tuple(entity.split()): entity for entity in self.vocabulary}
        self.longest = max((len(phrase) for phrase in self.phrases), default=0)

    def __call__(self, caption: str) -> list[str]:
        words = _WORD.findall(caption.lower())
        found: list[str] = []
        position = 0
        while position < len(words):
            for length in range(min(self.longest, len(words) - position), 0, -1):
                span = words[position : position + length]
                entity = self.phrases.get(tuple(span)) or self.phrases.get((*span[:-1], _singular(span[-1])))
                if entity is not None:
                    if entity not in found:
                        found.append(entity)
                    position += length
                    break
            else:
                position += 1
        return found


def hard_prompt(entities: Sequence[str]) -> str:
    """ViECap's entity prompt: "There are cat, dog in the image." ("There are no known objects in the image." for
    none, so that the prompt always says how many entities it names)."""
    if not entities:
        return "There are no known objects in the image."
    return f"There are {', '.join(entities)} in the image."


def mask_entities(entities: Sequence[str], probability: float, rng: np.random.Generator) -> list[str]:
    """Each entity kept with probability 1 - ``probability`` (independently), order kept."""
    if not entities or probability <= 0.0:
        return list(entities)
    keep = rng.random(len(entities)) >= probability
    return [entity for entity, kept in zip(entities, keep, strict=True) if kept]


class PrefixTextDataset(Dataset):
    """Captions with their aligned features and entities; never opens an image.

    ``features`` (N, D) holds the normalised text feature of caption i in row i. Keys are indices or (index, epoch)
    pairs (the training sampler's); the entity masking draws from an RNG seeded by (seed, epoch, index), so an epoch's
    prompts are the same after a resume. Items: feature (D,), caption (str), entities (the kept ones), index.
    """

    def __init__(self, captions: Sequence[str], features: torch.Tensor, entities: Sequence[Sequence[str]] | None,
                 mask_probability: float, seed: int) -> None:
        if features.ndim != 2 or features.shape[0] != len(captions):
            raise ValueError(f"caption features {tuple(features.shape)} do not match {len(captions)} captions "
                             "(expected one row per caption): delete the feature cache and run again")
        if entities is not None and len(entities) != len(captions):
            raise ValueError(f"{len(entities)} entity lists for {len(captions)} captions")
        if not 0.0 <= mask_probability <= 1.0:
            raise ValueError(f"prefix.entity_mask_probability must be in [0, 1], got {mask_probability}")
        self.captions = list(captions)
        self.features = features
        self.entities = None if entities is None else [list(items) for items in entities]
        self.mask_probability = mask_probability
        self.seed = seed

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        index, epoch = split_index(key, len(self))
        item = {"feature": self.features[index], "caption": self.captions[index], "index": index}
        if self.entities is not None:
            rng = np.random.default_rng((self.seed, epoch, index))
            item["entities"] = mask_entities(self.entities[index], self.mask_probability, rng)
        return item


def prompt_sequences(tokenizer: Any, prefix_length: int, prompts: Sequence[str] | None, captions: Sequence[str] | None,
                     max_caption_tokens: int, soft_prompt_first: bool = True, pad_left: bool = False,
                     count: int | None = None) -> dict[str, torch.Tensor]:
    """The language model's input rows: the soft prompt (``prefix_length`` slots marked ``SOFT_PROMPT_SLOT``) and the
    hard prompt (when ``prompts``), in the order ``soft_prompt_first`` says, then the caption's tokens and the end
    token (when ``captions``; at most ``max_caption_tokens`` tokens, the end token included).

    Returns token_ids (B, L) (pad = the end token), attention_mask (B, L), labels (B, L): the caption tokens and the
    end token, IGNORE_INDEX on the prompts and the padding (so only the caption is scored). Without prompts and
    captions, ``count`` rows of the soft prompt alone (generation without entity prompts). Training pads on the
    right, generation (``pad_left``) on the left so that every row's next token comes at the end.
    """
    if prompts is not None or captions is not None:
        count = len(prompts if prompts is not None else captions)
    elif count is None:
        raise ValueError("prompt_sequences needs prompts, captions or the count of soft-prompt-only rows")
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN) if tokenizer.eos_token_id is None else tokenizer.eos_token_id
    hard = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts is not None else [[]] * count
    if captions is not None:
        if max_caption_tokens < 2:
            raise ValueError(f"data.max_tokens must be at least 2 (a word and the end token), got {max_caption_tokens}")
        # A leading space: GPT-2's byte-level BPE encodes a word inside a sentence with its space.
        words = tokenizer([" " + caption.strip() for caption in captions], add_special_tokens=False)["input_ids"]
        tails = [ids[: max_caption_tokens - 1] + [eos] for ids in words]
    else:
        tails = [[]] * count
    soft = [SOFT_PROMPT_SLOT] * prefix_length
    rows, labels = [], []
    for prompt_ids, tail in zip(hard, tails, strict=True):
        prompt = soft + prompt_ids if soft_prompt_first else prompt_ids + soft
        rows.append(prompt + tail)
        labels.append([IGNORE_INDEX] * len(prompt) + tail)
    length = max(len(row) for row in rows)
    token_ids = torch.full((count, length), eos, dtype=torch.long)
    mask = torch.zeros((count, length), dtype=torch.long)
    label_ids = torch.full((count, length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, scored) in enumerate(zip(rows, labels, strict=True)):
        span = slice(length - len(ids), length) if pad_left else slice(0, len(ids))
        token_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        mask[row, span] = 1
        label_ids[row, span] = torch.tensor(scored, dtype=torch.long)
    return {"token_ids": token_ids, "attention_mask": mask, "labels": label_ids}


class PrefixCollator:
    """Training batches: feature (B, D) and the sequences of `prompt_sequences` (hard prompts from the items'
    entities when the dataset has them). Picklable, so it runs in the loader workers."""

    def __init__(self, tokenizer: Any, prefix_length: int, max_caption_tokens: int, soft_prompt_first: bool) -> None:
        self.tokenizer = tokenizer
        self.prefix_length = prefix_length
        self.max_caption_tokens = max_caption_tokens
        self.soft_prompt_first = soft_prompt_first

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [hard_prompt(item["entities"]) for item in items] if "entities" in items[0] else None
        batch = prompt_sequences(self.tokenizer, self.prefix_length, prompts, [item["caption"] for item in items],
                                 self.max_caption_tokens, self.soft_prompt_first)
        batch["feature"] = torch.stack([item["feature"] for item in items]).float()
        batch["index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
        return batch


# ------------------------------------------------------------------------------------ offline GPT-2 style tokenizer


def build_bpe_tokenizer(texts: Iterable[str], folder: str | Path, vocab_size: int = 600) -> Path:
    """Train a byte-level BPE (GPT-2's scheme: bytes as the base alphabet, so no text is out of vocabulary) on
    ``texts`` and save it to ``folder`` in transformers' format (``tokenizer.json`` + its config), loadable offline
    with `load_lm_tokenizer`. ``EOS_TOKEN`` is id 0. For tests and the demo; real runs use GPT-2's own (``gpt2``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sorted(set(texts)), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                      unk_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(folder))
    return folder


def load_lm_tokenizer(name_or_path: str) -> Any:
    """The language model's tokenizer: a folder written by `build_bpe_tokenizer` (or any transformers tokenizer
    folder), or a hub name such as ``gpt2`` (real runs). Padding is the end token, as GPT-2 has no pad token."""
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    if not path.exists() and (str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1):
        raise FileNotFoundError(f"prefix.tokenizer {path} does not exist (a tokenizer folder, or a hub name like gpt2)")
    tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else str(name_or_path))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"prefix.tokenizer {name_or_path}: the tokenizer has no end token (expected {EOS_TOKEN})")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
