"""How the engine computes an optimizer step: a backend owns the wrapped model, the backward pass, the optimizer step
and the state these keep beside the weights. The trainer talks to one through this small interface only:

  prepare()                           wrap the model for training, once the resumed state is loaded and the unfreezing
                                      stage applied (DDP / torch.compile, or deepspeed.initialize)
  micro_batch(last)                   the context a micro-batch's forward and backward run in
  backward(total, last, group_size)   backward of one micro-batch's weighted loss sum
  step(total, stop_flag)              finish an optimizer step: non-finite check, clipping, optimizer and scheduler
  state_dict() / load_state_dict()    the backend's entries of our checkpoint (optimizer, scheduler, grad scaler)
  save(output_dir, run) / prune()     the backend's own checkpoint files beside ours (DeepSpeed's shards)
  rewrap()                            after progressive unfreezing changed which parameters train

Two backends: `engine.backend_torch.TorchBackend` (one process or DDP, fp16 GradScaler, torch.compile) and
`engine.backend_deepspeed.DeepSpeedBackend` (ZeRO 0-2 through deepspeed.initialize, which then owns accumulation,
clipping and fp16 loss scaling). `build_backend` picks one from the config's deepspeed.enabled.

Non-finite policy (the backends' half of it): once per optimizer step, after the backward of its last micro-batch,
the torch backend checks (one host sync) that the summed loss of the step and the global gradient norm are finite.
With fp16, inf/nan gradients under a finite loss are the GradScaler's overflow: the step is skipped and the loss scale
lowered ("overflow", not a failure). Any other non-finite value skips the step ("nonfinite") - gradients dropped, no
optimizer or scheduler update. Under DeepSpeed the skip decision is DeepSpeed's own (ZeRO skips a step whose gradient
norm is not finite, fp16 also on overflow), read back through `was_step_applied()`. The trainer counts the skips.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from engine.config import Config

if TYPE_CHECKING:
    from engine.state import RunState

StepStatus = Literal["stepped", "nonfinite", "overflow"]


@dataclass
class StepResult:
    """What finishing an optimizer step decided; the same on every rank."""

    status: StepStatus  # stepped | nonfinite (skipped, counts toward the limit) | overflow (fp16 calibration)
    stop_any: bool  # a stop signal arrived on some rank before this step finished
    grad_norm: torch.Tensor  # 0-d, on the device (before clipping)


def compile_model(model: nn.Module, backend: str, mode: str) -> nn.Module:
    """torch.compile for the training step (train.compile, compile_backend, compile_mode).

    Tasks pad training texts to data.max_tokens under compile (one text shape). What still varies from step to step is
    data-dependent, e.g. how many tokens MLM masked: such boolean-mask gathers are captured into the graph with a
    symbolic size instead of splitting it there (torch graph-breaks on them by default, and every piece after a break
    is recompiled for each new size). Tasks pass the distillation alpha as a tensor (AlbefTask.alpha). So a step is one
    graph, compiled on the first compiled step, and at most once more when a size that differs between batches (VQA's
    answer count) first changes: that dimension then becomes a symbol."""
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    return torch.compile(model, backend=backend, mode=None if mode == "default" else mode)


class Backend(abc.ABC):
    """One run's way of turning micro-batch losses into optimizer steps (see the module docstring)."""

    def __init__(self, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 device: torch.device, amp_dtype: torch.dtype | None) -> None:
        self.cfg = cfg
        self.model = model  # the plain model: its weights are the checkpoint's
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.amp_dtype = amp_dtype
        self.scaler: torch.amp.GradScaler | None = None
        self.eager_model: nn.Module = model  # what a training step calls, uncompiled (FLOP counting)
        self.train_model: nn.Module = model  # what a training step calls (compiled under train.compile)

    def _compile(self, model: nn.Module) -> nn.Module:
        tcfg = self.cfg.train
        if not tcfg.compile:
            return model
        return compile_model(model, str(tcfg.compile_backend), str(tcfg.compile_mode))

    @abc.abstractmethod
    def prepare(self) -> None:
        """Wrap the model for training; call once, after load_state_dict and the unfreezing stage."""

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-batch's forward and backward; `last`: the step's final micro-batch."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def backward(self, total: torch.Tensor, last: bool, group_size: int) -> None:
        """Backward of one micro-batch's loss sum `total`, one of `group_size` accumulated into this step."""

    @abc.abstractmethod
    def step(self, total: torch.Tensor, stop_flag: bool) -> StepResult:
        """Finish the optimizer step whose summed loss is `total`; `stop_flag`: a stop signal arrived on this rank.
        Collective: call on every rank."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The backend's entries of a resumable checkpoint (weights_only-loadable values)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        """Restore from a checkpoint `state` read from `path`, before prepare()."""

    @abc.abstractmethod
    def save(self, output_dir: Path, run: RunState) -> dict[str, Any]:
        """Write the backend's own files for a resumable checkpoint at `run`'s position (collective); returns the
        entries to add to our checkpoint."""

    @abc.abstractmethod
    def prune(self, output_dir: Path, keep: int) -> None:
        """Delete the backend's own checkpoint files beyond the newest `keep` (rank 0, after a save)."""

    @abc.abstractmethod
    def rewrap(self) -> None:
        """Wrap the model again because the set of parameters that require gradients changed."""

    @abc.abstractmethod
    def features(self) -> list[str]:
        """What the backend adds to training, for the start-up banner (e.g. ["torch.compile", "DDP"])."""


def check_config(cfg: Config) -> None:
    """Refuse backend settings that cannot work, before the model is built (ValueError naming the key)."""
    if cfg.deepspeed.enabled:
        from engine.backend_deepspeed import check_config as check_deepspeed

        check_deepspeed(cfg)


def build_backend(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                  device: torch.device, amp_dtype: torch.dtype | None, world_size: int, micro_batch_size: int,
                  iters_per_epoch: int, unfreezing: bool) -> Backend:
    """The backend the config asks for: DeepSpeed under deepspeed.enabled, else torch's own (DDP when world_size > 1).
    `unfreezing`: optimizer.unfreeze is on (the trained parameters change during the run)."""
    if cfg.deepspeed.enabled:
        from engine.backend_deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, model, optimizer, scheduler, device, amp_dtype, micro_batch_size=micro_batch_size,
                                iters_per_epoch=iters_per_epoch, unfreezing=unfreezing)
    from engine.backend_torch import TorchBackend

    return TorchBackend(cfg, model, optimizer, scheduler, device, amp_dtype, world_size=world_size)
