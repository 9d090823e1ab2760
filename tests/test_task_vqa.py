"""VQA: answer ranking equals brute-force scoring of every answer; VQA.py trains and evaluates through its real entry
point on 1 process and on 2 gloo processes, writes the official result format and learns above a constant answer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import create_model
from tests.test_models import SPECIAL, tiny_cfg
from vqaTools import vqa_accuracy

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.bert_overrides.hidden_size=32", "model.bert_overrides.intermediate_size=64",
              "model.bert_overrides.encoder_width=32", "model.vit.width=32", "model.image_res=32"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vqa_argv(data: Path, out: Path, *opts: str) -> list[str]:
    return ["--config", str(REPO / "configs/demo/VQA.yaml"), "--output_dir", str(out), "--device", "cpu", "--opts",
            f"model.tokenizer={data / 'vocab.txt'}", f"data.train_file=[{data / 'vqa_train.json'}]",
            f"data.val_file={data / 'vqa_val.json'}", f"data.test_file={data / 'vqa_test.json'}",
            f"data.answer_list={data / 'answer_list.json'}", f"data.image_root={data / 'images'}",
            f"data.vg_root={data / 'images'}",
            f"data.val_question_file={data / 'vqa_v2/v2_OpenEnded_mscoco_val_questions.json'}",
            f"data.val_annotation_file={data / 'vqa_v2/v2_mscoco_val_annotations.json'}",
            "data.num_workers=0", "scheduler.warmup_steps=2", *TINY_MODEL, *opts]


def test_answer_ranking_equals_brute_force(tmp_path):
    torch.manual_seed(0)
    model = create_model("vqa", tiny_cfg(tmp_path), special=SPECIAL).eval()
    num_answers, k = 9, 4
    answers = torch.randint(5, 60, (num_answers, 4))
    answers[:, 0] = SPECIAL.cls
    answers[:, 3] = SPECIAL.sep
    answers[::3, 2:] = torch.tensor([SPECIAL.sep, SPECIAL.pad])  # some shorter answers
    answer_mask = (answers != SPECIAL.pad).long()
    image = torch.randn(3, 3, 32, 32)
    questions = torch.randint(5, 60, (3, 6))
    questions[:, 0] = SPECIAL.cls
    question_mask = torch.ones_like(questions)
    with torch.no_grad():
        states = model.encode_question(image, questions, question_mask)
        top_ids, top_probs = model.rank_answers(states, question_mask, answers, answer_mask, k)
        all_ids, _ = model.rank_answers(states, question_mask, answers, answer_mask, num_answers)
        # Brute force: every (question, answer) pair through the decoder, one at a time.
        first_logp = torch.zeros(3, num_answers)
        seq_logp = torch.zeros(3, num_answers)
        for q in range(3):
            for a in range(num_answers):
                length = int(answer_mask[a].sum())
                ids = answers[a:a + 1, :length]
                logits = model.text_decoder(ids, None, encoder_hidden_states=states[q:q + 1],
                                            encoder_attention_mask=question_mask[q:q + 1])
                logp = F.log_softmax(logits[0, :-1], dim=-1).gather(1, ids[0, 1:, None]).squeeze(1)
                first_logp[q, a] = logp[0]
                seq_logp[q, a] = logp.sum()
    score = first_logp + seq_logp  # ALBEF's re-ranking score: log p(first token) + log p(answer)
    for q in range(3):
        assert all_ids[q].tolist() == score[q].argsort(descending=True).tolist()  # k = all: a full ranking
        shortlist = first_logp[q].argsort(descending=True)[:k]  # stage 1: the k likeliest first tokens
        expected = shortlist[score[q, shortlist].argsort(descending=True)]
        assert top_ids[q].tolist() == expected.tolist()
        torch.testing.assert_close(top_probs[q], score[q, expected].softmax(dim=0), atol=1e-5, rtol=1e-4)


def constant_answer_accuracy(val_entries: list[dict]) -> float:
    """The trivial baseline: the single answer that scores best on the val split itself, for every question."""
    candidates = Counter(answer for entry in val_entries for answer in entry["answer"])
    return max(100.0 * sum(vqa_accuracy(answer, e["answer"]) for e in val_entries) / len(val_entries)
               for answer in candidates)


def check_result_file(path: Path, entries: list[dict], answer_list: list[str]) -> None:
    results = json.loads(path.read_text())
    assert all(set(item) == {"question_id", "answer"} for item in results)
    assert sorted(item["question_id"] for item in results) == sorted(entry["question_id"] for entry in entries)
    assert all(isinstance(item["question_id"], int) and item["answer"] in answer_list for item in results)


def majority(entry: dict) -> str:
    return Counter(entry["answer"]).most_common(1)[0][0]


@pytest.mark.slow
def test_vqa_learns_above_a_constant_answer_slow(synthetic_dir, tmp_path):
    """~330 optimizer steps of a tiny model (20-100 s on a shared 2-core CPU). Learning is measured as top-1
    agreement with the annotators' majority answer, against the best constant answer; the official accuracy is
    checked to be reported (per answer type too)."""
    from VQA import main

    out = tmp_path / "vqa"
    metrics = main(vqa_argv(synthetic_dir, out, "train.epochs=30", "train.eval_every_epochs=30", "data.batch_size=16",
                            "optimizer.lr=3e-3", "model.distill=false"))
    val = json.loads((synthetic_dir / "vqa_val.json").read_text())
    answer_list = json.loads((synthetic_dir / "answer_list.json").read_text())
    check_result_file(out / "vqa_result_val_eval1.json", val, answer_list)
    check_result_file(out / "vqa_result_test_eval1.json", json.loads((synthetic_dir / "vqa_test.json").read_text()),
                      answer_list)
    predicted = {item["question_id"]: item["answer"]
                 for item in json.loads((out / "vqa_result_val_eval1.json").read_text())}
    agreement = sum(predicted[e["question_id"]] == majority(e) for e in val) / len(val)
    constant = max(Counter(majority(e) for e in val).values()) / len(val)
    assert agreement > constant + 0.08, (agreement, constant)
    assert {"val/accuracy", "val/accuracy_yes_no", "val/accuracy_number", "val/accuracy_other"} <= set(metrics)
    assert metrics["val/accuracy"] >= constant_answer_accuracy(val) - 5.0, metrics
    assert (out / "checkpoint_best.pth").is_file()  # the demo config selects on val accuracy


@pytest.mark.slow
@pytest.mark.dist
def test_vqa_two_gloo_processes(synthetic_dir, tmp_path):
    out = tmp_path / "vqa2"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(REPO / "VQA.py"),
               *vqa_argv(synthetic_dir, out, "train.epochs=1", "train.max_steps=3", "data.batch_size=8")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    val = json.loads((synthetic_dir / "vqa_val.json").read_text())
    answer_list = json.loads((synthetic_dir / "answer_list.json").read_text())
    check_result_file(out / "vqa_result_val_eval1.json", val, answer_list)  # each question once, from both ranks
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val/accuracy" in r]
    assert evals and 0.0 <= evals[-1]["val/accuracy"] <= 100.0
    assert evals[-1]["val/num_questions"] == len(val)
