"""dataset.tokenizer: ALBEF's '[CLS] wordpieces' convention, vocab building, and parity with ALBEF's tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dataset.tokenizer import SPECIAL_TOKENS, build_tokenizer, build_vocab, split_words, tokenize, write_vocab


def load_reference(reference_dir: Path, name: str) -> dict:
    return torch.load(reference_dir / name, map_location="cpu", weights_only=True)


CORPUS = [
    "A red circle on the left, and a small blue square.",
    "how many shapes are there",
    "the large yellow star is in the top right corner",
]


@pytest.fixture()
def tokenizer(tmp_path: Path):
    return build_tokenizer(write_vocab(build_vocab(CORPUS), tmp_path / "vocab.txt"))


def test_build_vocab_order_and_coverage():
    vocab = build_vocab(CORPUS, extra_words=["Triangle"])
    assert vocab[: len(SPECIAL_TOKENS)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = vocab[len(SPECIAL_TOKENS) :]
    assert words == sorted(words) and len(set(words)) == len(words)
    for word in ["red", "circle", ",", ".", "triangle", "a", "z", "0", "9"]:
        assert word in words, word
    assert "Triangle" not in words and "left," not in words  # lower-cased, punctuation split off


def test_special_ids_and_unknown_word(tokenizer):
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert tokenizer.mask_token_id == 4 and tokenizer.pad_token_id == 0
    input_ids, _ = tokenize(tokenizer, ["a purple circle"], max_length=10)
    a_id, circle_id = tokenizer.convert_tokens_to_ids(["a", "circle"])
    assert input_ids[0].tolist() == [2, a_id, 1, circle_id]


def test_round_trip_without_trailing_sep(tokenizer):
    input_ids, attention_mask = tokenize(tokenizer, CORPUS, max_length=40)
    assert input_ids.dtype == torch.long and attention_mask.dtype == torch.long
    for row, text in enumerate(CORPUS):
        length = int(attention_mask[row].sum())
        ids = input_ids[row, :length].tolist()
        assert ids[0] == tokenizer.cls_token_id and tokenizer.sep_token_id not in ids
        assert ids[1:] == tokenizer.convert_tokens_to_ids(split_words(text))
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ,", ",").replace(" .", ".") == text.lower()
        assert input_ids[row, length:].eq(0).all() and attention_mask[row, length:].eq(0).all()


def test_padding_and_truncation_lengths(tokenizer):
    texts = ["a red circle", "the large yellow star is in the top right corner"]
    longest, mask = tokenize(tokenizer, texts, max_length=30, padding="longest")
    assert longest.shape == (2, 11) and mask.sum(1).tolist() == [4, 11]
    padded, mask = tokenize(tokenizer, texts, max_length=30, padding="max_length")
    assert padded.shape == (2, 30) and mask.sum(1).tolist() == [4, 11]
    assert torch.equal(padded[:, :11], longest)
    truncated, mask = tokenize(tokenizer, texts, max_length=5)
    assert truncated.shape == (2, 5) and mask.sum(1).tolist() == [4, 5]
    assert torch.equal(truncated[1], longest[1, :5])


def test_add_eos_keeps_end_token_within_max_length(tokenizer):
    sep = tokenizer.sep_token_id
    input_ids, mask = tokenize(tokenizer, ["red", "the large yellow star is in the top right corner"], 6, add_eos=True)
    assert input_ids.shape == (2, 6)
    assert input_ids[0, :3].tolist() == [2, tokenizer.convert_tokens_to_ids("red"), sep] and mask[0].sum() == 3
    assert input_ids[1, -1] == sep and mask[1].all()  # truncated wordpieces, end token kept


def test_direct_call_follows_albef_convention(tokenizer):
    expected_ids, expected_mask = tokenize(tokenizer, CORPUS, max_length=12)
    direct = tokenizer(CORPUS, padding="longest", truncation=True, max_length=12, return_tensors="pt")
    assert torch.equal(direct["input_ids"], expected_ids) and torch.equal(direct["attention_mask"], expected_mask)


def test_bad_arguments(tokenizer, tmp_path: Path):
    with pytest.raises(ValueError, match="padding"):
        tokenize(tokenizer, ["a"], max_length=5, padding="do_not_pad")
    with pytest.raises(ValueError, match="list of strings"):
        tokenize(tokenizer, "a red circle", max_length=5)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="no vocab.txt"):
        build_tokenizer(empty_dir)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_tokenizer(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_tokenizer("./not/a/dir")
    (empty_dir / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="special tokens"):
        build_tokenizer(empty_dir)


def test_build_tokenizer_from_directory(tmp_path: Path):
    write_vocab(build_vocab(CORPUS), tmp_path / "vocab.txt")
    from_dir, from_file = build_tokenizer(tmp_path), build_tokenizer(str(tmp_path / "vocab.txt"))
    assert from_dir.get_vocab() == from_file.get_vocab()


def test_parity_with_albef_reference_tokenizer(reference_dir: Path, tmp_path: Path):
    """Our tokenize() reproduces the ids ALBEF's own tokenizer produced for the reference fixtures."""
    pretrain = load_reference(reference_dir, "pretrain_micro.pt")
    tokenizer = build_tokenizer(write_vocab(pretrain["vocab"], tmp_path / "vocab.txt"))
    no_truncation = 512  # calls without truncation: longer than any fixture text
    cases = [  # (file, texts key, tokens key, max_length, padding, add_eos)
        ("pretrain_micro.pt", "captions", "text", 25, "longest", False),
        ("retrieval_micro.pt", "captions", "text", 30, "max_length", False),
        ("retrieval_micro.pt", "captions", "text_train", 30, "longest", False),
        ("vqa_micro.pt", "questions", "question_test", no_truncation, "longest", False),
        ("vqa_micro.pt", "answer_list", "answer_input", no_truncation, "longest", True),
        ("nlvr_micro.pt", "texts", "text", no_truncation, "longest", False),
        ("ve_micro.pt", "texts", "text", no_truncation, "longest", False),
    ]
    for name, texts_key, tokens_key, max_length, padding, add_eos in cases:
        reference = load_reference(reference_dir, name)
        assert reference["vocab"] == pretrain["vocab"], name
        input_ids, attention_mask = tokenize(tokenizer, reference[texts_key], max_length, padding, add_eos=add_eos)
        assert torch.equal(input_ids, reference[tokens_key]["input_ids"]), (name, tokens_key)
        assert torch.equal(attention_mask, reference[tokens_key]["attention_mask"]), (name, tokens_key)
    # The fixture's recorded call, made directly on the tokenizer, gives the same ids too.
    call = "tokenizer(captions, padding='longest', truncation=True, max_length=25"
    assert pretrain["tokenizer_call"].startswith(call)
    direct = tokenizer(pretrain["captions"], padding="longest", truncation=True, max_length=25, return_tensors="pt")
    assert torch.equal(direct["input_ids"], pretrain["text"]["input_ids"])
