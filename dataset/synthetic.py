"""Synthetic vision-language data in every ALBEF annotation format, for the demo and the tests.

``python -m dataset.synthetic [--out DIR] [--num-images N] [--image-size PX] [--seed S] [--overwrite]`` draws N
scenes of 1-3 non-overlapping coloured shapes on a plain light background (OpenCV, JPEG) and writes texts about them
whose words depend on the colours, shapes, sizes, counts and positions, so that a small model can learn them. Same
seed, same bytes; a second call with the same parameters finds DIR/manifest.json and does nothing. DIR defaults to
``data/synthetic`` (``data/demo`` is the demo's, 1,500 images); data of other parameters already in DIR is replaced
only with ``--overwrite``.

Each shape sits in its own cell of a 3x3 grid (that keeps shapes apart and positions unambiguous) and has a shape,
a colour, a size (small/large) and a position named from its cell ("on the left", "in the top right corner").
Images are split once into train (~70%), val (~15%) and test (~15%); every task uses that split, so evaluation images
are never seen in training.

Files under DIR (ALBEF's formats, unchanged). Image paths are relative to ``DIR/images`` everywhere except in
``pretrain.json``, whose ``image`` is an absolute path as in ALBEF's pretraining files.

- ``images/synth_{id:012d}.jpg`` (the id is the last ``_`` field, as ALBEF parses COCO ids), ``vocab.txt`` (a
  WordPiece vocabulary covering every word the generator can emit), ``manifest.json`` (parameters, splits, files).
- ``pretrain.json`` ``[{image, caption}]``, caption a str or a list of str.
- ``retrieval_train.json`` ``[{image, caption, image_id}]`` (one entry per caption);
  ``retrieval_val.json`` / ``retrieval_test.json`` ``[{image, caption: [2-5 captions]}]``.
- ``ve_train.json`` / ``ve_dev.json`` / ``ve_test.json`` ``[{image, sentence, label}]``, one entailment, one
  contradiction and one neutral sentence per image. Neutral sentences give an object a property that a flat drawing
  cannot show ("the red circle is heavy"), so the label is decidable from text and image.
- ``nlvr_train.json`` / ``nlvr_dev.json`` / ``nlvr_test.json`` ``[{images: [a, b], sentence, label: "True"|"False"}]``.
- ``vqa_train.json`` ``[{question_id, question, answer: [10 annotator answers], image, dataset: "vqa"}]`` plus
  ``dataset: "vg"`` entries with ``answer: [one answer]``; ``vqa_val.json`` (same format), ``vqa_test.json``
  ``[{question_id, question, image, dataset}]``, ``answer_list.json``; and the official VQA v2 files of the val split
  for vqaTools: ``vqa_v2/v2_OpenEnded_mscoco_val_questions.json``, ``vqa_v2/v2_mscoco_val_annotations.json``.
  Some questions carry 1-4 noisy annotator answers, so the VQA accuracy gives partial credit.
- RefCOCO+ (REFER layout, data_root = DIR): ``refcoco+/refs(unc).p`` (pickle protocol 2, plain containers; the ref's
  ``file_name`` is its image's file name), ``refcoco+/instances.json``, ``refcoco+/dets.json`` (jittered object boxes
  plus distractor boxes), ``refcoco+/cocos.json`` (exact object boxes); ``refcoco+_train.json``,
  ``refcoco+_val.json``, ``refcoco+_test.json`` (testA + testB) ``[{image, text, ref_id}]``, one entry per sentence.
  Every expression matches exactly one object of its image.
- COCO Karpathy captioning: ``coco_karpathy_train.json`` ``[{image, caption, image_id}]``,
  ``coco_karpathy_val.json`` / ``coco_karpathy_test.json`` ``[{image, caption: [...]}]`` and the COCO-format ground
  truth ``coco_karpathy_val_gt.json`` / ``coco_karpathy_test_gt.json`` for pycocoevalcap.
- Cross-domain captioning (NoCaps-style), for the prefix captioner: ``coco_karpathy_train_indomain.json`` (the
  training captions of every train image that does not hold both shapes of ``CROSS_DOMAIN_PAIR``, so that no training
  caption mentions them together) and ``coco_karpathy_nocaps.json`` / ``coco_karpathy_nocaps_gt.json`` (the val and
  test images that hold both, 5 captions each, in the evaluation formats above); ``entities.txt`` (the entity
  vocabulary: shape and colour nouns, one a line) and ``lm_tokenizer/`` (a byte-level BPE in transformers' format,
  trained on the texts, for the GPT-2 of the prefix captioner; see dataset.prefix_text).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dataset.prefix_text import build_bpe_tokenizer, hard_prompt
from dataset.tokenizer import build_vocab, split_words, write_vocab

# bump when the output changes (2: VQA count answers are digits, as in VQA v2; 3: the cross-domain captioning split,
# entities.txt and lm_tokenizer/ of the prefix captioner)
FORMAT_VERSION = 3

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
                           "cross": "crosses"}
# RGB, saturated enough to stay distinct from each other and from the light background after JPEG.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 25),
    "purple": (135, 55, 175),
    "orange": (240, 130, 25),
}
SIZES: dict[str, float] = {"small": 0.08, "large": 0.13}  # half extent as a fraction of the image side
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
COLUMNS: tuple[str, ...] = ("left", "center", "right")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
NEUTRAL_PROPERTIES: tuple[str, ...] = ("made of wood", "made of metal", "heavy", "expensive", "soft", "warm")
VE_LABELS: tuple[str, ...] = ("entailment", "contradiction", "neutral")
CROSS_DOMAIN_PAIR: tuple[str, str] = ("star", "cross")  # never together in coco_karpathy_train_indomain's captions

_CELL_CENTRES = (1 / 6, 1 / 2, 5 / 6)  # grid cell centres as fractions of the image side
_JITTER = 0.02  # max shift of a shape from its cell centre (fraction of the side); keeps large shapes apart
_MAX_OBJECTS = 3
_ANSWERS_PER_QUESTION = 10  # VQA v2 has ten annotators per question
_SPLIT_FRACTIONS = (0.7, 0.15)  # train, val = test
# Connective words of the templates below; listed so that vocab.txt does not depend on which templates got sampled.
_TEMPLATE_WORDS = (
    "a an the and there is are in on at of with image picture photo shows showing contains shape shapes object "
    "corner light background what color where how many size is there yes no has have both images more than "
    "exactly left right at least was drawn by child one : , ."
)


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape: its attributes, grid cell and geometry in pixels."""

    shape: str
    colour: str
    size: str
    col: int  # grid column 0..2 (left, center, right)
    row: int  # grid row 0..2 (top, middle, bottom)
    points: tuple[tuple[float, float], ...]  # outline polygon (x, y) in pixels

    @property
    def bbox(self) -> list[float]:
        """Tight box [x, y, w, h] of the outline, COCO convention."""
        xs, ys = [p[0] for p in self.points], [p[1] for p in self.points]
        x0, y0 = min(xs), min(ys)
        return [round(x0, 2), round(y0, 2), round(max(xs) - x0, 2), round(max(ys) - y0, 2)]

    @property
    def area(self) -> float:
        return round(float(cv2.contourArea(np.asarray(self.points, dtype=np.float32))), 2)

    @property
    def cell(self) -> str:
        """Where the shape is, as a VQA answer: 'center', 'left', 'top', 'bottom right', ..."""
        return _cell_name(self.col, self.row)

    @property
    def position(self) -> str:
        """Where the shape is, as a phrase: 'in the center', 'on the left', 'at the top', 'in the top left corner'."""
        return _position_phrase(self.col, self.row)

    def noun(self, with_size: bool = False) -> str:
        return f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One synthetic image: id, background colour (RGB) and objects (at most one per grid cell)."""

    image_id: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]

    @property
    def file_name(self) -> str:
        return f"synth_{self.image_id:012d}.jpg"

    def count(self, predicate: Callable[[SceneObject], bool] = lambda obj: True) -> int:
        return sum(1 for obj in self.objects if predicate(obj))

    def has(self, colour: str, shape: str) -> bool:
        return any(obj.colour == colour and obj.shape == shape for obj in self.objects)


# ---------------------------------------------------------------------------------------------------- scenes, images


def _cell_name(col: int, row: int) -> str:
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return COLUMNS[col]
    if col == 1:
        return ROWS[row]
    return f"{ROWS[row]} {COLUMNS[col]}"


def _position_phrase(col: int, row: int) -> str:
    if row == 1 and col == 1:
        return "in the center"
    if row == 1:
        return f"on the {COLUMNS[col]}"
    if col == 1:
        return f"at the {ROWS[row]}"
    return f"in the {ROWS[row]} {COLUMNS[col]} corner"


def _outline(shape: str, cx: float, cy: float, half: float) -> np.ndarray:
    """Polygon (K, 2) of a shape centred at (cx, cy) with half extent `half`, in pixels."""
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        unit = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    elif shape == "square":
        unit = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    elif shape == "triangle":
        unit = np.array([[0, -1], [1, 1], [-1, 1]], dtype=np.float64)
    elif shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5  # alternate outer and inner vertices, first one pointing up
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        unit = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    elif shape == "cross":
        a = 0.4  # half width of an arm: wide enough that the centre pixel keeps its colour in a 64 px JPEG
        unit = np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a],
                         [-1, -a], [-a, -a]], dtype=np.float64)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return unit * half + np.array([cx, cy])


def sample_scene(rng: np.random.Generator, image_id: int, image_size: int) -> Scene:
    """1-3 shapes in distinct grid cells with distinct (colour, shape) pairs, so 'the red circle' is unambiguous."""
    num_objects = int(rng.integers(1, _MAX_OBJECTS + 1))
    cells = rng.choice(9, size=num_objects, replace=False)
    combos = rng.choice(len(COLOURS) * len(SHAPES), size=num_objects, replace=False)
    colour_names = list(COLOURS)
    objects = []
    for cell, combo in zip(cells, combos, strict=True):
        col, row = int(cell) % 3, int(cell) // 3
        size = "small" if rng.random() < 0.5 else "large"
        cx, cy = (_CELL_CENTRES[col] + rng.uniform(-_JITTER, _JITTER)) * image_size, (
            _CELL_CENTRES[row] + rng.uniform(-_JITTER, _JITTER)
        ) * image_size
        shape = SHAPES[int(combo) % len(SHAPES)]
        points = _outline(shape, cx, cy, SIZES[size] * image_size)
        objects.append(
            SceneObject(
                shape=shape,
                colour=colour_names[int(combo) // len(SHAPES)],
                size=size,
                col=col,
                row=row,
                points=tuple((round(float(x), 3), round(float(y), 3)) for x, y in points),
            )
        )
    background = tuple(int(v) for v in rng.integers(228, 252, size=3))
    return Scene(image_id=image_id, background=background, objects=tuple(objects))


def draw_scene(scene: Scene, image_size: int) -> np.ndarray:
    """The scene as a BGR uint8 image (H, W, 3), anti-aliased."""
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = scene.background[::-1]
    for obj in scene.objects:
        # Fixed-point coordinates (4 fractional bits) keep sub-pixel positions.
        polygon = np.round(np.asarray(obj.points) * 16).astype(np.int32)
        cv2.fillPoly(image, [polygon], COLOURS[obj.colour][::-1], lineType=cv2.LINE_AA, shift=4)
    return image


# ------------------------------------------------------------------------------------------------------------ texts


def _a(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _count_phrase(count: int, noun: str = "shape", plural: str = "shapes") -> str:
    return f"{NUMBER_WORDS[count]} {noun if count == 1 else plural}"


def _there_are(count: int) -> str:
    return f"there {'is' if count == 1 else 'are'} {_count_phrase(count)}"


def caption_candidates(scene: Scene) -> list[str]:
    """Distinct captions that are all true of the scene, from several paraphrase templates."""
    objs = scene.objects
    n = len(objs)
    captions = [
        _join([f"{_a(obj.noun(with_size=True))} {obj.position}" for obj in objs]),
        _join([_a(obj.noun()) for obj in objs]),
        f"{_count_phrase(n)}: {_join([_a(obj.noun()) for obj in objs])}",
        f"a picture of {_join([_a(obj.noun(with_size=True)) for obj in objs])}",
        f"{_there_are(n)} in the image: {_join([_a(obj.noun()) for obj in objs])}",
    ]
    captions += [f"{_a(obj.noun())} {obj.position}" for obj in objs]
    return list(dict.fromkeys(captions))


def sample_captions(scene: Scene, rng: np.random.Generator, count: int) -> list[str]:
    """`count` distinct captions (fewer if the scene has fewer), some capitalised with a full stop like COCO's."""
    candidates = caption_candidates(scene)
    picks = rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)
    captions = []
    for index in picks:
        caption = candidates[int(index)]
        if rng.random() < 0.5:
            caption = caption[0].upper() + caption[1:] + "."
        captions.append(caption)
    return captions


def referring_expressions(scene: Scene, target: SceneObject) -> list[str]:
    """Noun phrases that describe `target` and no other object of the scene."""
    candidates: list[tuple[str, Callable[[SceneObject], bool]]] = [
        (f"the {target.colour} {target.shape}", lambda o: o.colour == target.colour and o.shape == target.shape),
        (f"the {target.shape}", lambda o: o.shape == target.shape),
        (f"the {target.colour} object", lambda o: o.colour == target.colour),
        (f"the {target.size} {target.shape}", lambda o: o.size == target.size and o.shape == target.shape),
        (f"the {target.noun(with_size=True)}", lambda o: o.noun(with_size=True) == target.noun(with_size=True)),
        (f"the {target.colour} {target.shape} {target.position}", lambda o: o is target),
    ]
    if (target.col, target.row) == (1, 1) or (target.col != 1 and target.row != 1):
        candidates.append((f"the shape {target.position}", lambda o: (o.col, o.row) == (target.col, target.row)))
    if target.col != 1:  # "on the left": unique only when no other shape shares the column
        side = f"on the {COLUMNS[target.col]}"
        candidates.append((f"the shape {side}", lambda o: o.col == target.col))
        candidates.append((f"the {target.shape} {side}", lambda o: o.col == target.col and o.shape == target.shape))
    if target.row != 1:
        candidates.append((f"the shape at the {ROWS[target.row]}", lambda o: o.row == target.row))
    expressions = [text for text, matches in candidates if scene.count(matches) == 1]
    return list(dict.fromkeys(expressions))


def _wrong_cells(obj: SceneObject) -> list[tuple[int, int]]:
    """Cells that share neither column nor row with the object, so naming one is clearly false."""
    return [(col, row) for col in range(3) for row in range(3) if col != obj.col and row != obj.row]


def ve_sentence(scene: Scene, label: str, rng: np.random.Generator) -> str:
    """A statement about the scene that is entailed, contradicted, or neither (a property no drawing shows)."""
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    n = len(scene.objects)
    if label == "entailment":
        options = [
            f"there is {_a(obj.noun())}",
            _there_are(n),
            f"the {obj.noun()} is {obj.position}",
            f"the {obj.noun()} is {obj.size}",
            f"the image contains {_a(obj.noun())}",
        ]
    elif label == "contradiction":
        absent = [(c, s) for c in COLOURS for s in SHAPES if not scene.has(c, s)]
        colour, shape = absent[int(rng.integers(len(absent)))]
        wrong_count = [k for k in range(1, len(NUMBER_WORDS)) if k != n]
        col, row = _wrong_cells(obj)[int(rng.integers(4))]
        other_size = "large" if obj.size == "small" else "small"
        options = [
            f"there is {_a(colour + ' ' + shape)}",
            _there_are(int(rng.choice(wrong_count))),
            f"the {obj.noun()} is {_position_phrase(col, row)}",
            f"the {obj.noun()} is {other_size}",
        ]
    elif label == "neutral":
        prop = NEUTRAL_PROPERTIES[int(rng.integers(len(NEUTRAL_PROPERTIES)))]
        options = [f"the {obj.noun()} is {prop}", f"the {obj.noun()} was drawn by a child"]
    else:
        raise ValueError(f"unknown VE label {label!r}; expected one of {VE_LABELS}")
    return options[int(rng.integers(len(options)))]


def nlvr_example(left: Scene, right: Scene, want: bool, rng: np.random.Generator) -> tuple[str, bool]:
    """A sentence about an image pair and whether it holds; tries templates until the truth equals `want`."""
    pair = (left, right)
    objects = left.objects + right.objects
    sentence, truth = "", False
    for _ in range(50):
        kind = int(rng.integers(6))
        obj = objects[int(rng.integers(len(objects)))]
        colour = obj.colour if rng.random() < 0.6 else list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = obj.shape if rng.random() < 0.6 else SHAPES[int(rng.integers(len(SHAPES)))]
        if kind == 0:
            side = int(rng.integers(2))
            sentence = f"the {('left', 'right')[side]} image has {_a(colour + ' ' + shape)}"
            truth = pair[side].has(colour, shape)
        elif kind == 1:
            sentence = f"both images contain {_a(shape)}"
            truth = all(shape in {o.shape for o in scene.objects} for scene in pair)
        elif kind == 2:
            sentence = f"both images contain {_a(colour)} shape"
            truth = all(colour in {o.colour for o in scene.objects} for scene in pair)
        elif kind == 3:
            side = int(rng.integers(2))
            sentence = f"there are more shapes in the {('left', 'right')[side]} image"
            truth = len(pair[side].objects) > len(pair[1 - side].objects)
        elif kind == 4:
            side, count = int(rng.integers(2)), int(rng.integers(1, _MAX_OBJECTS + 1))
            sentence = f"the {('left', 'right')[side]} image has exactly {_count_phrase(count)}"
            truth = len(pair[side].objects) == count
        else:
            sentence = f"at least one image has {_a(colour + ' ' + shape)}"
            truth = left.has(colour, shape) or right.has(colour, shape)
        if truth == want:
            break
    return sentence, truth


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    answer_type: str  # VQA v2: "yes/no", "number" or "other"
    question_type: str  # VQA v2's question prefix
    distractors: tuple[str, ...]  # plausible wrong answers for annotator noise


def _question(scene: Scene, kind: str, rng: np.random.Generator) -> Question | None:
    """One question of the given kind about the scene, or None when the scene does not allow it."""
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    colours, n = list(COLOURS), len(scene.objects)
    if kind == "color":
        refs = [r for r in referring_expressions(scene, obj) if obj.colour not in r.split()]
        if not refs:
            return None
        return Question(f"what color is {refs[int(rng.integers(len(refs)))]}", obj.colour, "other",
                        "what color is the", tuple(c for c in colours if c != obj.colour))
    if kind == "shape":
        refs = [r for r in referring_expressions(scene, obj) if obj.shape not in r.split()]
        if not refs:
            return None
        return Question(f"what shape is {refs[int(rng.integers(len(refs)))]}", obj.shape, "other",
                        "what shape is", tuple(s for s in SHAPES if s != obj.shape))
    if kind == "count":
        return Question("how many shapes are there", str(n), "number", "how many",
                        tuple(str(k) for k in range(1, len(NUMBER_WORDS)) if k != n))
    if kind == "count_color":
        colour = obj.colour if rng.random() < 0.5 else colours[int(rng.integers(len(colours)))]
        count = scene.count(lambda o: o.colour == colour)
        return Question(f"how many {colour} shapes are there", str(count), "number", "how many",
                        tuple(str(k) for k in range(3) if k != count))
    if kind == "count_shape":
        count = scene.count(lambda o: o.shape == obj.shape)
        return Question(f"how many {PLURALS[obj.shape]} are there", str(count), "number", "how many",
                        tuple(str(k) for k in range(3) if k != count))
    if kind == "where":
        # Neighbouring cells are the plausible annotator mistakes ("left" for "top left").
        near = {_cell_name(c, r) for c in range(3) for r in range(3) if abs(c - obj.col) + abs(r - obj.row) == 1}
        return Question(f"where is the {obj.noun()}", obj.cell, "other", "where is the", tuple(sorted(near)))
    if kind == "exists":
        if rng.random() < 0.5:
            colour, shape, answer = obj.colour, obj.shape, "yes"
        else:
            absent = [(c, s) for c in colours for s in SHAPES if not scene.has(c, s)]
            (colour, shape), answer = absent[int(rng.integers(len(absent)))], "no"
        return Question(f"is there {_a(colour + ' ' + shape)}", answer, "yes/no", "is there a",
                        ("no",) if answer == "yes" else ("yes",))
    if kind == "size":
        other = "large" if obj.size == "small" else "small"
        if rng.random() < 0.5:
            return Question(f"what size is the {obj.noun()}", obj.size, "other", "what size is the", (other,))
        asked = obj.size if rng.random() < 0.5 else other
        answer = "yes" if asked == obj.size else "no"
        return Question(f"is the {obj.noun()} {asked}", answer, "yes/no", "is the",
                        ("no",) if answer == "yes" else ("yes",))
    raise ValueError(f"unknown question kind {kind!r}")


QUESTION_KINDS: tuple[str, ...] = ("color", "shape", "count", "count_color", "count_shape", "where", "exists", "size")


def sample_questions(scene: Scene, rng: np.random.Generator, count: int) -> list[Question]:
    """`count` questions of different kinds (fewer if the scene allows fewer kinds)."""
    questions: list[Question] = []
    for index in rng.permutation(len(QUESTION_KINDS)):
        question = _question(scene, QUESTION_KINDS[int(index)], rng)
        if question is not None:
            questions.append(question)
        if len(questions) == count:
            break
    return questions


def annotator_answers(question: Question, rng: np.random.Generator) -> list[str]:
    """Ten annotator answers: the truth, with 1-4 plausible mistakes in ~30% of questions (truth stays majority)."""
    answers = [question.answer] * _ANSWERS_PER_QUESTION
    if question.distractors and rng.random() < 0.3:
        wrong = rng.choice(_ANSWERS_PER_QUESTION, size=int(rng.integers(1, 5)), replace=False)
        for index in wrong:
            answers[int(index)] = question.distractors[int(rng.integers(len(question.distractors)))]
    return answers


def answer_vocabulary() -> list[str]:
    """Every answer a question (or an annotator) can give: the candidate list for answer ranking."""
    cells = {_cell_name(c, r) for c in range(3) for r in range(3)}
    counts = {str(k) for k in range(len(NUMBER_WORDS))}  # VQA v2 annotators write counts as digits
    answers = set(COLOURS) | set(SHAPES) | counts | cells | set(SIZES) | {"yes", "no"}
    return sorted(answers)


def lexicon() -> list[str]:
    """Every word the templates can use, so that vocab.txt covers texts of any sample of scenes."""
    phrases = [_TEMPLATE_WORDS, *SHAPES, *PLURALS.values(), *COLOURS, *SIZES, *NUMBER_WORDS, *NEUTRAL_PROPERTIES,
               *answer_vocabulary(), *(_position_phrase(c, r) for c in range(3) for r in range(3))]
    return sorted({word for phrase in phrases for word in split_words(phrase)})


# ----------------------------------------------------------------------------------------------------------- writers


def _write_json(path: Path, data: object, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a crash never leaves half a file behind


def _split(scenes: list[Scene]) -> dict[str, list[Scene]]:
    """Consecutive ids: the scenes are drawn independently, so no shuffle is needed for held-out splits."""
    # At least two val/test images: NLVR pairs images of one split, RefCOCO+ splits test into testA and testB.
    num_held_out = max(2, round(len(scenes) * _SPLIT_FRACTIONS[1]))
    num_train = len(scenes) - 2 * num_held_out
    return {"train": scenes[:num_train], "val": scenes[num_train : num_train + num_held_out],
            "test": scenes[num_train + num_held_out :]}


def _task_rng(seed: int, task: int) -> np.random.Generator:
    """An independent stream per task, so that changing one task's texts leaves the others' bytes alone."""
    return np.random.default_rng([seed, task])


def _captioning_files(splits: dict[str, list[Scene]], rng: np.random.Generator, images_dir: Path) -> dict:
    """pretrain, retrieval and COCO Karpathy captioning: the same caption templates in three formats."""
    files: dict[str, object] = {}
    pretrain = []
    for index, scene in enumerate(splits["train"]):
        captions = sample_captions(scene, rng, 3)
        # ALBEF's pretraining files mix a single caption string and a list of captions per image.
        caption: str | list[str] = captions if index % 2 == 0 else captions[0]
        pretrain.append({"image": str((images_dir / scene.file_name).resolve()), "caption": caption})
    files["pretrain"] = pretrain
    for prefix in ("retrieval", "coco_karpathy"):
        files[f"{prefix}_train"] = [
            {"image": scene.file_name, "caption": caption, "image_id": scene.image_id}
            for scene in splits["train"] for caption in sample_captions(scene, rng, 3)
        ]
        for split in ("val", "test"):
            entries = []
            for scene in splits[split]:
                count = int(rng.integers(2, 6)) if prefix == "retrieval" else 5
                entries.append({"image": scene.file_name, "caption": sample_captions(scene, rng, count)})
            files[f"{prefix}_{split}"] = entries
    for split in ("val", "test"):
        captions = [(scene.image_id, caption)
                    for scene, entry in zip(splits[split], files[f"coco_karpathy_{split}"], strict=True)
                    for caption in entry["caption"]]
        annotations = [{"image_id": image_id, "caption": caption, "id": index + 1}
                       for index, (image_id, caption) in enumerate(captions)]
        files[f"coco_karpathy_{split}_gt"] = {
            "info": {"description": "AlignFuse synthetic captions", "version": str(FORMAT_VERSION)},
            "licenses": [],
            "type": "captions",
            "images": [{"id": scene.image_id, "file_name": scene.file_name} for scene in splits[split]],
            "annotations": annotations,
        }
    return files


def _cross_domain_files(splits: dict[str, list[Scene]], train: list[dict], rng: np.random.Generator) -> dict:
    """In-domain training captions (train images without both shapes of CROSS_DOMAIN_PAIR) and the NoCaps-style
    evaluation split (the held-out images with both)."""

    def novel(scene: Scene) -> bool:
        return all(any(obj.shape == shape for obj in scene.objects) for shape in CROSS_DOMAIN_PAIR)

    excluded = {scene.image_id for scene in splits["train"] if novel(scene)}
    scenes = [scene for split in ("val", "test") for scene in splits[split] if novel(scene)]
    entries = [{"image": scene.file_name, "caption": sample_captions(scene, rng, 5)} for scene in scenes]
    annotations = [{"image_id": scene.image_id, "caption": caption}
                   for scene, entry in zip(scenes, entries, strict=True) for caption in entry["caption"]]
    return {
        "coco_karpathy_train_indomain": [entry for entry in train if entry["image_id"] not in excluded],
        "coco_karpathy_nocaps": entries,
        "coco_karpathy_nocaps_gt": {
            "info": {"description": "AlignFuse synthetic captions, cross-domain split", "version": str(FORMAT_VERSION)},
            "licenses": [], "type": "captions",
            "images": [{"id": scene.image_id, "file_name": scene.file_name} for scene in scenes],
            "annotations": [{**item, "id": index + 1} for index, item in enumerate(annotations)],
        },
    }


def _ve_files(splits: dict[str, list[Scene]], rng: np.random.Generator) -> dict:
    files = {}
    for split, name in (("train", "ve_train"), ("val", "ve_dev"), ("test", "ve_test")):
        files[name] = [
            {"image": scene.file_name, "sentence": ve_sentence(scene, label, rng), "label": label}
            for scene in splits[split] for label in VE_LABELS
        ]
    return files


def _nlvr_files(splits: dict[str, list[Scene]], rng: np.random.Generator) -> dict:
    files = {}
    for split, name in (("train", "nlvr_train"), ("val", "nlvr_dev"), ("test", "nlvr_test")):
        scenes, entries = splits[split], []
        for index, left in enumerate(scenes):
            # Pair with a different image of the same split; the wanted label alternates to balance True/False.
            right = scenes[(index + 1 + int(rng.integers(len(scenes) - 1))) % len(scenes)]
            sentence, truth = nlvr_example(left, right, want=index % 2 == 0, rng=rng)
            entries.append({"images": [left.file_name, right.file_name], "sentence": sentence, "label": str(truth)})
        files[name] = entries
    return files


def _vqa_files(splits: dict[str, list[Scene]], rng: np.random.Generator) -> dict:
    files: dict[str, object] = {"answer_list": answer_vocabulary()}
    question_id = 0
    v2_questions, v2_annotations = [], []
    for split in ("train", "val", "test"):
        entries = []
        for index, scene in enumerate(splits[split]):
            for question in sample_questions(scene, rng, 3):
                question_id += 1
                entry = {"question_id": question_id, "question": question.question, "image": scene.file_name,
                         "dataset": "vqa"}
                if split != "test":
                    answers = annotator_answers(question, rng)
                    entry["answer"] = answers
                if split == "val":
                    v2_questions.append({"image_id": scene.image_id, "question": question.question,
                                         "question_id": question_id})
                    v2_annotations.append({
                        "question_id": question_id,
                        "image_id": scene.image_id,
                        "question_type": question.question_type,
                        "answer_type": question.answer_type,
                        "multiple_choice_answer": Counter(answers).most_common(1)[0][0],
                        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                    for k, a in enumerate(answers)],
                    })
                entries.append(entry)
            if split == "train" and index % 4 == 0:
                # Visual-Genome-style extra QA: one answer per question, as in ALBEF's vg files.
                for question in sample_questions(scene, rng, 1):
                    question_id += 1
                    entries.append({"question_id": question_id, "question": question.question,
                                    "answer": [question.answer], "image": scene.file_name, "dataset": "vg"})
        files[f"vqa_{split}"] = entries
    info = {"description": "AlignFuse synthetic VQA (VQA v2 format)", "version": str(FORMAT_VERSION)}
    license_ = {"name": "synthetic", "url": ""}
    files["vqa_v2_val_questions"] = {"info": info, "task_type": "Open-Ended", "data_type": "mscoco",
                                     "license": license_, "data_subtype": "val2014", "questions": v2_questions}
    files["vqa_v2_val_annotations"] = {"info": info, "license": license_, "data_type": "mscoco",
                                       "data_subtype": "val2014", "annotations": v2_annotations}
    return files


def _grounding_files(splits: dict[str, list[Scene]], rng: np.random.Generator, image_size: int) -> dict:
    """RefCOCO+ in the REFER layout plus ALBEF's grounding JSONs."""
    ref_splits = {"train": "train", "val": "val"}
    refs, images, annotations, dets, cocos = [], [], [], {}, {}
    entries: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    ann_id = ref_id = sent_id = 0
    for split in ("train", "val", "test"):
        for index, scene in enumerate(splits[split]):
            # RefCOCO+'s two test sets (people / other objects): here simply alternating images.
            ref_split = ref_splits.get(split, "testA" if index % 2 == 0 else "testB")
            images.append({"id": scene.image_id, "file_name": scene.file_name, "height": image_size,
                           "width": image_size})
            boxes = []
            for obj in scene.objects:
                ann_id += 1
                ref_id += 1
                annotations.append({
                    "id": ann_id, "image_id": scene.image_id, "bbox": obj.bbox,
                    "category_id": SHAPES.index(obj.shape) + 1, "area": obj.area, "iscrowd": 0,
                    "segmentation": [[coord for point in obj.points for coord in point]],
                })
                boxes.append(obj.bbox)
                expressions = referring_expressions(scene, obj)
                picks = rng.choice(len(expressions), size=min(len(expressions), int(rng.integers(1, 4))),
                                   replace=False)
                sentences = []
                for pick in picks:
                    sent_id += 1
                    text = expressions[int(pick)]
                    raw = text[0].upper() + text[1:] if rng.random() < 0.5 else text
                    sentences.append({"sent": text, "raw": raw, "tokens": split_words(text), "sent_id": sent_id})
                    entries[split].append({"image": scene.file_name, "text": text, "ref_id": ref_id})
                refs.append({
                    "ref_id": ref_id, "ann_id": ann_id, "image_id": scene.image_id, "split": ref_split,
                    "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences],
                    "category_id": SHAPES.index(obj.shape) + 1, "file_name": scene.file_name,
                })
            cocos[str(scene.image_id)] = boxes
            dets[str(scene.image_id)] = _proposals(boxes, rng, image_size)
    return {
        "refcoco+_refs": refs,
        "refcoco+_instances": {"images": images, "annotations": annotations,
                               "categories": [{"id": k + 1, "name": s, "supercategory": "shape"}
                                              for k, s in enumerate(SHAPES)]},
        "refcoco+_dets": dets,
        "refcoco+_cocos": cocos,
        "refcoco+_train": entries["train"],
        "refcoco+_val": entries["val"],
        "refcoco+_test": entries["test"],
    }


def _proposals(boxes: list[list[float]], rng: np.random.Generator, image_size: int) -> list[list[float]]:
    """Detector-like proposals: every object box shifted by up to a pixel, plus 1-3 random distractor boxes."""
    proposals = [[round(float(v + rng.uniform(-1, 1)), 2) for v in box] for box in boxes]
    for _ in range(int(rng.integers(1, 4))):
        w, h = rng.uniform(0.1, 0.3, size=2) * image_size
        x, y = rng.uniform(0, image_size - w), rng.uniform(0, image_size - h)
        proposals.append([round(float(x), 2), round(float(y), 2), round(float(w), 2), round(float(h), 2)])
    return proposals


# Output files: key -> path relative to the output directory.
FILES: dict[str, str] = {
    "pretrain": "pretrain.json",
    **{f"retrieval_{s}": f"retrieval_{s}.json" for s in ("train", "val", "test")},
    **{f"ve_{s}": f"ve_{s}.json" for s in ("train", "dev", "test")},
    **{f"nlvr_{s}": f"nlvr_{s}.json" for s in ("train", "dev", "test")},
    **{f"vqa_{s}": f"vqa_{s}.json" for s in ("train", "val", "test")},
    "answer_list": "answer_list.json",
    "vqa_v2_val_questions": "vqa_v2/v2_OpenEnded_mscoco_val_questions.json",
    "vqa_v2_val_annotations": "vqa_v2/v2_mscoco_val_annotations.json",
    "refcoco+_refs": "refcoco+/refs(unc).p",
    "refcoco+_instances": "refcoco+/instances.json",
    "refcoco+_dets": "refcoco+/dets.json",
    "refcoco+_cocos": "refcoco+/cocos.json",
    **{f"refcoco+_{s}": f"refcoco+_{s}.json" for s in ("train", "val", "test")},
    **{f"coco_karpathy_{s}": f"coco_karpathy_{s}.json" for s in ("train", "val", "test")},
    "coco_karpathy_val_gt": "coco_karpathy_val_gt.json",
    "coco_karpathy_test_gt": "coco_karpathy_test_gt.json",
    "coco_karpathy_train_indomain": "coco_karpathy_train_indomain.json",
    "coco_karpathy_nocaps": "coco_karpathy_nocaps.json",
    "coco_karpathy_nocaps_gt": "coco_karpathy_nocaps_gt.json",
    "vocab": "vocab.txt",
    "entities": "entities.txt",
    "lm_tokenizer": "lm_tokenizer/tokenizer.json",  # the folder lm_tokenizer/ is the tokenizer (transformers' format)
    "manifest": "manifest.json",
}


def _paths(out: Path) -> dict[str, Path]:
    return {"root": out, "images": out / "images", **{key: out / rel for key, rel in FILES.items()}}


def _texts(files: dict[str, object]) -> list[str]:
    """Every text written to the annotation files (captions, sentences, questions, answers, expressions)."""
    texts: list[str] = []
    for key, data in files.items():
        if key == "answer_list":
            texts += data
        elif key == "refcoco+_refs":
            texts += [s["raw"] for ref in data for s in ref["sentences"]]
        elif isinstance(data, list):
            for entry in data:
                for field in ("caption", "sentence", "question", "text", "answer"):
                    value = entry.get(field)
                    texts += [value] if isinstance(value, str) else list(value or [])
    return texts


DEFAULT_OUT = "data/synthetic"  # not data/demo: that is the demo's data (1,500 images), used by configs/demo


def generator_params(num_images: int, image_size: int, seed: int) -> dict:
    """What the manifest records, and a later call compares, to tell whether a folder holds the same data."""
    return {"num_images": num_images, "image_size": image_size, "seed": seed, "format_version": FORMAT_VERSION}


def existing_params(out_dir: str | Path) -> dict | None:
    """The parameters of the synthetic data already in out_dir (its manifest), or None."""
    manifest = _paths(Path(out_dir))["manifest"]
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("params")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def generate(out_dir: str | Path, num_images: int = 600, image_size: int = 64, seed: int = 0) -> dict[str, Path]:
    """Write the synthetic dataset to out_dir (skipped when its manifest has the same parameters); returns paths."""
    if num_images < 10:
        raise ValueError(f"num_images must be at least 10 (every split needs images), got {num_images}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels (shapes must stay recognisable), got {image_size}")
    out = Path(out_dir)
    paths = _paths(out)
    params = generator_params(num_images, image_size, seed)
    if existing_params(out) == params:  # a missing or damaged manifest: (re)generate
        return paths

    images_dir = paths["images"]
    images_dir.mkdir(parents=True, exist_ok=True)
    paths["manifest"].unlink(missing_ok=True)  # the directory is incomplete until the new manifest is written
    for stale in images_dir.glob("synth_*.jpg"):  # a previous run with other parameters may have drawn more images
        stale.unlink()

    scene_rng = _task_rng(seed, 0)
    scenes = [sample_scene(scene_rng, image_id, image_size) for image_id in range(1, num_images + 1)]
    jpeg_params = [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    for scene in scenes:
        # Full-resolution chroma: 4:2:0 subsampling would bleed colour across the few pixels of a small shape.
        ok, encoded = cv2.imencode(".jpg", draw_scene(scene, image_size), jpeg_params)
        if not ok:
            raise RuntimeError(f"OpenCV failed to encode {scene.file_name}")
        (images_dir / scene.file_name).write_bytes(encoded.tobytes())

    splits = _split(scenes)
    files: dict[str, object] = {}
    files.update(_captioning_files(splits, _task_rng(seed, 1), images_dir))
    files.update(_ve_files(splits, _task_rng(seed, 2)))
    files.update(_nlvr_files(splits, _task_rng(seed, 3)))
    files.update(_vqa_files(splits, _task_rng(seed, 4)))
    files.update(_grounding_files(splits, _task_rng(seed, 5), image_size))
    files.update(_cross_domain_files(splits, files["coco_karpathy_train"], _task_rng(seed, 6)))

    for key, data in files.items():
        if key == "refcoco+_refs":
            paths[key].parent.mkdir(parents=True, exist_ok=True)
            with paths[key].open("wb") as handle:
                pickle.dump(data, handle, protocol=2)  # REFER's format
        else:
            _write_json(paths[key], data)
    write_vocab(build_vocab(_texts(files), extra_words=lexicon()), paths["vocab"])
    paths["entities"].write_text("".join(f"{name}\n" for name in (*SHAPES, *COLOURS)), encoding="utf-8")
    build_bpe_tokenizer([*_texts(files), *lexicon(), hard_prompt(SHAPES[:2]), hard_prompt([])],
                        paths["lm_tokenizer"].parent)

    manifest = {
        "generator": "dataset.synthetic",
        "params": params,
        "splits": {split: [scene.image_id for scene in split_scenes] for split, split_scenes in splits.items()},
        "files": {"images": "images", **FILES},
    }
    _write_json(paths["manifest"], manifest, indent=1)  # written last: its presence means the directory is complete
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace synthetic data of other parameters already in --out")
    parser.add_argument("--num-images", type=int, default=600, help="number of images (train ~70%%, val/test ~15%%)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=0, metavar="N",
                        help="also write pretrain.json as webdataset shards of N samples in OUT/pretrain_shards "
                             "(data.train_shards; see dataset.shards)")
    args = parser.parse_args(argv)
    wanted = generator_params(args.num_images, args.image_size, args.seed)
    previous = existing_params(args.out)
    if previous is not None and previous != wanted and not args.overwrite:
        parser.error(f"{args.out} already holds synthetic data with other parameters ({previous}; asked for "
                     f"{wanted}): choose another --out, or add --overwrite to replace it")
    paths = generate(args.out, num_images=args.num_images, image_size=args.image_size, seed=args.seed)
    print(f"synthetic data in {paths['root']} ({args.num_images} images of {args.image_size} px, seed {args.seed})")
    if args.shards:
        from dataset.shards import convert  # here: webdataset only when shards are asked for

        manifest = convert([paths["pretrain"]], None, Path(paths["root"]) / "pretrain_shards", args.shards)
        print(f"pretraining shards in {Path(paths['root']) / 'pretrain_shards'} ({len(manifest['shards'])} shards, "
              f"{manifest['total']} samples)")


if __name__ == "__main__":
    main()
