"""Images per second of one data worker for ALBEF's pretraining transform, OpenCV (ours) against PIL and torchvision.

Generates COCO-sized JPEGs (640x480, textured so that JPEG decoding does real work) into a temporary directory, then
times, in one process with one thread (what each DataLoader worker gets):
  opencv:      dataset.transforms.load_image + build_transform('pretrain', res)  (what the datasets run)
  pil:         PIL decode + RandomResizedCrop (PIL bicubic) + flip + the same RandAugment operations with PIL's
               ImageOps / ImageEnhance / Image.transform, as ALBEF ran it, then to a uint8 tensor
  torchvision: torchvision.io.decode_jpeg + v2 RandomResizedCrop / flip / RandAugment(2, 7) on uint8 tensors
               (torchvision's RandAugment draws from its own, larger operation set), if torchvision imports
The pipelines take turns for ``--rounds`` rounds and each reports its best round, so that a load spike on a shared
machine does not land on one of them only. ``--workers N [N ...]`` also times our pipeline behind a DataLoader with N
worker processes (batches of 64, pinned memory where CUDA is there): what a training rank gets. Prints one JSON line.

``--shards`` (issue 21) times instead, on the same JPEGs, in one process with one thread (images/s per core):
  files:  dataset.datasets.PretrainDataset over an ALBEF JSON + the loose image files
  shards: dataset.shards.ShardStream over the same images written as shards by the converter (tar reading, shuffle
          buffer, decode, transform)
and the resident memory of a shard loader (``--workers`` processes, default 2) over a pass of 10 and of 100 shards
(small images, 20 samples per shard): the peak RSS of its main process and of its largest worker, which must not
grow with the number of samples.
Not run by CI:
    python benchmarks/data_pipeline.py [--num-images 200] [--image-res 256] [--rounds 3] [--workers 8 16]
    python benchmarks/data_pipeline.py --shards [--num-images 200] [--image-res 256] [--rounds 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

# The repository first: run as a script, this folder leads sys.path and its common.py would hide the common package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import child_pids  # noqa: E402
from dataset.randaugment import ALBEF_OPS, TRANSLATE_PIXELS  # noqa: E402
from dataset.transforms import build_transform, load_image, random_resized_crop_box  # noqa: E402


def write_images(folder: Path, count: int, width: int = 640, height: int = 480, seed: int = 0) -> list[Path]:
    """Textured colour JPEGs (smooth gradients + noise + shapes), quality 90 like typical COCO files."""
    rng = np.random.default_rng(seed)
    paths = []
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    for index in range(count):
        phase = rng.uniform(0, 6.28, size=3)
        image = np.stack([127 + 100 * np.sin(xs / (40 + 10 * c) + ys / 70 + phase[c]) for c in range(3)], axis=-1)
        image += rng.normal(0, 12, size=image.shape)
        image = image.clip(0, 255).astype(np.uint8)
        for _ in range(6):
            centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
            cv2.circle(image, centre, int(rng.integers(10, 90)), colour, -1)
        path = folder / f"img_{index:06d}.jpg"
        cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


def _pil_augment(image: Image.Image, rng: np.random.Generator, n_ops: int = 2, magnitude: float = 7) -> Image.Image:
    """ALBEF's RandomAugment operations and magnitudes with PIL primitives."""
    level = magnitude / 10
    fill = (128, 128, 128)
    for op_index in rng.integers(0, len(ALBEF_OPS), size=n_ops):
        if rng.random() >= 0.5:
            continue
        name = ALBEF_OPS[op_index]
        sign = -1.0 if name not in ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness") and \
            rng.random() < 0.5 else 1.0
        if name == "AutoContrast":
            image = ImageOps.autocontrast(image)
        elif name == "Equalize":
            image = ImageOps.equalize(image)
        elif name == "Brightness":
            image = ImageEnhance.Brightness(image).enhance(0.1 + 1.8 * level)
        elif name == "Sharpness":
            image = ImageEnhance.Sharpness(image).enhance(0.1 + 1.8 * level)
        elif name == "ShearX":
            image = image.transform(image.size, Image.AFFINE, (1, sign * 0.3 * level, 0, 0, 1, 0), fillcolor=fill)
        elif name == "ShearY":
            image = image.transform(image.size, Image.AFFINE, (1, 0, 0, sign * 0.3 * level, 1, 0), fillcolor=fill)
        elif name == "TranslateX":
            shift = sign * TRANSLATE_PIXELS * level
            image = image.transform(image.size, Image.AFFINE, (1, 0, shift, 0, 1, 0), fillcolor=fill)
        elif name == "TranslateY":
            shift = sign * TRANSLATE_PIXELS * level
            image = image.transform(image.size, Image.AFFINE, (1, 0, 0, 0, 1, shift), fillcolor=fill)
        elif name == "Rotate":
            image = image.rotate(sign * 30 * level, fillcolor=fill)
    return image


def pil_pipeline(image_res: int) -> Callable[[Path, np.random.Generator], torch.Tensor]:
    def run(path: Path, rng: np.random.Generator) -> torch.Tensor:
        with Image.open(path) as file:
            image = file.convert("RGB")
        top, left, height, width = random_resized_crop_box(image.height, image.width, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        image = image.resize((image_res, image_res), Image.BICUBIC, box=(left, top, left + width, top + height))
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        image = _pil_augment(image, rng)
        return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())

    return run


def opencv_pipeline(image_res: int) -> Callable[[Path, np.random.Generator], torch.Tensor]:
    transform = build_transform("pretrain", image_res)

    def run(path: Path, rng: np.random.Generator) -> torch.Tensor:
        return transform(load_image(path), rng)

    return run


def torchvision_pipeline(image_res: int) -> Callable[[Path, np.random.Generator], torch.Tensor] | None:
    try:
        from torchvision.io import decode_jpeg, read_file
        from torchvision.transforms import InterpolationMode, v2
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        return None
    transform = v2.Compose([
        v2.RandomResizedCrop(image_res, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandAugment(num_ops=2, magnitude=7, fill=128),
    ])

    def run(path: Path, rng: np.random.Generator) -> torch.Tensor:
        del rng  # torchvision draws from torch's global generator
        return transform(decode_jpeg(read_file(str(path))))

    return run


def images_per_second(pipeline: Callable, paths: list[Path], repeats: int = 1) -> float:
    rng = np.random.default_rng(0)
    for path in paths[:5]:  # warm-up: imports, first-call allocations
        pipeline(path, rng)
    start = time.perf_counter()
    for _ in range(repeats):
        for path in paths:
            out = pipeline(path, rng)
            assert out.dtype == torch.uint8 and out.shape[0] == 3
    return repeats * len(paths) / (time.perf_counter() - start)


class _ImageFolder(torch.utils.data.Dataset):
    """Our pretraining transform over ``paths``, one generator per sample (as the datasets seed theirs)."""

    def __init__(self, paths: list[Path], image_res: int) -> None:
        self.paths = paths
        self.pipeline = opencv_pipeline(image_res)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.pipeline(self.paths[index], np.random.default_rng(index))


def _one_thread_per_worker(worker_id: int) -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def loader_images_per_second(paths: list[Path], image_res: int, workers: int, batch: int = 64,
                             passes: int = 3) -> float:
    """Images/s of a DataLoader with ``workers`` persistent processes over ``paths``: ``passes`` whole passes timed
    after one untimed pass (worker start-up)."""
    loader = torch.utils.data.DataLoader(_ImageFolder(paths, image_res), batch_size=batch, num_workers=workers,
                                         pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                                         worker_init_fn=_one_thread_per_worker, prefetch_factor=4 if workers else None)
    for _ in loader:  # worker start-up
        pass
    seen, start = 0, time.perf_counter()
    for _ in range(passes):
        for images in loader:
            seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def best_of_rounds(pipelines: dict[str, Callable], paths: list[Path], rounds: int) -> dict[str, float]:
    """Best images/s of each pipeline over ``rounds`` rounds in which the pipelines take turns."""
    best = dict.fromkeys(pipelines, 0.0)
    for _ in range(rounds):
        for name, pipeline in pipelines.items():
            best[name] = max(best[name], images_per_second(pipeline, paths))
    return best


def _rss_kib(pid: int, field: str = "VmHWM") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def shard_loader_rss(folder: Path, num_shards: int, workers: int, per_shard: int = 20, image_res: int = 64) -> dict:
    """Peak RSS (MiB) of a shard loader's main process and largest worker over one pass of ``num_shards`` shards of
    ``per_shard`` small images (hard links of one shard under new names: the same bytes, counted as new samples)."""
    from dataset.loader import create_loader, shutdown_workers
    from dataset.shards import MANIFEST, ShardStream, convert

    base = folder / f"base_{per_shard}"
    if not base.is_dir():
        (folder / "small").mkdir()
        images = write_images(folder / "small", per_shard, width=160, height=120, seed=1)
        ann = folder / "small.json"
        ann.write_text(json.dumps([{"image": str(p), "caption": f"picture {i}"} for i, p in enumerate(images)]))
        convert([ann], None, base, per_shard, progress=False)
    out = folder / f"rss_{num_shards}"
    out.mkdir()
    for index in range(num_shards):
        os.link(base / "00000.tar", out / f"{index:05d}.tar")
    (out / MANIFEST).write_text(json.dumps({"shards": {f"{i:05d}.tar": per_shard for i in range(num_shards)}}))
    stream = ShardStream(str(out / f"{{00000..{num_shards - 1:05d}}}.tar"), build_transform("pretrain", image_res),
                         shuffle_buffer=100)
    loader = create_loader(stream, 16, train=True, num_workers=workers, collate_fn=len, seed=0)
    loader.sampler.set_epoch(0)
    seen, worker_peak = 0, 0
    for size in loader:
        seen += size
        worker_peak = max([worker_peak] + [_rss_kib(pid) for pid in child_pids(os.getpid())])
    shutdown_workers(loader)
    return {"shards": num_shards, "samples": seen, "main_peak_rss_mib": round(_rss_kib(os.getpid()) / 1024, 1),
            "worker_peak_rss_mib": round(worker_peak / 1024, 1)}


def shards_main(args: argparse.Namespace) -> dict:
    """--shards: images/s per core of shards vs JSON + loose files, and the shard loader's RSS at 10 / 100 shards."""
    from dataset.datasets import PretrainDataset
    from dataset.shards import ShardStream, convert

    workers = max(args.workers, default=2)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        (folder / "images").mkdir()
        paths = write_images(folder / "images", args.num_images)
        ann = folder / "pretrain.json"
        ann.write_text(json.dumps([{"image": str(p), "caption": f"a picture number {i}"} for i, p in
                                   enumerate(paths)]))
        shards = len(convert([ann], None, folder / "shards", max(1, args.num_images // 10), progress=False)["shards"])
        transform = build_transform("pretrain", args.image_res)
        files = PretrainDataset(str(ann), transform)
        stream = ShardStream(str(folder / "shards" / f"{{00000..{shards - 1:05d}}}.tar"), transform, shuffle_buffer=100)
        stream.plan_loader(1, 0, 0, 1)

        def files_pass() -> int:
            return sum(1 for index in range(len(files)) if files[(index, 0)]["image"].shape[0] == 3)

        def shards_pass() -> int:
            return sum(1 for item in stream if item["image"].shape[0] == 3)

        best = {"files": 0.0, "shards": 0.0}
        for _ in range(args.rounds):
            for mode, run in (("files", files_pass), ("shards", shards_pass)):
                start = time.perf_counter()
                count = run()
                best[mode] = max(best[mode], count / (time.perf_counter() - start))
        rss = [shard_loader_rss(folder, count, workers) for count in (10, 100)]
    result = {"benchmark": "data_pipeline_shards", "transform": "pretrain", "source_image": [640, 480],
              "image_res": args.image_res, "num_images": args.num_images, "rounds": args.rounds, "threads": 1,
              "files_images_per_s_per_core": round(best["files"], 1),
              "shards_images_per_s_per_core": round(best["shards"], 1),
              "shards_vs_files": round(best["shards"] / best["files"], 3),
              "loader_workers": workers, "rss": rss}
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--image-res", type=int, default=256, help="output side in pixels (ALBEF pretrains at 256)")
    parser.add_argument("--rounds", type=int, default=3, help="the pipelines take turns this many times; best kept")
    parser.add_argument("--workers", type=int, nargs="*", default=[],
                        help="also time our pipeline behind a DataLoader with this many workers (several allowed)")
    parser.add_argument("--shards", action="store_true",
                        help="shards vs JSON + loose files (images/s per core) and the shard loader's RSS instead")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    if args.shards:
        return shards_main(args)
    with tempfile.TemporaryDirectory() as folder:
        paths = write_images(Path(folder), args.num_images)
        pipelines = {"opencv": opencv_pipeline(args.image_res), "pil": pil_pipeline(args.image_res)}
        tv = torchvision_pipeline(args.image_res)
        if tv is not None:
            pipelines["torchvision"] = tv
        best = best_of_rounds(pipelines, paths, args.rounds)
        batch = max(1, min(32, args.num_images // (2 * max(args.workers, default=1))))  # 2+ batches per worker
        loader_rates = {str(n): round(loader_images_per_second(paths, args.image_res, n, batch), 1)
                        for n in args.workers}
    result = {
        "benchmark": "data_pipeline",
        "transform": "pretrain",
        "source_image": [640, 480],
        "image_res": args.image_res,
        "num_images": args.num_images,
        "rounds": args.rounds,
        "threads": 1,
        "opencv_images_per_s": round(best["opencv"], 1),
        "pil_images_per_s": round(best["pil"], 1),
        "torchvision_images_per_s": round(best["torchvision"], 1) if tv is not None else None,
    }
    if loader_rates:
        result["loader_images_per_s"] = loader_rates  # worker count -> images/s of the DataLoader
    result["speedup_vs_pil"] = round(best["opencv"] / best["pil"], 2)
    result["speedup_vs_torchvision"] = round(best["opencv"] / best["torchvision"], 2) if tv is not None else None
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
