"""The official VQA accuracy metric on hand-computed cases under both rule sets (the current official code and the
2017 version ALBEF vendored), and the VQA annotation/result loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vqaTools import VQA, VQA_RULES, VQAEval, normalize_answer, vqa_accuracy


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("yes.", "yes"),  # trailing period dropped
        ("  Yes\n", "yes"),  # whitespace, case
        ("Two", "2"),  # number words
        ("none", "0"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # digit-comma-digit: punctuation deleted, not spaced
        ("red,blue", "red blue"),  # otherwise a mark becomes a space
        ("red, blue", "red blue"),  # a mark next to a space is deleted
        ("black/white", "black white"),
        ("(left)", "left"),
        ("a dog", "dog"),  # articles
        ("the one on an island", "1 on island"),
        ("dont", "don't"),  # contractions
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("its", "its"),  # an ordinary word, not a contraction
        ("somebody'd", "somebodyd"),  # the official table's reversed entry
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def _brute_force_accuracy(pred: str, answers: list[str]) -> float:
    """Leave each annotator out in turn, written out the long way."""
    accs = []
    for left_out in range(len(answers)):
        others = answers[:left_out] + answers[left_out + 1 :]
        accs.append(min(1.0, sum(other == pred for other in others) / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize("rules", VQA_RULES)
@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_partial_credit(matches: int, expected: float, rules: str) -> None:
    answers = ["red"] * matches + ["blue"] * (10 - matches)
    acc = vqa_accuracy("red", answers, rules)
    assert acc == pytest.approx(expected, abs=1e-12)
    assert acc == pytest.approx(_brute_force_accuracy("red", answers), abs=1e-12)


def test_partial_credit_brute_force_with_normalisation_2017() -> None:
    # 2017 rules: annotators disagree, so their answers go through the punctuation step only; the prediction gets the
    # full normalisation.
    answers = ["2", "2", "two", "3", "2.", "2", "3", "4", "2", "3"]
    stripped = ["2", "2", "two", "3", "2", "2", "3", "4", "2", "3"]
    assert vqa_accuracy("Two.", answers, "2017") == pytest.approx(_brute_force_accuracy("2", stripped))
    assert vqa_accuracy("Two.", answers, "2017") == pytest.approx(1.0)  # five "2" answers once "2." loses its period
    assert vqa_accuracy("2", answers[:5] + ["5"] * 5, "2017") == pytest.approx(0.9)  # "2", "2", "2." match
    # "two" among the annotators is not turned into "2" (ground truth only gets the punctuation step).
    assert vqa_accuracy("three", answers, "2017") == pytest.approx(0.9)
    assert vqa_accuracy("four", answers, "2017") == pytest.approx(0.3)


def test_partial_credit_brute_force_with_normalisation_2021() -> None:
    # Current rules: annotators disagree, so every answer gets the full normalisation ("two" -> "2", "2." -> "2").
    answers = ["2", "2", "two", "3", "2.", "2", "3", "4", "2", "3"]
    normalised = ["2", "2", "2", "3", "2", "2", "3", "4", "2", "3"]
    assert [normalize_answer(answer) for answer in answers] == normalised
    for pred in ("Two.", "three", "4", "five"):
        assert vqa_accuracy(pred, answers) == pytest.approx(_brute_force_accuracy(normalize_answer(pred), normalised))
    assert vqa_accuracy("Two.", answers) == pytest.approx(1.0)  # six matches
    assert vqa_accuracy("three", answers) == pytest.approx(0.9)
    assert vqa_accuracy("four", answers) == pytest.approx(0.3)


# The cases where the two official versions differ (issue 18): (prediction, answers, 2021 accuracy, 2017 accuracy).
RULE_CASES = [
    ("Yes", ["yes"] * 10, 0.0, 1.0),  # all agree: 2021 compares the prediction verbatim
    ("2", ["two"] * 9 + ["2"], 1.0, 0.3),  # disagreement: 2021 normalises the answers too ("two" -> "2")
    ("none", ["none"] * 4 + ["1"] * 6, 1.0, 0.0),  # both sides become "0" in 2021; 2017 leaves "none" in the answers
    ("dog", ["the dog"] * 5 + ["cat"] * 5, 1.0, 0.0),  # articles dropped from the answers in 2021
    ("yes", ["yes "] * 5 + ["no"] * 5, 1.0, 0.0),  # 2021 strips the answers' whitespace
    # Cases where they agree.
    ("yes", ["yes"] * 10, 1.0, 1.0),
    ("red", ["red"] * 3 + ["blue"] * 7, 0.9, 0.9),
    ("Red.", ["red"] * 3 + ["blue"] * 7, 0.9, 0.9),  # disagreement: the prediction is normalised in both
    (" yes\t", ["yes"] * 10, 1.0, 1.0),  # whitespace goes in both
    ("yes", ["yes!"] * 10, 0.0, 0.0),  # all agree: no punctuation step on the answers in either
]


@pytest.mark.parametrize(("pred", "answers", "acc_2021", "acc_2017"), RULE_CASES)
def test_rule_sets(pred: str, answers: list[str], acc_2021: float, acc_2017: float) -> None:
    assert vqa_accuracy(pred, answers) == pytest.approx(acc_2021, abs=1e-12)  # the current rules are the default
    assert vqa_accuracy(pred, answers, "2021") == pytest.approx(acc_2021, abs=1e-12)
    assert vqa_accuracy(pred, answers, "2017") == pytest.approx(acc_2017, abs=1e-12)


def test_identical_answers_are_compared_verbatim() -> None:
    # Both official versions only process ground truth when annotators disagree.
    assert vqa_accuracy("yes", ["yes"] * 10, "2017") == 1.0
    assert vqa_accuracy("Yes!", ["yes"] * 10, "2017") == 1.0  # 2017: the prediction is always normalised
    assert vqa_accuracy("Yes!", ["yes"] * 10, "2021") == 0.0  # 2021: not when the annotators agree
    assert vqa_accuracy("yes", ["yes."] * 9 + ["no"], "2017") == 1.0  # disagreement: "yes." -> "yes"
    assert vqa_accuracy("yes", ["yes."] * 9 + ["no"], "2021") == 1.0
    # As in the official code, a mark with no space beside it becomes a space: ground-truth "yes!" -> "yes " (2017);
    # the 2021 rules also strip that space and match.
    assert vqa_accuracy("yes", ["yes!"] * 9 + ["no"], "2017") == 0.0
    assert vqa_accuracy("yes", ["yes!"] * 9 + ["no"], "2021") == 1.0


def test_unknown_rules_rejected() -> None:
    with pytest.raises(ValueError, match=r"rules '2019'.*\['2021', '2017'\]"):
        vqa_accuracy("yes", ["yes"] * 10, "2019")


def test_empty_answers_rejected() -> None:
    with pytest.raises(ValueError, match="gt_answers is empty"):
        vqa_accuracy("yes", [])


def _question(qid: int, image_id: int, qtype: str, atype: str, answers: list[str]) -> tuple[dict, dict]:
    annotation = {
        "question_id": qid,
        "image_id": image_id,
        "question_type": qtype,
        "answer_type": atype,
        "multiple_choice_answer": answers[0],
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
    }
    return annotation, {"question_id": qid, "image_id": image_id, "question": f"question {qid}?"}


@pytest.fixture()
def vqa_files(tmp_path: Path) -> tuple[Path, Path]:
    items = [
        _question(1, 10, "is the", "yes/no", ["yes"] * 10),
        _question(2, 10, "how many", "number", ["2"] * 2 + ["two"] * 2 + ["3"] * 6),
        _question(3, 11, "what color", "other", ["red"] * 3 + ["blue"] * 7),
        _question(4, 11, "is the", "yes/no", ["no"] * 10),
    ]
    ann_file, q_file = tmp_path / "ann.json", tmp_path / "q.json"
    ann_file.write_text(json.dumps({"annotations": [a for a, _ in items]}))
    q_file.write_text(json.dumps({"questions": [q for _, q in items]}))
    return ann_file, q_file


def test_vqa_index(vqa_files: tuple[Path, Path]) -> None:
    vqa = VQA(*vqa_files)
    assert len(vqa) == 4
    assert sorted(vqa.get_question_ids(image_ids=[11])) == [3, 4]
    assert sorted(vqa.get_question_ids(answer_types=["yes/no"])) == [1, 4]
    assert vqa.get_question_ids(question_types=["how many"]) == [2]
    assert vqa.get_image_ids([1, 2, 3]) == [10, 11]
    assert vqa.qqa[3]["question"] == "question 3?"


@pytest.mark.parametrize(
    ("rules", "yes_no", "number"),
    [
        ("2021", 0.0, 100.0),  # "Yes" is compared verbatim to 10 x "yes"; "two" matches "2" and "two" -> 1.0
        ("2017", 50.0, 60.0),  # "Yes" normalised -> 1.0; "two" -> "2" matches the two "2" only -> 0.6
    ],
)
def test_vqa_eval(vqa_files: tuple[Path, Path], tmp_path: Path, rules: str, yes_no: float, number: float) -> None:
    vqa = VQA(*vqa_files)
    result_file = tmp_path / "results.json"
    predictions = [
        {"question_id": 1, "answer": "Yes"},  # 10 x "yes": 2021 0.0, 2017 1.0
        {"question_id": 2, "answer": "two"},  # "2" x2 + "two" x2 + "3" x6: 2021 1.0 (4 matches), 2017 0.6
        {"question_id": 3, "answer": "red"},  # "red" x3 -> 0.9 under both
        {"question_id": 4, "answer": "yes"},  # 0.0
    ]
    result_file.write_text(json.dumps(predictions))
    results = vqa.load_results(result_file)
    assert results == {1: "Yes", 2: "two", 3: "red", 4: "yes"}
    evaluator = VQAEval(vqa, results, rules=rules)
    acc = evaluator.evaluate()
    assert acc["overall"] == round((yes_no * 2 + number + 90.0) / 4, 2)
    assert acc["per_answer_type"] == {"yes/no": yes_no, "number": number, "other": 90.0}
    assert acc["per_question_type"] == {"is the": yes_no, "how many": number, "what color": 90.0}
    assert evaluator.per_question[3] == pytest.approx(90.0)
    assert VQAEval(vqa, results).evaluate() == VQAEval(vqa, results, rules="2021").evaluate()  # the default
    with pytest.raises(ValueError, match="rules 'official'"):
        VQAEval(vqa, results, rules="official")


def test_vqa_eval_rounds_to_two_decimals(vqa_files: tuple[Path, Path]) -> None:
    vqa = VQA(*vqa_files)
    results = vqa.load_results(
        [
            {"question_id": 1, "answer": "no"},
            {"question_id": 2, "answer": "x"},
            {"question_id": 3, "answer": "red"},
            {"question_id": 4, "answer": "no"},
        ]  # fmt: skip
    )
    # (0 + 0 + 0.9 + 1) / 4 = 0.475 -> 47.5
    assert VQAEval(vqa, results).evaluate()["overall"] == 47.5
    three = {1: "yes", 3: "red", 4: "x"}  # a subset: (1 + 0.9 + 0) / 3 = 63.333.. -> 63.33
    assert VQAEval(vqa, three).evaluate()["overall"] == 63.33


def test_result_errors(vqa_files: tuple[Path, Path], tmp_path: Path) -> None:
    vqa = VQA(*vqa_files)
    full = [{"question_id": q, "answer": "yes"} for q in (1, 2, 3, 4)]
    with pytest.raises(ValueError, match=r"2 question\(s\) .* have no answer, e.g. \[3, 4\]"):
        vqa.load_results(full[:2])
    with pytest.raises(ValueError, match="question_id 99 is not in"):
        vqa.load_results([*full, {"question_id": 99, "answer": "yes"}])
    with pytest.raises(ValueError, match="answered twice"):
        vqa.load_results([*full, {"question_id": 1, "answer": "no"}])
    with pytest.raises(ValueError, match="answer must be a string"):
        vqa.load_results([{"question_id": 1, "answer": 3}, *full[1:]])
    with pytest.raises(ValueError, match=r"entry 0 lacks key\(s\) \['answer'\]"):
        vqa.load_results([{"question_id": 1}])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        vqa.load_results(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="not in"):
        VQAEval(vqa, {1: "yes", 42: "no"})


def test_annotation_errors(tmp_path: Path) -> None:
    ann_file, q_file = tmp_path / "ann.json", tmp_path / "q.json"
    annotation, question = _question(1, 10, "is the", "yes/no", ["yes"] * 10)
    del annotation["answer_type"]
    ann_file.write_text(json.dumps({"annotations": [annotation]}))
    q_file.write_text(json.dumps({"questions": [question]}))
    with pytest.raises(ValueError, match=r"ann.json: entry 0 lacks key\(s\) \['answer_type'\]"):
        VQA(ann_file, q_file)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        VQA(tmp_path / "missing.json", q_file)
    ann_file.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match='"annotations" list'):
        VQA(ann_file, q_file)
