"""refTools: IoU, heat-map box scoring, grounding accuracy, the REFER loader and the restricted unpickler."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from refTools import (
    REFER,
    UnsafePickleError,
    box_heat_scores,
    compute_iou,
    evaluate_heatmaps,
    grounding_accuracy,
    heat_peak_in_box,
    load_dets,
    paired_iou,
    pick_box,
    predict_boxes,
    safe_pickle,
)


# REFER's computeIoU over inclusive pixel coordinates (x2 = x + w - 1), worked out by hand.
@pytest.mark.parametrize(
    ("box_a", "box_b", "expected"),
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),  # inter 10 * 10, union 100
        ([0, 0, 10, 10], [5, 5, 10, 10], 25 / 175),  # x, y in 5..9: inter 5 * 5, union 100 + 100 - 25
        ([0, 0, 3, 3], [1, 1, 3, 3], 4 / 14),  # x, y in 1..2: inter 2 * 2, union 9 + 9 - 4
        ([0, 0, 4, 4], [1, 1, 2, 2], 4 / 16),  # contained: inter 2 * 2, union 16 + 4 - 4
        ([0, 0, 10, 10], [0, 0, 10, 5], 0.5),  # inter 10 * 5, union 100 + 50 - 50
        ([0, 0, 2, 2], [1, 1, 2, 2], 0.0),  # one shared pixel: ix1 == ix2 is no overlap (strict <)
        ([0, 0, 2, 2], [2, 0, 2, 2], 0.0),  # touching edges
        ([0, 0, 2, 2], [5, 5, 1, 1], 0.0),  # disjoint
        ([0.5, 0.5, 4.0, 4.0], [1.0, 1.0, 4.0, 4.0], 12.25 / 19.75),  # fractional: 1..3.5 -> (2.5 + 1) ** 2
        ([3, 3, 0, 0], [3, 3, 0, 0], 0.0),  # no area (the toolkit would divide by zero)
    ],
)
def test_compute_iou(box_a: list, box_b: list, expected: float) -> None:
    assert compute_iou(box_a, box_b) == pytest.approx(expected, abs=1e-12)
    assert compute_iou(box_b, box_a) == pytest.approx(expected, abs=1e-12)


def test_paired_iou_matches_compute_iou() -> None:
    generator = torch.Generator().manual_seed(0)
    boxes_a = torch.randint(0, 20, (50, 4), generator=generator).double()
    boxes_b = torch.randint(0, 20, (50, 4), generator=generator).double()
    expected = [compute_iou(a, b) for a, b in zip(boxes_a.tolist(), boxes_b.tolist(), strict=True)]
    assert paired_iou(boxes_a, boxes_b).tolist() == pytest.approx(expected, abs=1e-12)


def test_box_heat_scores_match_slicing() -> None:
    generator = torch.Generator().manual_seed(0)
    heatmap = torch.rand(37, 53, generator=generator)
    boxes = torch.tensor(
        [
            [0.0, 0.0, 53.0, 37.0],  # the whole map
            [3.7, 5.2, 10.6, 7.9],  # fractional corners: pixels int(x):int(x + w)
            [40.0, 30.0, 30.0, 20.0],  # runs past the right/bottom edge
            [-4.0, -2.0, 10.0, 6.0],  # starts before the map
            [10.0, 10.0, 1.0, 1.0],  # one pixel
        ]
    )
    scores = box_heat_scores(heatmap, boxes, alpha=0.5)
    for index, (x, y, w, h) in enumerate(boxes.tolist()):
        rows = slice(max(int(y), 0), int(y + h))
        cols = slice(max(int(x), 0), int(x + w))
        expected = heatmap[rows, cols].double().sum() / (w * h) ** 0.5
        assert float(scores[index]) == pytest.approx(float(expected), rel=1e-9)


def test_heat_peak_in_box_is_the_pointing_game() -> None:
    """A 4x4 grid over a 40x80 (H, W) image: cell (row 1, col 2) is hottest, its centre is (x 50, y 15)."""
    heat = torch.zeros(4, 4)
    heat[1, 2] = 1.0
    assert heat_peak_in_box(heat, [40, 10, 20, 10], (40, 80))  # x 40..60, y 10..20 holds (50, 15)
    assert heat_peak_in_box(heat, [50, 15, 1, 1], (40, 80))  # edges count
    assert not heat_peak_in_box(heat, [0, 0, 49, 40], (40, 80))  # x up to 49
    assert not heat_peak_in_box(heat, [40, 16, 20, 10], (40, 80))  # y from 16
    heat[3, 0] = 1.0  # a tie: the first cell in row-major order wins
    assert heat_peak_in_box(heat, [40, 10, 20, 10], (40, 80))
    with pytest.raises(ValueError, match="non-empty"):
        heat_peak_in_box(torch.zeros(0, 4), [0, 0, 1, 1], (4, 4))


def test_box_heat_scores_invalid_boxes() -> None:
    scores = box_heat_scores(torch.ones(8, 8), torch.tensor([[1.0, 1.0, 0.0, 3.0], [1.0, 1.0, 2.0, 2.0]]))
    assert scores[0] == float("-inf")
    assert scores[1] == pytest.approx(4.0 / 2.0)
    with pytest.raises(ValueError, match="zero width or height"):
        pick_box(torch.ones(8, 8), torch.tensor([[1.0, 1.0, 0.0, 3.0]]))
    with pytest.raises(ValueError, match=r"heatmap must be \(H, W\)"):
        box_heat_scores(torch.ones(1, 8, 8), torch.tensor([[1.0, 1.0, 2.0, 2.0]]))


def test_pick_box_prefers_heat_and_normalises_by_size() -> None:
    heatmap = torch.zeros(40, 40)
    heatmap[5:10, 5:10] = 1.0  # 25 hot pixels
    heatmap[30:32, 30:32] = 1.0  # 4 hot pixels
    tight = [5.0, 5.0, 5.0, 5.0]  # all 25 in 25 pixels: 25 / 5 = 5
    large = [0.0, 0.0, 40.0, 40.0]  # all 29 in 1600 pixels: 29 / 40
    small = [30.0, 30.0, 2.0, 2.0]  # 4 in 4 pixels: 4 / 2 = 2
    cold = [15.0, 15.0, 5.0, 5.0]
    boxes = torch.tensor([large, cold, small, tight])
    assert pick_box(heatmap, boxes).tolist() == tight
    assert pick_box(heatmap, boxes, alpha=0.0).tolist() == large  # plain sum: the biggest box collects most heat
    # Mean heat: both hot boxes tie at 1 and the first one listed wins.
    assert pick_box(heatmap, boxes, alpha=1.0).tolist() == small
    assert pick_box(heatmap, torch.tensor([cold, tight, small]), alpha=1.0).tolist() == tight


def _write_refer(root: Path) -> Path:
    """A two-image RefCOCO+-style dataset: refs(unc).p + instances.json under root/refcoco+."""
    data_dir = root / "refcoco+"
    data_dir.mkdir(parents=True)
    instances = {
        "images": [
            {"id": 100, "height": 64, "width": 64, "file_name": "a.jpg"},
            {"id": 200, "height": 48, "width": 80, "file_name": "b.jpg"},
        ],
        "annotations": [
            {"id": 1, "image_id": 100, "category_id": 1, "bbox": [0.0, 0.0, 16.0, 16.0]},
            {"id": 2, "image_id": 100, "category_id": 2, "bbox": [40.0, 40.0, 20.0, 20.0]},
            {"id": 3, "image_id": 200, "category_id": 1, "bbox": [10.0, 10.0, 20.0, 10.0]},
            {"id": 4, "image_id": 200, "category_id": 2, "bbox": [50.0, 20.0, 20.0, 20.0]},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
    }
    refs = [
        {"ref_id": 10, "ann_id": 1, "image_id": 100, "category_id": 1, "split": "val",
         "sentences": [{"sent_id": 1000, "sent": "man on the left", "raw": "Man on the left", "tokens": []}]},
        {"ref_id": 11, "ann_id": 2, "image_id": 100, "category_id": 2, "split": "val",
         "sentences": [{"sent_id": 1001, "sent": "dog lower right", "raw": "dog lower right", "tokens": []}]},
        {"ref_id": 20, "ann_id": 3, "image_id": 200, "category_id": 1, "split": "testA",
         "sentences": [{"sent_id": 2000, "sent": "café person", "raw": "café person", "tokens": []}]},
        {"ref_id": 21, "ann_id": 4, "image_id": 200, "category_id": 2, "split": "testB",
         "sentences": [{"sent_id": 2001, "sent": "brown dog", "raw": "brown dog", "tokens": []},
                       {"sent_id": 2002, "sent": "dog right", "raw": "dog right", "tokens": []}]},
    ]  # fmt: skip
    (data_dir / "instances.json").write_text(json.dumps(instances))
    with open(data_dir / "refs(unc).p", "wb") as handle:
        pickle.dump(refs, handle, protocol=2)
    return root


@pytest.fixture()
def refer(tmp_path: Path) -> REFER:
    return REFER(_write_refer(tmp_path / "data"), dataset="refcoco+", split_by="unc")


def test_refer_index(refer: REFER) -> None:
    assert sorted(refer.Refs) == [10, 11, 20, 21]
    assert refer.get_ref_ids(split="val") == [10, 11]
    assert refer.get_ref_ids(split="test") == [20, 21]
    assert refer.get_ref_ids(split="testB") == [21]
    assert refer.get_ref_ids(image_ids=[200], cat_ids=[2]) == [21]
    assert refer.get_ref_box(20) == [10.0, 10.0, 20.0, 10.0]
    assert refer.refToAnn[11]["id"] == 2
    assert [ref["ref_id"] for ref in refer.imgToRefs[100]] == [10, 11]
    assert refer.sentToRef[2002]["ref_id"] == 21
    assert refer.Sents[2000]["sent"] == "café person"
    assert refer.Cats[2] == "dog"
    assert refer.Imgs[200]["width"] == 80
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        refer.get_ref_ids(split="dev")
    with pytest.raises(ValueError, match="ref_id 99 is not in"):
        refer.get_ref_box(99)


def test_refer_missing_files(tmp_path: Path) -> None:
    root = _write_refer(tmp_path / "data")
    with pytest.raises(FileNotFoundError, match=r"refs\(umd\)\.p"):
        REFER(root, dataset="refcoco+", split_by="umd")
    (root / "refcoco+" / "instances.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances.json"):
        REFER(root, dataset="refcoco+", split_by="unc")


def test_grounding_accuracy(refer: REFER) -> None:
    results = [
        {"ref_id": 10, "pred_box": [0.0, 0.0, 16.0, 8.0]},  # IoU exactly 0.5: counts
        {"ref_id": 11, "pred_box": [0.0, 0.0, 16.0, 16.0]},  # wrong object
        {"ref_id": 20, "pred_box": torch.tensor([11.0, 10.0, 20.0, 10.0])},  # IoU 19/21
        {"ref_id": 21, "pred_box": [50.0, 20.0, 20.0, 9.0]},  # IoU 0.45
    ]
    assert grounding_accuracy(results, refer) == {"testA": 100.0, "testB": 0.0, "val": 50.0}
    with pytest.raises(ValueError, match="ref_id 99 is not in"):
        grounding_accuracy([{"ref_id": 99, "pred_box": [0, 0, 1, 1]}], refer)
    # Results count per expression: ref 21 has two sentences, one grounded right and one wrong.
    per_sentence = [*results[:3], results[3], {"ref_id": 21, "pred_box": [50.0, 20.0, 20.0, 20.0]}]
    assert grounding_accuracy(per_sentence, refer) == {"testA": 100.0, "testB": 50.0, "val": 50.0}


def test_evaluate_heatmaps(refer: REFER, tmp_path: Path) -> None:
    dets_file = tmp_path / "dets.json"
    dets_file.write_text(
        json.dumps(
            {
                "100": [[40.0, 40.0, 20.0, 20.0, 0.9], [0.0, 0.0, 16.0, 16.0, 0.8]],  # extra score column ignored
                "200": [[10.0, 10.0, 20.0, 10.0], [50.0, 20.0, 20.0, 20.0], [0.0, 0.0, 80.0, 48.0]],
            }
        )
    )
    dets = load_dets(dets_file)
    assert dets[100].shape == (2, 4)
    top_left = torch.zeros(4, 4)
    top_left[0, 0] = 1.0  # patch (0, 0) covers pixels [0, 16) of a 64 x 64 image
    right = torch.zeros(6, 10)
    right[3, 7] = 1.0  # the patch over the second box of image 200 (48 x 80)
    heatmaps = {10: top_left, 11: top_left, 20: right, 21: right}
    predictions = predict_boxes(heatmaps, dets, refer)
    assert [p["pred_box"] for p in predictions] == [
        [0.0, 0.0, 16.0, 16.0],
        [0.0, 0.0, 16.0, 16.0],
        [50.0, 20.0, 20.0, 20.0],
        [50.0, 20.0, 20.0, 20.0],
    ]
    assert evaluate_heatmaps(heatmaps, dets, refer) == {"testA": 0.0, "testB": 100.0, "val": 50.0}
    # One heat map per sentence: (ref_id, map) pairs, a ref may repeat.
    per_sentence = [(21, right), (21, top_left), (10, top_left)]
    assert [p["ref_id"] for p in predict_boxes(per_sentence, dets, refer)] == [21, 21, 10]
    assert evaluate_heatmaps(per_sentence, dets, refer) == {"testB": 50.0, "val": 100.0}
    with pytest.raises(ValueError, match="no detection boxes for image_id 200"):
        evaluate_heatmaps({20: right}, {100: dets[100]}, refer)


def test_load_dets_errors(tmp_path: Path) -> None:
    path = tmp_path / "dets.json"
    path.write_text(json.dumps({"abc": [[0, 0, 1, 1]]}))
    with pytest.raises(ValueError, match="dets.json: key 'abc' is not an integer image id"):
        load_dets(path)
    path.write_text(json.dumps({"5": [[0, 0, 1, 1], [0, 0, "w", 1]]}))
    with pytest.raises(ValueError, match=r"dets.json: key '5', box 1: expected \[x, y, w, h\]"):
        load_dets(path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_dets(tmp_path / "missing.json")


class _RunsCommand:
    """Unpickling this calls os.system(command): what a malicious refs file would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_safe_pickle_refuses_globals(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.p"
    path.write_bytes(pickle.dumps([{"ref_id": 1}, _RunsCommand(f"touch {marker}")], protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"evil\.p: the pickle references the global (posix|os|nt)\.system"):
        safe_pickle.load(path)
    assert not marker.exists()
    assert issubclass(UnsafePickleError, ValueError)


def test_safe_pickle_loads_plain_data(tmp_path: Path) -> None:
    data = [
        {"ref_id": 1, "split": "val", "sentences": [{"sent": "naïve dog", "tokens": ["naïve", "dog"]}]},
        (1, 2.5, None, True, -(2**70)),
    ]
    path = tmp_path / "plain.p"
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        assert safe_pickle.load(path) == data
    # Python 2 pickles (the released REFER files) store text as byte strings: read back as UTF-8 str.
    py2_str = b"\x80\x02]q\x00U\x05caf\xc3\xa9q\x01a."  # cPickle.dumps(['caf\xc3\xa9'], 2) under Python 2
    path.write_bytes(py2_str)
    assert safe_pickle.load(path) == ["café"]
    path.write_bytes(pickle.dumps([b"raw"], protocol=pickle.HIGHEST_PROTOCOL))
    assert safe_pickle.load(path) == [b"raw"]
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="plain.p: not a readable plain-data pickle"):
        safe_pickle.load(path)
    with pytest.raises(FileNotFoundError, match="absent.p"):
        safe_pickle.load(tmp_path / "absent.p")
