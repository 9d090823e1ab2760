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

from tqdm import tqdm

_FORMAT = "%(asctime)s %(levelname)s %(message)s"


PROJECT_PACKAGES = ("dataset", "models", "tasks", "optim", "scheduler", "metrics", "refTools", "vqaTools")


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
