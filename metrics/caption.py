"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) through pycocoevalcap's scorers.

The pipeline is the one of pycocoevalcap's ``COCOEvalCap``: PTB-tokenise references and candidates (Stanford
CoreNLP, Java), then run each scorer on the tokenised text. ``COCOEvalCap.evaluate`` itself is not called because
it always builds the SPICE scorer, which downloads Stanford CoreNLP when its jars are missing, and it needs Java for
every step. Here each part runs only when its dependencies are already present, and whatever cannot run is reported
with its reason instead of a number:

- no Java: a logged warning; captions are tokenised by a simple lower-case word splitter (BLEU, ROUGE-L and CIDEr
  are computed on it, but are not comparable to published PTB-tokenised numbers), ``ptb_tokenizer_unavailable`` and
  ``meteor_unavailable`` say why;
- SPICE needs Java and the CoreNLP 3.6.0 jars inside pycocoevalcap's ``spice/lib``; otherwise ``spice_unavailable``.

Returned dict: metric name (``Bleu_1`` .. ``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``, ``SPICE``, the names
COCOEvalCap uses) -> float in pycocoevalcap's scale (fractions; CIDEr unbounded), plus ``<metric>_unavailable`` ->
reason (str) for each metric that was not computed.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import spice as spice_module
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocotools.coco import COCO

from dataset.annotations import read_json

logger = logging.getLogger(__name__)

# Jars the SPICE scorer needs besides spice-1.0.jar; pycocoevalcap downloads them on first use, which we never do.
_SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
# Words and clitics ("it's" -> "it", "'s"), the way the PTB tokenizer splits them; punctuation is dropped.
_SIMPLE_TOKEN_RE = re.compile(r"'?[^\W_]+")

References = Mapping[Hashable, Sequence[str]]


def simple_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """Java-free stand-in for the PTB tokenizer: lower-case, split off clitics, drop punctuation."""
    return {
        key: [" ".join(_SIMPLE_TOKEN_RE.findall(text.lower())) for text in texts] for key, texts in captions.items()
    }


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """pycocoevalcap's PTB tokenisation (needs Java): image_id -> tokenised captions."""
    wrapped = {key: [{"caption": text} for text in texts] for key, texts in captions.items()}
    return PTBTokenizer().tokenize(wrapped)


def spice_missing_jars() -> list[str]:
    """The CoreNLP jars SPICE needs that are not installed (empty when SPICE can run without a download)."""
    lib_dir = Path(spice_module.__file__).resolve().parent / "lib"
    return [str(lib_dir / name) for name in _SPICE_CORENLP_JARS if not (lib_dir / name).is_file()]


def _check_inputs(gt: References, results: Sequence[Mapping]) -> tuple[dict, dict]:
    """Validate and return (references, candidates) as image_id -> list of captions, over the results' images."""
    if not results:
        raise ValueError("caption results are empty; expected [{image_id, caption}, ...]")
    candidates: dict[Hashable, list[str]] = {}
    references: dict[Hashable, list[str]] = {}
    for index, item in enumerate(results):
        if not isinstance(item, Mapping) or "image_id" not in item or "caption" not in item:
            raise ValueError(f"caption results[{index}]: expected an object with image_id and caption, got {item!r}")
        image_id, caption = item["image_id"], item["caption"]
        if not isinstance(caption, str):
            raise ValueError(f"caption results[{index}] (image_id {image_id}): caption must be a string")
        if image_id in candidates:
            raise ValueError(f"caption results[{index}]: image_id {image_id!r} has more than one caption")
        if image_id not in gt:
            raise ValueError(f"caption results[{index}]: image_id {image_id!r} has no reference captions")
        refs = gt[image_id]
        if isinstance(refs, str) or not refs or not all(isinstance(ref, str) for ref in refs):
            raise ValueError(f"reference captions of image_id {image_id!r} must be a non-empty list of strings")
        candidates[image_id] = [caption]
        references[image_id] = list(refs)
    return references, candidates


def _run_scorer(name: str, scorer_factory, references: dict, candidates: dict):
    """Build and run one java-backed scorer; return (score, None) or (None, reason) when the JVM fails."""
    try:
        scorer = scorer_factory()
        score, _ = scorer.compute_score(references, candidates)
    except (OSError, ValueError, subprocess.CalledProcessError) as err:
        reason = f"{name} scorer failed: {type(err).__name__}: {err}"
        logger.warning("%s", reason)
        return None, reason
    return float(score), None


def _store(out: dict, name: str, value: float | None, reason: str | None) -> None:
    """Record a metric, or the reason it is missing under ``<name lower-case>_unavailable``."""
    if reason is None:
        out[name] = value
    else:
        out[f"{name.lower()}_unavailable"] = reason


def _score(references: dict, candidates: dict, java: bool, meteor: bool, spice: bool) -> dict[str, float | str]:
    out: dict[str, float | str] = {}
    if java:
        references, candidates = ptb_tokenize(references), ptb_tokenize(candidates)
    else:
        logger.warning(
            "java not found on PATH: METEOR and SPICE are not computed and captions are tokenised without the PTB "
            "tokenizer, so BLEU/ROUGE-L/CIDEr are not comparable to published numbers"
        )
        out["ptb_tokenizer_unavailable"] = "java not found on PATH; a simple word tokenizer was used instead"
        references, candidates = simple_tokenize(references), simple_tokenize(candidates)

    bleu, _ = Bleu(4).compute_score(references, candidates, verbose=0)
    for n, value in enumerate(bleu, start=1):
        out[f"Bleu_{n}"] = float(value)

    if not meteor:
        out["meteor_unavailable"] = "METEOR not requested"
    elif not java:
        out["meteor_unavailable"] = "java not found on PATH (METEOR runs meteor-1.5.jar)"
    else:
        _store(out, "METEOR", *_run_scorer("METEOR", Meteor, references, candidates))

    out["ROUGE_L"] = float(Rouge().compute_score(references, candidates)[0])
    out["CIDEr"] = float(Cider().compute_score(references, candidates)[0])

    missing = spice_missing_jars() if spice and java else []
    if not spice:
        out["spice_unavailable"] = "SPICE not requested"
    elif not java:
        out["spice_unavailable"] = "java not found on PATH (SPICE runs spice-1.0.jar)"
    elif missing:
        out["spice_unavailable"] = f"Stanford CoreNLP jars missing (never downloaded here): {', '.join(missing)}"
    else:
        _store(out, "SPICE", *_run_scorer("SPICE", spice_module.Spice, references, candidates))
    return out


def load_coco_references(gt_file: str | Path) -> dict[int, list[str]]:
    """Reference captions image_id -> [captions] from a COCO-format caption file (read with pycocotools)."""
    gt_file = Path(gt_file)
    if not gt_file.is_file():
        raise FileNotFoundError(f"COCO caption ground-truth file not found: {gt_file}")
    try:
        coco = COCO(str(gt_file))
    except (json.JSONDecodeError, AssertionError, KeyError, TypeError) as err:
        raise ValueError(
            f"{gt_file}: not a COCO caption file ({type(err).__name__}: {err}); "
            'expected {"images": [...], "annotations": [{"image_id", "caption"}, ...]}'
        ) from err
    references: dict[int, list[str]] = {}
    for image_id, anns in coco.imgToAnns.items():
        for index, ann in enumerate(anns):
            if not isinstance(ann.get("caption"), str):
                raise ValueError(f"{gt_file}: annotation {index} of image_id {image_id} has no caption string")
        references[image_id] = [ann["caption"] for ann in anns]
    return references


def caption_metrics(
    gt: References | str | Path,
    results: Sequence[Mapping],
    *,
    meteor: bool = True,
    spice: bool = True,
) -> dict[str, float | str]:
    """Caption metrics of ``results`` ``[{image_id, caption}]`` against ``gt``.

    ``gt`` is image_id -> reference captions, or the path of a COCO-format caption file. Only the images that have
    a result are scored (as ALBEF/BLIP do for their Karpathy splits). ``meteor`` / ``spice`` switch those (slow,
    Java) metrics off explicitly.
    """
    if isinstance(gt, (str, Path)):
        gt = load_coco_references(gt)
    references, candidates = _check_inputs(gt, results)
    java = shutil.which("java") is not None
    return _score(references, candidates, java=java, meteor=meteor, spice=spice)


def coco_caption_eval(
    gt_file: str | Path, results: Sequence[Mapping] | str | Path, *, meteor: bool = True, spice: bool = True
) -> dict[str, float | str]:
    """COCO caption evaluation of a result file (or list) ``[{image_id, caption}]`` against a COCO gt file."""
    if isinstance(results, (str, Path)):
        result_file = Path(results)
        results = read_json(result_file, "caption result file")
        if not isinstance(results, list):
            raise ValueError(f"{result_file}: expected a list of {{image_id, caption}}")
    return caption_metrics(gt_file, results, meteor=meteor, spice=spice)


class ConstantCaption(NamedTuple):
    """The best single caption for every image (``best_constant_caption``): the strongest trivial captioner."""

    caption: str  # lower-cased, punctuation-free (the form CIDEr scores)
    cider: float  # its CIDEr on the references
    count: int  # how often it occurs among the training captions
    num_candidates: int  # how many frequent training captions were tried


def best_constant_caption(train_captions: Iterable[str], references: References, top_n: int = 40) -> ConstantCaption:
    """The one caption that, given to every image of ``references`` (image_id -> captions), scores the highest CIDEr,
    among the ``top_n`` most frequent ``train_captions`` (counted after lower-casing and dropping punctuation, so
    'A red circle.' and 'a red circle' are one caption; ties in frequency by first occurrence).

    A captioner that ignores the image can do this well, so a learning check compares with it. Tokenised and scored
    the way ``caption_metrics`` scores (PTB tokenizer with Java, else the simple one); CIDEr's document frequencies
    come from the references only, so every candidate is scored against the same statistics."""
    counts = Counter(" ".join(_SIMPLE_TOKEN_RE.findall(text.lower())) for text in train_captions)
    counts.pop("", None)
    if not counts:
        raise ValueError("best_constant_caption: no training captions (or only empty ones)")
    if not references:
        raise ValueError("best_constant_caption: no reference captions to score against")
    candidates = [caption for caption, _ in counts.most_common(top_n)]
    tokenize = ptb_tokenize if shutil.which("java") is not None else simple_tokenize
    tokenised_refs = tokenize({key: list(refs) for key, refs in references.items()})
    tokenised = tokenize(dict(enumerate([caption] for caption in candidates)))
    best = None
    for index, caption in enumerate(candidates):
        constant = {key: tokenised[index] for key in tokenised_refs}
        cider = float(Cider().compute_score(tokenised_refs, constant)[0])
        if best is None or cider > best.cider:
            best = ConstantCaption(caption, cider, counts[caption], len(candidates))
    return best
