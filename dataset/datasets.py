"""One dataset class per ALBEF annotation format, and the collators that batch their items.

Items are dicts with uint8 images (3, H, W) and cleaned text; collators stack images and tokenize text inside the
DataLoader workers. Indexing takes an int or an ``(index, epoch)`` tuple (what ResumableDistributedSampler yields
when training); the sample's augmentation draws from ``np.random.default_rng((seed, epoch, index))`` so it does not
depend on the worker, the rank or a resume.

Broken images (missing, empty, truncated, not an image, too large) are logged with their path and counted. Training
datasets replace the sample by another one drawn deterministically from (seed, epoch, index, retry), so batches stay
full; each item carries ``num_skipped``, 1 when its own sample's image was broken (else 0). Evaluation datasets never
score a stand-in: a broken image raises :class:`EvalImageError` naming it. Leaving such samples out instead is the
caller's choice: :func:`find_broken_images` lists them and ``exclude_entries`` builds the dataset without them.

The guard against a wrong image_root or a damaged copy (``max_bad_image_fraction``, see :func:`bad_image_rate_exceeds`)
stops the run only on statistical evidence that the failure rate of the data is above the threshold, so a few broken
files met early in an epoch do not stop a run whose overall rate is below it, while a run whose first loads all fail
stops after a handful of loads. :meth:`ImageTextDataset.check_images_exist` catches a wrong folder before any load.
"""

from __future__ import annotations

import abc
import logging
import math
import os
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.annotations import load_json_annotations
from dataset.text import pre_caption, pre_question
from dataset.tokenizer import tokenize
from dataset.transforms import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTransform, load_image

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
AnnotationFiles = PathLike | Sequence[PathLike]
# SNLI-VE labels as ALBEF's fine-tuned checkpoints expect them.
VE_LABEL_IDS: dict[str, int] = {"entailment": 2, "neutral": 1, "contradiction": 0}
MAX_CONSECUTIVE_BROKEN = 50  # replacement draws in a row before giving up on one item
# Probability that the bad-image guard stops a run whose true failure rate is exactly max_bad_image_fraction, per
# check (one check per failed load); below the threshold it is far smaller still (see bad_image_rate_exceeds).
BAD_IMAGE_FALSE_ALARM = 1e-6
IMAGES_CHECKED_PER_FILE = 5  # check_images_exist: the first this many images of each annotation file


class EvalImageError(ValueError):
    """An evaluation image that cannot be read: evaluation stops rather than score a stand-in image."""

    def __init__(self, message: str):
        # A DataLoader worker's exception reaches the main process re-raised as type(message-with-its-traceback):
        # keep our own message (the traceback's last line), so the user reads one line.
        caught, marker = f"Caught {type(self).__name__}", f"{type(self).__name__}: "
        if message.startswith(caught) and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def bad_image_rate_exceeds(failures: int, attempts: int, max_fraction: float,
                           false_alarm: float = BAD_IMAGE_FALSE_ALARM) -> bool:
    """Whether ``failures`` failed loads out of ``attempts`` show that the true failure rate is above max_fraction.

    A one-sided test of the binomial rate: if the true rate were max_fraction (p), seeing k or more failures in n
    loads would have probability P(X >= k) <= exp(-n KL(k/n || p)) (the Chernoff bound, KL the Bernoulli relative
    entropy), and the test fires when that bound is below ``false_alarm``. The bound is conservative (the exact tail
    is smaller), so the rate is judged on the evidence, not on a running fraction: 2 failures in 173 loads (1.2%) do
    not fire at p = 1%, and data whose rate is half the threshold practically never fires (the bound shrinks
    exponentially with n). Loads that all fail fire after about log(1/false_alarm) / log(1/p) of them (3-4 at the
    default p = 1%); at p = 1% a true rate of 5% is caught after ~330 loads, 20% after ~35. The check runs once per
    failed load, so over a run the false-alarm probability at the threshold is at most failures x false_alarm.
    p = 0 fires at the first failure, p = 1 never.
    """
    if failures <= 0 or attempts <= 0 or max_fraction >= 1.0:
        return False
    rate = failures / attempts
    if rate <= max_fraction:
        return False
    if max_fraction <= 0.0:
        return True
    relative_entropy = rate * math.log(rate / max_fraction)
    if rate < 1.0:
        relative_entropy += (1.0 - rate) * math.log((1.0 - rate) / (1.0 - max_fraction))
    return attempts * relative_entropy > math.log(1.0 / false_alarm)


def image_id_from_filename(path: str) -> int:
    """COCO-style id: the int after the file name's last '_' ('val2014/COCO_val2014_000000391895.jpg' -> 391895)."""
    field = Path(path).stem.split("_")[-1]
    if not field.isdigit():
        raise ValueError(f"image file name {path!r}: expected '<prefix>_<digits>.<ext>' to read the image id from")
    return int(field)


def _image_under(relative: str, root: str | None) -> tuple[str, str | None]:
    """(the file of an annotation's image path, the folder it was joined to or None when used as written)."""
    if root is None or os.path.isabs(relative):
        return relative, None
    return os.path.join(root, relative), root


def split_index(key: Any, length: int) -> tuple[int, int]:
    """An int index or an (index, epoch) pair -> (index, epoch); epoch 0 when not given."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise TypeError(f"dataset key must be an int or an (index, epoch) pair, got {key!r}")
        index, epoch = int(key[0]), int(key[1])
    else:
        index, epoch = int(key), 0
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} items")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return index, epoch


class ImageTextDataset(Dataset, abc.ABC):
    """Shared base: annotation loading, per-sample RNG, image loading with broken-image accounting.

    Subclasses set ``kind`` (the annotation kind) and implement ``_make_item``; evaluation datasets set
    ``replace_broken = False``. Subclasses whose entries name images other than ``image`` under image_root override
    ``entry_image_files``.
    """

    kind: str = ""
    replace_broken: bool = True
    # add_eos for the 'text' field when collated (decoder targets need an end token).
    text_eos: bool = False

    def __init__(
        self,
        ann_files: AnnotationFiles,
        transform: ImageTransform,
        image_root: PathLike | None = None,
        max_words: int = 30,
        *,
        train: bool | None = None,
        seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bad_image_fraction: float = 0.01,
        bad_image_false_alarm: float = BAD_IMAGE_FALSE_ALARM,
        exclude_entries: Collection[int] = (),
    ):
        """``max_words``: texts are cut to that many words; ``train``: replace broken images by other samples (True)
        or stop with EvalImageError (False, evaluation); None keeps the class's default. ``exclude_entries``: indices
        of the annotation entries (all files concatenated) to leave out, e.g. those find_broken_images reported."""
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
        if not 0.0 <= max_bad_image_fraction <= 1.0:
            raise ValueError(f"max_bad_image_fraction must be within [0, 1], got {max_bad_image_fraction}")
        self.ann_files = [str(ann_files)] if isinstance(ann_files, (str, os.PathLike)) else [str(f) for f in ann_files]
        if not self.ann_files:
            raise ValueError("no annotation files given (expected a path or a non-empty list of paths)")
        excluded = set(exclude_entries)
        self.entries = []
        self.file_starts: list[int] = []  # index of each annotation file's first (kept) entry in self.entries
        offset = 0
        for ann_file in self.ann_files:
            entries = load_json_annotations(ann_file, self.kind)
            self.file_starts.append(len(self.entries))
            self.entries += [entry for i, entry in enumerate(entries, offset) if i not in excluded]
            offset += len(entries)
        self.num_excluded = offset - len(self.entries)
        self.transform = transform
        self.image_root = None if image_root is None else str(image_root)
        self.seed = seed
        self.max_pixels = max_pixels
        self.max_bad_image_fraction = max_bad_image_fraction
        self.bad_image_false_alarm = bad_image_false_alarm
        self.max_words = max_words
        if train is not None:
            self.replace_broken = train
        # Counters of this instance (each DataLoader worker holds its own copy).
        self.image_attempts = 0
        self.broken_images = 0

    def __len__(self) -> int:
        return len(self.entries)

    def image_path(self, relative: str) -> str:
        """The file of an annotation's image (absolute paths, as in ALBEF's pretraining files, are kept)."""
        return _image_under(relative, self.image_root)[0]

    def entry_images(self, index: int) -> list[tuple[str, str | None]]:
        """(file, configured folder it is under, or None for a path used as written) of each image that the item of
        entry ``index`` reads."""
        return [_image_under(self.entries[index]["image"], self.image_root)]

    def check_images_exist(self, per_file: int = IMAGES_CHECKED_PER_FILE) -> None:
        """Before any image is loaded: each image folder in use exists, and of the first ``per_file`` images of each
        annotation file at least one is there. Otherwise one FileNotFoundError naming the folder and an example path
        (a wrong image_root would else show as a failed load per image). A few missing files among them are left to
        the skip-and-count handling of broken images."""
        ends = self.file_starts[1:] + [len(self.entries)]
        for ann_file, start, end in zip(self.ann_files, self.file_starts, ends, strict=True):
            first = range(start, min(end, start + per_file))
            checked = [image for index in first for image in self.entry_images(index)]
            for _path, root in checked:
                if root is not None and not os.path.isdir(root):
                    raise FileNotFoundError(f"{type(self).__name__}: image folder {root} does not exist (images of "
                                            f"{ann_file}, e.g. {checked[0][0]}): check data.image_root")
            if checked and not any(os.path.isfile(path) for path, _root in checked):
                path, root = checked[0]
                folder = root if root is not None else os.path.dirname(path) or "."
                raise FileNotFoundError(
                    f"{type(self).__name__}: none of the first {len(checked)} images of {ann_file} exists under "
                    f"{folder}, e.g. {path}: check data.image_root (the folder the annotation's relative image paths "
                    "start from)"
                )

    @abc.abstractmethod
    def _make_item(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        """Build the item for entry index; images go through self._load_image(self.image_path(...), rng)."""

    def __getitem__(self, key: Any) -> dict[str, Any]:
        index, epoch = split_index(key, len(self))
        sample = index
        for retry in range(MAX_CONSECUTIVE_BROKEN + 1):
            rng = np.random.default_rng((self.seed, epoch, sample))
            try:
                item = self._make_item(sample, rng)
            except ImageDecodeError as error:
                if not self.replace_broken:
                    raise EvalImageError(
                        f"{type(self).__name__}: {error} (entry {index} of {self.ann_files}). Evaluation never scores "
                        "a stand-in image: fix or remove the file, check data.image_root, or set "
                        "data.eval_skip_broken_images: true to leave such samples out of the metrics"
                    ) from None
                # Training: draw another sample, reproducibly, so that the batch stays full.
                sample = int(np.random.default_rng((self.seed, epoch, index, retry + 1)).integers(len(self)))
                continue
            # 1 when the sample's own image was unreadable: each broken file counts once per epoch, whatever its
            # stand-in draws met (every failed load is logged with its path).
            item["num_skipped"] = int(retry > 0)
            return item
        raise RuntimeError(
            f"{type(self).__name__}: {MAX_CONSECUTIVE_BROKEN + 1} images in a row failed to load while building item "
            f"{index} (image_root={self.image_root}, annotations {self.ann_files}); see the warnings above"
        )

    def _load_image(self, path: str, rng: np.random.Generator) -> torch.Tensor:
        """Decode and transform one image -> uint8 (3, res, res); broken files are counted and raise ImageDecodeError
        (see the module docstring for what happens then)."""
        self.image_attempts += 1
        try:
            image = load_image(path, self.max_pixels)
        except ImageDecodeError as error:
            self._record_broken(error)
            raise
        return self.transform(image, rng)

    def _record_broken(self, error: ImageDecodeError) -> None:
        self.broken_images += 1
        if not self.replace_broken:
            return  # evaluation: __getitem__ stops with the error
        logger.warning("%s; replacing the sample (%d of %d image loads failed in this %s)", error, self.broken_images,
                       self.image_attempts, type(self).__name__)
        if bad_image_rate_exceeds(self.broken_images, self.image_attempts, self.max_bad_image_fraction,
                                  self.bad_image_false_alarm):
            raise RuntimeError(
                f"{type(self).__name__}: {self.broken_images} of {self.image_attempts} image loads failed "
                f"({self.broken_images / self.image_attempts:.1%}): evidence that more than max_bad_image_fraction="
                f"{self.max_bad_image_fraction:.1%} of the images are unreadable (the chance of this many failures "
                f"at that rate is below {self.bad_image_false_alarm:.0e}); last: {error}. Check image_root="
                f"{self.image_root} and the image files of {self.ann_files}."
            )

    def make_collator(self, tokenizer: Any, max_length: int = 30, padding: str = "longest") -> ImageTextCollator:
        """The collator that batches this dataset's items (tokenizing 'text' into text_ids / text_mask)."""
        return ImageTextCollator(tokenizer, max_length, padding=padding, add_eos=self.text_eos)


class PretrainDataset(ImageTextDataset):
    """``[{image, caption}]``; a list of captions gives one picked per sample. Items: image, text, index."""

    kind = "pretrain"

    def _make_item(self, index, rng):
        entry = self.entries[index]
        caption = entry["caption"]
        if isinstance(caption, list):
            caption = caption[int(rng.integers(len(caption)))]
        image = self._load_image(self.image_path(entry["image"]), rng)
        return {"image": image, "text": pre_caption(caption, self.max_words), "index": index}


def contiguous_ids(keys: Sequence[Any]) -> dict[Any, int]:
    """Map each distinct key to 0, 1, 2, ... in order of first appearance."""
    ids: dict[Any, int] = {}
    for key in keys:
        ids.setdefault(key, len(ids))
    return ids


class RetrievalTrainDataset(ImageTextDataset):
    """``[{image, caption, image_id}]``. Items: image, text, image_idx (contiguous image index, for ITC positives)."""

    kind = "retrieval_train"

    def __init__(self, ann_files: AnnotationFiles, transform: ImageTransform, image_root: PathLike | None = None,
                 max_words: int = 30, **options: Any):
        super().__init__(ann_files, transform, image_root, **options)
        self.max_words = max_words
        self.image_ids = contiguous_ids([entry["image_id"] for entry in self.entries])

    def _make_item(self, index, rng):
        entry = self.entries[index]
        image = self._load_image(self.image_path(entry["image"]), rng)
        text = pre_caption(entry["caption"], self.max_words)
        return {"image": image, "text": text, "image_idx": self.image_ids[entry["image_id"]]}


class RetrievalEvalDataset(ImageTextDataset):
    """``[{image, caption: [..]}]``: iterates over images (items: image, index); the texts are attributes.

    ``texts[t]`` is the cleaned caption t, ``txt2img[t]`` its image index, ``img2txt[i]`` the caption indices of
    image i (ALBEF's layout, as lists).
    """

    kind = "retrieval_eval"
    replace_broken = False

    def __init__(self, ann_files: AnnotationFiles, transform: ImageTransform, image_root: PathLike | None = None,
                 max_words: int = 30, **options: Any):
        super().__init__(ann_files, transform, image_root, **options)
        self.texts: list[str] = []
        self.txt2img: list[int] = []
        self.img2txt: list[list[int]] = []
        for image_index, entry in enumerate(self.entries):
            self.img2txt.append([])
            for caption in entry["caption"]:
                self.img2txt[image_index].append(len(self.texts))
                self.texts.append(pre_caption(caption, max_words))
                self.txt2img.append(image_index)

    def _make_item(self, index, rng):
        return {"image": self._load_image(self.image_path(self.entries[index]["image"]), rng), "index": index}


def _with_default_suffix(image: str) -> str:
    """ALBEF's SNLI-VE files name Flickr30k images by id without '.jpg'."""
    return image if os.path.splitext(image)[1] else image + ".jpg"


class VEDataset(ImageTextDataset):
    """SNLI-VE ``[{image, sentence, label}]``. Items: image, text, label (entailment=2, neutral=1, contradiction=0),
    index."""

    kind = "ve"

    def entry_images(self, index: int) -> list[tuple[str, str | None]]:
        return [_image_under(_with_default_suffix(self.entries[index]["image"]), self.image_root)]

    def _make_item(self, index, rng):
        entry = self.entries[index]
        image = self._load_image(self.image_path(_with_default_suffix(entry["image"])), rng)
        text = pre_caption(entry["sentence"], self.max_words)
        return {"image": image, "text": text, "label": VE_LABEL_IDS[entry["label"]], "index": index}


class NLVRDataset(ImageTextDataset):
    """NLVR2 ``[{images: [a, b], sentence, label}]``. Items: image0, image1, text, label ('True'/True -> 1, else 0),
    index."""

    kind = "nlvr"

    def entry_images(self, index: int) -> list[tuple[str, str | None]]:
        return [_image_under(image, self.image_root) for image in self.entries[index]["images"]]

    def _make_item(self, index, rng):
        entry = self.entries[index]
        first, second = entry["images"]
        return {
            "image0": self._load_image(self.image_path(first), rng),
            "image1": self._load_image(self.image_path(second), rng),
            "text": pre_caption(entry["sentence"], self.max_words),
            "label": int(entry["label"] is True or entry["label"] == "True"),
            "index": index,
        }


class VQADataset(ImageTextDataset):
    """VQA v2 / Visual Genome QA.

    Training (``train=True``, kind vqa_train): items image, question, answers (distinct), weights. A 'vqa' entry
    weights each distinct answer by its share of the annotator answers; a 'vg' entry gives its answer(s) weight 0.5
    (ALBEF's rule). Images of 'vg' entries are under vg_root. Evaluation (kind vqa_test): image, question,
    question_id; questions keep up to 50 words by default (ALBEF does not shorten test questions).
    """

    def __init__(self, ann_files: AnnotationFiles, transform: ImageTransform, image_root: PathLike | None = None,
                 vg_root: PathLike | None = None, train: bool = True, max_words: int | None = None, **options: Any):
        self.kind = "vqa_train" if train else "vqa_test"
        self.replace_broken = train
        super().__init__(ann_files, transform, image_root, **options)
        self.train = train
        self.vg_root = None if vg_root is None else str(vg_root)
        self.max_words = max_words if max_words is not None else (30 if train else 50)
        if self.vg_root is None and any(entry.get("dataset") == "vg" for entry in self.entries):
            raise ValueError(f"{self.ann_files}: entries with dataset 'vg' need vg_root (the Visual Genome images)")

    def image_path(self, relative: str, source: str = "vqa") -> str:
        """The file of an image of a 'vqa' (under image_root) or 'vg' (under vg_root) entry."""
        return _image_under(relative, self.vg_root if source == "vg" else self.image_root)[0]

    def entry_images(self, index: int) -> list[tuple[str, str | None]]:
        entry = self.entries[index]
        source = entry.get("dataset", "vqa")
        return [_image_under(entry["image"], self.vg_root if source == "vg" else self.image_root)]

    def _make_item(self, index, rng):
        entry = self.entries[index]
        image = self._load_image(self.image_path(entry["image"], entry.get("dataset", "vqa")), rng)
        question = pre_question(entry["question"], self.max_words)
        if not self.train:
            return {"image": image, "question": question, "question_id": entry["question_id"]}
        answers = entry["answer"] if isinstance(entry["answer"], list) else [entry["answer"]]
        counts = Counter(answers)  # distinct answers in order of first appearance
        if entry["dataset"] == "vg":
            weights = {answer: 0.5 for answer in counts}
        else:
            weights = {answer: count / len(answers) for answer, count in counts.items()}
        return {"image": image, "question": question, "answers": list(weights), "weights": list(weights.values())}

    def make_collator(self, tokenizer: Any, max_length: int = 30, padding: str = "longest",
                      max_answer_length: int = 10) -> VQACollator:
        """Collator tokenizing questions (max_length) and, when training, answers with [SEP] (max_answer_length)."""
        return VQACollator(tokenizer, max_length, max_answer_length=max_answer_length, padding=padding)


class GroundingDataset(ImageTextDataset):
    """RefCOCO+ ``[{image, text, ref_id}]``.

    Training items: image, text, image_idx (a contiguous index per image file name, so that expressions of the same
    image are positives for each other). Evaluation items: image, text, ref_id, index (the entry's position, to
    drop the repeats the distributed sampler pads the last rank's share with).
    """

    kind = "grounding"

    def __init__(self, ann_files: AnnotationFiles, transform: ImageTransform, image_root: PathLike | None = None,
                 max_words: int = 30, train: bool = True, **options: Any):
        super().__init__(ann_files, transform, image_root, **options)
        self.max_words = max_words
        self.train = train
        self.replace_broken = train
        self.image_ids = contiguous_ids([os.path.basename(entry["image"]) for entry in self.entries])

    def _make_item(self, index, rng):
        entry = self.entries[index]
        image = self._load_image(self.image_path(entry["image"]), rng)
        item = {"image": image, "text": pre_caption(entry["text"], self.max_words)}
        if self.train:
            item["image_idx"] = self.image_ids[os.path.basename(entry["image"])]
        else:
            item["ref_id"] = entry["ref_id"]
            item["index"] = index
        return item


class _CaptionDataset(ImageTextDataset):
    """COCO Karpathy captioning files; image ids are read from the file names (COCO_..._<id>.jpg)."""

    def __init__(self, ann_files: AnnotationFiles, transform: ImageTransform, image_root: PathLike | None = None,
                 max_words: int = 30, **options: Any):
        super().__init__(ann_files, transform, image_root, **options)
        self.max_words = max_words
        self.image_ids: list[int] = []
        for index, entry in enumerate(self.entries):
            try:
                self.image_ids.append(image_id_from_filename(entry["image"]))
            except ValueError as error:
                raise ValueError(f"{self.ann_files}: entry {index}: field 'image': {error}") from None


class CaptionTrainDataset(_CaptionDataset):
    """``[{image, caption, image_id}]``. Items: image, text (collated with an end token), image_id."""

    kind = "caption_train"
    text_eos = True

    def _make_item(self, index, rng):
        entry = self.entries[index]
        image = self._load_image(self.image_path(entry["image"]), rng)
        text = pre_caption(entry["caption"], self.max_words)
        return {"image": image, "text": text, "image_id": self.image_ids[index]}


class CaptionEvalDataset(_CaptionDataset):
    """``[{image, caption: [..]}]``. Items: image, image_id (the id of the COCO-format ground truth)."""

    kind = "caption_eval"
    replace_broken = False

    def _make_item(self, index, rng):
        image = self._load_image(self.image_path(self.entries[index]["image"]), rng)
        return {"image": image, "image_id": self.image_ids[index]}


def find_broken_images(dataset: ImageTextDataset, indices: Iterable[int] | None = None, threads: int = 8
                       ) -> dict[int, str]:
    """Entry index -> "cannot use image ...: reason" for each entry (of ``indices``, default all) with an image that
    does not decode. Every image is decoded in full (a truncated file is only found that way), in ``threads`` threads
    (OpenCV decodes without the GIL). For evaluation with data.eval_skip_broken_images: the entries found are then
    left out through ``exclude_entries``."""
    indices = range(len(dataset)) if indices is None else list(indices)

    def problem(index: int) -> str | None:
        for path, _root in dataset.entry_images(index):
            try:
                load_image(path, dataset.max_pixels)
            except ImageDecodeError as error:
                return str(error)
        return None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        found = zip(indices, pool.map(problem, indices), strict=True)
        return {index: message for index, message in found if message is not None}


# ------------------------------------------------------------------------------------------------ collation


def _stack_field(key: str, values: list[Any]) -> Any:
    """Tensors are stacked, ints/bools -> LongTensor, floats -> FloatTensor, anything else stays a list."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(values)
    if all(isinstance(v, (bool, int, np.integer)) for v in values):
        return torch.tensor([int(v) for v in values], dtype=torch.long)
    if all(isinstance(v, (float, int, np.floating, np.integer)) for v in values):
        return torch.tensor(values, dtype=torch.float32)
    return list(values)


class ImageTextCollator:
    """Batches items: images stacked (uint8, (B, 3, H, W)), 'text' tokenized to text_ids / text_mask (B, L),
    ints as LongTensors, num_skipped summed. Picklable, so it runs in the workers."""

    def __init__(self, tokenizer: Any, max_length: int = 30, padding: str = "longest", add_eos: bool = False):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.padding = padding
        self.add_eos = add_eos

    def _text(self, batch: dict, name: str, texts: list[str], max_length: int, add_eos: bool) -> None:
        ids, mask = tokenize(self.tokenizer, texts, max_length, padding=self.padding, add_eos=add_eos)
        batch[f"{name}_ids"], batch[f"{name}_mask"] = ids, mask

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty list of items")
        batch: dict[str, Any] = {}
        for key in items[0]:
            values = [item[key] for item in items]
            if key == "num_skipped":
                batch[key] = int(sum(values))
            elif key == "text":
                self._text(batch, "text", values, self.max_length, self.add_eos)
            else:
                batch[key] = _stack_field(key, values)
        return batch


class VQACollator(ImageTextCollator):
    """VQA batches in ALBEF's training layout.

    question -> question_ids / question_mask (B, Lq). Training items also give: answer_ids / answer_mask (A, La),
    every question's distinct answers flattened in batch order and tokenized with the end token [SEP];
    answer_weights (A,) float; answer_counts (B,) long, how many of the A answers belong to each question (ALBEF's
    ``n``: repeat question states answer_counts[b] times to line them up with the answers).
    """

    def __init__(self, tokenizer: Any, max_length: int = 30, max_answer_length: int = 10, padding: str = "longest"):
        super().__init__(tokenizer, max_length, padding=padding, add_eos=False)
        self.max_answer_length = max_answer_length

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty list of items")
        batch: dict[str, Any] = {"image": torch.stack([item["image"] for item in items])}
        self._text(batch, "question", [item["question"] for item in items], self.max_length, add_eos=False)
        if "answers" in items[0]:
            answers = [answer for item in items for answer in item["answers"]]
            self._text(batch, "answer", answers, self.max_answer_length, add_eos=True)
            batch["answer_weights"] = torch.tensor([w for item in items for w in item["weights"]], dtype=torch.float32)
            batch["answer_counts"] = torch.tensor([len(item["answers"]) for item in items], dtype=torch.long)
        if "question_id" in items[0]:
            batch["question_id"] = _stack_field("question_id", [item["question_id"] for item in items])
        batch["num_skipped"] = int(sum(item["num_skipped"] for item in items))
        return batch
