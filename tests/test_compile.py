"""train.compile through the real entry scripts: the tiny pretraining model and VQA fine-tuning, compiled, over
batches whose texts have different lengths (issue 16, item 5: the second compiled step recompiled for its new text
length and crashed in mask_tokens).

The backend is aot_eager: it captures the forward and backward graphs as inductor does (the capture is what broke) but
generates no code, so the test stays quick on a CPU. The runs shrink the demo model to fewer layers (compile time grows
with the number of layers, not their width).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import dataset.datasets
from engine.backend import compile_model
from tests.conftest import REPO

MAX_TOKENS = 24
COMPILED = ["train.compile=true", "train.compile_backend=aot_eager", "train.max_steps=4", "train.log_every_steps=1",
            "train.eval_every_epochs=0", "data.batch_size=8", "data.num_workers=0", "scheduler.warmup_steps=0",
            f"data.max_tokens={MAX_TOKENS}", "model.bert_overrides.num_hidden_layers=2",
            "model.bert_overrides.fusion_layer=1", "model.vit.depth=1"]


def run_compiled(monkeypatch, main, config: str, out: Path, *opts: str) -> tuple[list[dict], list[tuple[int, ...]]]:
    """Run an entry script with COMPILED; returns its per-step log records and, for every text batch the collator
    tokenised, (max_length asked for, number of texts, width of the padded batch, length of its longest text)."""
    tokenised: list[tuple[int, ...]] = []
    tokenize = dataset.datasets.tokenize

    def recording_tokenize(tokenizer, texts, max_length, padding="longest", add_eos=False):
        ids, mask = tokenize(tokenizer, texts, max_length, padding=padding, add_eos=add_eos)
        tokenised.append((max_length, *ids.shape, int(mask.sum(1).max())))
        return ids, mask

    monkeypatch.setattr(dataset.datasets, "tokenize", recording_tokenize)  # the collators run here (no workers)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False):  # compile_model sets it for the process
        main(["--config", str(REPO / "configs" / "demo" / config), "--output_dir", str(out), "--device", "cpu",
              "--opts", *opts, *COMPILED])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "train/total_loss" in r], tokenised


def check_compiled_run(steps: list[dict], loss_names: list[str], max_compiles: int) -> None:
    """4 steps with finite losses, the 3 or 4 compiled ones (the first runs eagerly when the engine counts its FLOPs)
    compiled at most ``max_compiles`` times, as one graph: a recompile per step would be 3 or 4 here."""
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for record in steps:
        for name in loss_names:
            assert math.isfinite(record[f"train/{name}"]), (record["step"], name, record[f"train/{name}"])
    frames = counters["frames"]
    assert 1 <= frames["total"] <= max_compiles and frames["ok"] == frames["total"], dict(frames)
    assert not counters["graph_break"], dict(counters["graph_break"])  # one graph per step, not pieces
    assert counters["stats"]["unique_graphs"] <= max_compiles, dict(counters["stats"])


@pytest.mark.slow
def test_compiled_pretraining_with_varying_caption_lengths(synthetic_dir, tmp_path, monkeypatch):
    from Pretrain import main

    steps, tokenised = run_compiled(
        monkeypatch, main, "Pretrain.yaml", tmp_path / "pretrain", f"model.tokenizer={synthetic_dir / 'vocab.txt'}",
        f"data.train_file=[{synthetic_dir / 'pretrain.json'}]", "data.eval_file=")
    # One compile: texts padded, the masked-token count a symbol, the ramping distillation alpha a tensor input.
    check_compiled_run(steps, ["loss_ita", "loss_itm", "loss_mlm", "total_loss"], max_compiles=1)
    assert len(tokenised) >= 4
    assert {width for _, _, width, _ in tokenised} == {MAX_TOKENS}  # under compile every batch is padded to max_tokens
    assert len({longest for *_, longest in tokenised[:4]}) >= 2, tokenised  # ... although their captions differ


@pytest.mark.slow
def test_compiled_vqa_with_varying_question_lengths_and_answer_counts(synthetic_dir, tmp_path, monkeypatch):
    from VQA import main

    s = synthetic_dir
    steps, tokenised = run_compiled(
        monkeypatch, main, "VQA.yaml", tmp_path / "vqa", f"model.tokenizer={s / 'vocab.txt'}",
        f"data.train_file=[{s / 'vqa_train.json'}]", f"data.image_root={s / 'images'}", f"data.vg_root={s / 'images'}",
        f"data.answer_list={s / 'answer_list.json'}", "data.val_file=", "data.test_file=", "data.max_answer_tokens=6")
    # One recompile at most: when the number of answers first changes, that dimension becomes a symbol.
    check_compiled_run(steps, ["loss_vqa", "total_loss"], max_compiles=2)
    questions = [entry for entry in tokenised if entry[0] == MAX_TOKENS]
    answers = [entry for entry in tokenised if entry[0] == 6]
    assert len(questions) >= 4 and len(answers) == len(questions)
    assert {width for _, _, width, _ in questions} == {MAX_TOKENS} and {width for _, _, width, _ in answers} == {6}
    assert len({longest for *_, longest in questions[:4]}) >= 2, questions
    assert len({count for _, count, _, _ in answers[:4]}) >= 2, answers  # how many answers 8 questions have varies


@pytest.mark.slow
def test_compiled_pretraining_step_equals_eager(tmp_path):
    """The memory-saving layers (models.layers' autograd Functions: ViT LeanBlock, the lean MLPs, the tied decoder;
    the ITC loss that forms its gradient in forward) are traced into the compiled graph; the sparse word-embedding
    gradient is off there. Compiled, one pretraining step gives the eager losses and gradients (dropout off, same
    negatives and masks; alpha a tensor, as tasks pass it under compile, against a float)."""
    from models import create_model
    from models.albef import mask_tokens
    from tests.test_models import SPECIAL, tiny_batch, tiny_cfg

    torch.manual_seed(0)
    eager = create_model("pretrain", tiny_cfg(tmp_path, bert_overrides={"hidden_dropout_prob": 0.0,
                                                                         "attention_probs_dropout_prob": 0.0}),
                         special=SPECIAL).train()
    compiled = copy.deepcopy(eager)
    image, ids, mask = tiny_batch()
    mlm_ids, mlm_labels = mask_tokens(ids, SPECIAL, 0.5, generator=torch.Generator().manual_seed(0))
    inputs = {"neg_image_for_text": torch.tensor([1, 2, 3, 0]), "neg_text_for_image": torch.tensor([3, 0, 1, 2]),
              "mlm_input_ids": mlm_ids, "mlm_labels": mlm_labels}
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False):
        step = compile_model(compiled, "aot_eager", "default")
        compiled_losses = step(image, ids, mask, alpha=torch.tensor(0.4), **inputs)
        sum(compiled_losses.values()).backward()
    eager_losses = eager(image, ids, mask, alpha=0.4, **inputs)
    sum(eager_losses.values()).backward()
    assert counters["frames"]["ok"] == 1 and not counters["graph_break"]
    for name, value in eager_losses.items():
        torch.testing.assert_close(compiled_losses[name], value, atol=1e-5, rtol=1e-5, msg=name)
    grads = dict(compiled.named_parameters())
    checked = 0
    for name, param in eager.named_parameters():
        if param.grad is None:
            assert grads[name].grad is None, name
            continue
        torch.testing.assert_close(grads[name].grad.to_dense(), param.grad.to_dense(), atol=1e-5, rtol=1e-4, msg=name)
        checked += 1
    assert checked > 50
    for name, buffer in eager.named_buffers():  # queues and their pointer, updated in forward
        torch.testing.assert_close(dict(compiled.named_buffers())[name], buffer, msg=name)
