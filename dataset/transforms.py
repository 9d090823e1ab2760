"""Image decoding and ALBEF's image transforms on uint8 arrays with OpenCV; normalisation on the device.

Workers only decode, crop, flip and augment uint8 ``(H, W, 3)`` RGB arrays and hand over uint8 ``(3, H, W)`` tensors
(4x less to copy and pin than float32); :func:`normalize` turns a batch into the float input of the vision encoder
once it is on the GPU. All randomness comes from the ``numpy.random.Generator`` passed in, so that a sample's
augmentation is a function of (seed, epoch, index) only, whichever worker or rank draws it.

ALBEF's transforms, kept as they were (ALBEF ran them with PIL):
  pretrain: RandomResizedCrop(res, scale=(0.2, 1.0), bicubic) + horizontal flip + RandomAugment(N, M, ALBEF_OPS)
  train:    the same with scale=(0.5, 1.0) (fine-tuning: retrieval, VQA, NLVR2, SNLI-VE, captioning)
  grounding_train: Resize((res, res), bicubic) + horizontal flip + RandomAugment(N, M, ALBEF_OPS)
  test:     Resize((res, res), bicubic)
with ALBEF's N = 2 operations at magnitude M = 7 unless given (``data.randaugment_num_ops`` / ``_magnitude``).
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import cv2
import numpy as np
import torch

from dataset.randaugment import ALBEF_MAGNITUDE, ALBEF_NUM_OPS, ALBEF_OPS, RandomAugment

# ALBEF's (CLIP's) normalisation statistics for [0, 1]-scaled RGB pixels.
IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
# Same threshold as PIL's decompression-bomb guard (Image.MAX_IMAGE_PIXELS): ~0.25 GB of RGB pixels.
DEFAULT_MAX_PIXELS = 89_478_485
TRANSFORM_KINDS: tuple[str, ...] = ("pretrain", "train", "grounding_train", "test")
# Direct-to-RGB JPEG decoding (OpenCV >= 4.10). EXIF orientation is ignored, as PIL (and so ALBEF) ignores it and
# box annotations refer to the stored pixel grid; IMREAD_UNCHANGED, used for the other formats, ignores it too.
_JPEG_RGB_FLAGS: int | None = (
    cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION if hasattr(cv2, "IMREAD_COLOR_RGB") else None
)


class ImageDecodeError(ValueError):
    """An image file that cannot be used: missing, empty, truncated, not an image, too large, odd pixel format."""

    def __init__(self, path: str | os.PathLike, reason: str):
        # args == (path, reason) keeps the exception picklable across DataLoader worker processes.
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot use image {self.path}: {self.reason}"


# --------------------------------------------------------------------------------------------------- decoding


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first SOF segment of a JPEG, walking the marker segments; None if not found."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # segments without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        if marker == 0xDA:  # start of scan before any frame header: malformed
            return None
        pos += 2 + length
    return None


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from the header of PNG, JPEG, GIF, BMP or WebP bytes; None for other formats."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:2] == b"BM" and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":
            width = 1 + int.from_bytes(data[24:27], "little")
            height = 1 + int.from_bytes(data[27:30], "little")
            return width, height
        if chunk == b"VP8 ":
            width, height = struct.unpack("<HH", data[26:30])
            return width & 0x3FFF, height & 0x3FFF
        if chunk == b"VP8L" and len(data) >= 25:
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _jpeg_is_complete(data: np.ndarray, header: bytes) -> bool:
    """A JPEG (file bytes ``data``, the first of them ``header``) whose last scan is followed by the end-of-image
    marker.

    Some OpenCV/libjpeg builds decode a truncated JPEG into a partly grey image with only a printed warning; this
    catches that. Inside entropy-coded data 0xFF is always stuffed (FF 00) or a restart marker, so an EOI (FF D9)
    after the last SOS (FF DA) means the final scan ended properly; trailing bytes after the EOI are allowed.
    """
    if data.size >= 2 and data[-2] == 0xFF and data[-1] == 0xD9:
        # The usual file ends with its EOI, which follows every scan: complete if there is a scan at all. Found in
        # the header for nearly every file, without scanning the entropy-coded data (~0.2 ms for a COCO JPEG).
        return b"\xff\xda" in header or b"\xff\xda" in data.tobytes()
    whole = data.tobytes()
    last_scan = whole.rfind(b"\xff\xda")
    return last_scan >= 0 and whole.find(b"\xff\xd9", last_scan) >= 0


def _to_uint8(image: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Scale 16-bit / float pixel values to uint8 (rounded)."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if image.dtype in (np.float32, np.float64):
        # HDR/float TIFFs store [0, 1]; anything finite is clipped to it.
        return (np.nan_to_num(image, nan=0.0).clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise ImageDecodeError(path, f"unsupported pixel type {image.dtype}")


def _to_rgb(image: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Grey, grey+alpha, BGR or BGRA uint8 -> RGB (H, W, 3); transparent pixels are composited on white."""
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim != 3:
        raise ImageDecodeError(path, f"unexpected array shape {image.shape}")
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels in (2, 4):
        colour = image[:, :, :1] if channels == 2 else image[:, :, 2::-1]  # grey or BGR->RGB, (H, W, 1|3)
        alpha = image[:, :, -1:].astype(np.uint16)  # (H, W, 1)
        # out = colour * a + 255 * (1 - a), in integer arithmetic with rounding.
        blended = (colour.astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
        blended = blended.astype(np.uint8)
        return np.repeat(blended, 3, axis=2) if channels == 2 else np.ascontiguousarray(blended)
    raise ImageDecodeError(path, f"unsupported number of channels {channels}")


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file into an RGB uint8 array (H, W, 3).

    Handles grey, alpha (composited on white), 16-bit and CMYK images. Raises ImageDecodeError naming the file for
    a missing, empty, truncated, undecodable or oversized (width * height > max_pixels) image; the size is read from
    the header before decoding where the format allows it.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except (IsADirectoryError, PermissionError, OSError) as error:
        raise ImageDecodeError(path, f"cannot read file ({error.strerror or error})") from None
    return decode_image(data, path, max_pixels)


def decode_image(data: np.ndarray | bytes, path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """:func:`load_image` on the bytes of an image already read (a tar member, say); ``path`` names it in errors."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, dtype=np.uint8)
    if data.size == 0:
        raise ImageDecodeError(path, "file is empty (0 bytes)")
    header = data[:65536].tobytes()
    size = _header_size(header)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageDecodeError(path, f"{size[0]}x{size[1]} pixels exceed max_pixels={max_pixels}")
    is_jpeg = header[:2] == b"\xff\xd8"
    if is_jpeg and not _jpeg_is_complete(data, header):
        raise ImageDecodeError(path, "truncated JPEG (no end-of-image marker after the last scan)")
    if is_jpeg and _JPEG_RGB_FLAGS is not None:
        # JPEGs have no alpha and 8-bit samples: let libjpeg emit RGB (grey and CMYK converted) and skip a pass.
        image = cv2.imdecode(data, _JPEG_RGB_FLAGS)
        if image is not None and image.ndim == 3 and image.shape[2] == 3:
            return _check_decoded_size(image, path, max_pixels)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        reason = "truncated or corrupt image data" if size is not None else "not a decodable image"
        raise ImageDecodeError(path, reason)
    _check_decoded_size(image, path, max_pixels)
    return _to_rgb(_to_uint8(image, path), path)


def _check_decoded_size(image: np.ndarray, path: str | os.PathLike, max_pixels: int) -> np.ndarray:
    if image.shape[0] * image.shape[1] > max_pixels:
        raise ImageDecodeError(path, f"{image.shape[1]}x{image.shape[0]} pixels exceed max_pixels={max_pixels}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageDecodeError(path, f"image has no pixels (shape {image.shape})")
    return image


# ------------------------------------------------------------------------------------------------- geometry


def resize_bicubic(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bicubic resize of a uint8 (H, W, C) array to (height, width).

    PIL's bicubic (what ALBEF used) widens its filter when shrinking; OpenCV's does not and aliases. Shrinks by more
    than 2x therefore first area-average down to twice the target size, then finish with bicubic.
    """
    in_height, in_width = image.shape[:2]
    if (in_width, in_height) == (width, height):
        return image
    if in_width > 2 * width or in_height > 2 * height:
        mid_width, mid_height = min(in_width, 2 * width), min(in_height, 2 * height)
        image = cv2.resize(image, (mid_width, mid_height), interpolation=cv2.INTER_AREA)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) of a random crop covering scale of the area at an aspect ratio in ratio.

    The usual Inception-style sampling: 10 tries at a random area and log-uniform aspect ratio, then a central crop
    with the ratio clamped into range.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_width, crop_height = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_height, crop_width = height, int(round(height * ratio[1]))
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) array -> uint8 tensor (3, H, W), contiguous."""
    out = torch.empty((3, *image.shape[:2]), dtype=torch.uint8)
    # cv2.split writes the planes straight into the tensor's memory: 5x quicker than numpy's strided transpose copy.
    cv2.split(np.ascontiguousarray(image), list(out.numpy()))
    return out


class ImageTransform:
    """One of ALBEF's image pipelines: ``transform(image_hwc_uint8, rng) -> uint8 tensor (3, res, res)``.

    Picklable (plain attributes), so DataLoader workers get their own copy.
    """

    def __init__(
        self,
        image_res: int,
        crop_scale: tuple[float, float] | None,
        flip: bool,
        randaugment: RandomAugment | None,
        crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    ):
        if image_res < 1:
            raise ValueError(f"image_res must be a positive number of pixels, got {image_res}")
        self.image_res = image_res
        self.crop_scale = crop_scale  # None: resize the whole image to (res, res)
        self.crop_ratio = crop_ratio
        self.flip = flip
        self.randaugment = randaugment

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        res = self.image_res
        if self.crop_scale is not None:
            top, left, crop_height, crop_width = random_resized_crop_box(
                image.shape[0], image.shape[1], self.crop_scale, self.crop_ratio, rng
            )
            image = image[top : top + crop_height, left : left + crop_width]
        image = resize_bicubic(image, res, res)  # (res, res, 3)
        if self.flip and rng.random() < 0.5:
            image = cv2.flip(image, 1)  # contiguous, ~40x quicker than copying the negative-stride view image[:, ::-1]
        if self.randaugment is not None:
            image = self.randaugment(np.ascontiguousarray(image), rng)  # a no-op unless the crop was res x res
        return to_chw_tensor(image)

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_res={self.image_res}, crop_scale={self.crop_scale}, flip={self.flip}, "
            f"randaugment={self.randaugment!r})"
        )


def build_transform(
    kind: str, image_res: int, randaugment_num_ops: int = ALBEF_NUM_OPS, randaugment_magnitude: float = ALBEF_MAGNITUDE
) -> ImageTransform:
    """ALBEF's transform for kind in TRANSFORM_KINDS (see the module docstring) at image_res pixels; the training
    kinds draw ``randaugment_num_ops`` RandAugment operations at ``randaugment_magnitude`` (0-10)."""
    if kind == "test":
        return ImageTransform(image_res, None, False, None)
    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"unknown transform kind {kind!r}; expected one of {TRANSFORM_KINDS}")
    augment = RandomAugment(randaugment_num_ops, randaugment_magnitude, ALBEF_OPS)
    if kind == "pretrain":
        return ImageTransform(image_res, (0.2, 1.0), True, augment)
    if kind == "train":
        return ImageTransform(image_res, (0.5, 1.0), True, augment)
    return ImageTransform(image_res, None, True, augment)  # grounding_train


# ------------------------------------------------------------------------------------------- normalisation


def _stats(reference: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGE_MEAN, dtype=dtype, device=reference.device).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=dtype, device=reference.device).view(3, 1, 1)
    return mean, std


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (or 0-255 float) images (B, 3, H, W) or (3, H, W) -> (pixels / 255 - mean) / std as dtype.

    Meant to run on the device right after the host-to-device copy of the uint8 batch.
    """
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    mean, std = _stats(images, dtype)
    # One fused multiply-add: x / 255 / std - mean / std.
    return torch.addcmul(-mean / std, images.to(dtype), 1.0 / (255.0 * std))


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of normalize for visualisation: float images (B, 3, H, W) or (3, H, W) -> uint8 RGB."""
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    mean, std = _stats(images, torch.float32)
    pixels = (images.float() * std + mean) * 255.0
    return pixels.round_().clamp_(0, 255).to(torch.uint8)


def save_image(image: torch.Tensor | np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 RGB image, tensor (3, H, W) or array (H, W, 3), to path (format from the suffix)."""
    array = image.permute(1, 2, 0).cpu().numpy() if isinstance(image, torch.Tensor) else image
    path = Path(path)
    ok, encoded = cv2.imencode(path.suffix or ".png", cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"OpenCV could not encode an image for {path} (suffix {path.suffix!r})")
    encoded.tofile(str(path))
    return path
