"""torch's own training backend: one process or DDP, the fp16 GradScaler, gradient clipping, torch.compile.

Accumulation: every micro-batch's loss is divided by the number of micro-batches in its step; DDP all-reduces the
gradients once, in the backward of the step's last micro-batch (`no_sync` before). See engine.backend for the
interface and the non-finite policy.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine import dist
from engine.backend import Backend, StepResult
from engine.config import Config

if TYPE_CHECKING:
    from engine.state import RunState


class TorchBackend(Backend):
    """DDP (world_size > 1) + GradScaler (fp16) + torch.compile (train.compile)."""

    def __init__(self, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 device: torch.device, amp_dtype: torch.dtype | None, world_size: int) -> None:
        super().__init__(cfg, model, optimizer, scheduler, device, amp_dtype)
        self.world_size = world_size
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        if amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(device.type)

    def _wrap_ddp(self) -> nn.parallel.DistributedDataParallel:
        """The model in DDP; it reduces the gradients of the parameters that require one now (collective)."""
        tcfg = self.cfg.train
        return nn.parallel.DistributedDataParallel(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            find_unused_parameters=bool(tcfg.find_unused_parameters),
            static_graph=bool(tcfg.static_graph),
        )

    def prepare(self) -> None:
        if self.world_size > 1:
            self.ddp = self._wrap_ddp()
            self.eager_model = self.ddp
        self.train_model = self._compile(self.eager_model)

    def rewrap(self) -> None:
        # A compiled model without DDP recompiles by itself (requires_grad guards). DDP reduces the gradients of what
        # was trainable when it was built: wrap again. The old wrapper (and its gradient hooks and buckets) goes with
        # the last references to it.
        if self.ddp is None:
            return
        self.ddp = self.eager_model = self.train_model = None
        self.ddp = self._wrap_ddp()
        self.eager_model = self.ddp
        self.train_model = self._compile(self.ddp)

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        if self.ddp is not None and not last:
            return self.ddp.no_sync()  # gradients are all-reduced once, on the last micro-batch of the step
        return contextlib.nullcontext()

    def backward(self, total: torch.Tensor, last: bool, group_size: int) -> None:
        loss = total / group_size
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _grad_norm(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        clip = float(self.cfg.train.clip_grad_norm)
        if clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, clip)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def step(self, total: torch.Tensor, stop_flag: bool) -> StepResult:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._grad_norm().detach().float()
        flags = torch.stack([
            (~torch.isfinite(total)).float(),
            (~torch.isfinite(grad_norm)).float(),
            torch.tensor(float(stop_flag), device=grad_norm.device),
        ])
        # One host sync per optimizer step; the max over ranks keeps every rank's decision identical.
        loss_bad, grad_bad, stop_any = dist.all_reduce_max(flags).tolist()
        if loss_bad or grad_bad:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()  # lowers the loss scale (unscale_ recorded the inf/nan gradients)
            # With fp16 and a finite loss, inf gradients are the GradScaler's calibration, not a failure.
            status = "overflow" if self.scaler is not None and not loss_bad else "nonfinite"
            return StepResult(status, bool(stop_any), grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult("stepped", bool(stop_any), grad_norm)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        for key, target in (("optimizer", self.optimizer), ("scheduler", self.scheduler), ("scaler", self.scaler)):
            if target is not None and state.get(key) is not None:
                target.load_state_dict(state[key])

    def save(self, output_dir: Path, run: RunState) -> dict[str, Any]:
        return {}  # everything is in state_dict()

    def prune(self, output_dir: Path, keep: int) -> None:
        pass  # no files of its own

    def features(self) -> list[str]:
        return [name for name, on in (("torch.compile", self.cfg.train.compile), ("DDP", self.ddp is not None)) if on]
