"""Caption metrics equal pycocoevalcap's scorers called directly; missing Java or SPICE jars are reported, not faked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from metrics.caption import (
    best_constant_caption,
    caption_metrics,
    coco_caption_eval,
    simple_tokenize,
    spice_missing_jars,
)

GT = {
    1: ["A dog runs across the grass.", "a brown dog on a lawn", "The dog is running outside!"],
    2: ["A cat's toy lies on a wooden table.", "a toy for a cat on a table"],
    3: ["Two men riding horses in a field.", "men on horseback, in an open field", "two riders and their horses"],
    4: ["A plate of food with broccoli.", "broccoli and rice on a white plate"],
}
RESULTS = [
    {"image_id": 1, "caption": "A dog running on the grass."},
    {"image_id": 2, "caption": "the toy of a cat on a table"},
    {"image_id": 3, "caption": "two people riding horses in a field"},
    {"image_id": 4, "caption": "a plate with broccoli and rice"},
]


def _direct_scores(references: dict, candidates: dict, meteor: bool) -> dict[str, float]:
    """What pycocoevalcap's own scorers give on already tokenised captions."""
    bleu, _ = Bleu(4).compute_score(references, candidates, verbose=0)
    out = {f"Bleu_{n}": value for n, value in enumerate(bleu, start=1)}
    out["ROUGE_L"] = Rouge().compute_score(references, candidates)[0]
    out["CIDEr"] = Cider().compute_score(references, candidates)[0]
    if meteor:
        out["METEOR"] = Meteor().compute_score(references, candidates)[0]
    return out


def _assert_scores_equal(ours: dict, expected: dict) -> None:
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert 0.0 < ours["Bleu_1"] <= 1.0 and ours["CIDEr"] > 0.0


@pytest.mark.slow
def test_caption_metrics_equal_pycocoevalcap() -> None:
    java = shutil.which("java") is not None
    missing_before = spice_missing_jars()
    ours = caption_metrics(GT, RESULTS)
    if java:
        tokenizer = PTBTokenizer()
        references = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in GT.items()})
        candidates = tokenizer.tokenize({r["image_id"]: [{"caption": r["caption"]}] for r in RESULTS})
        _assert_scores_equal(ours, _direct_scores(references, candidates, meteor=True))
        assert "meteor_unavailable" not in ours and "ptb_tokenizer_unavailable" not in ours
    else:
        assert "METEOR" not in ours and "java" in ours["meteor_unavailable"]
    if missing_before:
        # SPICE would need CoreNLP jars: reported as unavailable, and nothing was downloaded to get them.
        assert "SPICE" not in ours
        assert "stanford-corenlp-3.6.0" in ours["spice_unavailable"]
        assert spice_missing_jars() == missing_before
    else:
        assert isinstance(ours["SPICE"], float)


def test_without_java_reports_what_it_can(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    # Lower-case, punctuation-free captions: the fallback tokenizer leaves them as they are.
    gt = {7: ["a man rides a red bike", "a person on a bicycle"], 8: ["two dogs play in the snow"]}
    results = [{"image_id": 7, "caption": "a man on a red bike"}, {"image_id": 8, "caption": "dogs playing in snow"}]
    candidates = {r["image_id"]: [r["caption"]] for r in results}
    assert simple_tokenize(gt) == gt and simple_tokenize(candidates) == candidates
    with caplog.at_level("WARNING", logger="metrics.caption"):
        ours = caption_metrics(gt, results)
    assert "java not found" in caplog.text
    _assert_scores_equal(ours, _direct_scores(gt, candidates, meteor=False))
    assert "METEOR" not in ours and "SPICE" not in ours
    assert "java" in ours["meteor_unavailable"] and "java" in ours["spice_unavailable"]
    assert "simple word tokenizer" in ours["ptb_tokenizer_unavailable"]


def test_simple_tokenize() -> None:
    assert simple_tokenize({1: ["A cat's toy, on the TABLE!"]}) == {1: ["a cat 's toy on the table"]}


def test_coco_caption_eval(tmp_path: Path) -> None:
    gt_file = tmp_path / "coco_karpathy_val_gt.json"
    images = [{"id": image_id} for image_id in GT]
    annotations = [
        {"image_id": image_id, "id": 10 * image_id + i, "caption": caption}
        for image_id, captions in GT.items()
        for i, caption in enumerate(captions)
    ]
    gt_file.write_text(json.dumps({"images": images, "annotations": annotations}))
    result_file = tmp_path / "results.json"
    result_file.write_text(json.dumps(RESULTS[:3]))  # only the images with a result are scored
    from_files = coco_caption_eval(gt_file, result_file, meteor=False, spice=False)
    from_dict = caption_metrics(GT, RESULTS[:3], meteor=False, spice=False)
    assert from_files == from_dict
    assert from_files["meteor_unavailable"] == "METEOR not requested"
    assert from_files["spice_unavailable"] == "SPICE not requested"
    with pytest.raises(FileNotFoundError, match="missing_gt.json"):
        coco_caption_eval(tmp_path / "missing_gt.json", RESULTS)


def test_result_errors() -> None:
    with pytest.raises(ValueError, match="image_id 1 has more than one caption"):
        caption_metrics(GT, [RESULTS[0], RESULTS[0]], meteor=False, spice=False)
    with pytest.raises(ValueError, match="image_id 99 has no reference captions"):
        caption_metrics(GT, [{"image_id": 99, "caption": "a dog"}], meteor=False, spice=False)
    with pytest.raises(ValueError, match="expected an object with image_id and caption"):
        caption_metrics(GT, [{"image_id": 1, "text": "a dog"}], meteor=False, spice=False)
    with pytest.raises(ValueError, match="caption results are empty"):
        caption_metrics(GT, [], meteor=False, spice=False)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        caption_metrics({1: "a dog"}, [{"image_id": 1, "caption": "a dog"}], meteor=False, spice=False)


def test_best_constant_caption_equals_scoring_every_candidate_for_every_image() -> None:
    """The best of the top_n most frequent training captions (case and punctuation folded when counting) is the one
    whose CIDEr, given to every image through caption_metrics, is the highest; a less frequent caption is not tried."""
    train = (["A dog on the grass.", "a dog on the grass", "a dog on the grass"]  # one caption, three spellings
             + ["two horses in a field"] * 2 + ["a plate of food"] * 2 + ["a cat toy on a table"])  # the rarest
    best = best_constant_caption(train, GT, top_n=3)
    tried = ["a dog on the grass", "two horses in a field", "a plate of food"]
    expected = {caption: caption_metrics(GT, [{"image_id": key, "caption": caption} for key in GT], meteor=False,
                                         spice=False)["CIDEr"] for caption in tried}
    winner = max(expected, key=expected.get)
    assert (best.caption, best.num_candidates) == (winner, 3)
    assert best.cider == pytest.approx(expected[winner], rel=1e-9)
    assert best.count == {"a dog on the grass": 3}.get(winner, 2)
    assert len(set(expected.values())) == 3  # the candidates score differently: the choice is a real one
    # On images 1 and 2 the rarest caption scores best (CIDEr 1.37 against 0.96 for the dog), but only the 4 most
    # frequent captions include it.
    assert best_constant_caption(train, {1: GT[1], 2: GT[2]}, top_n=4).caption == "a cat toy on a table"
    assert best_constant_caption(train, {1: GT[1], 2: GT[2]}, top_n=3).caption == "a dog on the grass"
    with pytest.raises(ValueError, match="no training captions"):
        best_constant_caption(["...", ""], GT)
    with pytest.raises(ValueError, match="no reference captions"):
        best_constant_caption(train, {})
