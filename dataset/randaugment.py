"""RandAugment on uint8 (H, W, 3) arrays with OpenCV, with ALBEF's operations and magnitude ranges.

ALBEF's policy (facts kept so that fine-tuning sees the augmentation its checkpoints were trained with): draw
``n_ops`` (N, ALBEF: 2) operations uniformly with replacement; apply each with probability 0.5 at magnitude ``M`` out
of 10 (ALBEF: 7). N and M are the config keys ``data.randaugment_num_ops`` / ``data.randaugment_magnitude``:
  Brightness / Sharpness: enhancement factor 0.1 + 1.8 * M / 10 (1.0 = unchanged)
  ShearX / ShearY:        shear factor 0.3 * M / 10, random sign
  TranslateX / TranslateY: 10 * M / 10 pixels, random sign
  Rotate:                 30 * M / 10 degrees, random sign
  Identity, AutoContrast, Equalize: no magnitude
Geometric operations fill uncovered pixels with grey 128. Every random draw comes from the generator passed in.
Point operations are 256-entry lookup tables (cv2.LUT); geometric ones a single cv2.warpAffine, whole-pixel
translations a bordered copy (the same pixels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np

MAX_MAGNITUDE = 10
ALBEF_NUM_OPS = 2  # N: operations drawn per image
ALBEF_MAGNITUDE = 7  # M: magnitude of every operation, out of MAX_MAGNITUDE
FILL_VALUE = 128
TRANSLATE_PIXELS = 10.0  # translation at magnitude 10, in pixels (ALBEF's translate_const)
# The operations ALBEF's pretraining and fine-tuning transforms use.
ALBEF_OPS: tuple[str, ...] = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)


def identity(image: np.ndarray) -> np.ndarray:
    return image


def autocontrast(image: np.ndarray) -> np.ndarray:
    """Stretch each channel so that its darkest pixel becomes 0 and its brightest 255 (PIL's autocontrast)."""
    # Per-plane cv2.minMaxLoc: ~50x quicker than numpy's min/max over axis 0 of an (H * W, 3) array.
    low, high = np.array([cv2.minMaxLoc(plane)[:2] for plane in cv2.split(image)], dtype=np.float32).T  # (3,) each
    flat = high <= low  # a constant channel stays as it is
    scale = np.where(flat, 1.0, 255.0 / np.maximum(high - low, 1.0))
    offset = np.where(flat, 0.0, -low * scale)
    values = np.arange(256, dtype=np.float32)[:, None]  # (256, 1)
    table = (values * scale + offset).clip(0, 255).astype(np.uint8)  # (256, 3)
    return cv2.LUT(image, table.reshape(256, 1, 3))


def equalize(image: np.ndarray) -> np.ndarray:
    """Histogram-equalise each channel the way PIL's ImageOps.equalize does (not cv2.equalizeHist)."""
    tables = np.empty((256, 3), dtype=np.uint8)
    for channel, plane in enumerate(cv2.split(image)):
        if plane.size < 1 << 24:  # cv2.calcHist counts in float32, exact below 2**24; ~3x quicker than bincount
            hist = cv2.calcHist([plane], [0], None, [256], [0, 256]).reshape(256).astype(np.int64)  # (256,)
        else:
            hist = np.bincount(plane.ravel(), minlength=256)  # (256,)
        used = hist[hist > 0]
        # PIL leaves out the last occupied bin so that the brightest level maps to 255.
        step = (int(used.sum()) - int(used[-1])) // 255
        if step == 0:
            tables[:, channel] = np.arange(256)
            continue
        before = np.concatenate(([0], np.cumsum(hist)[:-1]))  # pixels strictly darker than each level
        tables[:, channel] = ((before + step // 2) // step).clip(0, 255)
    return cv2.LUT(image, tables.reshape(256, 1, 3))


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with black: pixel * factor (PIL's ImageEnhance.Brightness)."""
    table = (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)
    return cv2.LUT(image, table)


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with PIL's SMOOTH-filtered image: factor < 1 blurs, > 1 sharpens; the 1-pixel border is left as is."""
    kernel = np.ones((3, 3), dtype=np.float32)
    kernel[1, 1] = 5.0
    kernel /= 13.0
    smooth = cv2.filter2D(image, -1, kernel)
    # factor * image + (1 - factor) * smooth, saturated to uint8 by OpenCV.
    out = cv2.addWeighted(image, factor, smooth, 1.0 - factor, 0.0)
    out[0, :], out[-1, :], out[:, 0], out[:, -1] = image[0, :], image[-1, :], image[:, 0], image[:, -1]
    return out


def _warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    return cv2.warpAffine(
        image,
        matrix.astype(np.float32),
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(FILL_VALUE, FILL_VALUE, FILL_VALUE),
    )


def shear_x(image: np.ndarray, factor: float) -> np.ndarray:
    return _warp(image, np.array([[1.0, factor, 0.0], [0.0, 1.0, 0.0]]))


def shear_y(image: np.ndarray, factor: float) -> np.ndarray:
    return _warp(image, np.array([[1.0, 0.0, 0.0], [factor, 1.0, 0.0]]))


def _shift(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """out[y, x] = image[y + dy, x + dx], grey outside: exactly what _warp computes for a whole-pixel translation
    (bilinear weights 1 and 0), as a copy with a constant border, ~50x quicker than the per-pixel interpolation."""
    height, width = image.shape[:2]
    if abs(dx) >= width or abs(dy) >= height:
        return np.full_like(image, FILL_VALUE)
    inside = image[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)]
    return cv2.copyMakeBorder(inside, max(-dy, 0), max(dy, 0), max(-dx, 0), max(dx, 0), cv2.BORDER_CONSTANT,
                              value=(FILL_VALUE, FILL_VALUE, FILL_VALUE))


def translate_x(image: np.ndarray, pixels: float) -> np.ndarray:
    """Content moves left by ``pixels`` (PIL's affine data (1, 0, pixels, 0, 1, 0))."""
    if float(pixels).is_integer():  # ALBEF's magnitudes give whole pixels (10 * M / 10)
        return _shift(image, int(pixels), 0)
    return _warp(image, np.array([[1.0, 0.0, -pixels], [0.0, 1.0, 0.0]]))


def translate_y(image: np.ndarray, pixels: float) -> np.ndarray:
    """Content moves up by ``pixels`` (PIL's affine data (1, 0, 0, 0, 1, pixels))."""
    if float(pixels).is_integer():
        return _shift(image, 0, int(pixels))
    return _warp(image, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -pixels]]))


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate counter-clockwise about the image centre (PIL's convention)."""
    height, width = image.shape[:2]
    return _warp(image, cv2.getRotationMatrix2D((width / 2.0, height / 2.0), degrees, 1.0))


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _operation_args(name: str, magnitude: float, rng: np.random.Generator) -> tuple[float, ...]:
    """The argument of operation name at magnitude (0-10), with its random sign drawn from rng."""
    level = magnitude / MAX_MAGNITUDE
    if name in ("Brightness", "Sharpness"):
        return (0.1 + 1.8 * level,)
    if name in ("ShearX", "ShearY"):
        return (_signed(0.3 * level, rng),)
    if name in ("TranslateX", "TranslateY"):
        return (_signed(TRANSLATE_PIXELS * level, rng),)
    if name == "Rotate":
        return (_signed(30.0 * level, rng),)
    return ()


OPERATIONS: dict[str, Callable[..., np.ndarray]] = {
    "Identity": identity,
    "AutoContrast": autocontrast,
    "Equalize": equalize,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Rotate": rotate,
}


def apply_operation(name: str, image: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Apply one named operation (always, no coin flip) to a uint8 (H, W, 3) image."""
    if name not in OPERATIONS:
        raise ValueError(f"unknown RandAugment operation {name!r}; expected one of {sorted(OPERATIONS)}")
    return OPERATIONS[name](image, *_operation_args(name, magnitude, rng))


class RandomAugment:
    """``augment(image_hwc_uint8, rng) -> image_hwc_uint8``: n_ops random operations, each applied with p=0.5."""

    def __init__(self, n_ops: int = ALBEF_NUM_OPS, magnitude: float = ALBEF_MAGNITUDE, ops: Sequence[str] = ALBEF_OPS,
                 prob: float = 0.5):
        unknown = [name for name in ops if name not in OPERATIONS]
        if unknown:
            raise ValueError(f"unknown RandAugment operations {unknown}; expected names from {sorted(OPERATIONS)}")
        if not ops:
            raise ValueError("RandomAugment needs at least one operation")
        if isinstance(n_ops, bool) or not isinstance(n_ops, int) or n_ops < 0:
            raise ValueError(f"RandAugment n_ops (data.randaugment_num_ops) must be an integer >= 0, got {n_ops!r}")
        if isinstance(magnitude, bool) or not 0 <= magnitude <= MAX_MAGNITUDE:
            raise ValueError(f"RandAugment magnitude (data.randaugment_magnitude) must be within [0, {MAX_MAGNITUDE}], "
                             f"got {magnitude!r}")
        self.n_ops = n_ops
        self.magnitude = magnitude
        self.ops = tuple(ops)
        self.prob = prob

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"RandomAugment expects a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        chosen = rng.integers(0, len(self.ops), size=self.n_ops)
        for op_index in chosen:
            if rng.random() >= self.prob:
                continue
            image = apply_operation(self.ops[op_index], image, self.magnitude, rng)
        return image

    def __repr__(self) -> str:
        return f"RandomAugment(n_ops={self.n_ops}, magnitude={self.magnitude}, ops={list(self.ops)})"
