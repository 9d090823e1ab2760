"""The process around a run: the precision, seeding, the output folder check and the stop signal.

Small pieces the trainer composes; none of them knows about models, data or the training loop.
"""

from __future__ import annotations

import contextlib
import random
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """train.amp -> the autocast dtype (None = full precision)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    choices = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in choices:
        raise ValueError(f"train.amp must be auto, none, bf16 or fp16, got {amp!r}")
    return choices[amp]


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `amp_dtype` on `device`, or nothing for full precision."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def check_writable(output_dir: Path) -> None:
    """Create output_dir and prove it is writable, before any training time is spent."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write_test_"):
            pass
    except OSError as err:
        raise ValueError(f"output_dir {output_dir} cannot be created or written: {err}") from None


class StopSignal:
    """SIGTERM/SIGINT set a flag that the loop reads after each optimizer step; a second SIGINT exits at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not inside some launchers)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def restore(self, ignore_term: bool = False) -> None:
        """Put the previous handlers back; `ignore_term` ignores SIGTERM instead, for a rank on its way out: after a
        peer failure, torchrun SIGTERMs the survivors as soon as one rank exits, which would otherwise kill this rank
        before it reports why it stopped; after a stop signal, the same preemption often arrives twice (SLURM signals
        every process and torchrun forwards its own copy), and the second must not kill a rank that is shutting down
        (torchrun still SIGKILLs it after its grace period)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if ignore_term and sig == signal.SIGTERM else handler)
        self._previous = {}
