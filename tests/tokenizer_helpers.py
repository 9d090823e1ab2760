"""A tokenizer over a given word list (the reference fixtures' vocab), for parity tests."""

from __future__ import annotations

from pathlib import Path

from dataset.tokenizer import build_tokenizer


def reference_tokenizer(vocab: list[str], tmp_path: Path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return build_tokenizer(str(path))
