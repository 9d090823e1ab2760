"""The DataLoader factory: a resumable distributed sampler, persistent workers, pinned memory, prefetching.

Preemption: a SIGTERM or SIGINT meant for the training process must not kill its loader workers first. torchrun
forwards the signal to each rank's whole process group (the rank and its workers), SLURM signals every process of a job
step, and `timeout` or a terminal's Ctrl-C signal a process group. A worker that died of it would make the main process
raise "DataLoader worker ... is killed by signal" in the middle of a step, before the engine could save. So the
workers of `create_loader` take no part in those signals: they hold SIGTERM and SIGINT blocked from the moment they are
forked, and a thread in each consumes them (`_absorb_stop_signals`). They still stop when the loader shuts them down (a
done-event, then the parent's own SIGTERM for a worker that does not answer: that one is obeyed, as in torch's own
worker handler), when the parent dies (torch's worker watchdog; a SIGTERM then is obeyed too), and at the parent's
exit (multiprocessing terminates its daemon children, again the parent's SIGTERM).
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from common import dist
from dataset.sampler import ResumableDistributedSampler

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # the preemption signals that workers leave to the main process
# sigwaitinfo is missing on macOS (and Windows): there the workers only ignore SIGINT and keep torch's SIGTERM rule.
CAN_ABSORB = hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask")


def _absorb_stop_signals(main_pid: int) -> None:
    """In a loader worker: block SIGTERM/SIGINT and consume them on a daemon thread, which ends the worker (exit 0, as
    torch's own worker handler does) only for a SIGTERM from the main process (its shutdown) or once that is gone.

    Blocked in every thread of the worker (threads started later inherit the mask), the signals go only to that
    thread's sigwaitinfo: neither torch's C handler (which re-raises a SIGTERM from anyone but the parent, killing
    the worker) nor a Python handler runs.
    """
    if not CAN_ABSORB:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    start_ppid = os.getppid()

    def main_gone() -> bool:
        if os.getppid() != start_ppid:
            return True  # reparented: the process that started this worker has exited
        try:
            os.kill(main_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return True  # the pid now belongs to another user's process
        return False

    def absorb() -> None:
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            if info.si_signo == signal.SIGTERM and (info.si_pid == main_pid or main_gone()):
                os._exit(0)  # exit 0: a non-zero status would make the main process's SIGCHLD handler raise

    threading.Thread(target=absorb, name="stop_signal_absorber", daemon=True).start()


def init_worker(worker_id: int, main_pid: int | None = None) -> None:
    """One torch thread per worker: the workers already run in parallel with each other; stop signals are left to the
    main process (see the module docstring).

    OpenCV's thread count is not set here: cv2.setNumThreads in a forked child can deadlock on the parent's thread
    pool (a condition variable with waiters that do not exist in the child). create_loader sets it in the parent,
    before the workers fork, and the workers inherit it.
    """
    del worker_id  # same setting for every worker
    torch.set_num_threads(1)
    _absorb_stop_signals(os.getppid() if main_pid is None else main_pid)


class SignalSafeLoader(DataLoader):
    """A DataLoader whose worker processes start with SIGTERM/SIGINT blocked: forked while the main process blocks them,
    they cannot die of a signal between their start and `init_worker` (signals sent to this process meanwhile are
    delivered when iter() returns). That holds for the fork start method (Linux's default before Python 3.14); workers
    started by a forkserver or spawned are covered from `init_worker` on."""

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers == 0 or not CAN_ABSORB:  # blocked without an absorber, even the shutdown SIGTERM would wait
            return super().__iter__()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class StreamLoader(SignalSafeLoader):
    """The loader of an iterable dataset that plans its own epochs (dataset.shards.ShardStream): for the engine's
    resume contract its ``sampler`` is that dataset (set_epoch / set_start_batch); torch's own sampler of an iterable
    dataset (an endless placeholder) is kept aside."""

    @property
    def sampler(self) -> Any:
        return self.dataset

    @sampler.setter
    def sampler(self, value: Any) -> None:  # DataLoader.__init__ sets it
        self._placeholder_sampler = value

    def __len__(self) -> int:
        """Batches left in the epoch on this rank (the dataset's own len() counts the epoch's samples)."""
        return self.dataset.batches_left()


def shutdown_workers(loader: DataLoader) -> None:
    """Stop the worker processes that a loader with persistent workers keeps between epochs (they would otherwise
    live until the loader is garbage-collected or the interpreter exits); the next iter() starts new ones."""
    iterator = getattr(loader, "_iterator", None)  # torch keeps the persistent workers' iterator there
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


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
    workers = num_workers > 0
    if workers:
        # Decoding and augmentation run in the workers, one OpenCV thread each (more would oversubscribe the cores).
        # Set in this process so that the forked workers inherit it and the parent's OpenCV thread pool is wound
        # down before the fork (see init_worker); images are not processed in this process when workers exist.
        cv2.setNumThreads(1)
        # The collators tokenize inside the workers; the Rust tokenizer's own thread pool would oversubscribe too.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if isinstance(dataset, IterableDataset):  # shards: the dataset splits its epochs over ranks and workers itself
        if not (train and hasattr(dataset, "plan_loader")):
            raise ValueError(f"{type(dataset).__name__}: only training loaders over a dataset with plan_loader "
                             "(dataset.shards.ShardStream) may be iterable")
        dataset.plan_loader(batch_size, num_workers, dist.get_rank(), dist.get_world_size())
        # Not persistent: each epoch's workers must start from the epoch's plan (set_epoch / set_start_batch).
        return StreamLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn,
                            pin_memory=torch.cuda.is_available(), drop_last=True,
                            prefetch_factor=prefetch_factor if workers else None,
                            worker_init_fn=functools.partial(init_worker, main_pid=os.getpid()) if workers else None)
    sampler = ResumableDistributedSampler(
        dataset,
        shuffle=train,
        seed=seed,
        num_replicas=dist.get_world_size(),
        rank=dist.get_rank(),
        drop_last=drop_last,
        yield_epoch=train,
    )
    return SignalSafeLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=workers,
        prefetch_factor=prefetch_factor if workers else None,
        worker_init_fn=functools.partial(init_worker, main_pid=os.getpid()) if workers else None,
    )
