"""Annotation validation, the per-format datasets and collators, broken-image handling and the DataLoader factory."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dataset.annotations import ANNOTATION_KINDS, load_answer_list, load_json_annotations
from dataset.datasets import (
    CaptionEvalDataset,
    CaptionTrainDataset,
    EvalImageError,
    GroundingDataset,
    ImageTextCollator,
    NLVRDataset,
    PretrainDataset,
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    VEDataset,
    VQACollator,
    VQADataset,
    bad_image_rate_exceeds,
    find_broken_images,
    image_id_from_filename,
)
from dataset.loader import create_loader
from dataset.tokenizer import build_tokenizer, build_vocab, write_vocab
from dataset.transforms import build_transform

RES = 16


def _write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value))
    return path


# ------------------------------------------------------------------------------------------------ annotations


def test_missing_and_invalid_json_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*nope\.json"):
        load_json_annotations(tmp_path / "nope.json", "pretrain")
    (tmp_path / "cut.json").write_text('[{"image": "a.jpg",\n "caption": "a dog"},\n {"image": "b.j')
    with pytest.raises(ValueError, match=r"cut\.json: invalid JSON at line 3 column \d+.*truncated"):
        load_json_annotations(tmp_path / "cut.json", "pretrain")
    (tmp_path / "obj.json").write_text('{"image": "a.jpg"}')
    with pytest.raises(ValueError, match=r"obj\.json: expected a JSON list of pretrain entries, got a dict"):
        load_json_annotations(tmp_path / "obj.json", "pretrain")
    with pytest.raises(ValueError, match="unknown annotation kind 'vqa'"):
        load_json_annotations(tmp_path / "obj.json", "vqa")


@pytest.mark.parametrize(
    ("kind", "entry", "message"),
    [
        ("pretrain", {"image": "a.jpg"}, r"entry 1: missing field 'caption'"),
        ("pretrain", {"image": "a.jpg", "caption": []}, r"entry 1: field 'caption' must be a non-empty list of str"),
        ("pretrain", {"image": "a.jpg", "caption": ["ok", 3]}, r"field 'caption' must be a list of strings \(item 1"),
        ("pretrain", {"image": 7, "caption": "x"}, r"entry 1: field 'image' must be a non-empty string, got 7"),
        ("retrieval_train", {"image": "a.jpg", "caption": "x"}, r"missing field 'image_id'"),
        ("retrieval_eval", {"image": "a.jpg", "caption": "x"}, r"field 'caption' must be a non-empty list"),
        ("vqa_train", {"image": "a.jpg", "question": "q", "answer": ["y"], "dataset": "coco"}, r"'dataset' must be"),
        ("vqa_test", {"image": "a.jpg", "question": "q"}, r"missing field 'question_id'"),
        ("nlvr", {"images": ["a.jpg"], "sentence": "s", "label": "True"}, r"'images' must be a list of two image"),
        ("nlvr", {"images": ["a.jpg", "b.jpg"], "sentence": "s", "label": "yes"}, r"'label' must be \"True\""),
        ("ve", {"image": "a", "sentence": "s", "label": "maybe"}, r"'label' must be one of \['entailment'"),
        ("grounding", {"image": "a.jpg", "text": "t", "ref_id": "7"}, r"'ref_id' must be an int"),
        ("caption_train", {"image": "a.jpg", "caption": "c", "image_id": None}, r"'image_id' must be an int or"),
        ("caption_eval", {"image": "a.jpg", "caption": []}, r"'caption' must be a non-empty list"),
    ],
)
def test_entry_errors_name_file_index_and_field(tmp_path, kind, entry, message):
    good = {
        "pretrain": {"image": "a.jpg", "caption": "a cat"},
        "retrieval_train": {"image": "a.jpg", "caption": "a cat", "image_id": 3},
        "retrieval_eval": {"image": "a.jpg", "caption": ["a cat"]},
        "vqa_train": {"image": "a.jpg", "question": "q", "answer": ["y"], "dataset": "vqa"},
        "vqa_test": {"image": "a.jpg", "question": "q", "question_id": 1},
        "nlvr": {"images": ["a.jpg", "b.jpg"], "sentence": "s", "label": False},
        "ve": {"image": "a", "sentence": "s", "label": "neutral"},
        "grounding": {"image": "a.jpg", "text": "t", "ref_id": 7},
        "caption_train": {"image": "a.jpg", "caption": "c"},
        "caption_eval": {"image": "a.jpg", "caption": ["c"]},
    }[kind]
    path = _write_json(tmp_path / f"{kind}.json", [good, entry])
    with pytest.raises(ValueError, match=message) as caught:
        load_json_annotations(path, kind)
    assert str(path) in str(caught.value)
    assert load_json_annotations(_write_json(tmp_path / "ok.json", [good]), kind) == [good]


def test_extra_fields_ignored_and_files_concatenated(tmp_path):
    first = _write_json(tmp_path / "a.json", [{"image": "a.jpg", "caption": "x", "extra": {"anything": 1}}])
    second = _write_json(tmp_path / "b.json", [{"image": "b.jpg", "caption": ["y", "z"]}])
    entries = load_json_annotations([first, second], "pretrain")
    assert [entry["image"] for entry in entries] == ["a.jpg", "b.jpg"]
    assert set(ANNOTATION_KINDS) >= {"pretrain", "vqa_train", "grounding", "caption_eval"}


def test_answer_list(tmp_path):
    assert load_answer_list(_write_json(tmp_path / "a.json", ["yes", "no", "2"])) == ["yes", "no", "2"]
    with pytest.raises(ValueError, match=r"bad\.json: entry 1: expected an answer string, got 2"):
        load_answer_list(_write_json(tmp_path / "bad.json", ["yes", 2]))
    with pytest.raises(ValueError, match="non-empty JSON list"):
        load_answer_list(_write_json(tmp_path / "empty.json", []))


# ------------------------------------------------------------------------------------- datasets on synthetic data


@pytest.fixture(scope="module")
def tokenizer(synthetic_dir):
    return build_tokenizer(synthetic_dir / "vocab.txt")


def test_all_formats_load_and_collate(synthetic_dir, tokenizer):
    root = synthetic_dir / "images"
    train, test = build_transform("train", RES), build_transform("test", RES)
    cases = [
        (PretrainDataset(synthetic_dir / "pretrain.json", build_transform("pretrain", RES)), {"text_ids", "index"}),
        (RetrievalTrainDataset(synthetic_dir / "retrieval_train.json", train, root), {"text_ids", "image_idx"}),
        (RetrievalEvalDataset(synthetic_dir / "retrieval_test.json", test, root), {"index"}),
        (VEDataset(synthetic_dir / "ve_train.json", train, root), {"text_ids", "label"}),
        (NLVRDataset(synthetic_dir / "nlvr_train.json", train, root), {"image0", "image1", "text_ids", "label"}),
        (VQADataset(synthetic_dir / "vqa_train.json", train, root, vg_root=root), {"answer_ids", "answer_counts"}),
        (VQADataset(synthetic_dir / "vqa_test.json", test, root, train=False), {"question_ids", "question_id"}),
        (GroundingDataset(synthetic_dir / "refcoco+_train.json", train, root), {"text_ids", "image_idx"}),
        (GroundingDataset(synthetic_dir / "refcoco+_val.json", test, root, train=False), {"text_ids", "ref_id"}),
        (CaptionTrainDataset(synthetic_dir / "coco_karpathy_train.json", train, root), {"text_ids", "image_id"}),
        (CaptionEvalDataset(synthetic_dir / "coco_karpathy_val.json", test, root), {"image_id"}),
    ]
    for dataset, keys in cases:
        batch = dataset.make_collator(tokenizer, max_length=20)([dataset[(i, 0)] for i in range(3)])
        name = type(dataset).__name__
        assert keys <= set(batch), (name, sorted(batch))
        image = batch.get("image", batch.get("image0"))
        assert image.dtype == torch.uint8 and image.shape == (3, 3, RES, RES), name
        assert batch["num_skipped"] == 0
        for key in ("text_ids", "question_ids"):
            if key in batch:
                assert (batch[key][:, 0] == tokenizer.cls_token_id).all(), name
                assert batch[key].shape[1] <= 20 and batch[key.replace("ids", "mask")].shape == batch[key].shape


def test_vqa_training_layout(synthetic_dir, tokenizer, tmp_path):
    root = synthetic_dir / "images"
    image = json.loads((synthetic_dir / "vqa_train.json").read_text())[0]["image"]
    entries = [
        {"question": "What colour?", "answer": ["red", "red", "blue", "red"], "image": image, "dataset": "vqa"},
        {"question": "Shape?", "answer": "circle", "image": image, "dataset": "vg"},
        {"question": "How many?", "answer": ["two", "three"], "image": image, "dataset": "vg"},
    ]
    dataset = VQADataset(_write_json(tmp_path / "q.json", entries), build_transform("train", RES), root, vg_root=root)
    items = [dataset[i] for i in range(3)]
    assert items[0]["question"] == "what colour"
    assert items[0]["answers"] == ["red", "blue"] and items[0]["weights"] == [0.75, 0.25]
    assert items[1]["answers"] == ["circle"] and items[1]["weights"] == [0.5]
    assert items[2]["weights"] == [0.5, 0.5]
    batch = VQACollator(tokenizer, max_length=10, max_answer_length=6)(items)
    assert batch["answer_counts"].tolist() == [2, 1, 2]
    torch.testing.assert_close(batch["answer_weights"], torch.tensor([0.75, 0.25, 0.5, 0.5, 0.5]))
    assert batch["answer_ids"].shape[0] == 5
    lengths = batch["answer_mask"].sum(1)
    ends = batch["answer_ids"][torch.arange(5), lengths - 1]
    assert (ends == tokenizer.sep_token_id).all()  # every answer carries the end token
    with pytest.raises(ValueError, match="need vg_root"):
        VQADataset(tmp_path / "q.json", build_transform("train", RES), root)


def test_labels_and_ids(synthetic_dir):
    root = synthetic_dir / "images"
    test = build_transform("test", RES)
    ve = VEDataset(synthetic_dir / "ve_dev.json", test, root, train=False)
    expected = {"entailment": 2, "neutral": 1, "contradiction": 0}
    assert [ve[i]["label"] for i in range(len(ve))] == [expected[e["label"]] for e in ve.entries]
    nlvr = NLVRDataset(synthetic_dir / "nlvr_dev.json", test, root, train=False)
    assert [nlvr[i]["label"] for i in range(len(nlvr))] == [int(e["label"] == "True") for e in nlvr.entries]
    retrieval = RetrievalEvalDataset(synthetic_dir / "retrieval_val.json", test, root)
    assert len(retrieval.texts) == len(retrieval.txt2img) == sum(len(e["caption"]) for e in retrieval.entries)
    for image_index, text_indices in enumerate(retrieval.img2txt):
        assert all(retrieval.txt2img[t] == image_index for t in text_indices)
    captions = CaptionEvalDataset(synthetic_dir / "coco_karpathy_val.json", test, root)
    gt = json.loads((synthetic_dir / "coco_karpathy_val_gt.json").read_text())
    assert {captions[i]["image_id"] for i in range(len(captions))} == {image["id"] for image in gt["images"]}
    assert image_id_from_filename("val2014/COCO_val2014_000000391895.jpg") == 391895
    with pytest.raises(ValueError, match="expected '<prefix>_<digits>"):
        image_id_from_filename("cat.jpg")


def test_per_sample_rng_follows_seed_epoch_index(synthetic_dir):
    dataset = PretrainDataset(synthetic_dir / "pretrain.json", build_transform("pretrain", RES), seed=3)
    assert torch.equal(dataset[(4, 1)]["image"], dataset[(4, 1)]["image"])
    assert torch.equal(dataset[4]["image"], dataset[(4, 0)]["image"])
    assert not torch.equal(dataset[(4, 1)]["image"], dataset[(4, 2)]["image"])
    other_seed = PretrainDataset(synthetic_dir / "pretrain.json", build_transform("pretrain", RES), seed=4)
    assert not torch.equal(dataset[(4, 1)]["image"], other_seed[(4, 1)]["image"])
    with pytest.raises(IndexError, match="out of range"):
        dataset[len(dataset)]


# ------------------------------------------------------------------------------------------------ broken images


def _image_set(tmp_path: Path, num_images: int, broken: set[int]) -> tuple[Path, Path]:
    """num_images small JPEGs (those in broken written as garbage) and a retrieval_train file over them."""
    root = tmp_path / "images"
    root.mkdir()
    entries = []
    for index in range(num_images):
        name = f"img_{index:03d}.jpg"
        if index in broken:
            (root / name).write_bytes(b"not a jpeg" if index % 2 else b"")
        else:
            image = np.full((20, 24, 3), index * 10 % 250, dtype=np.uint8)
            assert cv2.imwrite(str(root / name), image)
        entries.append({"image": name, "caption": f"picture number {index}", "image_id": index})
    return _write_json(tmp_path / "ann.json", entries), root


def test_broken_image_is_skipped_counted_and_batch_stays_full(tmp_path, caplog):
    ann, root = _image_set(tmp_path, 10, broken={3})
    dataset = RetrievalTrainDataset(ann, build_transform("train", RES), root)
    with caplog.at_level(logging.WARNING, logger="dataset.datasets"):
        item = dataset[(3, 0)]
    assert item["num_skipped"] == 1 and item["image_idx"] != 3
    assert "img_003.jpg" in caplog.text and "not a decodable image" in caplog.text
    assert dataset.broken_images == 1
    # The replacement is deterministic.
    assert dataset[(3, 0)]["image_idx"] == item["image_idx"]
    vocab = write_vocab(build_vocab(["picture number"]), tmp_path / "vocab.txt")
    batch = ImageTextCollator(build_tokenizer(vocab))([dataset[(i, 0)] for i in range(10)])
    assert batch["image"].shape[0] == 10 and batch["num_skipped"] == 1
    assert dataset.broken_images == 3


def _eval_set(tmp_path: Path, num_images: int, broken: set[int]) -> tuple[Path, Path]:
    ann, root = _image_set(tmp_path, num_images, broken)
    entries = json.loads(ann.read_text())
    eval_entries = [{"image": e["image"], "caption": [e["caption"], f"caption {i}"]} for i, e in enumerate(entries)]
    return _write_json(tmp_path / "eval.json", eval_entries), root


def test_eval_dataset_never_scores_a_placeholder(tmp_path):
    eval_file, root = _eval_set(tmp_path, 4, broken={1})
    dataset = RetrievalEvalDataset(eval_file, build_transform("test", RES), root)
    assert dataset[2]["num_skipped"] == 0
    with pytest.raises(EvalImageError, match=r"img_001\.jpg.*entry 1 of .*eval\.json.*eval_skip_broken_images"):
        dataset[1]


def test_eval_image_error_keeps_one_line_through_loader_workers(tmp_path):
    eval_file, root = _eval_set(tmp_path, 4, broken={1})
    dataset = RetrievalEvalDataset(eval_file, build_transform("test", RES), root)
    vocab = write_vocab(build_vocab(["picture number caption"]), tmp_path / "vocab.txt")
    loader = create_loader(dataset, 2, train=False, num_workers=1, collate_fn=dataset.make_collator(
        build_tokenizer(vocab)), seed=0)
    with pytest.raises(EvalImageError) as caught:
        list(loader)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("RetrievalEvalDataset: cannot use image") and "img_001.jpg" in message


def test_broken_eval_entries_found_and_left_out(tmp_path):
    eval_file, root = _eval_set(tmp_path, 6, broken={1, 4})
    dataset = RetrievalEvalDataset(eval_file, build_transform("test", RES), root)
    broken = find_broken_images(dataset)
    assert sorted(broken) == [1, 4] and "img_004.jpg" in broken[4]
    assert find_broken_images(dataset, [0, 4, 5], threads=1) == {4: broken[4]}
    kept = RetrievalEvalDataset(eval_file, build_transform("test", RES), root, exclude_entries=sorted(broken))
    assert len(kept) == 4 and kept.num_excluded == 2
    assert [entry["image"] for entry in kept.entries] == ["img_000.jpg", "img_002.jpg", "img_003.jpg", "img_005.jpg"]
    # The derived text index follows the kept entries: 2 captions per image.
    assert kept.img2txt == [[0, 1], [2, 3], [4, 5], [6, 7]] and kept.txt2img == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(kept[i]["num_skipped"] == 0 for i in range(len(kept)))


def test_image_folder_checked_before_loading(tmp_path):
    ann, root = _image_set(tmp_path, 8, broken=set())
    transform = build_transform("train", RES)
    with pytest.raises(FileNotFoundError, match=r"image folder .*wrong_root does not exist .*ann\.json.*image_root"):
        RetrievalTrainDataset(ann, transform, tmp_path / "wrong_root").check_images_exist()
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    with pytest.raises(FileNotFoundError, match=r"none of the first 5 images of .*ann\.json exists under .*other, "
                                                r"e\.g\. .*other/img_000\.jpg"):
        RetrievalTrainDataset(ann, transform, elsewhere).check_images_exist()
    # A few missing files among the first ones are left to the skip-and-count handling.
    for index in (0, 1, 2, 3):
        (root / f"img_{index:03d}.jpg").unlink()
    RetrievalTrainDataset(ann, transform, root).check_images_exist()
    # Every annotation file is checked: a second file whose images are elsewhere fails, naming that file.
    other_ann = _write_json(tmp_path / "second.json", [{"image": "nowhere/x.jpg", "caption": "a", "image_id": 99}])
    with pytest.raises(FileNotFoundError, match=r"second\.json exists under .*images, e\.g\. .*nowhere/x\.jpg"):
        RetrievalTrainDataset([ann, other_ann], transform, root).check_images_exist()
    # NLVR2 entries name two images, VQA 'vg' entries live under vg_root.
    nlvr = _write_json(tmp_path / "nlvr.json", [{"images": ["img_005.jpg", "img_006.jpg"], "sentence": "s",
                                                  "label": "True"}])
    NLVRDataset(nlvr, transform, root).check_images_exist()
    vqa = _write_json(tmp_path / "vqa.json", [{"question_id": 1, "question": "q?", "answer": ["a"],
                                               "image": "img_005.jpg", "dataset": "vg"}])
    VQADataset(vqa, transform, tmp_path / "unused", vg_root=root).check_images_exist()
    with pytest.raises(FileNotFoundError, match=r"image folder .*no_vg does not exist"):
        VQADataset(vqa, transform, root, vg_root=tmp_path / "no_vg").check_images_exist()


def _binomial_tail(failures: int, attempts: int, rate: float) -> float:
    """P(X >= failures) for X ~ Binomial(attempts, rate), exactly."""
    return sum(math.comb(attempts, k) * rate**k * (1 - rate) ** (attempts - k) for k in range(failures, attempts + 1))


def test_bad_image_rule_judges_the_evidence_not_the_running_fraction():
    # The reported case: 2 failures in 173 loads (1.2%) with the threshold at 1%: no evidence yet.
    assert not bad_image_rate_exceeds(2, 173, 0.01)
    # Loads that all fail (a wrong image_root) stop within 4 loads; a threshold of 0 stops at once, 1 never.
    assert next(n for n in range(1, 20) if bad_image_rate_exceeds(n, n, 0.01)) <= 4
    assert bad_image_rate_exceeds(1, 1, 0.0) and not bad_image_rate_exceeds(1000, 1000, 1.0)
    # A true rate of 5% (above the 1% threshold) is caught.
    assert bad_image_rate_exceeds(25, 500, 0.01)
    # Sound: whenever the rule fires, the exact probability of that many failures at the threshold rate is below
    # the false-alarm level (the Chernoff bound is conservative).
    fired = 0
    for attempts in (5, 20, 60, 200):
        for failures in range(1, attempts + 1):
            if bad_image_rate_exceeds(failures, attempts, 0.01):
                fired += 1
                assert _binomial_tail(failures, attempts, 0.01) < 1e-6, (failures, attempts)
    assert fired > 100
    # Data whose true rate is below the threshold (6 broken of 1,050 = 0.57%) runs whole epochs without a stop: the
    # rule is checked after every failure, as the dataset does.
    rng = np.random.default_rng(0)
    for _ in range(300):
        failed = np.flatnonzero(rng.random(1050) < 6 / 1050) + 1  # 1-based load counts of the failures
        assert not any(bad_image_rate_exceeds(k, int(n), 0.01) for k, n in enumerate(failed, 1))


@pytest.mark.slow
def test_too_many_broken_images_stop_with_a_clear_error(tmp_path):
    ann, root = _image_set(tmp_path, 40, broken=set(range(0, 40, 2)))  # half of the files
    dataset = RetrievalTrainDataset(ann, build_transform("train", RES), root, max_bad_image_fraction=0.05)
    with pytest.raises(RuntimeError, match=r"image loads failed .*more than max_bad_image_fraction=5\.0%.*image_root"):
        for index in range(40):
            dataset[(index, 0)]
    assert dataset.image_attempts < 40  # judged after a few dozen loads, long before the epoch ends


def test_all_images_missing_stops(tmp_path):
    ann, root = _image_set(tmp_path, 3, broken=set())
    dataset = RetrievalTrainDataset(ann, build_transform("train", RES), tmp_path / "wrong_root",
                                    max_bad_image_fraction=1.0)
    with pytest.raises(RuntimeError, match="images in a row failed to load"):
        dataset[0]


# ------------------------------------------------------------------------------------------------------ loader


def _batches(loader, epoch: int) -> list[dict]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_loader_with_two_workers_is_deterministic(synthetic_dir, tokenizer):
    dataset = PretrainDataset(synthetic_dir / "pretrain.json", build_transform("pretrain", RES), seed=1)
    collate = dataset.make_collator(tokenizer, max_length=16)
    loader = create_loader(dataset, batch_size=4, train=True, num_workers=2, collate_fn=collate, seed=7)
    assert loader.persistent_workers and loader.drop_last
    first, other_epoch, again = _batches(loader, 1), _batches(loader, 2), _batches(loader, 1)
    serial = create_loader(dataset, batch_size=4, train=True, num_workers=0, collate_fn=collate, seed=7)
    reference = _batches(serial, 1)
    assert len(first) == len(dataset) // 4
    for a, b, c in zip(first, again, reference, strict=True):
        for key in ("image", "text_ids", "index"):
            assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])
    assert not torch.equal(first[0]["index"], other_epoch[0]["index"])  # new epoch, new permutation


def test_eval_loader_keeps_order(synthetic_dir, tokenizer):
    dataset = RetrievalEvalDataset(synthetic_dir / "retrieval_val.json", build_transform("test", RES),
                                   synthetic_dir / "images")
    collate = dataset.make_collator(tokenizer)
    loader = create_loader(dataset, batch_size=4, train=False, num_workers=0, collate_fn=collate, seed=0)
    indices = torch.cat([batch["index"] for batch in loader]).tolist()
    assert indices == list(range(len(dataset)))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        create_loader(dataset, 0, False, 0, dataset.make_collator(tokenizer), 0)
