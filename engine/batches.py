"""The training loader as the loop sees it: an epoch's batches from any position (for resume), the time spent
waiting for each (into the throughput meter), and the unreadable images the datasets replaced, reported over all
ranks at each epoch's end and at a stop."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch.utils.data import DataLoader

from engine import dist, throughput
from engine.runtime import StopSignal

log = logging.getLogger("alignfuse")  # the run's log (engine.logger.RunLogger's sinks)


class TrainBatches:
    """Batches of `loader` (its sampler a dataset.sampler.ResumableDistributedSampler) for the training loop."""

    def __init__(self, loader: DataLoader, meter: throughput.StepMeter, stop_signal: StopSignal,
                 device: torch.device) -> None:
        self.loader = loader
        self.meter = meter
        self.stop_signal = stop_signal
        self.device = device
        self.batch_size = int(loader.batch_size)
        self.skipped_images = 0  # unreadable images replaced since the last report (this rank)
        self._iterator: Any = None

    def start_epoch(self, epoch: int, start: int) -> None:
        """Iterate over `epoch` from its batch `start` on."""
        sampler = self.loader.sampler
        sampler.set_epoch(epoch)
        if start:
            sampler.set_start_batch(start, self.batch_size)
        # Creating a DataLoader iterator draws its base seed from torch's global RNG; restoring the state keeps the
        # training RNG stream independent of where iterators were created (so resume == uninterrupted).
        rng = torch.get_rng_state()
        self._iterator = iter(self.loader)
        torch.set_rng_state(rng)

    def next(self, index: int) -> Any | None:
        """The epoch's batch number `index` (the next one); None when the loader failed after a stop signal (data
        workers can die from the same preemption signal)."""
        try:
            wait_start = time.perf_counter()
            batch = next(self._iterator)
            self.meter.record_data_wait(time.perf_counter() - wait_start,
                                        throughput.batch_size_of(batch, self.batch_size))
        except StopIteration:
            raise RuntimeError(f"the training loader stopped after {index} batches but its len() is "
                               f"{len(self.loader)}") from None
        except Exception:
            if self.stop_signal.requested is None:
                raise
            return None
        if isinstance(batch, dict):  # datasets count the unreadable images they replaced (an int)
            self.skipped_images += int(batch.get("num_skipped", 0))
        return batch

    def report_skipped(self, epoch: int, stopped_after: int | None = None) -> dict[str, Any]:
        """Log how many unreadable images the datasets skipped on all ranks since the last report (each replaced by
        another sample, so batches stayed full): at each epoch's end, and at a stop inside an epoch (max_steps, a
        signal, early stopping: `stopped_after` batches). Collective. Returns the record to log
        (train/skipped_images)."""
        local = torch.tensor([float(self.skipped_images)], device=self.device)
        total = int(round(float(dist.all_reduce_mean(local)) * dist.get_world_size()))
        self.skipped_images = 0
        where = f"epoch {epoch}" + (f" (stopped after batch {stopped_after})" if stopped_after is not None else "")
        if total:
            log.info("%s: %d unreadable image(s) skipped and replaced by other samples (see the warnings naming them)",
                     where, total)
        return {"epoch": epoch if stopped_after is not None else epoch + 1, "train/skipped_images": total}
