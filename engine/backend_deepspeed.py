"""The DeepSpeed training backend: ZeRO stage 0-2 through deepspeed.initialize with our optimizer and scheduler.

DeepSpeed owns accumulation (it counts micro-batches and acts on the last one of a step), gradient clipping, bf16/fp16
and the skip decision for non-finite steps. Its optimizer, scheduler and ZeRO shards are saved by DeepSpeed itself
under output_dir/deepspeed/<tag>; our checkpoint names the tag (`deepspeed_tag`) and holds everything else, with
the model's weights in their own shapes, so it stays interchangeable with torch-backend runs and official files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine import checkpoint as ckpt
from engine import dist
from engine.backend import Backend, StepResult
from engine.config import Config

if TYPE_CHECKING:
    from engine.state import RunState

DS_FOLDER = "deepspeed"  # DeepSpeed's checkpoint folders, next to our checkpoint files


def check_config(cfg: Config) -> None:
    """Refuse a ZeRO stage the models cannot train under (before the model is built)."""
    if cfg.deepspeed.zero_stage not in (0, 1, 2):
        # Stage 3 partitions the parameters themselves, and code outside a module's own forward reads full
        # weights: the momentum update (every parameter, every step), the tied MLM decoder, the token-type row.
        raise ValueError(f"deepspeed.zero_stage must be 0, 1 or 2, got {cfg.deepspeed.zero_stage!r}: ZeRO-3 "
                         "partitions the parameters, which the momentum models and tied weights read whole "
                         "(stage 2 already shards gradients and optimizer state)")


def _hold_scalar_params_as_vectors(model: nn.Module) -> None:
    """DeepSpeed cannot broadcast or flatten 0-dim parameters (ALBEF's ``temp``): hold them as 1-element tensors while
    DeepSpeed owns the model (they broadcast the same in every use), and keep their own shape in state_dicts so that
    checkpoints stay interchangeable with non-DeepSpeed runs and official files."""
    names = [name for name, param in model.named_parameters() if param.dim() == 0]
    if not names:
        return
    for name in names:
        param = model.get_parameter(name)
        param.data = param.data.reshape(1)

    def to_scalars(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for name in names:
            key = prefix + name
            if key in state_dict and state_dict[key].shape == (1,):
                state_dict[key] = state_dict[key].reshape(())

    def from_scalars(state_dict: dict, prefix: str, *args: Any) -> None:
        for name in names:
            key = prefix + name
            if key in state_dict and state_dict[key].dim() == 0:
                state_dict[key] = state_dict[key].reshape(1)

    model._register_state_dict_hook(to_scalars)
    model._register_load_state_dict_pre_hook(from_scalars)


class DeepSpeedBackend(Backend):
    """deepspeed.initialize around the model, our optimizer and our scheduler."""

    def __init__(self, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 device: torch.device, amp_dtype: torch.dtype | None, *, micro_batch_size: int, iters_per_epoch: int,
                 unfreezing: bool) -> None:
        super().__init__(cfg, model, optimizer, scheduler, device, amp_dtype)
        check_config(cfg)
        self.accum = int(cfg.train.grad_accum_steps)
        if unfreezing:
            raise ValueError("optimizer.unfreeze (progressive unfreezing) does not work with DeepSpeed, which fixes "
                             "the trained parameters when it starts; use DDP or set deepspeed.enabled=false")
        if iters_per_epoch % self.accum:
            raise ValueError(
                f"with DeepSpeed, batches per epoch ({iters_per_epoch}) must be a multiple of "
                f"train.grad_accum_steps ({self.accum}): DeepSpeed accumulates a fixed number of micro-batches"
            )
        self.micro_batch_size = micro_batch_size
        self.engine: Any = None  # the DeepSpeedEngine, from prepare()
        self._resume: tuple[Path, str] | None = None  # (our checkpoint, DeepSpeed's tag) to load in prepare()

    def state_dict(self) -> dict[str, Any]:
        return {}  # DeepSpeed saves its optimizer, scheduler and loss scale in its own files: save()

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        # DeepSpeed's optimizer and scheduler state sit in its own files, loaded once deepspeed.initialize has run.
        if state.get("deepspeed_tag"):
            self._resume = (Path(path), str(state["deepspeed_tag"]))

    def prepare(self) -> None:
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (set before its import)
        import deepspeed

        _hold_scalar_params_as_vectors(self.model)
        tcfg = self.cfg.train
        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.accum,
            "gradient_clipping": float(tcfg.clip_grad_norm),
            "zero_optimization": {"stage": int(self.cfg.deepspeed.zero_stage)},
            "zero_allow_untested_optimizer": True,  # our optimizer is torch's / timm's, not DeepSpeed's own
            "steps_per_print": 2**31 - 1,  # the engine logs; keep DeepSpeed quiet
            "bf16": {"enabled": self.amp_dtype == torch.bfloat16},
            "fp16": {"enabled": self.amp_dtype == torch.float16},
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=ds_config,
            dist_init_required=False,
        )
        self.eager_model = self.engine
        self.train_model = self._compile(self.engine)
        if self._resume is not None:
            path, tag = self._resume
            ds_dir = path.parent / DS_FOLDER  # saved next to our checkpoint file
            load_path, _ = self.engine.load_checkpoint(str(ds_dir), tag=tag, load_module_strict=True)
            if load_path is None:
                raise ValueError(f"DeepSpeed state {tag} for {path} was not found under {ds_dir}")

    def backward(self, total: torch.Tensor, last: bool, group_size: int) -> None:
        self.engine.backward(total)  # DeepSpeed divides by its gradient_accumulation_steps itself
        if not last:
            self.engine.step()  # DeepSpeed counts micro-batches: step() after each, it acts on the last

    def step(self, total: torch.Tensor, stop_flag: bool) -> StepResult:
        # DeepSpeed skips a step whose gradient norm is not finite (and fp16 overflows) by itself, stepping the
        # scheduler only when the step was applied; read that decision back.
        self.engine.step()
        stepped = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(0.0 if norm is None else float(norm), device=self.device)
        stop_any = dist.all_reduce_max(torch.tensor(float(stop_flag), device=self.device)).item()
        return StepResult("stepped" if stepped else "nonfinite", bool(stop_any), grad_norm)

    def save(self, output_dir: Path, run: RunState) -> dict[str, Any]:
        tag = f"step{run.step:08d}_e{run.epoch}_i{run.iter_in_epoch}"
        self.engine.save_checkpoint(str(output_dir / DS_FOLDER), tag=tag)  # collective
        return {"deepspeed_tag": tag}

    def prune(self, output_dir: Path, keep: int) -> None:
        ckpt.prune_deepspeed_tags(output_dir / DS_FOLDER, keep)

    def rewrap(self) -> None:
        # DeepSpeed fixes the trained parameters when it builds its engine; check_config refuses optimizer.unfreeze.
        raise ValueError("DeepSpeed cannot change the trained parameters during a run: leave optimizer.unfreeze "
                         "empty or set deepspeed.enabled=false")

    def features(self) -> list[str]:
        compiled = ["torch.compile"] if self.cfg.train.compile else []
        return [*compiled, f"DeepSpeed ZeRO-{self.cfg.deepspeed.zero_stage}"]
