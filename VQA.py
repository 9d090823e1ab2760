"""Visual question answering (ALBEF): the question is encoded with image fusion, an answer decoder ranks a fixed list.

    torchrun --nproc_per_node=8 VQA.py --config configs/VQA.yaml --checkpoint ALBEF_4M.pth --output_dir output/vqa
    python VQA.py --config configs/VQA.yaml --checkpoint vqa.pth --evaluate --output_dir output/vqa_eval

Training: ``data.train_file`` (``[{question_id, question, answer: [..], image, dataset: vqa|vg}]``); each question's
distinct answers are weighted by their share of the annotators (Visual Genome answers 0.5); momentum distillation
with ``model.distill``. Evaluation of ``data.val_file`` / ``data.test_file``: the first-token probabilities of the
answer decoder pick the ``eval.k_test`` likeliest answers of ``data.answer_list``, the full answer likelihood re-ranks
them (batched, each rank answers its share, merged in memory). Each evaluation writes
``vqa_result_<split>_eval<N>.json`` in the official format (``[{"question_id", "answer"}]``, the test-dev submission
file; never overwritten: N counts on from the largest number already in the output folder). The val split is scored
with the official VQA accuracy (vqaTools; ``eval.vqa_rules``: "2021", the current official code, or "2017", the
version ALBEF vendored): against ``data.val_annotation_file`` and
``data.val_question_file`` (VQA v2 files; overall and per answer type) when given, else against the annotator answers
in ``data.val_file``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from dataset.annotations import load_answer_list
from dataset.datasets import VQADataset
from dataset.tokenizer import tokenize
from dataset.transforms import normalize
from engine import dist, main_for
from tasks.base import AlbefTask, task_defaults, unwrap
from vqaTools import VQA, VQAEval, check_rules, vqa_accuracy


class VQATask(AlbefTask):
    name = "vqa"
    model_task = "vqa"
    config_defaults = task_defaults(
        data={
            "train_file": [],  # VQA-format training files (ALBEF: vqa_train, vqa_val, vg_qa)
            "val_file": "",  # VQA-format file with answers, scored with the VQA accuracy ("" = none)
            "test_file": "",  # VQA-format file without answers: result file only ("" = none)
            "answer_list": "",  # JSON list of the candidate answers ranked at evaluation
            "vg_root": "",  # image folder of the 'vg' (Visual Genome) entries
            "val_question_file": "",  # official VQA v2 question file of val_file (with val_annotation_file)
            "val_annotation_file": "",  # official VQA v2 annotation file of val_file: per answer type accuracy
            "max_answer_tokens": 10,  # token limit of an answer, [CLS] and [SEP] included
        },
        eval={
            "k_test": 128,  # answers re-ranked by their full likelihood per question
            # Official VQA accuracy rules: "2021" (the evaluation code as published now) or "2017" (the version ALBEF
            # vendored, for comparing with its published local numbers); see vqaTools/vqa_eval.py.
            "vqa_rules": "2021",
        },
    )
    # ALBEF trains on train + val and submits test-dev, so there is no model selection by default; with a val split
    # set train.best_metric=accuracy.
    best_metric = None

    def __init__(self, config, device) -> None:
        super().__init__(config, device)
        check_rules(config.eval.vqa_rules)  # a misspelt rule set fails now, not after training

    def build_train_loader(self):
        data = self.config.data
        if not data.train_file:
            raise ValueError("data.train_file is empty: give the VQA training files")
        dataset = VQADataset(list(data.train_file), self.transform("train"), self.image_root(),
                             vg_root=data.vg_root or None, train=True, max_words=int(data.max_words),
                             **self.dataset_options())
        collator = dataset.make_collator(self.tokenizer, int(data.max_tokens), padding=self.text_padding(train=True),
                                         max_answer_length=int(data.max_answer_tokens))
        return self.loader(dataset, train=True, collate_fn=collator)

    def train_step(self, model, batch: dict[str, Any], progress) -> dict[str, Any]:
        batch = self.to_device(batch)
        return model(batch["image"], batch["question_ids"], batch["question_mask"], batch["answer_ids"],
                     batch["answer_mask"], batch["answer_weights"], batch["answer_counts"], alpha=self.alpha(progress))

    def eval_splits(self) -> list[str]:
        return [split for split in ("val", "test") if self.config.data[f"{split}_file"]]

    def build_eval_dataset(self, split: str, **options: Any) -> VQADataset:
        data = self.config.data
        return VQADataset(data[f"{split}_file"], self.transform("test"), self.image_root(),
                          vg_root=data.vg_root or None, train=False, **options)

    def evaluate(self, model, split: str) -> dict[str, float]:
        data = self.config.data
        if not data.answer_list:
            raise ValueError("data.answer_list is empty: evaluation ranks the answers of that JSON list")
        answer_list = load_answer_list(data.answer_list)
        dataset = self.eval_dataset(split)
        loader = self.loader(dataset, train=False, collate_fn=dataset.make_collator(self.tokenizer,
                                                                                    int(data.max_tokens)))
        predictions = answer_questions(model, loader, self.tokenizer, answer_list, self.device,
                                       int(self.config.eval.k_test), int(data.max_answer_tokens))
        results = [{"question_id": qid, "answer": predictions[qid]} for qid in sorted(predictions)]
        metrics: dict[str, float] | None = {"num_questions": float(len(results))}
        if dist.is_main():
            self.write_result(f"vqa_result_{split}_eval{{n}}.json", results)
            if split == "val":
                metrics.update(self.accuracy(dataset.entries, predictions))
        return dist.broadcast_object(metrics)

    def accuracy(self, entries: list[dict], predictions: dict[int, str]) -> dict[str, float]:
        """VQA accuracy in percent: official files when configured (overall + per answer type), else the annotator
        answers of the evaluation file."""
        data = self.config.data
        rules = check_rules(self.config.eval.vqa_rules)
        if data.val_annotation_file and data.val_question_file:
            scores = VQAEval(VQA(data.val_annotation_file, data.val_question_file), predictions,
                             rules=rules).evaluate()
            out = {"accuracy": float(scores["overall"])}
            for answer_type, value in scores["per_answer_type"].items():
                out["accuracy_" + re.sub(r"\W+", "_", answer_type)] = float(value)
            return out
        missing = [entry["question_id"] for entry in entries if not entry.get("answer")]
        if missing:
            raise ValueError(f"{data.val_file}: questions {missing[:5]} have no answers; the val split is scored "
                             "against them (or set data.val_annotation_file and data.val_question_file)")
        scores = [vqa_accuracy(predictions[entry["question_id"]], entry["answer"], rules) for entry in entries]
        return {"accuracy": 100.0 * sum(scores) / len(scores)}


@torch.no_grad()
def answer_questions(model, loader, tokenizer: Any, answer_list: list[str], device: torch.device, k: int,
                     max_answer_tokens: int) -> dict[Any, str]:
    """question_id -> the top-ranked answer, for every question of ``loader``, on every rank (each rank answers its
    share; shares are gathered in memory, padding repeats dropped)."""
    model = unwrap(model)
    answer_ids, answer_mask = tokenize(tokenizer, answer_list, max_answer_tokens, add_eos=True)  # (A, La)
    answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
    pairs: list[tuple[Any, int]] = []
    for batch in loader:
        image = normalize(batch["image"].to(device, non_blocking=True))
        question_ids, question_mask = batch["question_ids"].to(device), batch["question_mask"].to(device)
        states = model.encode_question(image, question_ids, question_mask)
        topk_ids, _ = model.rank_answers(states, question_mask, answer_ids, answer_mask, k)  # (B, k)
        ids = batch["question_id"]
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        pairs += zip(ids, topk_ids[:, 0].tolist(), strict=True)
    merged: dict[Any, str] = {}
    for share in dist.all_gather_object(pairs):
        for question_id, answer_index in share:
            merged.setdefault(question_id, answer_list[answer_index])
    return merged


main = main_for(VQATask)

if __name__ == "__main__":
    main()
