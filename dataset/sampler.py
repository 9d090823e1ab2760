"""A distributed sampler that can resume mid-epoch and tells the dataset which epoch a sample is drawn for."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler

from common import dist


class ResumableDistributedSampler(Sampler):
    """Like torch's DistributedSampler, plus `set_start_batch` to skip what an interrupted epoch already consumed.

    Each epoch draws a permutation from (seed, epoch) (or keeps the order when shuffle=False), pads it by repeating
    its head (or truncates it when drop_last) to a multiple of num_replicas, and gives rank r the indices r, r + R, ...
    With yield_epoch=True it yields `(index, epoch)` so that the dataset derives per-sample augmentation randomness
    from (seed, epoch, index): the same for any number of workers and across resume.
    """

    def __init__(
        self,
        dataset: Sized | int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        yield_epoch: bool = False,
    ) -> None:
        self.dataset_len = dataset if isinstance(dataset, int) else len(dataset)
        self.num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
        self.rank = dist.get_rank() if rank is None else rank
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"sampler rank {self.rank} is outside [0, {self.num_replicas})")
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.yield_epoch = yield_epoch
        self.epoch = 0
        self.start_index = 0  # samples of this rank's share already consumed in the current epoch
        if drop_last:
            self.num_samples = self.dataset_len // self.num_replicas
        else:
            self.num_samples = math.ceil(self.dataset_len / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation and start it from the beginning."""
        self.epoch = epoch
        self.start_index = 0

    def set_start_batch(self, num_batches: int, batch_size: int) -> None:
        """Skip the first `num_batches` batches of `batch_size` of the current epoch (call after set_epoch)."""
        if num_batches < 0 or batch_size <= 0:
            raise ValueError(f"set_start_batch expects num_batches >= 0 and batch_size > 0, got {num_batches}, "
                             f"{batch_size}")
        self.start_index = min(num_batches * batch_size, self.num_samples)

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            indices = list(range(self.dataset_len))
        if self.drop_last:
            indices = indices[: self.total_size]
        elif self.total_size > len(indices) and indices:
            repeats = math.ceil((self.total_size - len(indices)) / len(indices))
            indices += (indices * repeats)[: self.total_size - len(indices)]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        mine = self._indices()[self.start_index :]
        if self.yield_epoch:
            return iter([(index, self.epoch) for index in mine])
        return iter(mine)

    def __len__(self) -> int:
        return self.num_samples - self.start_index
