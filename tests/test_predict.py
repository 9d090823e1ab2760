"""Predict.py (--task itm | caption | vqa, single and batch mode, --save_npy, official checkpoints without a config),
the readable sheet (tile size, label height, colour bar) and the demo's Grad-CAM picture, on tiny random models and
the synthetic images."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dataset.tokenizer import build_tokenizer
from engine.config import save_config
from models import create_model
from Predict import main
from tasks.demo_gradcam import write_demo_gradcam
from tasks.gradcam_view import (
    COLOUR_BAR_PX,
    LABEL_PX,
    MAX_COLUMNS,
    TILE_PX,
    TITLE_PX,
    text_words,
    tile_size,
)

TINY_MODEL = {
    "bert_config": "configs/config_bert.json", "text_encoder": "",
    "bert_overrides": {"hidden_size": 32, "num_hidden_layers": 4, "fusion_layer": 2, "num_attention_heads": 2,
                       "intermediate_size": 64, "encoder_width": 32, "max_position_embeddings": 64},
    "vit": {"patch_size": 8, "width": 32, "depth": 2, "heads": 2, "pretrained": ""},
    "image_res": 48, "embed_dim": 16, "queue_size": 32,
}
REPO = Path(__file__).resolve().parents[1]


def assert_sheet(picture: np.ndarray, image: np.ndarray, tiles: int) -> None:
    """The sheet of ``tiles`` tiles: title, rows of TILE_PX-high tiles with their label strips, colour bar."""
    tile_w, tile_h = tile_size(image)
    assert tile_h >= 224
    columns = min(tiles, MAX_COLUMNS)
    rows = -(-tiles // columns)
    assert picture.shape == (TITLE_PX + rows * (tile_h + LABEL_PX) + COLOUR_BAR_PX, columns * tile_w, 3)


@pytest.fixture(scope="module")
def checkpoints(synthetic_dir, tmp_path_factory) -> dict[str, Path]:
    """An AlignFuse-style checkpoint (weights + config) and an official-style one (weights only)."""
    out = tmp_path_factory.mktemp("predict")
    config = {"model": {**TINY_MODEL, "tokenizer": str(synthetic_dir / "vocab.txt")}, "data": {"max_tokens": 24}}
    torch.manual_seed(0)
    model = create_model("grounding", config["model"], tokenizer=build_tokenizer(config["model"]["tokenizer"]))
    ours, official = out / "ours.pth", out / "official.pth"
    torch.save({"model": model.state_dict(), "config": config}, ours)
    torch.save({"model": model.state_dict()}, official)
    save_config(config, out)
    return {"ours": ours, "official": official, "config": out / "config.yaml", "dir": out}


def test_predict_writes_a_png_of_image_sized_tiles(checkpoints, synthetic_dir, tmp_path, capsys) -> None:
    image_path = synthetic_dir / "images" / json.loads((synthetic_dir / "refcoco+_val.json").read_text())[0]["image"]
    text = "the large red circle on the left"
    out = tmp_path / "cam.png"
    written = main(["--checkpoint", str(checkpoints["ours"]), "--image", str(image_path), "--text", text,
                    "--out", str(out), "--save_npy"])
    assert written == [out] and out.is_file()
    image = cv2.imread(str(image_path))
    picture = cv2.imread(str(out))
    tiles = 2 + len(text.split())  # the image, the sentence, one per word
    assert_sheet(picture, image, tiles)
    # The first tile is the image itself, upscaled to TILE_PX (PNG is lossless).
    tile_w, tile_h = tile_size(image)
    upscaled = cv2.resize(image, (tile_w, tile_h), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(picture[TITLE_PX:TITLE_PX + tile_h, :tile_w], upscaled)
    assert "ITM score" in capsys.readouterr().out
    maps = np.load(out.with_suffix(".npy"))
    names = json.loads(out.with_suffix(".json").read_text())["maps"]
    assert names == ["<sentence>", *text.split()]
    assert maps.shape == (len(names), 6, 6)  # 48 px / patch 8
    np.testing.assert_allclose(maps[0], maps[1:].mean(axis=0), rtol=1e-5, atol=1e-9)  # the sentence = mean of words


def test_predict_batch_mode_and_official_checkpoint(checkpoints, synthetic_dir, tmp_path) -> None:
    entries = json.loads((synthetic_dir / "refcoco+_val.json").read_text())[:2]
    batch = tmp_path / "pairs.json"
    batch_images = [synthetic_dir / "images" / e["image"] for e in entries]
    batch.write_text(json.dumps([{"image": str(path), "text": e["text"]}
                                 for path, e in zip(batch_images, entries, strict=True)]))
    with pytest.raises(ValueError, match="carries no config.*--config"):
        main(["--checkpoint", str(checkpoints["official"]), "--batch", str(batch)])
    written = main(["--checkpoint", str(checkpoints["official"]), "--config", str(checkpoints["config"]),
                    "--batch", str(batch), "--out_dir", str(tmp_path / "cams"), "--mode", "itc"])
    assert len(written) == 2 and all(path.is_file() and path.parent == tmp_path / "cams" for path in written)
    assert_sheet(cv2.imread(str(written[0])), cv2.imread(str(batch_images[0])), 2)  # itc: image + sentence map
    batch.write_text(json.dumps([{"image": "a.jpg"}]))
    with pytest.raises(ValueError, match=r"pairs.json: entry 0: expected"):
        main(["--checkpoint", str(checkpoints["ours"]), "--batch", str(batch)])


def test_demo_gradcam_writes_the_png(checkpoints, synthetic_dir) -> None:
    demo_dir = checkpoints["dir"]
    (demo_dir / "checkpoint_last.pth").write_bytes(checkpoints["ours"].read_bytes())
    png, pointing = write_demo_gradcam(demo_dir, synthetic_dir)
    assert png == demo_dir / "gradcam.png" and png.is_file()
    assert cv2.imread(str(png)).shape[0] >= TITLE_PX + TILE_PX + LABEL_PX + COLOUR_BAR_PX
    expressions = json.loads((synthetic_dir / "refcoco+_test.json").read_text())
    assert pointing.count == min(200, len(expressions))
    assert 0 < pointing.chance < 50 and 0 <= pointing.accuracy <= 100


def test_word_pieces_join_into_words_and_unknown_words_stay(tmp_path) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "##dish", "circle"]) + "\n")
    tokenizer = build_tokenizer(str(vocab))
    ids = torch.tensor([2, 5, 6, 1, 7, 0])  # [CLS] red ##dish [UNK] circle [PAD]
    token_maps = torch.arange(6 * 2 * 2, dtype=torch.float32).view(6, 2, 2)
    words, maps, unknown = text_words(tokenizer, "reddish shiny circle", ids, token_maps)
    assert words == ["reddish", "shiny", "circle"] and unknown == ["shiny"]
    np.testing.assert_allclose(maps[0], ((token_maps[1] + token_maps[2]) / 2).numpy())
    np.testing.assert_allclose(maps[1], token_maps[3].numpy())  # the [UNK] token's map, under the word's own name
    np.testing.assert_allclose(maps[2], token_maps[4].numpy())
    with pytest.raises(ValueError, match="not the tokens of"):
        text_words(tokenizer, "circle", ids, token_maps)


def test_predict_shows_words_the_tokenizer_does_not_know(checkpoints, synthetic_dir, tmp_path) -> None:
    """'button' is not in the synthetic vocabulary: it used to vanish from the PNG and cam.json."""
    import logging

    image_path = synthetic_dir / "images" / json.loads((synthetic_dir / "refcoco+_val.json").read_text())[0]["image"]
    vocab = (synthetic_dir / "vocab.txt").read_text().split()
    assert "button" not in vocab and "blue" in vocab
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("alignfuse")
    logger.addHandler(handler)
    try:
        out = tmp_path / "cam.png"
        main(["--checkpoint", str(checkpoints["ours"]), "--image", str(image_path), "--text", "the blue button",
              "--out", str(out), "--save_npy"])
    finally:
        logger.removeHandler(handler)
    described = json.loads(out.with_suffix(".json").read_text())
    assert described["maps"] == ["<sentence>", "the", "blue", "button"]
    assert described["unknown_words"] == ["button"]
    assert np.load(out.with_suffix(".npy")).shape[0] == 4
    assert_sheet(cv2.imread(str(out)), cv2.imread(str(image_path)), 5)  # image, sentence and the 3 words
    assert any("'button'" in record.getMessage() and "[UNK]" in record.getMessage() for record in records)


@pytest.fixture(scope="module")
def head_checkpoints(synthetic_dir, tmp_path_factory) -> dict[str, Path]:
    """Tiny random captioning and VQA checkpoints with their configs, and an answer list."""
    out = tmp_path_factory.mktemp("heads")
    tokenizer = build_tokenizer(str(synthetic_dir / "vocab.txt"))
    answers = out / "answers.json"
    answers.write_text(json.dumps(["red", "blue", "green", "circle", "square", "two"]))
    paths = {"answers": answers}
    for task in ("caption", "vqa"):
        config = {"model": {**TINY_MODEL, "tokenizer": str(synthetic_dir / "vocab.txt")}, "data": {"max_tokens": 24}}
        if task == "caption":
            config["caption"] = {"prompt": "a picture of "}
            config["generation"] = {"num_beams": 2, "max_length": 8, "min_length": 5}
        torch.manual_seed(0)
        model = create_model(task, config["model"], tokenizer=tokenizer)
        paths[task] = out / f"{task}.pth"
        torch.save({"model": model.state_dict(), "config": config}, paths[task])
    return paths


def _image(synthetic_dir: Path) -> Path:
    return synthetic_dir / "images" / json.loads((synthetic_dir / "refcoco+_val.json").read_text())[0]["image"]


def assert_distinct_maps(maps: np.ndarray) -> None:
    """No map is constant and no two consecutive maps are the same."""
    assert all(float(np.ptp(heat)) > 0 for heat in maps)
    for first, second in zip(maps[:-1], maps[1:], strict=True):
        assert not np.allclose(first / first.max(), second / second.max(), atol=1e-4)


def test_predict_caption_sheet_has_a_tile_per_generated_word(head_checkpoints, synthetic_dir, tmp_path,
                                                            capsys) -> None:
    image_path = _image(synthetic_dir)
    out = tmp_path / "caption.png"
    assert main(["--task", "caption", "--checkpoint", str(head_checkpoints["caption"]), "--image", str(image_path),
                 "--out", str(out), "--save_npy"]) == [out]
    described = json.loads(out.with_suffix(".json").read_text())
    caption = described["text"]
    words = caption.split()
    assert described["mode"] == "caption" and described["maps"] == ["<caption>", *words] and len(words) >= 2
    assert f"caption {caption!r}" in capsys.readouterr().out
    maps = np.load(out.with_suffix(".npy"))
    assert maps.shape == (1 + len(words), 6, 6)
    assert_distinct_maps(maps[1:])
    assert_sheet(cv2.imread(str(out)), cv2.imread(str(image_path)), 2 + len(words))


def test_predict_vqa_sheet_shows_the_answer_and_the_question_words(head_checkpoints, synthetic_dir,
                                                                   tmp_path, capsys) -> None:
    image_path = _image(synthetic_dir)
    out = tmp_path / "vqa.png"
    question = "what colour is the circle?"
    main(["--task", "vqa", "--checkpoint", str(head_checkpoints["vqa"]), "--image", str(image_path),
          "--text", question, "--answer_list", str(head_checkpoints["answers"]), "--out", str(out), "--save_npy"])
    described = json.loads(out.with_suffix(".json").read_text())
    answers = json.loads(head_checkpoints["answers"].read_text())
    assert described["answer"] in answers and described["score"] < 0
    assert described["maps"] == [f"<answer: {described['answer']}>", "what", "colour", "is", "the", "circle"]
    assert f"answer {described['answer']!r}" in capsys.readouterr().out
    maps = np.load(out.with_suffix(".npy"))
    assert_distinct_maps(maps[1:])
    assert_sheet(cv2.imread(str(out)), cv2.imread(str(image_path)), 7)
    with pytest.raises(ValueError, match="does not fill the vqa model"):  # the wrong head: one clear message
        main(["--task", "vqa", "--checkpoint", str(head_checkpoints["caption"]), "--image", str(image_path),
              "--text", question, "--out", str(tmp_path / "x.png")])


def test_sheet_is_readable(checkpoints, synthetic_dir, tmp_path) -> None:
    """Tiles of at least 224 px, labels whose letters are >= 12 px high (not 8-pixel text), a colour bar whose
    colours run from blue (low) to red (high)."""
    image_path = _image(synthetic_dir)
    out = tmp_path / "cam.png"
    main(["--checkpoint", str(checkpoints["ours"]), "--image", str(image_path), "--text", "the red circle",
          "--out", str(out)])
    picture = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    tile_w, tile_h = tile_size(cv2.imread(str(image_path)))
    assert tile_h >= 224 and tile_w >= 224
    strip = picture[TITLE_PX + tile_h:TITLE_PX + tile_h + LABEL_PX, :tile_w]  # the label of the first tile
    letter_rows = np.nonzero((strip.min(axis=2) > 200).any(axis=1))[0]
    assert letter_rows.size and letter_rows[-1] - letter_rows[0] + 1 >= 12, letter_rows
    bar = picture[-COLOUR_BAR_PX // 2].astype(int)  # the middle row of the colour bar
    coloured = bar[(bar.max(axis=1) - bar.min(axis=1)) > 100]
    assert len(coloured) > picture.shape[1] // 2
    assert coloured[0][2] > coloured[0][0] and coloured[-1][0] > coloured[-1][2]  # blue ... red


@pytest.mark.slow
def test_predict_every_head_on_the_demo_pretraining(pretrained_demo, tmp_path) -> None:
    """Predict.py --task itm | caption | vqa on the session's demo pretraining (caption and VQA heads built from it by
    their key surgery, as Caption.py / VQA.py start): each writes its sheet, one map per word, no two words alike."""
    data = pretrained_demo.data
    entry = json.loads((data / "refcoco+_test.json").read_text())[0]
    image_path = data / "images" / entry["image"]
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["red", "blue", "green", "circle", "square", "triangle"]))
    runs = {"itm": ["--text", entry["text"]], "caption": ["--num_beams", "2"],
            "vqa": ["--text", "what colour is the shape?", "--answer_list", str(answers)]}
    for task, extra in runs.items():
        out = tmp_path / f"{task}.png"
        main(["--task", task, "--checkpoint", str(pretrained_demo.checkpoint), "--image", str(image_path),
              "--out", str(out), "--save_npy", *extra])
        described = json.loads(out.with_suffix(".json").read_text())
        maps = np.load(out.with_suffix(".npy"))
        assert described["mode"] == task and maps.shape[0] == len(described["maps"]) >= 3, described
        assert_distinct_maps(maps[1:])
        assert_sheet(cv2.imread(str(out)), cv2.imread(str(image_path)), len(described["maps"]) + 1)
