"""The official VQA accuracy metric (VQA v2 evaluation server), written from its published definition.

Per question: the prediction and the annotators' answers are normalised as the rules below say; each of the n
ground-truth answers is left out in turn and the prediction scores ``min(1, #remaining answers equal to it / 3)``;
the question's accuracy is the mean over the n leave-one-out subsets (for 10 answers and m matches:
m = 0, 1, 2, 3, >=4 give 0, 0.3, 0.6, 0.9, 1.0). Reported numbers are means x 100, rounded to 2 decimals.

Two rule sets, both from the official ``vqaEval.py`` (GT-Vision-Lab/VQA):

- ``"2021"`` (the default): the code as published since the 2021 change "Fixed processing answers bug"; its
  maintainers confirmed that no processing when all annotators agree is intended (GT-Vision-Lab/VQA issue 14: the
  answers of text-reading questions should stay as written). Prediction and answers lose surrounding whitespace
  (newlines and tabs become spaces). When all annotators gave the same answer, nothing else happens: the prediction
  is compared verbatim (``Yes`` against 10 x ``yes`` scores 0). When they disagree, the prediction and every answer
  get the full normalisation (punctuation, lower case, number words to digits, articles, contractions), so ``dog``
  matches ``the dog`` and ``2`` matches ``two``.
- ``"2017"``: the code before that change (the copy ALBEF vendored; use it to compare with ALBEF's published local
  numbers). The prediction always gets the full normalisation; the answers are taken as already normalised and only
  get the punctuation step, and only when the annotators disagree (identical answers are compared verbatim, not even
  stripped of whitespace).

Kept from the official code for identical numbers: the period-stripping step removes at most 32 periods (the
official code passes ``re.UNICODE`` as the ``count`` argument of ``re.sub``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vqaTools.vqa import VQA

# Characters the official metric treats as punctuation; '.' is handled separately (decimal numbers keep theirs) and
# the apostrophe is kept because the contraction table works on it.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# A period not followed by a digit ("1.5" keeps its period, "yes." loses it).
_PERIOD_RE = re.compile(r"\.(?!\d)")
_PERIOD_MAX_REPLACEMENTS = 32
# A comma between digits ("1,000"): when present, punctuation is deleted instead of turned into a space.
_DIGIT_COMMA_RE = re.compile(r"\d,\d")

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})

# Contracted words as they should be written. The metric maps every spelling with exactly one apostrophe missing
# (annotators typing "dont", "couldnt've", "couldn'tve") to this form; see _build_contractions.
_CONTRACTED_FORMS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "isn't", "it'd",
    "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't", "must've", "needn't", "not've",
    "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've", "should've", "shouldn't", "shouldn't've",
    "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll", "someone's",
    "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've", "there're", "there's",
    "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't", "we'd've", "we've", "weren't",
    "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've",
    "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've",
    "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
)  # fmt: skip


def _build_contractions() -> dict[str, str]:
    """Misspelling -> contraction table of the official metric.

    Forms that are ordinary words once the apostrophe is gone ("its", "well", "were", "shed") are absent from
    _CONTRACTED_FORMS, as in the official table. The official table also lists "Id've", "I'dve", "Im" and "Ive",
    which can never match because answers are lower-cased first, so they are left out; and it maps "somebody'd" to
    "somebodyd" (reversed), which is kept for identical numbers.
    """
    table: dict[str, str] = {}
    for form in _CONTRACTED_FORMS:
        positions = [i for i, char in enumerate(form) if char == "'"]
        for pos in positions:
            table[form[:pos] + form[pos + 1 :]] = form
    table["somebody'd"] = "somebodyd"
    return table


CONTRACTIONS = _build_contractions()


def clean_whitespace(text: str) -> str:
    """Newlines and tabs become spaces; surrounding whitespace goes."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def strip_punctuation(text: str) -> str:
    """The official punctuation step.

    A punctuation mark next to a space (or any mark when the text has a digit-comma-digit group such as "1,000") is
    deleted; otherwise it becomes a space ("black/white" -> "black white"). Then periods not followed by a digit go.
    """
    has_digit_comma = _DIGIT_COMMA_RE.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The decision looks at the original text, not the partly processed one, as the official code does.
        if has_digit_comma or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_RE.sub("", out, count=_PERIOD_MAX_REPLACEMENTS)


def normalize_words(text: str) -> str:
    """Lower-case, number words to digits, articles dropped, contractions repaired; words joined by one space."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """The full normalisation: whitespace, punctuation, then words (lower case, digits, articles, contractions)."""
    return normalize_words(strip_punctuation(clean_whitespace(answer)))


# The official rule sets (see the module docstring): the current one first, it is the default.
VQA_RULES: tuple[str, ...] = ("2021", "2017")


def check_rules(rules: str) -> str:
    """``rules`` as a valid rule-set name, or a ValueError naming the valid ones."""
    rules = str(rules)
    if rules not in VQA_RULES:
        raise ValueError(
            f"VQA accuracy rules {rules!r}: expected one of {list(VQA_RULES)} ('2021' = the official "
            "evaluation code as published now, '2017' = the version ALBEF vendored)"
        )
    return rules


def normalized_pair(pred: str, gt_answers: Sequence[str], rules: str = "2021") -> tuple[str, list[str]]:
    """The prediction and the annotators' answers as the official code compares them under ``rules``."""
    rules = check_rules(rules)
    if rules == "2017":
        answers = list(gt_answers)
        if len(set(answers)) > 1:
            answers = [strip_punctuation(answer) for answer in answers]
        return normalize_answer(pred), answers
    answers = [clean_whitespace(answer) for answer in gt_answers]
    if len(set(answers)) > 1:  # decided after the whitespace step: "yes " and "yes" agree
        return normalize_answer(pred), [normalize_answer(answer) for answer in answers]
    return clean_whitespace(pred), answers


def vqa_accuracy(pred: str, gt_answers: Sequence[str], rules: str = "2021") -> float:
    """Official VQA accuracy in [0, 1] of one predicted answer against the annotators' answers, under ``rules``
    ("2021", the current official code, or "2017", the version ALBEF vendored; see the module docstring).

    With a single ground-truth answer (e.g. Visual Genome questions) the leave-one-out rule leaves nobody to agree
    with, so the accuracy is 0 by definition: use it on VQA v2's 10-answer questions.
    """
    if len(gt_answers) == 0:
        raise ValueError("vqa_accuracy: gt_answers is empty; expected the annotators' answers (10 for VQA v2)")
    pred_norm, answers = normalized_pair(pred, gt_answers, rules)
    num_answers = len(answers)
    num_matches = sum(answer == pred_norm for answer in answers)
    # Leave-one-out in closed form: leaving out a matching annotator leaves m-1 matches, any other leaves m.
    left_out_match = min(1.0, (num_matches - 1) / 3) if num_matches else 0.0
    left_out_other = min(1.0, num_matches / 3)
    return (num_matches * left_out_match + (num_answers - num_matches) * left_out_other) / num_answers


class VQAEval:
    """Evaluate predicted answers against a :class:`vqaTools.vqa.VQA` annotation set.

    ``results`` maps question_id -> predicted answer, as returned by ``VQA.load_results``; ``rules`` picks the
    official rule set ("2021" or "2017", see the module docstring). After ``evaluate()``, ``per_question`` holds each
    question's accuracy (0-100, unrounded).
    """

    def __init__(self, vqa: VQA, results: Mapping[int, str], decimals: int = 2, rules: str = "2021") -> None:
        self.rules = check_rules(rules)
        unknown = [qid for qid in results if qid not in vqa.qa]
        if unknown:
            raise ValueError(
                f"VQAEval: {len(unknown)} result question_id(s) are not in {vqa.annotation_file}, e.g. {unknown[:5]}"
            )
        self.vqa = vqa
        self.results = results
        self.decimals = decimals
        self.per_question: dict[int, float] = {}

    def evaluate(self) -> dict:
        """Return ``{"overall": %, "per_answer_type": {type: %}, "per_question_type": {type: %}}``."""
        if not self.results:
            raise ValueError("VQAEval: no results to evaluate")
        per_answer_type: dict[str, list[float]] = {}
        per_question_type: dict[str, list[float]] = {}
        scores = []
        for question_id, pred in self.results.items():
            annotation = self.vqa.qa[question_id]
            acc = vqa_accuracy(pred, [item["answer"] for item in annotation["answers"]], self.rules)
            scores.append(acc)
            per_answer_type.setdefault(annotation["answer_type"], []).append(acc)
            per_question_type.setdefault(annotation["question_type"], []).append(acc)
            self.per_question[question_id] = 100.0 * acc
        return {
            "overall": self._percent(scores),
            "per_answer_type": {key: self._percent(values) for key, values in per_answer_type.items()},
            "per_question_type": {key: self._percent(values) for key, values in per_question_type.items()},
        }

    def _percent(self, values: list[float]) -> float:
        return round(100.0 * sum(values) / len(values), self.decimals)
