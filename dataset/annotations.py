"""Loading and validating ALBEF's JSON annotation files.

Every entry is checked up front, so a bad file fails at start-up with the file, the entry index, the field and what
was expected, instead of in the middle of an epoch. Unknown extra fields are ignored (ALBEF's files carry some).

Formats (ALBEF's, unchanged), by kind:
  pretrain         [{image, caption: str | [str, ...]}]
  retrieval_train  [{image, caption: str, image_id: str | int}]
  retrieval_eval   [{image, caption: [str, ...]}]
  vqa_train        [{question, answer: [str, ...] | str, image, dataset: "vqa" | "vg", question_id (optional)}]
                   (ALBEF's Visual Genome entries hold a single answer string)
  vqa_test         [{question_id, question, image, dataset (optional)}]
  nlvr             [{images: [str, str], sentence, label: "True" | "False" | bool}]
  ve               [{image, sentence, label: "entailment" | "neutral" | "contradiction"}]
  grounding        [{image, text, ref_id: int}]
  caption_train    [{image, caption: str, image_id (optional)}]
  caption_eval     [{image, caption: [str, ...]}]
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

VE_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
VQA_SOURCES: tuple[str, ...] = ("vqa", "vg")

PathLike = str | os.PathLike
# A field check returns None when the value is fine, else a description of what was expected.
Check = Callable[[Any], str | None]


def _nonempty_str(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "a non-empty string"


def _str(value: Any) -> str | None:
    # Texts may be blank (the cleaned text then is empty and tokenizes to [CLS]); they must still be strings.
    return None if isinstance(value, str) else "a string"


def _str_list(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "a non-empty list of strings"
    bad = next((i for i, item in enumerate(value) if not isinstance(item, str)), None)
    return None if bad is None else f"a list of strings (item {bad} is {type(value[bad]).__name__})"


def _str_or_str_list(value: Any) -> str | None:
    return None if isinstance(value, str) else _str_list(value)


def _id(value: Any) -> str | None:
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value != "")
    return None if ok else "an int or a non-empty string id"


def _int(value: Any) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) else "an int"


def _image_pair(value: Any) -> str | None:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) and v for v in value):
        return None
    return "a list of two image paths"


def _nlvr_label(value: Any) -> str | None:
    return None if isinstance(value, bool) or value in ("True", "False") else '"True", "False" or a bool'


def _ve_label(value: Any) -> str | None:
    return None if value in VE_LABELS else f"one of {list(VE_LABELS)}"


def _vqa_source(value: Any) -> str | None:
    return None if value in VQA_SOURCES else f"one of {list(VQA_SOURCES)}"


# kind -> (required fields, optional fields validated when present)
SCHEMAS: dict[str, tuple[dict[str, Check], dict[str, Check]]] = {
    "pretrain": ({"image": _nonempty_str, "caption": _str_or_str_list}, {}),
    "retrieval_train": ({"image": _nonempty_str, "caption": _str, "image_id": _id}, {}),
    "retrieval_eval": ({"image": _nonempty_str, "caption": _str_list}, {}),
    "vqa_train": (
        {"question": _str, "answer": _str_or_str_list, "image": _nonempty_str, "dataset": _vqa_source},
        {"question_id": _id},
    ),
    "vqa_test": ({"question_id": _id, "question": _str, "image": _nonempty_str}, {"dataset": _vqa_source}),
    "nlvr": ({"images": _image_pair, "sentence": _str, "label": _nlvr_label}, {}),
    "ve": ({"image": _nonempty_str, "sentence": _str, "label": _ve_label}, {}),
    "grounding": ({"image": _nonempty_str, "text": _str, "ref_id": _int}, {}),
    "caption_train": ({"image": _nonempty_str, "caption": _str}, {"image_id": _id}),
    "caption_eval": ({"image": _nonempty_str, "caption": _str_list}, {}),
}
ANNOTATION_KINDS: tuple[str, ...] = tuple(SCHEMAS)


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_json(path: str | Path, what: str = "annotation file") -> Any:
    """Parse a JSON file; errors name the file and say what went wrong (missing, not a file, not UTF-8, invalid or
    truncated JSON with line/column). ``what`` names the kind of file in the messages. Used for every JSON input of
    the project (annotations, VQA files, detections, REFER instances, result files)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} path is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}): expected a JSON file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        # Errors at the very end (or a string that never closes) mean the file was cut short.
        truncated = error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated string")
        raise ValueError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
            + (" (the file looks truncated)" if truncated else "")
        ) from None


def validate_entries(entries: Any, kind: str, source: str) -> list[dict]:
    """Check a parsed annotation list against kind's schema; source names the file in error messages."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown annotation kind {kind!r}; expected one of {list(ANNOTATION_KINDS)}")
    if not isinstance(entries, list):
        raise ValueError(f"{source}: expected a JSON list of {kind} entries, got a {type(entries).__name__}")
    required, optional = SCHEMAS[kind]
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: entry {index}: expected an object, got {_describe(entry)}")
        for field in required:
            if field not in entry:
                raise ValueError(
                    f"{source}: entry {index}: missing field {field!r} (a {kind} entry needs {sorted(required)})"
                )
        checks = list(required.items()) + [(field, check) for field, check in optional.items() if field in entry]
        for field, check in checks:
            problem = check(entry[field])
            if problem:
                got = _describe(entry[field])
                raise ValueError(f"{source}: entry {index}: field {field!r} must be {problem}, got {got}")
    return entries


def _as_paths(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    result = [Path(p) for p in paths]
    if not result:
        raise ValueError("no annotation files given (expected a path or a non-empty list of paths)")
    return result


def load_json_annotations(paths: PathLike | Sequence[PathLike], kind: str) -> list[dict]:
    """Load one or several annotation files of the given kind, validated, concatenated in order."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown annotation kind {kind!r}; expected one of {list(ANNOTATION_KINDS)}")
    entries: list[dict] = []
    for path in _as_paths(paths):
        entries.extend(validate_entries(read_json(path), kind, str(path)))
    return entries


def load_answer_list(path: PathLike) -> list[str]:
    """ALBEF's VQA answer list: a JSON list of answer strings (the candidates ranked at test time)."""
    path = Path(path)
    answers = read_json(path)
    if not isinstance(answers, list) or not answers:
        raise ValueError(f"{path}: expected a non-empty JSON list of answer strings")
    for index, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise ValueError(f"{path}: entry {index}: expected an answer string, got {_describe(answer)}")
    return answers
