"""How fast a run goes: samples/s, the data-wait share of a step, and MFU (model FLOPs utilisation).

- FLOPs per sample are counted once, on the run's first micro-batch, with torch's `FlopCounterMode` around the real
  forward + backward (the momentum encoders' forward passes included, since they run inside the task's step). The
  count rides along the step that training does anyway, so it changes no state and no result. Text lengths vary from
  batch to batch, so the figure is an estimate of the run's average, as in every MFU report.
- The peak a device can reach is read from a small table of dense datasheet rates for the GPUs users train on
  (bf16/fp16 and tf32/fp32 tensor-core rates); on a CPU, or a GPU not in the table, it is a float32 (or the autocast
  dtype's) matmul rate measured once at start-up, and `peak_source` says which was used.
- `StepMeter` collects, between two log records, the optimizer steps, the samples seen by this rank, the seconds
  spent waiting for the data loader and the wall time, and turns them into the logged fields.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' datasheets (SXM parts); keys are matched against
# torch.cuda.get_device_name() in order, so the more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 494.5}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 378.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 494.5}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 156.0}),
)

_MEASURED: dict[tuple[str, torch.dtype | None], float] = {}  # CPU stand-in peaks measured in this process

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", None: "fp32"}


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 3) -> float:
    """FLOP/s of a square matmul on ``device`` in ``dtype``, best of ``repeats`` (a stand-in peak for MFU)."""
    # A private generator: drawing from the global RNG here (after --resume restored it) would shift the training
    # stream, and a resumed run would no longer equal the uninterrupted one.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    a @ b  # warm-up: library load, first-call allocations
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def device_peak_flops(device: torch.device, amp_dtype: torch.dtype | None) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for MFU on ``device`` computing in ``amp_dtype`` (None: float32)."""
    name = _DTYPE_NAMES.get(amp_dtype, "fp32")
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        for key, rates in PEAK_TFLOPS:
            if key in gpu:
                # fp32 matmuls run as tf32 only where torch allows it; otherwise the plain fp32 rate is far lower.
                if name == "fp32" and torch.backends.cuda.matmul.allow_tf32:
                    name = "tf32"
                return rates[name] * 1e12, f"{gpu} {name} dense datasheet peak"
        return measured_matmul_flops(device, amp_dtype or torch.float32, size=4096), \
            f"{gpu} {name} 4096^3 matmul measured at start-up (not in the datasheet table)"
    key = (str(device), amp_dtype)
    if key not in _MEASURED:  # once per process: a few tenths of a second that in-process runs need not repeat
        _MEASURED[key] = measured_matmul_flops(device, amp_dtype or torch.float32, size=1024, repeats=5)
    return _MEASURED[key], f"CPU {name} 1024^3 matmul measured at start-up (a stand-in for a datasheet peak)"


def count_flops(step: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``step()`` under FlopCounterMode; returns (its result, the FLOPs it did)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        result = step()
    return result, int(counter.get_total_flops())


def batch_size_of(batch: Any, default: int) -> int:
    """Samples in a batch: the leading size of its first tensor (dicts, lists and tuples searched in order)."""
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.dim() else default
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, list | tuple) else ()
    for value in values:
        if torch.is_tensor(value) and value.dim():
            return int(value.shape[0])
    for value in values:
        if isinstance(value, dict | list | tuple):
            found = batch_size_of(value, 0)
            if found:
                return found
    return default


class StepMeter:
    """Throughput of one log window (between two records) on this rank."""

    def __init__(self, world_size: int, peak_flops: float | None = None) -> None:
        self.world_size = world_size
        self.peak_flops = peak_flops
        self.flops_per_sample: float | None = None
        self.windows = 0  # windows turned into fields so far
        self.warned_epoch = -1  # the epoch of the last input-bound warning
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.data_wait_s = 0.0
        self.samples = 0
        self.steps = 0
        self.discounted_steps = 0

    def discount(self, seconds: float, samples: int) -> None:
        """Leave one micro-batch (the FLOP-counting one, slowed by the counter) out of the window's figures."""
        self.started += seconds
        self.samples -= samples
        self.discounted_steps += 1

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation inside the window) out of the window's wall time."""
        self.started += seconds

    def record_data_wait(self, seconds: float, samples: int) -> None:
        self.data_wait_s += seconds
        self.samples += samples

    def fields(self) -> dict[str, float]:
        """The window's log fields (train/...); call before reset()."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        steps = max(self.steps - self.discounted_steps, 1)
        per_device = self.samples / elapsed
        out = {
            "train/step_time_s": elapsed / steps,
            "train/data_wait_s": self.data_wait_s / steps,
            "train/compute_s": (elapsed - self.data_wait_s) / steps,
            "train/data_wait_share": self.data_wait_s / elapsed,
            "train/samples_per_s": per_device * self.world_size,  # ranks see equal batches (distributed sampler)
            "train/samples_per_s_per_device": per_device,
        }
        if self.flops_per_sample and self.peak_flops:
            out["train/tflops_per_device"] = self.flops_per_sample * per_device / 1e12
            out["train/mfu"] = self.flops_per_sample * per_device / self.peak_flops
        return out

    def input_bound(self, fields: dict[str, float], limit: float, epoch: int) -> bool:
        """Whether to warn that a window (its `fields`) waited for data more than `limit` of its time: once an epoch,
        and never for the run's first window, which holds the loader workers' start-up."""
        self.windows += 1
        if fields["train/data_wait_share"] <= limit or self.warned_epoch == epoch or self.windows == 1:
            return False
        self.warned_epoch = epoch
        return True
