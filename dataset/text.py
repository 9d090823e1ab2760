"""Caption and question cleaning, following ALBEF's ``pre_caption`` / ``pre_question`` rules.

ALBEF's checkpoints were trained on text cleaned this way, so the rules are kept exactly: lower-case, delete the
characters ``, . ' ! ? " ( ) * # : ; ~``, turn ``-`` and ``/`` into spaces, collapse whitespace, strip, keep the first
``max_words`` words. Whitespace runs are collapsed for questions too (ALBEF only right-strips them); the WordPiece
tokenizer splits on whitespace, so the token ids are the same and only the word count used for truncation is exact.
"""

from __future__ import annotations

import re

# Punctuation ALBEF deletes (not replaces) in captions and questions alike.
_DELETED_PUNCTUATION = re.compile(r"[,.'!?\"()*#:;~]")
_WHITESPACE = re.compile(r"\s+")


def _clean(text: str, max_words: int) -> str:
    if not isinstance(text, str):
        raise TypeError(f"expected a str to clean, got {type(text).__name__}: {text!r}")
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    text = _DELETED_PUNCTUATION.sub("", text.lower())
    text = text.replace("-", " ").replace("/", " ")
    words = _WHITESPACE.sub(" ", text).strip().split(" ")
    # ''.split(' ') == [''] -> an empty string comes back; the tokenizer still yields [CLS] for it.
    return " ".join(words[:max_words])


def pre_caption(caption: str, max_words: int) -> str:
    """Clean a caption as ALBEF does (``<person>`` placeholders of some datasets become ``person``)."""
    if isinstance(caption, str):
        caption = caption.lower().replace("<person>", "person")
    return _clean(caption, max_words)


def pre_question(question: str, max_words: int) -> str:
    """Clean a VQA question as ALBEF does; the trailing ``?`` goes with the deleted punctuation."""
    return _clean(question, max_words)
