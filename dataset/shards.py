"""Web-scale training data: image-text pairs in webdataset tar shards, streamed with exact mid-epoch resume.

Format. A shard is a tar of samples ``{key}.{jpg|png|webp|...}`` + ``{key}.txt`` (+ ``{key}.json``), what img2dataset
writes and what ``python -m dataset.shards`` (below) writes from ALBEF JSON files. ``txt`` holds one caption per line
(one is drawn per sample when there are several); a source may read its caption from a key of ``json`` instead
(``caption_key``). Retrieval training reads ``json["image_id"]`` (the sample key when absent).

Sample counts. Planning an epoch exactly needs each shard's sample count: ``manifest.json`` beside the shards (written
by the converter: ``{"shards": {"00000.tar": 1000, ...}}``), a source's ``manifest`` key (path or URL), or
img2dataset's ``{shard}_stats.json`` (``successes``). ``python -m dataset.shards --count URLS --out DIR`` writes a
manifest for shards made elsewhere. Counts per shard are all that is held in memory: resident memory does not grow
with the number of samples.

Config (``data.`` keys of Pretrain.py and Retrieval.py; ``train_shards`` replaces ``train_file``)::

    train_shards: /data/cc3m/{00000..00331}.tar                      # brace notation, a path, a URL, "pipe:cmd"
    train_shards: [/data/cc3m/{00000..00331}.tar, /data/sbu/{000..099}.tar]    # one source per string
    train_shards:                                                    # weighted sources
      - {urls: /data/cc3m/{00000..00331}.tar, weight: 1.0}
      - {urls: "pipe:aws s3 cp s3://b/sbu/{000..099}.tar -", weight: 0.5, caption_key: caption, manifest: ...}
    samples_per_epoch: 0      # 0: an epoch is one pass over every source (weights unused); N: N samples per epoch,
                              # split across the sources by weight, each source continuing its own passes
    shuffle_buffer: 1000      # samples (undecoded) held per loader worker for shuffling

How a pass is laid out (every rank computes the same plan from (seed, epoch) and the counts, no communication):

1. Sources. Source s contributes N_s samples to the epoch (its count, or samples_per_epoch split by weight with
   largest remainders). Its samples form an endless sequence of passes; pass p visits its shards in a permutation drawn
   from (seed, s, p), each shard's members in tar order. Epoch e takes positions [e N_s, (e + 1) N_s) of it, so with
   mixing every sample of a source is used once before any is used again.
2. Streams. There are R x W streams (R ranks, W loader workers per rank, at least 1), each given an even share of
   the epoch (sizes differ by at most 1) made of each source in proportion (rounded). Each source's epoch positions
   are cut into R x W contiguous ranges of those sizes, one per stream; a range is a list of pieces
   (shard, first member, last member). A stream opens only the shards its pieces touch; the member at a range's start
   is reached by reading through the tar members before it (not decoding them). So every sample of the pass belongs
   to exactly one stream, whatever R and W, even with fewer shards than streams; but then streams share shards and
   read through what they skip, which is reported as a warning (give at least R x W shards per source).
3. Inside a stream, its sources' pieces are merged in proportion (the sample k of a source with a samples in the
   stream goes at (k + 1/2) / a), then shuffled by a buffer of ``shuffle_buffer`` raw samples drawn from
   (seed, epoch, stream).
4. Equal steps. DDP needs every rank to take the same number of steps S. The DataLoader takes batch k of a rank from
   its worker k mod W; worker w therefore yields ceil((S - w) / W) batches of B samples, and S is the smallest number
   of steps that lets every stream deliver all its samples. A stream shorter than its batches pads them by repeating
   its own first samples (fewer than 2 B per stream: ``EpochPlan.padding`` counts them, logged when the loader is
   built). So each sample is seen once per pass, plus those repeats; none when the counts divide evenly.

Resume. The loader's ``sampler`` is this dataset: the engine calls ``set_epoch(e)`` and ``set_start_batch(b, B)``
as for the JSON datasets, and the run state records (epoch, batch). Batch b of a rank belongs to stream
(rank, b mod W), local batch b // W; after a resume DataLoader worker i serves plan worker (i + b) mod W so that the
round-robin order continues where it stopped. A stream skips its first batches by running the same raw reading,
merging and shuffling without decoding a single image; so a resume costs reading (not decoding) the stream's bytes up
to that point. The workers start afresh each epoch (not persistent): they must see the epoch's plan.

Faults. Raw faults (a shard that cannot be opened, a truncated tar, a sample without image or caption, fewer samples
than the manifest says) are found while reading, so also when skipping: the missing position gets the previous good
sample of the same source in the stream (or the next one, at a stream's start), deterministically. An image that
does not decode is replaced by the next good item of its own batch (batches are the unit of resume, so this too
replays exactly). Every fault is logged with the shard and key, counted in the batch's ``num_skipped`` (the engine
reports them per epoch) and fed to the bad-data guard of its source (``data.max_bad_image_fraction``, per loader
worker and source: see dataset.datasets.bad_image_rate_exceeds), which stops the run with an error naming the source
when the evidence says more of its data is broken than allowed. Nothing else stops an epoch, short of a stream in
which not one sample can be read (an error naming the source).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import heapq
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info
from tqdm import tqdm
from webdataset import shardlists, tariterators

from common import dist
from dataset.datasets import BAD_IMAGE_FALSE_ALARM, ImageTextCollator, bad_image_rate_exceeds
from dataset.text import pre_caption
from dataset.transforms import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTransform, decode_image

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "alignfuse-shards/1"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
# The data.* keys of the tasks that train from shards (Pretrain.py, Retrieval.py).
SHARD_DEFAULTS: dict[str, Any] = {
    # Training shards instead of data.train_file: a brace-notation string, a list of them (one source each), or a list
    # of sources {urls, weight (1.0), caption_key ("txt" or a key of the json member), manifest ("")}.
    "train_shards": None,
    "samples_per_epoch": 0,  # 0 = an epoch is one pass over every source; N = N samples per epoch mixed by weight
    "shuffle_buffer": 1000,  # raw (undecoded) samples each loader worker holds for shuffling
}
ITEM_KINDS = ("pretrain", "retrieval_train")
READ_BUFFER = 1 << 20  # bytes read from a shard at a time (a pipe's or a file's buffer)


# ------------------------------------------------------------------------------------------------ sources and counts


@dataclass
class ShardSource:
    """One source of shards: its URLs (expanded), their sample counts, its mixing weight and caption field."""

    name: str
    urls: list[str]
    counts: list[int]
    weight: float = 1.0
    caption_key: str = "txt"
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.total = int(sum(self.counts))


def expand_shard_urls(spec: str | Sequence[str]) -> list[str]:
    """Brace notation expanded (``a/{000..002}.tar`` -> three URLs); a list is expanded item by item."""
    items = [spec] if isinstance(spec, str) else list(spec)
    urls = [url for item in items for url in shardlists.expand_urls(str(item))]
    if not urls:
        raise ValueError(f"shard list {spec!r} names no shards")
    return urls


def _is_local(location: str) -> bool:
    return not location.startswith("pipe:") and ("://" not in location or location.startswith("file://"))


def _read_text(location: str) -> str | None:
    """The text at a local path or URL (through webdataset's gopen), None when it cannot be read."""
    if _is_local(location):
        path = location.removeprefix("file://")
        return Path(path).read_text(encoding="utf-8") if os.path.isfile(path) else None
    try:
        with tariterators.gopen.gopen(location) as stream:
            return stream.read().decode("utf-8")
    except Exception:  # noqa: BLE001 - any failure to fetch means: no such file
        return None


def _shard_dir(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _shard_name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def load_counts(urls: list[str], manifest: str = "") -> list[int]:
    """Each shard's sample count from a manifest (``manifest``, else ``manifest.json`` beside the shards) or
    img2dataset's ``{shard}_stats.json``; a ValueError naming the first shard without one."""
    manifests: dict[str, dict[str, int]] = {}

    def manifest_at(location: str) -> dict[str, int]:
        if location not in manifests:
            text = _read_text(location)
            shards: dict[str, int] = {}
            if text is not None:
                try:
                    shards = {str(k): int(v) for k, v in json.loads(text)["shards"].items()}
                except (ValueError, KeyError, TypeError, AttributeError) as error:
                    raise ValueError(f"shard manifest {location}: expected {{\"shards\": {{name: count}}}} "
                                     f"({error})") from None
            manifests[location] = shards
        return manifests[location]

    counts = []
    for url in urls:
        name, count = _shard_name(url), None
        for location in ([manifest] if manifest else []) + ([] if url.startswith("pipe:") else
                                                            [f"{_shard_dir(url)}/{MANIFEST}"]):
            count = manifest_at(location).get(name)
            if count is not None:
                break
        if count is None and not url.startswith("pipe:"):
            stats = _read_text(url.rsplit(".tar", 1)[0] + "_stats.json") if url.endswith(".tar") else None
            if stats is not None:
                try:
                    count = int(json.loads(stats)["successes"])
                except (ValueError, KeyError, TypeError):
                    count = None
        if count is None and _is_local(url) and not os.path.exists(url.removeprefix("file://")):
            raise FileNotFoundError(f"training shard {url} does not exist (nor a manifest counting it): check "
                                    "data.train_shards")
        if count is None:
            raise ValueError(
                f"no sample count for shard {url}: exact epochs need {MANIFEST} beside the shards (written by "
                f"`python -m dataset.shards`), img2dataset's {name.rsplit('.', 1)[0]}_stats.json, or a source "
                f"'manifest' key; write one with `python -m dataset.shards --count '<shard urls>' --out <folder>`")
        if count < 0:
            raise ValueError(f"shard manifest: negative sample count {count} for {url}")
        counts.append(count)
    return counts


def parse_sources(spec: Any) -> list[ShardSource]:
    """``data.train_shards`` -> sources (see the module docstring); a ValueError naming the key for a bad value."""
    key = "data.train_shards"
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f"config key {key!r} must be a shard URL pattern, a list of them, or a list of "
                         f"{{urls, weight, caption_key}} sources, got {spec!r}")
    sources = []
    for index, item in enumerate(spec):
        if isinstance(item, str):
            item = {"urls": item}
        if not isinstance(item, dict) or "urls" not in item:
            raise ValueError(f"{key}[{index}]: expected a URL pattern or a mapping with 'urls', got {item!r}")
        unknown = set(item) - {"urls", "weight", "caption_key", "manifest"}
        if unknown:
            raise ValueError(f"{key}[{index}]: unknown keys {sorted(unknown)} (expected urls, weight, caption_key, "
                             "manifest)")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"{key}[{index}].weight must be a number > 0, got {weight!r}")
        caption_key = item.get("caption_key", "txt")
        if not isinstance(caption_key, str) or not caption_key:
            raise ValueError(f"{key}[{index}].caption_key must be a non-empty string, got {caption_key!r}")
        urls = expand_shard_urls(item["urls"])
        counts = load_counts(urls, str(item.get("manifest") or ""))
        name = item["urls"] if isinstance(item["urls"], str) else f"source {index}"
        source = ShardSource(name, urls, counts, float(weight), caption_key)
        if source.total == 0:
            raise ValueError(f"{key}[{index}] ({name}): its {len(urls)} shards hold no samples (per their manifest)")
        sources.append(source)
    return sources


def epoch_sizes(sources: Sequence[ShardSource], samples_per_epoch: int) -> list[int]:
    """Samples each source contributes to an epoch: its whole count (0), or samples_per_epoch split by weight."""
    if samples_per_epoch < 0:
        raise ValueError(f"data.samples_per_epoch must be >= 0, got {samples_per_epoch}")
    if samples_per_epoch == 0:
        return [source.total for source in sources]
    total_weight = sum(source.weight for source in sources)
    exact = [samples_per_epoch * source.weight / total_weight for source in sources]
    sizes = [int(math.floor(value)) for value in exact]
    by_remainder = sorted(range(len(sources)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in by_remainder[: samples_per_epoch - sum(sizes)]:
        sizes[i] += 1
    return sizes


# ------------------------------------------------------------------------------------------------------- the plan


def shard_order(seed: int, source_index: int, pass_index: int, num_shards: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng((seed, 0x5A4D, source_index, pass_index)).permutation(num_shards)


def source_pieces(source: ShardSource, source_index: int, seed: int, start: int, length: int,
                  shuffle: bool = True) -> Iterator[tuple[int, int, int]]:
    """(shard index, first member, end member) pieces covering positions [start, start + length) of the source's
    endless sequence of passes (pass p in the shard order drawn from (seed, source, p))."""
    counts = np.asarray(source.counts, dtype=np.int64)
    position, remaining = start, length
    while remaining > 0:
        pass_index, offset = divmod(position, source.total)
        order = shard_order(seed, source_index, pass_index, len(counts), shuffle)
        ends = np.cumsum(counts[order])
        slot = int(np.searchsorted(ends, offset, side="right"))
        while remaining > 0 and slot < len(order):
            shard = int(order[slot])
            shard_start = int(ends[slot] - counts[shard])
            first = offset - shard_start
            take = min(int(counts[shard]) - first, remaining)
            if take > 0:
                yield shard, first, first + take
                remaining -= take
                position += take
                offset += take
            slot += 1


@dataclass
class EpochPlan:
    """Who reads what in one epoch (the same on every rank and worker): see the module docstring."""

    sizes: list[int]  # samples of each source in the epoch
    ranks: int
    workers: int  # streams per rank (loader workers, at least 1)
    batch_size: int

    def __post_init__(self) -> None:
        streams = self.ranks * self.workers
        total = sum(self.sizes)
        cuts = [total * i // streams for i in range(streams + 1)]  # even split of the epoch's samples
        # allot[i][s]: samples of source s in stream i; offset[i][s]: where they start in the source's epoch range.
        # Proportional shares rounded down, then each stream's few missing samples taken from the sources with the
        # most samples not yet given out: every stream gets exactly its even share, every source exactly its size.
        self.allot = [[(cuts[i + 1] - cuts[i]) * size // total if total else 0 for size in self.sizes]
                      for i in range(streams)]
        left = [size - sum(row[s] for row in self.allot) for s, size in enumerate(self.sizes)]
        for i, row in enumerate(self.allot):
            for _ in range(cuts[i + 1] - cuts[i] - sum(row)):
                s = max(range(len(left)), key=lambda j: (left[j], -j))
                row[s] += 1
                left[s] -= 1
        self.offset = [[0] * len(self.sizes) for _ in range(streams)]
        for s in range(len(self.sizes)):
            running = 0
            for i in range(streams):
                self.offset[i][s] = running
                running += self.allot[i][s]
        self.lengths = [sum(row) for row in self.allot]
        steps = 0
        for i, length in enumerate(self.lengths):
            batches = math.ceil(length / self.batch_size)
            if batches:
                steps = max(steps, (batches - 1) * self.workers + i % self.workers + 1)
        self.steps = steps  # batches per rank
        self.padding = sum(self.stream_batches(i % self.workers) * self.batch_size - length
                           for i, length in enumerate(self.lengths))

    def stream(self, rank: int, worker: int) -> int:
        return rank * self.workers + worker

    def stream_batches(self, worker: int) -> int:
        """Batches the plan worker ``worker`` yields per epoch: those k < steps with k % workers == worker."""
        return max(0, (self.steps - worker + self.workers - 1) // self.workers)

    def batches_before(self, worker: int, start: int) -> int:
        """Batches of plan worker ``worker`` among a rank's first ``start`` batches."""
        return max(0, (start - worker + self.workers - 1) // self.workers)


# ---------------------------------------------------------------------------------------------------- raw reading


@dataclass
class RawSample:
    """A sample as read from its tar, not decoded: the image bytes, its captions, where it came from."""

    source: int
    shard: int
    member: int
    url: str
    key: str
    image: bytes | None = None
    image_ext: str = ""
    captions: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    fault: str = ""  # why the sample is unusable (raw level); "" when fine
    fault_logged: bool = False  # already named in the log (a shard's missing samples: one line for all)
    replaced: bool = False  # a stand-in for a faulty position

    def stand_in(self) -> RawSample:
        copy = RawSample(**{**self.__dict__})
        copy.replaced = True
        return copy


def _captions(group: dict[str, Any], caption_key: str, meta: dict[str, Any]) -> list[str]:
    if caption_key in group and caption_key != "json":
        text = group[caption_key].decode("utf-8", errors="replace")
        return [line for line in text.splitlines() if line.strip()]
    value = meta.get(caption_key)
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str) and item.strip()]
    return []


def parse_group(group: dict[str, Any], source: int, shard: int, member: int, url: str,
                caption_key: str) -> RawSample:
    """A webdataset sample dict (extension -> bytes) -> RawSample; ``fault`` set when it has no image or caption."""
    sample = RawSample(source, shard, member, url, str(group.get("__key__", member)))
    meta: dict[str, Any] = {}
    if "json" in group:
        try:
            meta = json.loads(group["json"])
        except ValueError:
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
    sample.meta = meta
    ext = next((ext for ext in IMAGE_EXTENSIONS if ext in group), None)
    if ext is None:
        sample.fault = f"no image member (has {sorted(k for k in group if not k.startswith('__'))})"
        return sample
    sample.image, sample.image_ext = bytes(group[ext]), ext
    sample.captions = _captions(group, caption_key, meta)
    if not sample.captions:
        sample.fault = f"no caption ({caption_key!r} member or json key)"
    return sample


def read_shard_groups(url: str, errors: list[str]) -> Iterator[dict[str, Any]]:
    """The samples of one shard as webdataset groups (extension -> bytes), in tar order; errors (unopenable shard,
    truncated tar) end the iteration and are appended to ``errors``."""

    def handler(error: Exception) -> bool:
        # webdataset appends the stream and URL to an error's args: keep its own message (or the whole error's text).
        detail = error.args[0] if error.args and isinstance(error.args[0], str) else error
        errors.append(f"{type(error).__name__}: {detail}")
        return False

    try:
        stream = tariterators.gopen.gopen(url, bufsize=READ_BUFFER)
    except Exception as error:  # noqa: BLE001 - any failure to open is a fault of this shard
        handler(error)
        return
    try:
        files = tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        yield from tariterators.group_by_keys(files, handler=handler)
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001,S110 - a pipe: closed early, its command may report a broken pipe
            pass


def read_piece(source: ShardSource, source_index: int, shard: int, first: int, end: int) -> Iterator[RawSample]:
    """Members [first, end) of a shard as RawSamples: exactly end - first of them, the missing ones (shard
    unreadable, truncated, shorter than its count) as faults naming why."""
    url = source.urls[shard]
    errors: list[str] = []
    member = 0
    for group in read_shard_groups(url, errors):
        if member >= end:
            break
        if member >= first:
            yield parse_group(group, source_index, shard, member, url, source.caption_key)
        member += 1
    if member < end:
        why = errors[0] if errors else f"the shard ended after {member} samples (truncated?)"
        logger.warning("shard %s: samples %d..%d of %d missing (%s); each replaced by another sample", url,
                       max(member, first), end - 1, source.counts[shard], why)
        for missing in range(max(member, first), end):
            yield RawSample(source_index, shard, missing, url, f"#{missing}", fault=f"missing from the shard ({why})",
                            fault_logged=True)


# ------------------------------------------------------------------------------------------------- the dataset


class ShardStream(IterableDataset):
    """Training samples from webdataset shards, planned per epoch and resumable (see the module docstring).

    ``kind``: "pretrain" (items image, text, index, key) or "retrieval_train" (image, text, image_idx, key). Call
    ``plan_loader`` (create_loader does) before iterating; the DataLoader's ``sampler`` is this object.
    """

    def __init__(self, sources: Any, transform: ImageTransform, kind: str = "pretrain", max_words: int = 30, *,
                 samples_per_epoch: int = 0, shuffle_buffer: int = 1000, shuffle: bool = True, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_bad_image_fraction: float = 0.01,
                 bad_image_false_alarm: float = BAD_IMAGE_FALSE_ALARM):
        if kind not in ITEM_KINDS:
            raise ValueError(f"training from shards supports {list(ITEM_KINDS)}, not {kind!r}")
        if shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1, got {shuffle_buffer}")
        if not 0.0 <= max_bad_image_fraction <= 1.0:
            raise ValueError(f"max_bad_image_fraction must be within [0, 1], got {max_bad_image_fraction}")
        self.sources = sources if isinstance(sources, list) and all(isinstance(s, ShardSource) for s in sources) \
            else parse_sources(sources)
        self.sizes = epoch_sizes(self.sources, int(samples_per_epoch))
        self.transform = transform
        self.kind = kind
        self.max_words = max_words
        self.shuffle_buffer = shuffle_buffer
        self.shuffle = shuffle
        self.seed = seed
        self.max_pixels = max_pixels
        self.max_bad_image_fraction = max_bad_image_fraction
        self.bad_image_false_alarm = bad_image_false_alarm
        self.epoch = 0
        self.start_batch = 0
        self.plan: EpochPlan | None = None
        self.rank, self.ranks = 0, 1
        # Per worker and source: sample positions read and faults met (the bad-data guard's evidence).
        self.attempts = [0] * len(self.sources)
        self.failures = [0] * len(self.sources)

    # ---- the engine's resume contract (what ResumableDistributedSampler offers for the JSON datasets) ------------
    def plan_loader(self, batch_size: int, num_workers: int, rank: int | None = None,
                    world_size: int | None = None) -> EpochPlan:
        """Fix the layout (ranks, workers, batch size); returns the plan and warns when streams share shards."""
        self.rank = dist.get_rank() if rank is None else rank
        self.ranks = dist.get_world_size() if world_size is None else world_size
        self.plan = EpochPlan(self.sizes, self.ranks, max(1, num_workers), batch_size)
        if self.plan.steps == 0:
            raise ValueError(f"the training shards hold {sum(self.sizes)} samples per epoch: not one batch of "
                             f"{batch_size} per rank")
        streams = self.ranks * self.plan.workers
        for source in self.sources:
            if len(source.urls) < streams:
                logger.warning(
                    "training shards %s: %d shards for %d streams (%d ranks x %d loader workers): streams share "
                    "shards, each reading through the members it skips (every sample is still read once per pass); "
                    "give at least %d shards", source.name, len(source.urls), streams, self.ranks, self.plan.workers,
                    streams)
        return self.plan

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start_batch = 0

    def set_start_batch(self, num_batches: int, batch_size: int) -> None:
        plan = self._require_plan()
        if num_batches < 0 or batch_size != plan.batch_size:
            raise ValueError(f"set_start_batch expects num_batches >= 0 and the planned batch size "
                             f"{plan.batch_size}, got {num_batches}, {batch_size}")
        self.start_batch = min(num_batches, plan.steps)

    def __len__(self) -> int:
        """The epoch's samples over all ranks (as len() of a JSON dataset counts its entries)."""
        return sum(self.sizes)

    def batches_left(self) -> int:
        """Batches this rank yields from the current position to the epoch's end (the loader's len())."""
        return self._require_plan().steps - self.start_batch

    def _require_plan(self) -> EpochPlan:
        if self.plan is None:
            raise RuntimeError("ShardStream.plan_loader(batch_size, num_workers) must be called first "
                               "(dataset.loader.create_loader does)")
        return self.plan

    def describe(self) -> str:
        plan = self._require_plan()
        parts = [f"{source.name}: {size} of {source.total} samples in {len(source.urls)} shards"
                 for source, size in zip(self.sources, self.sizes, strict=True)]
        return (f"shards: {sum(self.sizes)} samples per epoch ({'; '.join(parts)}); {plan.steps} batches of "
                f"{plan.batch_size} per rank x {plan.ranks} ranks; {plan.padding} repeated to balance the "
                f"{plan.ranks * plan.workers} streams")

    def make_collator(self, tokenizer: Any, max_length: int = 30, padding: str = "longest") -> ImageTextCollator:
        return ImageTextCollator(tokenizer, max_length, padding=padding)

    # ---- reading ------------------------------------------------------------------------------------------------
    def stream_raw(self, stream: int) -> Iterator[RawSample]:
        """The stream's raw samples of the epoch, merged, faults filled in, shuffled (no padding, no decoding)."""
        plan = self._require_plan()
        merged = self._merged(stream, plan)
        return self._shuffled(merged, stream) if self.shuffle else merged

    def _source_raw(self, stream: int, source_index: int, plan: EpochPlan) -> Iterator[RawSample]:
        source = self.sources[source_index]
        start = self.epoch * self.sizes[source_index] + plan.offset[stream][source_index]
        for shard, first, end in source_pieces(source, source_index, self.seed, start,
                                               plan.allot[stream][source_index], self.shuffle):
            yield from read_piece(source, source_index, shard, first, end)

    def _filled(self, raw: Iterator[RawSample], source_index: int) -> Iterator[RawSample]:
        """Faulty positions replaced by the previous good sample of the source (the next one at the start)."""
        last: RawSample | None = None
        owed = 0
        for sample in raw:
            self.attempts[source_index] += 1
            if sample.fault:
                self._fault(source_index, f"{sample.url} sample {sample.key}: {sample.fault}",
                            log=not sample.fault_logged)
                if last is None:
                    owed += 1
                    continue
                yield last.stand_in()
                continue
            yield sample
            last = sample
            for _ in range(owed):
                yield sample.stand_in()
            owed = 0
        if owed:
            raise RuntimeError(f"training shards {self.sources[source_index].name}: no readable sample in this "
                               f"stream's share of the epoch ({owed} positions); see the warnings above")

    def _merged(self, stream: int, plan: EpochPlan) -> Iterator[RawSample]:
        allot = plan.allot[stream]
        iterators = {s: self._filled(self._source_raw(stream, s, plan), s) for s in range(len(allot)) if allot[s]}
        heap = [((0.5 / allot[s]), s, 0) for s in iterators]
        heapq.heapify(heap)
        while heap:
            _, s, k = heapq.heappop(heap)
            yield next(iterators[s])
            if k + 1 < allot[s]:
                heapq.heappush(heap, ((k + 1.5) / allot[s], s, k + 1))

    def _shuffled(self, raw: Iterator[RawSample], stream: int) -> Iterator[RawSample]:
        rng = np.random.default_rng((self.seed, 0xB0F, self.epoch, stream))
        buffer: list[RawSample] = []
        for sample in raw:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                k = int(rng.integers(len(buffer)))
                buffer[k], buffer[-1] = buffer[-1], buffer[k]
                yield buffer.pop()
        order = rng.permutation(len(buffer))
        for k in order:
            yield buffer[int(k)]

    @staticmethod
    def _padded(raw: Iterator[RawSample], length: int, pads: int) -> Iterator[RawSample]:
        """The stream's ``length`` samples, then its first ``pads`` again (the plan's balancing repeats)."""
        head: list[RawSample] = []
        count = 0
        for sample in raw:
            yield sample
            count += 1
            if len(head) < pads:
                head.append(sample)
        if count != length:
            raise RuntimeError(f"a shard stream read {count} samples where its plan has {length}")
        for index in range(pads):
            yield head[index % len(head)]

    def _fault(self, source_index: int, message: str, log: bool = True) -> None:
        self.failures[source_index] += 1
        if log:
            logger.warning("%s; replaced by another sample (%d of %d samples of this source failed in this worker)",
                           message, self.failures[source_index], self.attempts[source_index])
        if bad_image_rate_exceeds(self.failures[source_index], self.attempts[source_index],
                                  self.max_bad_image_fraction, self.bad_image_false_alarm):
            raise RuntimeError(
                f"training shards {self.sources[source_index].name}: {self.failures[source_index]} of "
                f"{self.attempts[source_index]} samples failed: evidence that more than max_bad_image_fraction="
                f"{self.max_bad_image_fraction:.1%} of this source is unreadable; last: {message}. Check the shards "
                "(or raise data.max_bad_image_fraction)")

    def _item(self, sample: RawSample) -> dict[str, Any]:
        """Decode and transform one sample (raises ImageDecodeError)."""
        rng = np.random.default_rng((self.seed, self.epoch, sample.source, sample.shard, sample.member))
        name = f"{sample.url}:{sample.key}.{sample.image_ext}"
        image = self.transform(decode_image(sample.image, name, self.max_pixels), rng)
        caption = sample.captions[int(rng.integers(len(sample.captions)))] if len(sample.captions) > 1 \
            else sample.captions[0]
        item: dict[str, Any] = {"image": image, "text": pre_caption(caption, self.max_words), "key": sample.key,
                                "num_skipped": int(sample.replaced)}
        if self.kind == "pretrain":
            item["index"] = (sample.source << 48) | (sample.shard << 24) | sample.member
        else:
            item["image_idx"] = stable_id(sample.meta.get("image_id", sample.key))
        return item

    def _batch(self, samples: list[RawSample], lookahead: _Lookahead) -> list[dict[str, Any]]:
        """Items of one batch; an image that does not decode is replaced by the next good item of the batch (or, in
        a batch without one, of the samples after it)."""
        items: list[dict[str, Any] | None] = []
        for sample in samples:
            try:
                items.append(self._item(sample))
            except ImageDecodeError as error:
                self._fault(sample.source, str(error))
                items.append(None)
        good = [i for i, item in enumerate(items) if item is not None]
        if not good:
            for sample in lookahead.ahead():
                try:
                    extra = self._item(sample)
                except ImageDecodeError:
                    continue
                items = [{**extra, "num_skipped": 1} for _ in samples]
                return items  # type: ignore[return-value]
            raise RuntimeError("training shards: no image of this batch nor of the rest of the stream decodes")
        out = []
        for i, item in enumerate(items):
            if item is None:
                stand_in = items[min((j for j in good if j > i), default=good[0])]
                item = {**stand_in, "num_skipped": 1}  # type: ignore[dict-item]
            out.append(item)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self._require_plan()
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if num_workers != plan.workers:
            raise RuntimeError(f"ShardStream planned for {plan.workers} loader workers runs with {num_workers}")
        worker = (worker_id + self.start_batch) % plan.workers  # the plan worker this loader worker serves
        stream = plan.stream(self.rank, worker)
        batches = plan.stream_batches(worker)
        skip = plan.batches_before(worker, self.start_batch)
        size = plan.batch_size
        length = plan.lengths[stream]
        samples = _Lookahead(self._padded(self.stream_raw(stream), length, batches * size - length))
        for _ in range(skip * size):  # resume: read (do not decode) what the interrupted epoch consumed
            next(samples)
        for _ in range(batches - skip):
            batch = [next(samples) for _ in range(size)]
            yield from self._batch(batch, samples)


class _Lookahead:
    """An iterator that can also be read ahead of (``ahead()``) without losing what it reads."""

    def __init__(self, samples: Iterator[RawSample]) -> None:
        self.samples = samples
        self.buffer: collections.deque[RawSample] = collections.deque()

    def __iter__(self) -> _Lookahead:
        return self

    def __next__(self) -> RawSample:
        return self.buffer.popleft() if self.buffer else next(self.samples)

    def ahead(self) -> Iterator[RawSample]:
        yield from list(self.buffer)
        for sample in self.samples:
            self.buffer.append(sample)
            yield sample


def stable_id(value: Any) -> int:
    """An int id for ITC positives: ints as they are, other values by a stable 62-bit hash."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit() and len(value) < 18:
        return int(value)
    return int.from_bytes(hashlib.blake2b(str(value).encode(), digest_size=8).digest(), "big") >> 2


# ------------------------------------------------------------------------------------------------- the converter


def _image_ext(path: str) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    return "jpg" if ext in ("jpeg", "jpe", "") else ext


def convert(ann_files: Sequence[str | os.PathLike], image_root: str | os.PathLike | None, out: str | os.PathLike,
            samples_per_shard: int = 1000, progress: bool = True) -> dict[str, Any]:
    """Write ALBEF JSON annotations ([{image, caption (str or list), ...}]) as shards ``{out}/00000.tar`` ... and
    ``{out}/manifest.json``. Each sample: the image file's bytes (``.jpg``/``.png``/...), ``.txt`` (the captions, one
    per line), ``.json`` (the entry without ``image``, plus ``image_path``). Images that cannot be read are left out,
    named in the log and counted in the manifest. Returns the manifest."""
    import webdataset as wds

    from dataset.annotations import read_json

    if samples_per_shard < 1:
        raise ValueError(f"--samples_per_shard must be >= 1, got {samples_per_shard}")
    entries: list[dict[str, Any]] = []
    for ann_file in ann_files:
        data = read_json(ann_file)
        if not isinstance(data, list):
            raise ValueError(f"{ann_file}: expected a JSON list of {{image, caption}} entries")
        for index, entry in enumerate(data):
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or \
                    not isinstance(entry.get("caption"), (str, list)):
                raise ValueError(f"{ann_file}: entry {index}: expected {{image: str, caption: str | [str]}}, "
                                 f"got {entry!r:.200}")
            entries.append(entry)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    skipped: list[str] = []
    writer, name = None, ""
    try:
        for number, entry in enumerate(tqdm(entries, desc="shards", unit="sample", disable=not progress)):
            path = entry["image"]
            if image_root is not None and not os.path.isabs(path):
                path = os.path.join(image_root, path)
            try:
                image = Path(path).read_bytes()
            except OSError as error:
                logger.warning("convert: image %s of entry %d cannot be read (%s): left out", path, number,
                               error.strerror or error)
                skipped.append(path)
                continue
            if writer is None or counts[name] >= samples_per_shard:
                if writer is not None:
                    writer.close()
                name = f"{len(counts):05d}.tar"
                counts[name] = 0
                writer = wds.TarWriter(str(out / name), encoder=False)
            captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            meta = {key: value for key, value in entry.items() if key != "image"}
            meta["image_path"] = entry["image"]
            writer.write({"__key__": f"{number:09d}", _image_ext(path): image,
                          "txt": "\n".join(c.replace("\n", " ") for c in captions).encode("utf-8"),
                          "json": json.dumps(meta).encode("utf-8")})
            counts[name] += 1
    finally:
        if writer is not None:
            writer.close()
    if entries and not counts:
        raise ValueError(f"none of the {len(entries)} images of {[str(f) for f in ann_files]} could be read (e.g. "
                         f"{skipped[0]}): check --image_root")
    manifest = {"format": MANIFEST_FORMAT, "shards": counts, "total": sum(counts.values()),
                "samples_per_shard": samples_per_shard, "annotations": [str(f) for f in ann_files],
                "skipped_images": len(skipped)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def count_shards(urls: Sequence[str], progress: bool = True) -> dict[str, int]:
    """Samples per shard, by reading each (for shards written without a manifest)."""
    counts = {}
    for url in tqdm(urls, desc="counting", unit="shard", disable=not progress):
        errors: list[str] = []
        counts[_shard_name(url)] = sum(1 for _ in read_shard_groups(url, errors))
        if errors:
            logger.warning("shard %s: %s (counted %d samples before it)", url, errors[0], counts[_shard_name(url)])
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write ALBEF JSON annotations as webdataset shards + manifest, or "
                                                 "count the samples of existing shards (--count).")
    parser.add_argument("--ann", nargs="+", help="annotation files [{image, caption}] to convert")
    parser.add_argument("--image_root", default=None, help="folder the relative image paths start from")
    parser.add_argument("--out", required=True, help="output folder (shards and manifest.json)")
    parser.add_argument("--samples_per_shard", type=int, default=1000)
    parser.add_argument("--count", default=None, metavar="URLS",
                        help="instead: count the samples of these shards (brace notation) into OUT/manifest.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.count:
            counts = count_shards(expand_shard_urls(args.count))
            Path(args.out).mkdir(parents=True, exist_ok=True)
            manifest = {"format": MANIFEST_FORMAT, "shards": counts, "total": sum(counts.values())}
            (Path(args.out) / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        else:
            if not args.ann:
                parser.error("give --ann files to convert (or --count URLS)")
            manifest = convert(args.ann, args.image_root, args.out, args.samples_per_shard)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    print(f"{args.out}: {len(manifest['shards'])} shards, {manifest['total']} samples"
          + (f", {manifest['skipped_images']} unreadable images left out" if manifest.get("skipped_images") else ""))


if __name__ == "__main__":
    main()
