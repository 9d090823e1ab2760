"""models.inference: load_model_and_transforms and Predictor (features, similarity, match, caption, answer, Grad-CAM),
the README's "Use a trained model" example, and .safetensors checkpoints. Fast tests on tiny random models; the
slow ones on the session's pretrained demo model (tests/conftest.py `pretrained_demo`)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from common.checkpoint_file import load_checkpoint_file
from dataset.text import pre_caption
from dataset.tokenizer import build_tokenizer
from dataset.transforms import load_image
from engine.config import save_config
from metrics.retrieval import recall_at_k
from models import Predictor, create_model, load_model_and_transforms
from models.inference import ImagePreprocess, checkpoint_config, infer_task, load_for_inference
from tasks.retrieval_eval import encode_texts
from tests.test_predict import TINY_MODEL
from tools.export import export

REPO = Path(__file__).resolve().parents[1]


def tiny_checkpoint(folder: Path, vocab: Path, task: str, name: str, with_config: bool = True) -> Path:
    """A randomly initialised tiny model of ``task`` saved as our checkpoints are (weights + config)."""
    config = {"model": {**TINY_MODEL, "tokenizer": str(vocab)}, "data": {"max_words": 30, "max_tokens": 24}}
    torch.manual_seed(0)
    model = create_model(task, config["model"], tokenizer=build_tokenizer(vocab))
    path = folder / name
    torch.save({"model": model.state_dict(), **({"config": config} if with_config else {})}, path)
    return path


@pytest.fixture(scope="module")
def tiny(synthetic_dir, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("inference")
    vocab = synthetic_dir / "vocab.txt"
    paths = {task: tiny_checkpoint(out, vocab, task, f"{task}.pth") for task in ("retrieval", "vqa", "caption")}
    paths["official"] = tiny_checkpoint(out, vocab, "retrieval", "official.pth", with_config=False)
    save_config({"model": {**TINY_MODEL, "tokenizer": str(vocab)}}, out)
    paths["config"] = out / "config.yaml"
    paths["dir"] = out
    return paths


def synthetic_images(root: Path, count: int) -> list[Path]:
    return sorted((root / "images").glob("*.jpg"))[:count]


# ---- fast: tiny random models -------------------------------------------------------------------------------------
def test_transform_takes_every_kind_of_image(synthetic_dir):
    transform = ImagePreprocess(48)
    path = synthetic_images(synthetic_dir, 1)[0]
    rgb = load_image(path)  # (H, W, 3) uint8
    reference = transform(path)
    assert reference.shape == (3, 48, 48) and reference.dtype == torch.float32
    assert -3 < float(reference.min()) < float(reference.max()) < 3  # normalised, not 0-255
    for same in (str(path), Image.open(path), rgb, torch.from_numpy(rgb).permute(2, 0, 1).contiguous(),
                 np.concatenate([rgb, np.full_like(rgb[:, :, :1], 255)], axis=2), reference):
        assert torch.equal(transform(same), reference)
    grey = rgb[:, :, 0]
    assert torch.equal(transform(grey), transform(np.repeat(grey[:, :, None], 3, axis=2)))
    assert transform.batch([path, rgb]).shape == (2, 3, 48, 48)
    with pytest.raises(ValueError, match="uint8"):
        transform(rgb.astype(np.float32))
    with pytest.raises(ValueError, match="normalised"):
        transform(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="cannot use image"):
        transform(synthetic_dir / "missing.jpg")


def test_task_is_read_from_the_weights(tiny, synthetic_dir):
    for task in ("retrieval", "vqa", "caption"):
        assert infer_task(load_checkpoint_file(tiny[task])) == task
    model = create_model("pretrain", {**TINY_MODEL, "tokenizer": str(synthetic_dir / "vocab.txt")},
                         tokenizer=build_tokenizer(synthetic_dir / "vocab.txt"))
    assert infer_task({"model": model.state_dict()}) == "pretrain"
    classifier = create_model("ve", {**TINY_MODEL}, tokenizer=build_tokenizer(synthetic_dir / "vocab.txt"))
    with pytest.raises(ValueError, match="give task="):
        load_for_inference({"model": classifier.state_dict(), "config": {"model": TINY_MODEL}})


def test_loading_official_files_and_options(tiny, monkeypatch):
    model, transform, tokenizer = load_model_and_transforms(tiny["retrieval"], dtype=torch.float64)
    assert not model.training and next(model.parameters()).dtype == torch.float64
    assert transform.image_res == 48 and tokenizer.vocab_size > 10
    # An official file has no config: task= and config= (a YAML with its base: files) tell how to build it.
    # Without config=, the task's real config: configs/Retrieval_coco.yaml (ALBEF's 384 px) for retrieval.
    assert checkpoint_config({}, None, "retrieval")["model"]["image_res"] == 384
    with pytest.raises(ValueError, match="carries no config"):
        checkpoint_config({}, None, None)
    official = Predictor.from_checkpoint(tiny["official"], task="retrieval", config=tiny["config"])
    ours = Predictor.from_checkpoint(tiny["retrieval"])
    texts = ["a red circle", "a blue square"]
    assert torch.equal(official.text_features(texts), ours.text_features(texts))
    with pytest.raises(ValueError, match="does not fill the vqa model"):
        load_model_and_transforms(tiny["caption"], task="vqa")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the machine without a GPU, also on one
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_model_and_transforms(tiny["retrieval"], device="cuda")


def test_methods_refuse_a_model_without_the_head(tiny, synthetic_dir):
    image = synthetic_images(synthetic_dir, 1)[0]
    retrieval = Predictor.from_checkpoint(tiny["retrieval"])
    with pytest.raises(ValueError, match="caption needs a captioning"):
        retrieval.caption([image])
    with pytest.raises(ValueError, match="answer needs a VQA"):
        retrieval.answer([image], ["what colour?"])
    vqa = Predictor.from_checkpoint(tiny["vqa"])
    with pytest.raises(ValueError, match="similarity|image_features needs"):
        vqa.similarity([image], ["a red circle"])
    with pytest.raises(ValueError, match="give answer_list="):
        vqa.answer([image], ["what colour?"])
    with pytest.raises(ValueError, match="2 images and 3 texts"):
        retrieval.match([image, image], ["a", "b", "c"])
    with pytest.raises(ValueError, match="gradcam head must be one of"):
        retrieval.gradcam(image, "a red circle", head="nope")
    with pytest.raises(ValueError, match="gradcam head 'caption' needs a captioning"):
        retrieval.gradcam(image, head="caption")
    with pytest.raises(ValueError, match="gradcam head 'itm' needs a pretraining"):
        vqa.gradcam(image, "a red circle")


def test_gradcam_of_every_head(tiny, synthetic_dir):
    image = synthetic_images(synthetic_dir, 1)[0]
    retrieval = Predictor.from_checkpoint(tiny["retrieval"])
    itm = retrieval.gradcam(image, "a red circle")
    assert itm.text_map.shape == (1, 6, 6) and itm.token_maps.shape == (1, 4, 6, 6) and 0 < float(itm.match_prob) < 1
    assert retrieval.gradcam(image, "a red circle", head="itc").token_maps is None
    captioner = Predictor.from_checkpoint(tiny["caption"])
    given = captioner.gradcam(image, "a red circle", head="caption")
    assert given.token_maps.shape == (3, 6, 6)  # one map per caption token (the prompt is context)
    assert captioner.tokenizer.decode(given.token_ids) == "a red circle"
    generated = captioner.gradcam(image, head="caption", num_beams=2, max_length=6, min_length=2)
    assert generated.token_maps.shape[0] == len(generated.token_ids) >= 2
    vqa = Predictor.from_checkpoint(tiny["vqa"])
    maps = vqa.gradcam(image, "what colour is the circle?", head="vqa", answer_list=["red", "blue", "two"])
    assert maps.text_map.shape == (1, 6, 6) and maps.token_maps.shape[:2] == (1, 6)  # [CLS] + 5 question words
    assert float(maps.text_map.abs().sum()) > 0


def test_safetensors_export_loads_like_the_checkpoint(tiny, synthetic_dir, tmp_path):
    out = tmp_path / "retrieval.safetensors"
    summary = export(tiny["retrieval"], out)
    assert summary["task"] == "retrieval" and out.with_suffix(".json").is_file()
    keys = set(load_checkpoint_file(out)["model"])
    assert not any(key.split(".")[0].endswith("_m") for key in keys) and "image_queue" not in keys
    images = synthetic_images(synthetic_dir, 3)
    texts = ["a red circle", "a small blue square", "two shapes"]
    before, after = Predictor.from_checkpoint(tiny["retrieval"]), Predictor.from_checkpoint(out)
    assert torch.equal(before.similarity(images, texts), after.similarity(images, texts))
    assert torch.equal(before.match(images, texts), after.match(images, texts))
    # Without metadata, the config and task come from the JSON file beside it.
    bare = tmp_path / "bare.safetensors"
    save_file(load_checkpoint_file(out)["model"], str(bare))
    assert "config" not in load_checkpoint_file(bare)
    bare.with_suffix(".json").write_text(out.with_suffix(".json").read_text())
    assert torch.equal(Predictor.from_checkpoint(bare).match(images, texts), after.match(images, texts))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_checkpoint_file(broken)


# ---- slow: the pretrained demo model ------------------------------------------------------------------------------
def readme_python_example() -> str:
    """The first ```python block of README.md's "Use a trained model" section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Use a trained model"):]
    section = section[:section.index("\n## ", 3)]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def demo_layout(tmp_path: Path, pretrained_demo) -> Path:
    """output/demo/checkpoint_last.pth and data/demo/ as `bash run.sh demo` leaves them, in a fresh folder."""
    (tmp_path / "output" / "demo").mkdir(parents=True)
    os.symlink(pretrained_demo.checkpoint, tmp_path / "output" / "demo" / "checkpoint_last.pth")
    (tmp_path / "data").mkdir()
    os.symlink(pretrained_demo.data, tmp_path / "data" / "demo")
    return tmp_path


def test_readme_example_runs(pretrained_demo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(demo_layout(tmp_path, pretrained_demo))
    exec(compile(readme_python_example(), "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "torch.Size([2, 64])" in printed and "torch.Size([1, 6, 6])" in printed
    assert re.search(r"captions: \['[^']+', '[^']+'\]", printed), printed


def test_predictor_reproduces_the_evaluation(pretrained_demo):
    """similarity() on the held-out retrieval set: the evaluation's text features (tasks.retrieval_eval, the same
    cleaning and tokens) and the ITC recall the pretraining run logged. The synthetic captions repeat word for word,
    so some similarities tie exactly and float rounding (max_tokens padding there, none here) orders the ties
    differently: the recall agrees within a few tied queries, not to the digit."""
    entries = json.loads((pretrained_demo.data / "retrieval_test.json").read_text())
    images = [pretrained_demo.data / "images" / entry["image"] for entry in entries]
    texts, img2txt, txt2img = [], [], []
    for index, entry in enumerate(entries):
        img2txt.append(list(range(len(texts), len(texts) + len(entry["caption"]))))
        texts += entry["caption"]
        txt2img += [index] * len(entry["caption"])
    predictor = Predictor.from_checkpoint(pretrained_demo.checkpoint, batch_size=16)
    text_feats = predictor.text_features(texts)
    _, _, evaluated = encode_texts(predictor.model, predictor.tokenizer, [pre_caption(text, 30) for text in texts],
                                   torch.device("cpu"), max_tokens=32)
    assert torch.allclose(text_feats, evaluated, atol=1e-5)
    sims = predictor.similarity(images, texts)
    assert torch.allclose(sims, predictor.image_features(images) @ text_feats.T / float(predictor.model.temp.detach()),
                          atol=1e-5)
    recall = recall_at_k(sims, sims.T, img2txt, txt2img)
    assert recall["r_mean"] == pytest.approx(pretrained_demo.metrics["val/itc_r_mean"], abs=0.5)
    # match(): one image against every text equals the pairwise call.
    pairwise = predictor.match([images[0]] * 3, texts[:3])
    assert torch.allclose(predictor.match(images[0], texts[:3]), pairwise, atol=1e-6)
    assert ((pairwise > 0) & (pairwise < 1)).all()
    cam = predictor.gradcam(images[0], texts[0])
    assert cam.text_map.shape == (1, 6, 6) and cam.token_maps.shape[0] == 1


def test_caption_and_answer_from_the_pretraining_weights(pretrained_demo):
    """task='caption' / 'vqa' build those models from the pretraining checkpoint (their documented key surgery):
    untrained decoders, so only the form of the output is checked."""
    images = sorted((pretrained_demo.data / "images").glob("*.jpg"))[:3]
    captioner = Predictor.from_checkpoint(pretrained_demo.checkpoint, task="caption")
    captions = captioner.caption(images, num_beams=2, max_length=8, min_length=2)
    assert len(captions) == 3 and all(isinstance(caption, str) and caption for caption in captions)
    several = captioner.caption(images[:1], num_beams=3, num_return_sequences=2, max_length=6)
    assert len(several) == 1 and len(several[0]) == 2
    answers = json.loads((pretrained_demo.data / "answer_list.json").read_text())
    vqa = Predictor.from_checkpoint(pretrained_demo.checkpoint, task="vqa")
    got = vqa.answer(images, ["what colour is the shape?"], answer_list=pretrained_demo.data / "answer_list.json", k=4)
    assert len(got) == 3 and set(got) <= set(answers)
