"""The DataLoader factory: a resumable distributed sampler, persistent workers, pinned memory, prefetching."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import cv2
import torch
from torch.utils.data import DataLoader, Dataset

from dataset.sampler import ResumableDistributedSampler
from engine import dist


def init_worker(worker_id: int) -> None:
    """One torch thread per worker: the workers already run in parallel with each other.

    OpenCV's thread count is not set here: cv2.setNumThreads in a forked child can deadlock on the parent's thread
    pool (a condition variable with waiters that do not exist in the child). create_loader sets it in the parent,
    before the workers fork, and the workers inherit it.
    """
    del worker_id  # same setting for every worker
    torch.set_num_threads(1)


def create_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any],
    seed: int,
    drop_last: bool | None = None,
    prefetch_factor: int = 4,
) -> DataLoader:
    """A DataLoader over this rank's share of dataset; batch_size is per process.

    train=True shuffles with an epoch-seeded permutation and feeds ``(index, epoch)`` keys to the dataset (call
    ``loader.sampler.set_epoch(epoch)`` each epoch; ``set_start_batch`` resumes mid-epoch); drop_last defaults to
    train. Evaluation keeps the order and pads the last rank's share by repeating samples, so results must be
    de-duplicated by their ids after gathering.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    drop_last = train if drop_last is None else drop_last
    sampler = ResumableDistributedSampler(
        dataset,
        shuffle=train,
        seed=seed,
        num_replicas=dist.get_world_size(),
        rank=dist.get_rank(),
        drop_last=drop_last,
        yield_epoch=train,
    )
    workers = num_workers > 0
    if workers:
        # Decoding and augmentation run in the workers, one OpenCV thread each (more would oversubscribe the cores).
        # Set in this process so that the forked workers inherit it and the parent's OpenCV thread pool is wound
        # down before the fork (see init_worker); images are not processed in this process when workers exist.
        cv2.setNumThreads(1)
        # The collators tokenize inside the workers; the Rust tokenizer's own thread pool would oversubscribe too.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=workers,
        prefetch_factor=prefetch_factor if workers else None,
        worker_init_fn=init_worker if workers else None,
    )
