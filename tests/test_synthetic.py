"""dataset.synthetic: every ALBEF annotation format written, consistent, deterministic, learnable and in vocab."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from dataset.synthetic import COLOURS, FILES, FORMAT_VERSION, NEUTRAL_PROPERTIES, SHAPES, SIZES, generate, main
from dataset.tokenizer import build_tokenizer, split_words, tokenize

NUM_IMAGES, IMAGE_SIZE = 80, 64  # what tests/conftest.py's synthetic_dir fixture generates


class _PlainUnpickler(pickle.Unpickler):
    """Refuses every class: loads only if the pickle holds plain containers (as REFER's files must)."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refs pickle references {module}.{name}")


def _load(root: Path, key: str):
    path = root / FILES[key]
    if path.suffix == ".p":
        with path.open("rb") as handle:
            return _PlainUnpickler(handle).load()
    return json.loads(path.read_text(encoding="utf-8"))


def _images(entries: list[dict]) -> set[str]:
    return {name for entry in entries for name in (entry["images"] if "images" in entry else [entry["image"]])}


def test_every_file_exists_and_parses(synthetic_dir: Path):
    for key, rel in FILES.items():
        assert (synthetic_dir / rel).is_file(), rel
        if rel.endswith((".json", ".p")):
            assert _load(synthetic_dir, key), rel
    manifest = _load(synthetic_dir, "manifest")
    assert manifest["params"]["num_images"] == NUM_IMAGES and manifest["params"]["image_size"] == IMAGE_SIZE
    assert sorted(sum(manifest["splits"].values(), [])) == list(range(1, NUM_IMAGES + 1))
    assert len(manifest["splits"]["train"]) > 3 * len(manifest["splits"]["val"]) > 0


def test_images_decode_with_documented_size(synthetic_dir: Path):
    names = sorted(p.name for p in (synthetic_dir / "images").glob("*.jpg"))
    assert names == [f"synth_{i:012d}.jpg" for i in range(1, NUM_IMAGES + 1)]
    for name in names[:20]:
        image = cv2.imread(str(synthetic_dir / "images" / name))
        assert image is not None and image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3), name
        assert image.std() > 10, f"{name} is blank"


def test_formats(synthetic_dir: Path):
    pretrain = _load(synthetic_dir, "pretrain")
    for entry in pretrain:
        assert Path(entry["image"]).is_absolute() and Path(entry["image"]).is_file()
        assert isinstance(entry["caption"], str) or all(isinstance(c, str) for c in entry["caption"])
    assert {type(e["caption"]) for e in pretrain} == {str, list}
    for prefix in ("retrieval", "coco_karpathy"):
        train = _load(synthetic_dir, f"{prefix}_train")
        assert all(set(e) == {"image", "caption", "image_id"} and isinstance(e["caption"], str) for e in train)
        assert all(e["image_id"] == int(e["image"].split("_")[-1].split(".")[0]) for e in train)
        assert max(Counter(e["image"] for e in train).values()) > 1  # several captions per image
        for split in ("val", "test"):
            for entry in _load(synthetic_dir, f"{prefix}_{split}"):
                assert set(entry) == {"image", "caption"} and 2 <= len(entry["caption"]) <= 5
                assert (synthetic_dir / "images" / entry["image"]).is_file()
    for split in ("train", "dev", "test"):
        ve = _load(synthetic_dir, f"ve_{split}")
        assert all(set(e) == {"image", "sentence", "label"} for e in ve)
        counts = Counter(e["label"] for e in ve)
        assert set(counts) == {"entailment", "neutral", "contradiction"} and len(set(counts.values())) == 1
        nlvr = _load(synthetic_dir, f"nlvr_{split}")
        assert all(set(e) == {"images", "sentence", "label"} and len(e["images"]) == 2 for e in nlvr)
        assert all(e["images"][0] != e["images"][1] for e in nlvr)
        labels = Counter(e["label"] for e in nlvr)
        assert set(labels) <= {"True", "False"} and min(labels["True"], labels["False"]) >= len(nlvr) // 3
    for split in ("train", "val", "test"):
        for entry in _load(synthetic_dir, f"vqa_{split}"):
            assert isinstance(entry["question_id"], int) and isinstance(entry["question"], str)
            assert entry["dataset"] in ({"vqa", "vg"} if split == "train" else {"vqa"})
            if split == "test":
                assert set(entry) == {"question_id", "question", "image", "dataset"}
            else:
                assert isinstance(entry["answer"], list)
                assert len(entry["answer"]) == (10 if entry["dataset"] == "vqa" else 1)
    for split in ("train", "val", "test"):
        assert all(set(e) == {"image", "text", "ref_id"} for e in _load(synthetic_dir, f"refcoco+_{split}"))


def test_splits_are_disjoint(synthetic_dir: Path):
    groups = {
        "train": ["retrieval_train", "coco_karpathy_train", "ve_train", "nlvr_train", "vqa_train", "refcoco+_train"],
        "val": ["retrieval_val", "coco_karpathy_val", "ve_dev", "nlvr_dev", "vqa_val", "refcoco+_val"],
        "test": ["retrieval_test", "coco_karpathy_test", "ve_test", "nlvr_test", "vqa_test", "refcoco+_test"],
    }
    images = {split: set().union(*(_images(_load(synthetic_dir, k)) for k in keys)) for split, keys in groups.items()}
    manifest = _load(synthetic_dir, "manifest")
    for split, names in images.items():
        assert names == {f"synth_{i:012d}.jpg" for i in manifest["splits"][split]}, split
    assert not images["train"] & images["val"] and not images["train"] & images["test"]
    assert not images["val"] & images["test"]
    assert {Path(e["image"]).name for e in _load(synthetic_dir, "pretrain")} == images["train"]
    refs = _load(synthetic_dir, "refcoco+_refs")
    assert {r["split"] for r in refs} == {"train", "val", "testA", "testB"}


def test_every_word_is_in_vocab(synthetic_dir: Path):
    vocab = set((synthetic_dir / "vocab.txt").read_text().split())
    texts = []
    for key in FILES:
        if key.endswith("_gt"):
            texts += [a["caption"] for a in _load(synthetic_dir, key)["annotations"]]
        elif key.split("_")[0] in {"pretrain", "retrieval", "coco", "ve", "nlvr", "vqa", "refcoco+"} and (
            FILES[key].endswith(".json") and "/" not in FILES[key]
        ):
            for entry in _load(synthetic_dir, key):
                for field in ("caption", "sentence", "question", "text", "answer"):
                    value = entry.get(field, [])
                    texts += [value] if isinstance(value, str) else value
    texts += [s["raw"] for ref in _load(synthetic_dir, "refcoco+_refs") for s in ref["sentences"]]
    texts += _load(synthetic_dir, "answer_list")
    assert len(texts) > 1000
    missing = {word for text in texts for word in split_words(text)} - vocab
    assert not missing
    tokenizer = build_tokenizer(synthetic_dir)
    input_ids, _ = tokenize(tokenizer, texts, max_length=64)
    assert not input_ids.eq(tokenizer.unk_token_id).any()


def test_vqa_answers_and_official_files(synthetic_dir: Path):
    answer_list = _load(synthetic_dir, "answer_list")
    assert len(answer_list) == len(set(answer_list)) and {"yes", "no", "2", "red", "circle"} <= set(answer_list)
    train, val = _load(synthetic_dir, "vqa_train"), _load(synthetic_dir, "vqa_val")
    for entry in train + val:
        assert set(entry["answer"]) <= set(answer_list), entry
    assert any(e["dataset"] == "vg" for e in train)
    assert any(len(set(e["answer"])) > 1 for e in train + val)  # annotator noise, so partial credit happens
    ids = [e["question_id"] for e in train + val + _load(synthetic_dir, "vqa_test")]
    assert len(ids) == len(set(ids))
    questions = _load(synthetic_dir, "vqa_v2_val_questions")["questions"]
    annotations = _load(synthetic_dir, "vqa_v2_val_annotations")["annotations"]
    assert [q["question_id"] for q in questions] == [a["question_id"] for a in annotations] == [
        e["question_id"] for e in val
    ]
    for question, annotation, entry in zip(questions, annotations, val, strict=True):
        assert question["question"] == entry["question"]
        assert question["image_id"] == annotation["image_id"] == int(entry["image"].split("_")[-1].split(".")[0])
        assert [a["answer"] for a in annotation["answers"]] == entry["answer"]
        assert [a["answer_id"] for a in annotation["answers"]] == list(range(1, 11))
        assert annotation["multiple_choice_answer"] == Counter(entry["answer"]).most_common(1)[0][0]
        assert annotation["answer_type"] in {"yes/no", "number", "other"}
        if annotation["answer_type"] == "yes/no":
            assert annotation["multiple_choice_answer"] in {"yes", "no"}


def _observed_objects(root: Path) -> dict[int, list[dict]]:
    """Per image: each annotated object with the colour read back from the JPEG pixels and its position."""
    instances = _load(root, "refcoco+_instances")
    names = {c["id"]: c["name"] for c in instances["categories"]}
    files = {image["id"]: image["file_name"] for image in instances["images"]}
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    objects: dict[int, list[dict]] = {}
    for ann in instances["annotations"]:
        image = cv2.imread(str(root / "images" / files[ann["image_id"]]))[:, :, ::-1]  # RGB
        x, y, w, h = ann["bbox"]
        cx, cy = x + w / 2, y + h / 2
        pixel = image[int(cy), int(cx)].astype(np.float64)
        colour = list(COLOURS)[int(np.argmin(((palette - pixel) ** 2).sum(1)))]
        size = min(SIZES, key=lambda s: abs(SIZES[s] * 2 * IMAGE_SIZE - max(w, h)))
        col, row = int(cx * 3 // IMAGE_SIZE), int(cy * 3 // IMAGE_SIZE)
        objects.setdefault(ann["image_id"], []).append(
            {"id": ann["id"], "shape": names[ann["category_id"]], "colour": colour, "size": size, "col": col,
             "row": row, "bbox": ann["bbox"]}
        )
    return objects


def _matches(sentence: str, obj: dict) -> bool:
    """Whether every attribute word of a referring expression is true of the object."""
    words = set(split_words(sentence))
    checks = [
        all(obj["colour"] == c for c in COLOURS if c in words),
        all(obj["shape"] == s for s in SHAPES if s in words),
        all(obj["size"] == s for s in SIZES if s in words),
        "left" not in words or obj["col"] == 0,
        "right" not in words or obj["col"] == 2,
        "top" not in words or obj["row"] == 0,
        "bottom" not in words or obj["row"] == 2,
        "center" not in words or (obj["col"], obj["row"]) == (1, 1),
    ]
    return all(checks)


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return iw * ih / (a[2] * a[3] + b[2] * b[3] - iw * ih)


def test_grounding_refs_point_at_the_described_object(synthetic_dir: Path):
    objects = _observed_objects(synthetic_dir)
    refs = _load(synthetic_dir, "refcoco+_refs")
    assert len(refs) == sum(len(v) for v in objects.values())  # one ref per object
    by_ref = {ref["ref_id"]: ref for ref in refs}
    for ref in refs:
        target = next(o for o in objects[ref["image_id"]] if o["id"] == ref["ann_id"])
        assert ref["file_name"] == f"synth_{ref['image_id']:012d}.jpg"
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        for sentence in ref["sentences"]:
            assert sentence["tokens"] == split_words(sentence["sent"]) and sentence["raw"].lower() == sentence["sent"]
            # The expression is true of the referred object (colour read from the image) and of no other one.
            assert _matches(sentence["sent"], target), (sentence["sent"], target)
            others = [o for o in objects[ref["image_id"]] if o["id"] != target["id"] and _matches(sentence["sent"], o)]
            assert not others, (sentence["sent"], others)
    for split in ("train", "val", "test"):
        for entry in _load(synthetic_dir, f"refcoco+_{split}"):
            ref = by_ref[entry["ref_id"]]
            assert entry["image"] == ref["file_name"] and entry["text"] in [s["sent"] for s in ref["sentences"]]
    dets, cocos = _load(synthetic_dir, "refcoco+_dets"), _load(synthetic_dir, "refcoco+_cocos")
    for image_id, image_objects in objects.items():
        assert sorted(cocos[str(image_id)]) == sorted(o["bbox"] for o in image_objects)
        for obj in image_objects:  # a proposal overlaps every object well enough to count as a hit
            assert max(_iou(det, obj["bbox"]) for det in dets[str(image_id)]) > 0.5
        assert len(dets[str(image_id)]) > len(image_objects)  # plus distractors


def test_ve_neutral_sentences_are_decidable(synthetic_dir: Path):
    for entry in _load(synthetic_dir, "ve_train"):
        neutral_words = any(p in entry["sentence"] for p in NEUTRAL_PROPERTIES) or "drawn by" in entry["sentence"]
        assert neutral_words == (entry["label"] == "neutral"), entry


def test_caption_ground_truth_loads_in_pycocotools(synthetic_dir: Path):
    from pycocotools.coco import COCO

    for split in ("val", "test"):
        entries = _load(synthetic_dir, f"coco_karpathy_{split}")
        gt_path = synthetic_dir / FILES[f"coco_karpathy_{split}_gt"]
        coco = COCO(str(gt_path))
        for entry in entries:
            image_id = int(entry["image"].split("_")[-1].split(".")[0])
            assert [a["caption"] for a in coco.imgToAnns[image_id]] == entry["caption"]
        results = coco.loadRes([{"image_id": image_id, "caption": "a red circle"} for image_id in coco.getImgIds()])
        assert len(results.getAnnIds()) == len(entries)


def test_deterministic_and_idempotent(tmp_path: Path):
    first = generate(tmp_path / "a", num_images=40, image_size=IMAGE_SIZE, seed=3)
    second = generate(tmp_path / "b", num_images=40, image_size=IMAGE_SIZE, seed=3)
    files = sorted(p.relative_to(first["root"]) for p in first["root"].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second["root"]) for p in second["root"].rglob("*") if p.is_file())
    for rel in files:
        a, b = (first["root"] / rel).read_bytes(), (second["root"] / rel).read_bytes()
        if rel.name == "pretrain.json":  # absolute image paths differ only by the output directory
            a = a.replace(str(first["root"].resolve()).encode(), b"ROOT")
            b = b.replace(str(second["root"].resolve()).encode(), b"ROOT")
        assert a == b, rel
    stamps = {rel: (first["root"] / rel).stat().st_mtime_ns for rel in files}
    again = generate(tmp_path / "a", num_images=40, image_size=IMAGE_SIZE, seed=3)
    assert again == first and stamps == {rel: (first["root"] / rel).stat().st_mtime_ns for rel in files}
    other = generate(tmp_path / "a", num_images=30, image_size=IMAGE_SIZE, seed=4)  # new parameters: regenerated
    assert len(list(other["images"].glob("*.jpg"))) == 30
    assert other["vqa_train"].read_bytes() != second["vqa_train"].read_bytes()
    # The vocabulary covers the templates, not just the sampled texts, so it does not depend on the sample.
    assert other["vocab"].read_text() == second["vocab"].read_text()


def test_cli_and_bad_parameters(tmp_path: Path, capsys):
    main(["--out", str(tmp_path / "cli"), "--num-images", "10", "--image-size", "32", "--seed", "1"])
    assert "10 images" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["params"] == {"num_images": 10, "image_size": 32, "seed": 1, "format_version": FORMAT_VERSION}
    assert cv2.imread(str(tmp_path / "cli" / "images" / "synth_000000000010.jpg")).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="num_images"):
        generate(tmp_path / "bad", num_images=3)
    with pytest.raises(ValueError, match="image_size"):
        generate(tmp_path / "bad", num_images=20, image_size=16)


def test_cli_default_folder_is_not_the_demos_and_other_data_is_not_replaced_silently(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["--num-images", "10"])
    default = tmp_path / "data" / "synthetic"
    assert not (tmp_path / "data" / "demo").exists()  # the demo's folder (demo.py --data, configs/demo) is left alone
    assert _load(default, "manifest")["params"]["num_images"] == 10 and len(list((default / "images").iterdir())) == 10
    # Other parameters into a folder that holds data: refused, the data untouched.
    with pytest.raises(SystemExit):
        main(["--num-images", "12"])
    assert "already holds synthetic data with other parameters" in capsys.readouterr().err
    assert _load(default, "manifest")["params"]["num_images"] == 10
    main(["--num-images", "10"])  # the same parameters: nothing to do
    main(["--num-images", "12", "--overwrite"])
    assert _load(default, "manifest")["params"]["num_images"] == 12 and len(list((default / "images").iterdir())) == 12
