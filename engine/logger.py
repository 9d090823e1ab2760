"""Run logging: python logging to stdout + log.txt, one JSON object per record in log.jsonl, TensorBoard scalars,
and a tqdm bar. Only rank 0 writes files; other ranks log warnings and errors to stdout only.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from common import dist

_FORMAT = "%(asctime)s %(levelname)s %(message)s"


PROJECT_PACKAGES = ("common", "dataset", "models", "tasks", "optim", "scheduler", "metrics", "refTools", "vqaTools")


class RunLogger:
    """One run's log sinks. Use `info`/`warning` for text, `log_record` for numbers, `close` at the end."""

    def __init__(self, output_dir: str | Path | None, is_main: bool, rank: int = 0) -> None:
        self.is_main = is_main
        self.output_dir = Path(output_dir) if output_dir else None
        self.logger = logging.getLogger("alignfuse")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self._handlers: list[logging.Handler] = []
        fmt = logging.Formatter(_FORMAT if is_main else f"[rank {rank}] {_FORMAT}")
        stream = logging.StreamHandler(sys.stdout)
        stream.setLevel(logging.INFO if is_main else logging.WARNING)
        stream.setFormatter(fmt)
        self._handlers.append(stream)
        self._jsonl = None
        self._tb = None
        if is_main and self.output_dir is not None:
            file_handler = logging.FileHandler(self.output_dir / "log.txt", encoding="utf-8")
            file_handler.setFormatter(fmt)
            self._handlers.append(file_handler)
            self._jsonl = open(self.output_dir / "log.jsonl", "a", encoding="utf-8")
        # The project's other packages log through their module loggers (e.g. a skipped image in dataset.datasets):
        # they go to the same sinks, so log.txt holds every warning of the run.
        self._loggers = [self.logger] + [logging.getLogger(name) for name in PROJECT_PACKAGES]
        for logger in self._loggers[1:]:
            logger.setLevel(logging.INFO)
            logger.propagate = False
        for logger in self._loggers:
            for handler in self._handlers:
                logger.addHandler(handler)
        self._bar: tqdm | None = None

    def info(self, msg: str, *args: Any) -> None:
        self.logger.info(msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self.logger.warning(msg, *args)

    def _writer(self):
        if self._tb is None and self.is_main and self.output_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard is slow to import

            self._tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))
        return self._tb

    def log_record(self, record: dict[str, Any], step: int) -> None:
        """Append `record` (with 'step') to log.jsonl and its numeric entries to TensorBoard (rank 0 only)."""
        if not self.is_main:
            return
        record = {"step": step, **record}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, default=float) + "\n")
            self._jsonl.flush()
        writer = self._writer()
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key, value, step)
            writer.flush()

    def train_record(self, record: dict[str, Any], step: int, total_steps: int, loss_name: str) -> None:
        """A training window's record: in log.jsonl and TensorBoard in full, as a text line without the finer speed
        fields, and on the bar (`loss_name`: the loss it shows)."""
        self.log_record(record, step)
        quiet = {"epoch", "train/data_wait_s", "train/compute_s", "train/samples_per_s_per_device",
                 "train/tflops_per_device"}  # in log.jsonl and TensorBoard, left out of the text line
        self.info("step %d/%d epoch %d: %s", step, total_steps, record["epoch"],
                  ", ".join(f"{k.removeprefix('train/')}={v:.4g}" for k, v in record.items() if k not in quiet))
        bar = {"loss": record.get(f"train/{loss_name}", float("nan")), "lr": record["train/lr"],
               "samples/s": record["train/samples_per_s"]}
        if "train/mfu" in record:
            bar["mfu"] = record["train/mfu"]
        self.update_bar(0, **bar)

    def start_bar(self, total: int, initial: int) -> None:
        """A tqdm bar over optimizer steps on rank 0 when stderr is a terminal (logs carry progress otherwise)."""
        self.close_bar()
        if self.is_main and sys.stderr.isatty():
            self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, leave=False)

    def update_bar(self, n: int = 1, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else v
                                       for k, v in postfix.items()}, refresh=False)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_bar()
        for handler in self._handlers:
            for logger in self._loggers:
                logger.removeHandler(handler)
            handler.close()
        self._handlers = []
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class LossWindow:
    """The named losses and gradient norms of the optimizer steps since the last training record, summed on the
    device: one host sync per record, none per step."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.micro_batches = 0

    def add(self, losses: dict[str, torch.Tensor], grad_norm: torch.Tensor, micro_batches: int) -> None:
        """One optimizer step: its losses summed over its `micro_batches`, and its gradient norm."""
        for name, value in [*losses.items(), ("grad_norm", grad_norm)]:
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.steps += 1
        self.micro_batches += micro_batches

    def reduce(self) -> dict[str, float]:
        """train/<loss> per micro-batch and train/grad_norm per step, averaged over the ranks (collective); clears."""
        names = sorted(self.sums)
        values = dist.all_reduce_mean(torch.stack([self.sums[n] for n in names])).tolist()
        out = {f"train/{name}": value / (self.steps if name == "grad_norm" else self.micro_batches)
               for name, value in zip(names, values, strict=True)}
        self.clear()
        return out
