"""Text cleaning, image decoding, ALBEF's transforms, RandAugment operations and device-side normalisation."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from dataset.randaugment import ALBEF_OPS, OPERATIONS, RandomAugment, apply_operation, equalize
from dataset.text import pre_caption, pre_question
from dataset.transforms import (
    IMAGE_MEAN,
    IMAGE_STD,
    ImageDecodeError,
    build_transform,
    denormalize,
    load_image,
    normalize,
    random_resized_crop_box,
    save_image,
)

# ------------------------------------------------------------------------------------------------------ text


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A Dog, running!  On the beach.", "a dog running on the beach"),
        ("well-known t-shirt/jeans", "well known t shirt jeans"),
        ("don't (really) *care* #tag: yes; ok~", "dont really care tag yes ok"),
        ('"quoted"  \n\t text ', "quoted text"),
        ("<person> rides a bike", "person rides a bike"),
        ("Café Ünïcode 東京", "café ünïcode 東京"),
        ("", ""),
        ("...!!!", ""),
        ("   ", ""),
    ],
)
def test_pre_caption_cases(caption: str, expected: str):
    assert pre_caption(caption, max_words=30) == expected


def test_pre_caption_truncates_long_text():
    caption = " ".join(f"w{i}" for i in range(10_000))
    assert pre_caption(caption, max_words=5) == "w0 w1 w2 w3 w4"


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("What color is the cat's hat?", "what color is the cats hat"),
        ("Is this a left-handed/right-handed person?", "is this a left handed right handed person"),
        ("How many?", "how many"),
        ("?", ""),
    ],
)
def test_pre_question_cases(question: str, expected: str):
    assert pre_question(question, max_words=30) == expected


def test_pre_question_truncates():
    assert pre_question("one two three four?", max_words=2) == "one two"


def test_text_rejects_non_strings():
    with pytest.raises(TypeError, match="expected a str"):
        pre_caption(None, 30)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------- decoding


def _scene(height: int = 48, width: int = 64) -> np.ndarray:
    """A small RGB test image with distinct regions (uint8 (H, W, 3))."""
    rng = np.random.default_rng(1)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 2] = (200, 30, 40)
    image[:, width // 2 :] = (20, 60, 220)
    band = slice(height // 3, 2 * height // 3)
    image[band] += rng.integers(0, 30, size=image[band].shape, dtype=np.uint8)
    return image


def _write_rgb(path, rgb: np.ndarray) -> None:
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def test_load_rgb_png_round_trip(tmp_path):
    rgb = _scene()
    _write_rgb(tmp_path / "a.png", rgb)
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)
    np.testing.assert_array_equal(out, rgb)


def test_load_grayscale(tmp_path):
    gray = np.tile(np.arange(64, dtype=np.uint8) * 4, (16, 1))
    assert cv2.imwrite(str(tmp_path / "g.png"), gray)
    out = load_image(tmp_path / "g.png")
    assert out.shape == (16, 64, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


def test_load_alpha_composites_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = (255, 0, 0)
    rgba[:, :4, 3] = 255  # opaque red on the left
    rgba[:, 4:, 3] = 0  # transparent on the right -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 7], [255, 255, 255])
    # Half transparency blends half way to white.
    rgba[:, :, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b.png")
    np.testing.assert_allclose(load_image(tmp_path / "b.png")[0, 0], [255, 127, 127], atol=1)
    # Grey + alpha.
    grey_alpha = np.zeros((4, 4, 2), dtype=np.uint8)
    grey_alpha[:, 2:, 1] = 255  # left half transparent black -> white, right half opaque black
    Image.fromarray(grey_alpha, "LA").save(tmp_path / "c.png")
    out = load_image(tmp_path / "c.png")
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 3], [0, 0, 0])


def test_load_16_bit_scales_to_8_bit(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    assert cv2.imwrite(str(tmp_path / "d.png"), values)
    out = load_image(tmp_path / "d.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255])
    colour = np.zeros((2, 2, 3), dtype=np.uint16)
    colour[..., 2] = 65535  # BGR order on disk: red
    assert cv2.imwrite(str(tmp_path / "e.png"), colour)
    np.testing.assert_array_equal(load_image(tmp_path / "e.png")[0, 0], [255, 0, 0])


def test_load_cmyk_jpeg_matches_pil(tmp_path):
    rgb = _scene()
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    with Image.open(tmp_path / "c.jpg") as image:
        assert image.mode == "CMYK"
        expected = np.asarray(image.convert("RGB"))
    out = load_image(tmp_path / "c.jpg")
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 3


def test_load_refuses_huge_images_from_header(tmp_path):
    _write_rgb(tmp_path / "big.png", _scene(40, 50))
    _write_rgb(tmp_path / "big.jpg", _scene(40, 50))
    for name in ("big.png", "big.jpg"):
        with pytest.raises(ImageDecodeError, match=r"50x40 pixels exceed max_pixels=1000"):
            load_image(tmp_path / name, max_pixels=1000)
        assert load_image(tmp_path / name, max_pixels=2000).shape == (40, 50, 3)


def test_header_check_catches_a_decompression_bomb(tmp_path):
    # A valid PNG header claiming 100000 x 100000 pixels with almost no data: refused before decoding.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(data)
    with pytest.raises(ImageDecodeError, match="100000x100000 pixels exceed"):
        load_image(tmp_path / "bomb.png")


def test_load_errors_name_the_file(tmp_path):
    _write_rgb(tmp_path / "ok.jpg", _scene())
    full = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "trunc.jpg").write_bytes(full[: len(full) * 2 // 3])
    (tmp_path / "tail.jpg").write_bytes(full[:-2])  # only the end-of-image marker missing
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    _write_rgb(tmp_path / "ok.png", _scene())
    (tmp_path / "trunc.png").write_bytes((tmp_path / "ok.png").read_bytes()[:200])
    cases = {
        "missing.jpg": "file not found",
        "empty.jpg": "empty",
        "trunc.jpg": "truncated",
        "tail.jpg": "truncated",
        "text.jpg": "not a decodable image",
        "trunc.png": "truncated or corrupt",
    }
    for name, reason in cases.items():
        with pytest.raises(ImageDecodeError, match=reason) as caught:
            load_image(tmp_path / name)
        assert str(tmp_path / name) in str(caught.value)
        assert caught.value.path == str(tmp_path / name)
    with pytest.raises(ImageDecodeError, match="cannot read"):
        load_image(tmp_path)  # a directory
    # The error survives the trip from a DataLoader worker.
    error = pickle.loads(pickle.dumps(ImageDecodeError("x.jpg", "file not found")))
    assert (error.path, error.reason) == ("x.jpg", "file not found")


def test_jpeg_with_trailing_bytes_after_eoi_is_fine(tmp_path):
    _write_rgb(tmp_path / "ok.jpg", _scene())
    (tmp_path / "extra.jpg").write_bytes((tmp_path / "ok.jpg").read_bytes() + b"\x00" * 100)
    assert load_image(tmp_path / "extra.jpg").shape == (48, 64, 3)


# ------------------------------------------------------------------------------------------------ transforms


@pytest.mark.parametrize("kind", ["pretrain", "train", "grounding_train", "test"])
def test_transform_shape_dtype_and_determinism(kind: str):
    transform = build_transform(kind, 24)
    image = _scene(60, 90)
    outputs = [transform(image, np.random.default_rng(seed)) for seed in (5, 5, 6, 7, 8)]
    for out in outputs:
        assert out.dtype == torch.uint8 and out.shape == (3, 24, 24) and out.is_contiguous()
    assert torch.equal(outputs[0], outputs[1])
    if kind == "test":
        assert all(torch.equal(outputs[0], out) for out in outputs[2:])
    else:
        assert not all(torch.equal(outputs[0], out) for out in outputs[2:])
    # Pickles for the DataLoader workers.
    assert torch.equal(pickle.loads(pickle.dumps(transform))(image, np.random.default_rng(5)), outputs[0])


def test_transform_rejects_unknown_kind_and_bad_input():
    with pytest.raises(ValueError, match="unknown transform kind 'val'"):
        build_transform("val", 24)
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\)"):
        build_transform("test", 24)(np.zeros((8, 8), np.uint8), np.random.default_rng(0))


def test_test_transform_is_a_plain_bicubic_resize():
    image = _scene(32, 32)
    out = build_transform("test", 64)(image, np.random.default_rng(0))
    expected = cv2.resize(image, (64, 64), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), expected)
    # Large shrinks are anti-aliased: a fine checkerboard averages to grey instead of aliasing.
    checker = (np.indices((256, 256)).sum(axis=0) % 2 * 255).astype(np.uint8)
    small = build_transform("test", 16)(np.dstack([checker] * 3), np.random.default_rng(0))
    assert (small.float() - 127.5).abs().max() < 8


def test_random_resized_crop_box_respects_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, height, width = random_resized_crop_box(100, 150, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + height <= 100 and 0 <= left and left + width <= 150
        assert 0.18 * 15000 <= height * width <= 15000
    # Impossible ratio -> the central crop fallback with the ratio clamped.
    assert random_resized_crop_box(10, 1000, (0.99, 1.0), (1.0, 1.0), rng) == (0, 495, 10, 10)


# ----------------------------------------------------------------------------------------------- randaugment


@pytest.mark.parametrize("name", [op for op in ALBEF_OPS if op != "Identity"])
def test_each_randaugment_op_keeps_shape_dtype_and_changes_pixels(name: str):
    image = _scene(40, 40)
    image[5:10, 5:30] = 255  # a bright bar for the geometric ops to move
    out = apply_operation(name, image.copy(), 7, np.random.default_rng(0))
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert not np.array_equal(out, image), f"{name} left the image unchanged"


def test_identity_and_geometric_fill():
    image = _scene(20, 20)
    assert apply_operation("Identity", image, 7, np.random.default_rng(0)) is image
    shifted = OPERATIONS["TranslateX"](image, 5.0)
    # Like PIL's affine transform, a positive offset samples from x + 5: the content moves left, grey 128 fills in.
    np.testing.assert_array_equal(shifted[:, -5:], 128)
    np.testing.assert_array_equal(shifted[:, :-5], image[:, 5:])


def test_equalize_matches_pil():
    from PIL import ImageOps

    image = _scene(30, 30)
    expected = np.asarray(ImageOps.equalize(Image.fromarray(image)))
    np.testing.assert_array_equal(equalize(image), expected)


def test_random_augment_is_rng_driven():
    augment = RandomAugment(2, 7)
    image = _scene(32, 32)
    first = augment(image.copy(), np.random.default_rng(3))
    np.testing.assert_array_equal(first, augment(image.copy(), np.random.default_rng(3)))
    results = {augment(image.copy(), np.random.default_rng(seed)).tobytes() for seed in range(20)}
    assert len(results) > 5  # different seeds pick different operations
    with pytest.raises(ValueError, match="unknown RandAugment operations"):
        RandomAugment(2, 7, ops=["Solarise"])


def test_randaugment_n_and_m_are_settable_with_albef_defaults():
    default = build_transform("train", 24).randaugment
    assert (default.n_ops, default.magnitude) == (2, 7)  # ALBEF's RandomAugment(2, 7)
    for kind in ("pretrain", "train", "grounding_train"):
        augment = build_transform(kind, 24, randaugment_num_ops=4, randaugment_magnitude=9).randaugment
        assert (augment.n_ops, augment.magnitude) == (4, 9)
    assert build_transform("test", 24, 4, 9).randaugment is None
    # The settings act: rotation by 0 degrees leaves the image, by 30 (M = 10) does not; N = 0 applies nothing.
    image = _scene(32, 32)
    rotate_only = [RandomAugment(n, m, ops=["Rotate"], prob=1.0) for n, m in ((1, 0), (1, 10), (0, 10))]
    outputs = [augment(image.copy(), np.random.default_rng(0)) for augment in rotate_only]
    np.testing.assert_array_equal(outputs[0], image)
    assert not np.array_equal(outputs[1], image)
    np.testing.assert_array_equal(outputs[2], image)
    with pytest.raises(ValueError, match=r"data.randaugment_magnitude\) must be within \[0, 10\], got 11"):
        build_transform("train", 24, 2, 11)
    with pytest.raises(ValueError, match=r"data.randaugment_num_ops\) must be an integer >= 0, got -1"):
        build_transform("train", 24, -1, 7)


def test_randaugment_config_keys_reach_the_task_transform(synthetic_dir):
    import engine
    from Caption import CaptionTask

    opts = [f"model.tokenizer={synthetic_dir / 'vocab.txt'}", "data.randaugment_num_ops=3",
            "data.randaugment_magnitude=5"]
    cfg = engine.load_config(None, opts, engine.build_schema(CaptionTask.config_defaults))
    task = CaptionTask(cfg, torch.device("cpu"))
    augment = task.transform("train").randaugment
    assert (augment.n_ops, augment.magnitude) == (3, 5)
    default_cfg = engine.load_config(None, opts[:1], engine.build_schema(CaptionTask.config_defaults))
    augment = CaptionTask(default_cfg, torch.device("cpu")).transform("train").randaugment
    assert (augment.n_ops, augment.magnitude) == (2, 7)


# ------------------------------------------------------------------------------------------------ normalise


def test_normalize_and_denormalize():
    images = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    out = normalize(images)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (images.float() / 255 - mean) / std)
    assert out.dtype == torch.float32
    assert normalize(images[0], dtype=torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(denormalize(out), images)
    with pytest.raises(ValueError, match="expected images of shape"):
        normalize(torch.zeros(2, 1, 4, 4))


def test_save_image_round_trip(tmp_path):
    image = torch.from_numpy(_scene()).permute(2, 0, 1)
    save_image(image, tmp_path / "x.png")
    np.testing.assert_array_equal(load_image(tmp_path / "x.png"), _scene())


def test_pil_made_jpeg_decodes_like_pil(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(_scene()).save(buffer, "JPEG", quality=90)
    (tmp_path / "p.jpg").write_bytes(buffer.getvalue())
    with Image.open(tmp_path / "p.jpg") as image:
        expected = np.asarray(image.convert("RGB")).astype(int)
    assert np.abs(load_image(tmp_path / "p.jpg").astype(int) - expected).max() <= 3
