"""Text tokenisation with ALBEF's conventions, on top of transformers' BERT WordPiece tokenizer.

ALBEF encodes a single sentence as ``[CLS] wordpieces`` with no trailing ``[SEP]`` (its own BertTokenizer drops it),
pads with id 0 and truncates to ``max_length`` tokens in total. Decoder targets (VQA answers, captions) carry
``[SEP]`` as their end token. :func:`tokenize` produces exactly that from any BERT tokenizer, and
:func:`build_tokenizer` also installs the same template as the tokenizer's post-processor, so that a direct
``tokenizer(texts, ...)`` call (as in code ported from ALBEF) gives the same ids.

Tests and the demo never download anything: :func:`build_vocab` makes a WordPiece-compatible vocabulary from a
corpus (the synthetic generator writes one next to its data) and :func:`build_tokenizer` loads it offline.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import normalizers, pre_tokenizers, processors
from transformers import BertTokenizerFast

# Ids 0-4 of the vocabularies we build, in the order of the ALBEF reference fixtures ([PAD] is 0 as in BERT).
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PADDING_MODES: tuple[str, ...] = ("longest", "max_length")


def _looks_like_path(name_or_path: str) -> bool:
    """True for strings that are meant as a local path rather than a hub name like 'bert-base-uncased'."""
    return (
        name_or_path.startswith((".", "/", "~"))
        or name_or_path.endswith(".txt")
        or name_or_path.count("/") > 1
        or "\\" in name_or_path
    )


def _read_vocab(vocab_file: Path) -> dict[str, int]:
    """One token per line; the line number is the id (the vocab.txt format of BERT)."""
    tokens = vocab_file.read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens = tokens[:-1]  # trailing newline, not an empty token
    vocab = {token: index for index, token in enumerate(tokens)}
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise ValueError(f"{vocab_file}: vocabulary lacks the special tokens {missing}")
    if len(vocab) != len(tokens):
        raise ValueError(f"{vocab_file}: vocabulary has duplicate tokens ({len(tokens) - len(vocab)} repeats)")
    return vocab


def _install_albef_template(tokenizer: BertTokenizerFast) -> None:
    """Make direct tokenizer calls emit ALBEF's '[CLS] A' (pairs keep BERT's '[CLS] A [SEP] B [SEP]')."""
    cls, sep = tokenizer.cls_token, tokenizer.sep_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, tokenizer.cls_token_id), (sep, tokenizer.sep_token_id)],
    )


def build_tokenizer(name_or_path: str | Path) -> BertTokenizerFast:
    """A lower-casing BERT WordPiece tokenizer from a vocab.txt file, a directory holding one, or a hub name.

    Hub names (e.g. 'bert-base-uncased') go through ``from_pretrained`` and are meant for real runs only.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        vocab_file = path / "vocab.txt"
        if not vocab_file.is_file():
            raise FileNotFoundError(f"tokenizer directory {path} has no vocab.txt")
    elif path.is_file():
        vocab_file = path
    elif isinstance(name_or_path, Path) or _looks_like_path(name):
        raise FileNotFoundError(f"tokenizer vocabulary {path} does not exist (expected a vocab.txt or its directory)")
    else:
        vocab_file = None

    if vocab_file is None:
        tokenizer = BertTokenizerFast.from_pretrained(name)
    elif "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters:
        tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)  # transformers 4.x
    else:
        tokenizer = BertTokenizerFast(vocab=_read_vocab(vocab_file), do_lower_case=True)  # transformers 5.x
    if tokenizer.pad_token_id != 0:
        raise ValueError(f"tokenizer {name}: [PAD] must have id 0 (ALBEF pads with 0), got {tokenizer.pad_token_id}")
    _install_albef_template(tokenizer)
    return tokenizer


def tokenize(
    tokenizer: BertTokenizerFast,
    texts: Sequence[str],
    max_length: int,
    padding: str = "longest",
    add_eos: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode texts as ``[CLS] wordpieces`` (+ ``[SEP]`` when add_eos), at most max_length tokens, padded with 0.

    Truncation drops trailing wordpieces, never the end token. padding='longest' pads to the longest text of the
    batch, 'max_length' to max_length. Returns (input_ids, attention_mask), both LongTensor (B, L).
    """
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, got a single string")
    num_special = 2 if add_eos else 1
    if max_length < num_special:
        raise ValueError(f"max_length must be at least {num_special} (room for the special tokens), got {max_length}")
    # The Rust tokenizer encodes and truncates the whole batch; only the special tokens are placed here.
    wordpieces = tokenizer(
        list(texts), add_special_tokens=False, truncation=True, max_length=max_length - num_special
    )["input_ids"]
    prefix, suffix = [tokenizer.cls_token_id], [tokenizer.sep_token_id] if add_eos else []
    sequences = [prefix + ids + suffix for ids in wordpieces]
    length = max_length if padding == "max_length" else max((len(ids) for ids in sequences), default=num_special)
    input_ids = torch.full((len(sequences), length), tokenizer.pad_token_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)  # (B, L)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def split_words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks of a text, split as BERT's basic tokenizer does."""
    normalized = normalizers.BertNormalizer(lowercase=True).normalize_str(text)
    return [word for word, _span in pre_tokenizers.BertPreTokenizer().pre_tokenize_str(normalized)]


def build_vocab(texts: Iterable[str], extra_words: Iterable[str] = ()) -> list[str]:
    """A WordPiece vocabulary covering every word of texts: special tokens first, then sorted whole words.

    Digits and the letters a-z are always included so that single characters never become [UNK].
    """
    words = {word for text in texts for word in split_words(text)}
    words.update(word for extra in extra_words for word in split_words(extra))
    words.update("0123456789abcdefghijklmnopqrstuvwxyz")
    words.difference_update(SPECIAL_TOKENS)
    return list(SPECIAL_TOKENS) + sorted(words)


def write_vocab(vocab: Sequence[str], path: str | Path) -> Path:
    """Write one token per line (BERT's vocab.txt format); returns the path."""
    path = Path(path)
    bad = [index for index, token in enumerate(vocab) if not token or any(ch.isspace() for ch in token)]
    if bad:
        raise ValueError(f"vocab tokens must be non-empty without whitespace; bad indices {bad[:5]}")
    path.write_text("".join(f"{token}\n" for token in vocab), encoding="utf-8")
    return path
