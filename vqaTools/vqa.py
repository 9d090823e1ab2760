"""Loader and index for the official VQA v2 annotation and question files.

Annotation file: ``{"annotations": [{"question_id", "image_id", "question_type", "answer_type",
"multiple_choice_answer", "answers": [{"answer", "answer_confidence", "answer_id"}, ...]}, ...]}``.
Question file: ``{"questions": [{"question_id", "image_id", "question"}, ...]}``.
Result file: ``[{"question_id": int, "answer": str}, ...]`` covering every question of the annotation file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from dataset.annotations import read_json

_ANNOTATION_KEYS = ("question_id", "image_id", "question_type", "answer_type", "answers")
_QUESTION_KEYS = ("question_id", "image_id", "question")


def _load_json_list(path: Path, top_key: str) -> list[dict]:
    """Read ``path`` and return the list stored under ``top_key``, with errors naming the file."""
    data = read_json(path, "VQA file")
    if not isinstance(data, dict) or not isinstance(data.get(top_key), list):
        raise ValueError(f'{path}: expected a JSON object with a "{top_key}" list')
    return data[top_key]


def _check_keys(path: Path, index: int, item: object, keys: Sequence[str]) -> None:
    if not isinstance(item, dict):
        raise ValueError(f"{path}: entry {index} is {type(item).__name__}, expected an object")
    missing = [key for key in keys if key not in item]
    if missing:
        raise ValueError(f"{path}: entry {index} lacks key(s) {missing}; expected {list(keys)}")


class VQA:
    """Index of a VQA v2 split: ``qa`` (question_id -> annotation), ``qqa`` (question_id -> question),
    ``img_to_qa`` (image_id -> annotations)."""

    def __init__(self, annotation_file: str | Path, question_file: str | Path) -> None:
        self.annotation_file = Path(annotation_file)
        self.question_file = Path(question_file)
        annotations = _load_json_list(self.annotation_file, "annotations")
        questions = _load_json_list(self.question_file, "questions")

        self.qa: dict[int, dict] = {}
        self.img_to_qa: dict[int, list[dict]] = {}
        for index, ann in enumerate(annotations):
            _check_keys(self.annotation_file, index, ann, _ANNOTATION_KEYS)
            answers = ann["answers"]
            if (
                not isinstance(answers, list)
                or not answers
                or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers)
            ):
                raise ValueError(
                    f'{self.annotation_file}: entry {index} (question_id {ann["question_id"]}): "answers" must be a '
                    'non-empty list of {"answer": str, ...}'
                )
            if ann["question_id"] in self.qa:
                raise ValueError(f"{self.annotation_file}: entry {index}: duplicate question_id {ann['question_id']}")
            self.qa[ann["question_id"]] = ann
            self.img_to_qa.setdefault(ann["image_id"], []).append(ann)

        self.qqa: dict[int, dict] = {}
        for index, question in enumerate(questions):
            _check_keys(self.question_file, index, question, _QUESTION_KEYS)
            self.qqa[question["question_id"]] = question
        without_question = [qid for qid in self.qa if qid not in self.qqa]
        if without_question:
            raise ValueError(
                f"{self.question_file}: {len(without_question)} question_id(s) of {self.annotation_file} have no "
                f"question, e.g. {without_question[:5]}"
            )

    def __len__(self) -> int:
        return len(self.qa)

    def get_question_ids(
        self,
        image_ids: Iterable[int] | None = None,
        question_types: Iterable[str] | None = None,
        answer_types: Iterable[str] | None = None,
    ) -> list[int]:
        """Question ids, optionally restricted to some images, question types and answer types."""
        if image_ids is None:
            candidates = list(self.qa.values())
        else:
            candidates = [ann for image_id in image_ids for ann in self.img_to_qa.get(image_id, [])]
        if question_types is not None:
            wanted = set(question_types)
            candidates = [ann for ann in candidates if ann["question_type"] in wanted]
        if answer_types is not None:
            wanted = set(answer_types)
            candidates = [ann for ann in candidates if ann["answer_type"] in wanted]
        return [ann["question_id"] for ann in candidates]

    def get_image_ids(self, question_ids: Iterable[int] | None = None) -> list[int]:
        """Image ids of the given questions (all images when None), without duplicates, in first-seen order."""
        if question_ids is None:
            return list(self.img_to_qa)
        return list(dict.fromkeys(self._annotation(qid)["image_id"] for qid in question_ids))

    def question_types(self) -> set[str]:
        return {ann["question_type"] for ann in self.qa.values()}

    def answer_types(self) -> set[str]:
        return {ann["answer_type"] for ann in self.qa.values()}

    def _annotation(self, question_id: int) -> dict:
        if question_id not in self.qa:
            raise ValueError(f"question_id {question_id} is not in {self.annotation_file}")
        return self.qa[question_id]

    def load_results(self, results: str | Path | Sequence[dict]) -> dict[int, str]:
        """Validate predictions (a result file path or the list itself) and return question_id -> answer.

        Every question of the annotation file must be answered exactly once, as the official evaluation requires.
        """
        source = "results"
        if isinstance(results, (str, Path)):
            source = str(results)
            results = _load_result_file(Path(results))
        if not isinstance(results, Sequence):
            raise ValueError(f'{source}: expected a list of {{"question_id", "answer"}}, got {type(results).__name__}')
        answers: dict[int, str] = {}
        for index, item in enumerate(results):
            _check_keys(Path(source), index, item, ("question_id", "answer"))
            question_id, answer = item["question_id"], item["answer"]
            if isinstance(question_id, str) and question_id.isdigit():
                question_id = int(question_id)
            if not isinstance(answer, str):
                raise ValueError(f"{source}: entry {index}: answer must be a string, got {type(answer).__name__}")
            if question_id not in self.qa:
                raise ValueError(
                    f"{source}: entry {index}: question_id {question_id!r} is not in {self.annotation_file}"
                )
            if question_id in answers:
                raise ValueError(f"{source}: entry {index}: question_id {question_id} is answered twice")
            answers[question_id] = answer
        missing = [qid for qid in self.qa if qid not in answers]
        if missing:
            raise ValueError(
                f"{source}: {len(missing)} question(s) of {self.annotation_file} have no answer, e.g. {missing[:5]}"
            )
        return answers


def _load_result_file(path: Path) -> list:
    return read_json(path, "VQA result file")
