"""The quick paths of the image pipeline give the same pixels as the straightforward computations they replace:
whole-pixel translations as a bordered copy instead of a bilinear warp, per-plane min/max for AutoContrast, the flip
as cv2.flip, the (H, W, 3) -> (3, H, W) copy via cv2.split, and the JPEG completeness check's fast path."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dataset.randaugment import FILL_VALUE, _warp, autocontrast, translate_x, translate_y
from dataset.transforms import ImageDecodeError, ImageTransform, load_image, resize_bicubic, to_chw_tensor


def textured(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (3, 3), 0)


@pytest.mark.parametrize("shape", [(64, 48), (7, 30)])
@pytest.mark.parametrize("pixels", [-100, -7, -1, 0, 1, 7, 10, 29, 30, 100, 2.5, -3.25])
def test_translations_equal_the_bilinear_warp(shape: tuple[int, int], pixels: float) -> None:
    image = textured(*shape, seed=0)
    for translate, matrix in ((translate_x, [[1.0, 0.0, -pixels], [0.0, 1.0, 0.0]]),
                              (translate_y, [[1.0, 0.0, 0.0], [0.0, 1.0, -pixels]])):
        out = translate(image, pixels)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert np.array_equal(out, _warp(image, np.array(matrix))), (translate.__name__, pixels)


def test_translation_moves_content_and_fills_grey() -> None:
    image = textured(10, 12, seed=1)
    out = translate_x(image, 3.0)
    assert np.array_equal(out[:, :9], image[:, 3:]) and (out[:, 9:] == FILL_VALUE).all()
    out = translate_y(image, -4.0)
    assert np.array_equal(out[4:], image[:6]) and (out[:4] == FILL_VALUE).all()


def test_autocontrast_equals_the_per_channel_stretch() -> None:
    image = textured(40, 50, seed=2) // 2 + 40  # a narrow range to stretch
    image[:, :, 1] = 77  # a constant channel stays as it is
    expected = image.astype(np.float32)
    for channel in (0, 2):
        low, high = expected[:, :, channel].min(), expected[:, :, channel].max()
        scale = np.float32(255.0) / (high - low)
        expected[:, :, channel] = (expected[:, :, channel] * scale - low * scale).clip(0, 255)
    assert np.array_equal(autocontrast(image), expected.astype(np.uint8))
    stretched = autocontrast(image)
    assert stretched[:, :, 0].min() == 0 and stretched[:, :, 0].max() == 255


@pytest.mark.parametrize("view", ["contiguous", "crop", "negative_stride"])
def test_to_chw_tensor_is_the_transpose(view: str) -> None:
    image = textured(30, 20, seed=3)
    image = {"contiguous": image, "crop": image[3:25, 2:17], "negative_stride": image[:, ::-1]}[view]
    out = to_chw_tensor(image)
    assert out.is_contiguous() and out.shape == (3, *image.shape[:2])
    assert np.array_equal(out.numpy(), image.transpose(2, 0, 1))


def test_flip_equals_mirroring_the_resized_image() -> None:
    image = textured(50, 70, seed=4)
    transform = ImageTransform(24, None, flip=True, randaugment=None)
    resized = resize_bicubic(image, 24, 24)
    seen = set()
    for seed in range(8):
        flipped = np.random.default_rng(seed).random() < 0.5
        expected = resized[:, ::-1] if flipped else resized
        assert np.array_equal(transform(image, np.random.default_rng(seed)).numpy(), expected.transpose(2, 0, 1))
        seen.add(flipped)
    assert seen == {True, False}


def _jpeg_bytes(app_payload: int = 0) -> bytes:
    """A small JPEG, optionally with an APP15 segment that pushes the first scan beyond the first 64 KiB."""
    ok, encoded = cv2.imencode(".jpg", textured(16, 16, seed=5))
    assert ok
    data = encoded.tobytes()
    segments = b""
    for _ in range(app_payload):
        payload = b"\x00" * 65000
        segments += b"\xff\xef" + (len(payload) + 2).to_bytes(2, "big") + payload
    return data[:2] + segments + data[2:]


@pytest.mark.parametrize("app_payload", [0, 2], ids=["scan_in_header", "scan_after_64k"])
def test_jpeg_completeness_check(tmp_path, app_payload: int) -> None:
    data = _jpeg_bytes(app_payload)
    assert data.find(b"\xff\xda") > 65536 if app_payload else data.find(b"\xff\xda") < 65536
    whole = tmp_path / "whole.jpg"
    whole.write_bytes(data)
    assert load_image(whole).shape == (16, 16, 3)
    trailing = tmp_path / "trailing.jpg"
    trailing.write_bytes(data + b"\x00\x01padding")
    assert load_image(trailing).shape == (16, 16, 3)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[:-20])
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        load_image(truncated)
    no_scan = tmp_path / "no_scan.jpg"  # headers only, then an end-of-image marker
    no_scan.write_bytes(data[: data.find(b"\xff\xda")] + b"\xff\xd9")
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        load_image(no_scan)
