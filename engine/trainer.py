"""The one training loop: every entry script is a Task plus `main = lambda argv=None: engine.run(XTask, argv)`.

What the engine owns, so that tasks only return named losses and metrics:
- run-level flags (--config --output_dir --checkpoint --resume --evaluate --seed --device --opts), config schema;
- process group, seeding (seed + rank), output dir checks, resolved config saved to output_dir/config.yaml;
- AMP (bf16 autocast, or fp16 autocast + GradScaler), gradient accumulation (no_sync on non-final micro-batches),
  gradient clipping, optimizer and scheduler steps (the scheduler is stepped once per optimizer step), EMA weights,
  DDP / torch.compile / DeepSpeed;
- evaluation cadence (every N epochs, N chunks per epoch, every N steps), best / last / rolling checkpoints,
  early stopping, resume (exact, including RNG and the position inside the epoch), SIGTERM/SIGINT checkpointing;
- failures of the job around the task: a collective that fails because another rank died or hung (bounded by
  train.dist_timeout_s) is re-raised as dist.PeerFailure naming the step and the way back (--resume auto); a
  checkpoint write that fails (disk full) raises OSError on every rank at that save, the earlier files untouched.

Non-finite policy: once per optimizer step, after the backward of its last micro-batch, the engine checks (one host
sync) that the summed loss of the step and the global gradient norm are finite. With fp16, inf/nan gradients under a
finite loss are the GradScaler's overflow: the step is skipped and the loss scale lowered, without counting as a
failure. Any other non-finite value skips the step - gradients dropped, no optimizer, scheduler or EMA update,
global step not advanced - with a warning naming the step and the non-finite losses. After
`train.nonfinite_max_consecutive` consecutive skipped steps the run writes a resumable checkpoint of the last good
state (the weights the skipped steps did not touch) and raises RuntimeError. Under DeepSpeed the skip decision is
DeepSpeed's own (ZeRO skips a step whose gradient norm is not finite, fp16 also on overflow), read back through
`was_step_applied()`; the consecutive-skip limit applies the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from engine import checkpoint as ckpt
from engine import dist, errors, throughput
from engine.config import Config, build_schema, load_config, save_config
from engine.launch import report_clean_stop
from engine.logger import RunLogger
from engine.task import Progress, Task

TOTAL = "total_loss"  # the engine's name for the weighted sum of a step's named losses (logged as train/total_loss)


def build_arg_parser(description: str = "") -> argparse.ArgumentParser:
    """The run-level flags every entry script shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=str, default=None, help="YAML config file (may include base: files)")
    parser.add_argument("--output_dir", type=str, default=None, help="where logs and checkpoints go")
    parser.add_argument("--checkpoint", type=str, default=None, help="pretrained weights for the task's model")
    parser.add_argument("--allow_partial_checkpoint", action="store_true",
                        help="accept a --checkpoint that fills under half of the model's weights (or, with --evaluate,"
                             " not every weight); the missing ones stay at their initialisation")
    parser.add_argument("--resume", type=str, default=None, help="a checkpoint to resume from, or 'auto'")
    parser.add_argument("--evaluate", action="store_true", help="evaluate only, no training")
    parser.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    parser.add_argument("--device", type=str, default=None, choices=["auto", "cpu", "cuda"], help="overrides config")
    parser.add_argument("--opts", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. train.epochs=3 optimizer.lr=1e-4")
    parser.add_argument(errors.DEBUG_FLAG, action="store_true",
                        help=f"show the traceback of a user error (wrong file, key, value...); or {errors.DEBUG_ENV}=1")
    return parser


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """train.amp -> the autocast dtype (None = full precision)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    choices = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in choices:
        raise ValueError(f"train.amp must be auto, none, bf16 or fp16, got {amp!r}")
    return choices[amp]


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


class Trainer:
    """Holds one run's state; `fit()` trains (or evaluates with --evaluate) and returns the final metrics."""

    def __init__(self, task_cls: type[Task], cfg: Config, args: argparse.Namespace) -> None:
        self.cfg = cfg
        self.args = args
        self.tcfg = cfg.train
        self.stop_signal = StopSignal()
        self.device = dist.init_distributed(cfg.device, float(self.tcfg.dist_timeout_s))
        try:
            self._init_run(task_cls)
        except BaseException:
            # A failed setup (unwritable output_dir, bad config) leaves no process group or open log behind.
            if hasattr(self, "log"):
                self.log.close()
            dist.destroy()
            raise

    def _init_run(self, task_cls: type[Task]) -> None:
        cfg, args = self.cfg, self.args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.output_dir = Path(args.output_dir or Path("output") / task_cls.name)
        check_writable(self.output_dir)
        self.log = RunLogger(self.output_dir, dist.is_main(), self.rank)
        if dist.is_main():
            save_config(cfg, self.output_dir)
        seed_everything(int(cfg.seed) + self.rank)
        self.amp_dtype = resolve_amp(self.tcfg.amp, self.device)
        self.task = task_cls(cfg, self.device)
        self.task.output_dir = self.output_dir
        self.best_metric_key = self.tcfg.best_metric or task_cls.best_metric
        self.best_mode = self.tcfg.best_mode or task_cls.best_mode
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"train.best_mode must be max or min, got {self.best_mode!r}")
        if self.tcfg.early_stop_patience > 0 and not self.best_metric_key:
            raise ValueError("train.early_stop_patience > 0 needs a best metric (train.best_metric or the task's)")
        self.accum = int(self.tcfg.grad_accum_steps)
        if self.accum < 1:
            raise ValueError(f"train.grad_accum_steps must be >= 1, got {self.accum}")
        self.use_deepspeed = bool(cfg.deepspeed.enabled)
        if self.use_deepspeed and cfg.deepspeed.zero_stage not in (0, 1, 2):
            # Stage 3 partitions the parameters themselves, and code outside a module's own forward reads full
            # weights: the momentum update (every parameter, every step), the tied MLM decoder, the token-type row.
            raise ValueError(f"deepspeed.zero_stage must be 0, 1 or 2, got {cfg.deepspeed.zero_stage!r}: ZeRO-3 "
                             "partitions the parameters, which the momentum models and tied weights read whole "
                             "(stage 2 already shards gradients and optimizer state)")

        # Run state (saved in checkpoints).
        self.epoch = 0
        self.step = 0
        self.iter_in_epoch = 0
        self.best_value: float | None = None
        self.evals_without_improvement = 0
        self.last_eval_step = -1
        self.last_metrics: dict[str, float] = {}
        self.consecutive_skips = 0
        self.skipped_images = 0  # unreadable images replaced this epoch (this rank)
        self.stop_reason: str | None = None
        self._last_saved: tuple[int, int, int, int] | None = None

        self.model = self.task.build_model().to(self.device)
        self.train_model: nn.Module = self.model
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        self.ds_engine: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.scaler: torch.amp.GradScaler | None = None
        self.ema: AveragedModel | None = None
        self.unfreeze: Any = None  # optim.UnfreezeSchedule when optimizer.unfreeze is on (set up with the optimizer)
        self.meter: throughput.StepMeter | None = None  # training throughput (set up with the loader)
        self._input_bound_warned = -1  # the epoch of the last input-bound warning
        self._windows_logged = 0

    # ----------------------------------------------------------------------------------------------- setup
    def _resume_state(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint named by --resume (a path or 'auto'); rank 0 picks, every rank loads the same file."""
        if not self.args.resume:
            return None
        if self.args.resume == "auto":
            found = ckpt.find_resume_checkpoint(self.output_dir) if dist.is_main() else None
            path = dist.broadcast_object(str(found[0]) if found else None)
            if path is None:
                self.log.info("resume auto: no checkpoint in %s, starting fresh", self.output_dir)
                return None
            state = found[1] if found else ckpt.load_checkpoint_file(path)
            return Path(path), state
        return Path(self.args.resume), ckpt.load_checkpoint_file(self.args.resume)

    def _setup_training(self, resume: tuple[Path, dict[str, Any]] | None) -> None:
        import optim
        import scheduler as scheduler_mod

        self.loader = self.task.build_train_loader()
        self.sampler = self.loader.sampler
        if not hasattr(self.sampler, "set_start_batch") or not hasattr(self.sampler, "set_epoch"):
            raise ValueError(
                f"{type(self.task).__name__}.build_train_loader must use dataset.sampler.ResumableDistributedSampler "
                f"(got {type(self.sampler).__name__}): resuming mid-epoch needs set_epoch/set_start_batch"
            )
        if self.loader.batch_size is None:
            raise ValueError("the training loader must have a batch_size (no custom batch_sampler): resume needs it")
        self.sampler.set_epoch(0)
        self.iters_per_epoch = len(self.loader)
        if self.iters_per_epoch == 0:
            raise ValueError("the training loader is empty on this rank (is the dataset smaller than batch_size x "
                             "world_size?)")
        self.steps_per_epoch = math.ceil(self.iters_per_epoch / self.accum)
        epochs = int(self.tcfg.epochs)
        max_steps = int(self.tcfg.max_steps)
        self.total_steps = self.steps_per_epoch * epochs
        if max_steps > 0:
            self.total_steps = min(self.total_steps, max_steps)

        # Progressive unfreezing: the optimizer's groups hold every parameter the schedule will train; those not
        # unfrozen yet get no gradient, which the optimizer skips (groups, lrs and optimizer state keep their layout).
        self.unfreeze = optim.build_unfreeze_schedule(self.cfg.optimizer, self.model)
        if self.unfreeze is not None and self.use_deepspeed:
            raise ValueError("optimizer.unfreeze (progressive unfreezing) does not work with DeepSpeed, which fixes "
                             "the trained parameters when it starts; use DDP or set deepspeed.enabled=false")
        self.optimizer = optim.create_optimizer(self.cfg.optimizer, self.model, unfreeze=self.unfreeze)
        self.scheduler = scheduler_mod.create_scheduler(
            self.cfg.scheduler, self.optimizer, steps_per_epoch=self.steps_per_epoch, epochs=epochs,
            max_steps=max_steps,
        )
        if self.amp_dtype == torch.float16 and not self.use_deepspeed:
            self.scaler = torch.amp.GradScaler(self.device.type)
        if self.tcfg.ema_decay > 0:
            if not 0.0 < self.tcfg.ema_decay < 1.0:
                raise ValueError(f"train.ema_decay must be in (0, 1) or 0 (off), got {self.tcfg.ema_decay}")
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(self.tcfg.ema_decay),
                                     use_buffers=True)
        if resume is not None:
            self._load_state(*resume)
        if self.unfreeze is not None:
            self.unfreeze.apply(self.model)  # the stage reached before a resume (stage 0 on a fresh run)
            self.log.info("%s", self.unfreeze.describe(self.model, self.optimizer))

        if self.use_deepspeed:
            if self.iters_per_epoch % self.accum:
                raise ValueError(
                    f"with DeepSpeed, batches per epoch ({self.iters_per_epoch}) must be a multiple of "
                    f"train.grad_accum_steps ({self.accum}): DeepSpeed accumulates a fixed number of micro-batches"
                )
            self._setup_deepspeed(resume)
        elif self.world > 1:
            self.ddp = self._wrap_ddp()
            self.train_model = self.ddp
        self._eager_train_model = self.train_model  # the FLOP-counting step runs uncompiled
        peak, self.peak_source = (throughput.device_peak_flops(self.device, self.amp_dtype)
                                  if self.tcfg.count_flops else (None, "not measured (train.count_flops: false)"))
        self.meter = throughput.StepMeter(self.world, peak)
        if self.tcfg.compile:
            self.train_model = compile_model(self.train_model, str(self.tcfg.compile_backend),
                                             str(self.tcfg.compile_mode))

    def _wrap_ddp(self) -> nn.parallel.DistributedDataParallel:
        """The model in DDP; it reduces the gradients of the parameters that require one now (collective)."""
        return nn.parallel.DistributedDataParallel(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            find_unused_parameters=bool(self.tcfg.find_unused_parameters),
            static_graph=bool(self.tcfg.static_graph),
        )

    def _unfreeze_event(self, unit: str) -> None:
        """An epoch ended or an evaluation ran ("epochs" / "evals"): the unfreezing schedule may start its next stage,
        whose parameters then train from the next optimizer step on (every rank reaches this point together)."""
        if self.unfreeze is None or not self.unfreeze.record(unit):
            return
        self.unfreeze.apply(self.model)  # a compiled model without DDP recompiles by itself (requires_grad guards)
        if self.ddp is not None:
            # DDP reduces the gradients of what was trainable when it was built: wrap again. The old wrapper (and its
            # gradient hooks and buckets) goes with the last references to it.
            self.ddp = self._eager_train_model = self.train_model = None
            self.ddp = self._wrap_ddp()
            self._eager_train_model = self.train_model = self.ddp
            if self.tcfg.compile:
                self.train_model = compile_model(self.ddp, str(self.tcfg.compile_backend),
                                                 str(self.tcfg.compile_mode))
        self.log.info("%s", self.unfreeze.describe(self.model, self.optimizer))

    def _setup_deepspeed(self, resume: tuple[Path, dict[str, Any]] | None) -> None:
        """deepspeed.initialize with our optimizer and scheduler; DeepSpeed owns accumulation, clipping and fp16."""
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (set before its import)
        import deepspeed

        _hold_scalar_params_as_vectors(self.model)

        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": int(self.loader.batch_size),
            "gradient_accumulation_steps": self.accum,
            "gradient_clipping": float(self.tcfg.clip_grad_norm),
            "zero_optimization": {"stage": int(self.cfg.deepspeed.zero_stage)},
            "zero_allow_untested_optimizer": True,  # our optimizer is torch's / timm's, not DeepSpeed's own
            "steps_per_print": 2**31 - 1,  # the engine logs; keep DeepSpeed quiet
            "bf16": {"enabled": self.amp_dtype == torch.bfloat16},
            "fp16": {"enabled": self.amp_dtype == torch.float16},
        }
        self.ds_engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=ds_config,
            dist_init_required=False,
        )
        self.train_model = self.ds_engine
        if resume is not None and resume[1].get("deepspeed_tag"):
            ds_dir = Path(resume[0]).parent / "deepspeed"  # saved next to our checkpoint file
            load_path, _ = self.ds_engine.load_checkpoint(str(ds_dir), tag=resume[1]["deepspeed_tag"],
                                                          load_module_strict=True)
            if load_path is None:
                raise ValueError(f"DeepSpeed state {resume[1]['deepspeed_tag']} for {resume[0]} was not found under "
                                 f"{ds_dir}")

    def banner(self, training: bool) -> str:
        """The run's start-up summary (logged once on rank 0): what runs where, how big, and where it writes."""
        params = list(self.model.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        if self.device.type == "cuda":
            where = f"{self.world} x {torch.cuda.get_device_name(self.device)}"
        else:
            where = f"{self.world} x CPU ({torch.get_num_threads()} threads)"
        dtype = {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}
        lines = [
            f"{self.task.name}: {'training' if training else 'evaluation'} on {where}, "
            f"{dtype.get(self.amp_dtype, str(self.amp_dtype))}, backend {dist.backend_name()}",
            f"model {type(self.model).__name__}: {trainable / 1e6:.2f} M trainable of {total / 1e6:.2f} M parameters",
        ]
        if training:
            batch = int(self.loader.batch_size)
            extras = [name for name, on in (("torch.compile", self.tcfg.compile),
                                            (f"DeepSpeed ZeRO-{self.cfg.deepspeed.zero_stage}", self.use_deepspeed),
                                            ("DDP", self.ddp is not None), ("EMA", self.ema is not None)) if on]
            lines += [
                f"data: {len(self.loader.dataset)} training samples, {self.loader.num_workers} loader worker(s) per "
                f"rank; eval splits {self.task.eval_splits()}",
                f"batch: {batch} per rank x {self.world} ranks x {self.accum} accumulation = "
                f"{batch * self.world * self.accum} per optimizer step; {self.steps_per_epoch} steps per epoch, "
                f"{self.total_steps} in this run (from step {self.step}){'; ' + ', '.join(extras) if extras else ''}",
                f"MFU peak: {self.peak_source}",
            ]
        lines += [f"config {self.args.config or '(defaults only)'}, output {self.output_dir.resolve()}"]
        return "\n  ".join(lines)

    # ----------------------------------------------------------------------------------------- checkpoints
    def state_dict(self, full: bool = True) -> dict[str, Any]:
        """The run state as weights_only-loadable values. Collective (RNG of every rank): call on all ranks."""
        rng = dist.all_gather_object(ckpt.capture_rng())
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "iter_in_epoch": self.iter_in_epoch,
            "rng": rng,
            "world_size": self.world,
            "config": self.cfg.to_dict(),
            "best_metric_value": self.best_value,
            "evals_without_improvement": self.evals_without_improvement,
            "last_eval_step": self.last_eval_step,
            "last_metrics": dict(self.last_metrics),
            "unfreeze": self.unfreeze.state_dict() if self.unfreeze is not None else None,
        }
        if full and not self.use_deepspeed:
            state["optimizer"] = self.optimizer.state_dict() if self.optimizer is not None else None
            state["scheduler"] = self.scheduler.state_dict() if self.scheduler is not None else None
            state["scaler"] = self.scaler.state_dict() if self.scaler is not None else None
        return state

    def _load_state(self, path: Path, state: dict[str, Any]) -> None:
        for key in ("model", "epoch", "step", "iter_in_epoch"):
            if key not in state:
                raise ValueError(f"checkpoint {path} has no {key!r} entry: not a resumable checkpoint of this engine")
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError(f"checkpoint {path} has no EMA weights but train.ema_decay > 0")
            self.ema.load_state_dict(state["ema"])
        if not self.use_deepspeed:
            if self.optimizer is not None and state.get("optimizer") is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state.get("scheduler") is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler") is not None:
                self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.iter_in_epoch = int(state["epoch"]), int(state["step"]), int(state["iter_in_epoch"])
        self.best_value = state.get("best_metric_value")
        self.evals_without_improvement = int(state.get("evals_without_improvement", 0))
        self.last_eval_step = int(state.get("last_eval_step", -1))
        self.last_metrics = dict(state.get("last_metrics") or {})
        if self.unfreeze is not None:
            if state.get("unfreeze") is not None:
                self.unfreeze.load_state_dict(state["unfreeze"])
            else:  # a checkpoint from before optimizer.unfreeze was set: count its finished epochs
                self.unfreeze.events = self.epoch if self.unfreeze.unit == "epochs" else 0
                self.log.warning("checkpoint %s has no unfreezing state: starting the schedule at %d %s", path,
                                 self.unfreeze.events, self.unfreeze.unit)
        self._last_saved = (self.step, self.epoch, self.iter_in_epoch, self.last_eval_step)
        rng = state.get("rng")
        if isinstance(rng, list) and len(rng) == self.world:
            ckpt.restore_rng(rng[self.rank])
        else:
            # Another world size: no per-rank state to restore, so derive a fresh one from the position instead.
            self.log.warning("checkpoint %s holds RNG states for another world size: reseeding", path)
            seed_everything(int(self.cfg.seed) + self.rank + 1000003 * self.step)
        self.log.info("resumed from %s: epoch %d, step %d, iter_in_epoch %d", path, self.epoch, self.step,
                      self.iter_in_epoch)

    def save_resumable(self) -> None:
        """checkpoint_<step>.pth (rolling) + checkpoint_last.pth; once per position. Call on all ranks."""
        position = (self.step, self.epoch, self.iter_in_epoch, self.last_eval_step)
        if position == self._last_saved:
            return
        state = self.state_dict()
        path = self.output_dir / ckpt.rolling_name(self.step)
        if self.ds_engine is not None:
            tag = f"step{self.step:08d}_e{self.epoch}_i{self.iter_in_epoch}"
            self.ds_engine.save_checkpoint(str(self.output_dir / "deepspeed"), tag=tag)  # collective
            state["deepspeed_tag"] = tag

        def write() -> None:
            ckpt.save_checkpoint(path, state)
            ckpt.link_or_copy(path, self.output_dir / "checkpoint_last.pth")
            ckpt.prune_rolling(self.output_dir, int(self.tcfg.keep_last_ckpts))
            if self.ds_engine is not None:
                ckpt.prune_deepspeed_tags(self.output_dir / "deepspeed", int(self.tcfg.keep_last_ckpts))

        self._write_on_main(write)
        self._last_saved = position

    def _write_on_main(self, write: Callable[[], None]) -> None:
        """Run rank 0's checkpoint writes, then share the outcome with every rank (this is also their barrier).

        A failed write (disk full, permissions) raises the OSError on rank 0 and an OSError quoting it on the other
        ranks, so the whole job stops at the failing save instead of the others waiting in their next collective.
        """
        error: OSError | None = None
        try:
            write()
        except OSError as err:
            error = err
        message = dist.broadcast_object(str(error) if error is not None else None)
        if error is not None:
            raise error
        if message is not None:
            raise OSError(f"rank 0 failed to write a checkpoint: {message}")

    # ------------------------------------------------------------------------------------------ evaluation
    def _eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self) -> dict[str, float]:
        """Every eval split on the EMA (or raw) weights; logs and returns '<split>/<metric>' values."""
        from dataset.datasets import EvalImageError  # here, not at the top: the engine alone stays light to import

        model = self._eval_model()
        was_training = model.training
        model.eval()
        metrics: dict[str, float] = {}
        start = time.perf_counter()
        autocast = self._autocast()
        with torch.no_grad(), autocast:
            for split in self.task.eval_splits():
                try:
                    split_metrics = self.task.evaluate(model, split)
                except EvalImageError as err:  # from a loader worker it arrives through torch's re-raise: one line
                    raise EvalImageError(str(err)) from None
                for key, value in split_metrics.items():
                    metrics[f"{split}/{key}"] = float(value)
                skipped = getattr(self.task, "skipped_eval_images", {}).get(split)
                if skipped is not None:  # samples left out for an unreadable image (data.eval_skip_broken_images)
                    metrics[f"{split}/skipped_images"] = float(skipped)
        model.train(was_training)
        self.last_eval_step = self.step
        self.last_metrics = metrics
        if self.meter is not None:
            self.meter.exclude(time.perf_counter() - start)  # evaluation time is not training throughput
        if metrics:
            self.log.log_record({"epoch": self.epoch, **metrics, "eval_time_s": time.perf_counter() - start}, self.step)
            self.log.info("eval step %d epoch %d: %s", self.step, self.epoch,
                          ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    def _metric_value(self, metrics: dict[str, float]) -> float | None:
        if not self.best_metric_key or not metrics:
            return None
        key = self.best_metric_key
        if key not in metrics:
            splits = self.task.eval_splits()
            key = f"{splits[0]}/{key}" if splits else key
        if key not in metrics:
            raise ValueError(f"best metric {self.best_metric_key!r} is not among the evaluation metrics "
                             f"{sorted(metrics)} (set train.best_metric)")
        return metrics[key]

    def evaluate_and_track(self) -> None:
        """Evaluate, update best checkpoint / early-stopping count, feed a plateau scheduler."""
        metrics = self.evaluate()
        value = self._metric_value(metrics)
        if value is None:
            return
        if self.scheduler is not None and hasattr(self.scheduler, "step_metric"):
            self.scheduler.step_metric(value)
        improved = self.best_value is None or (value > self.best_value if self.best_mode == "max"
                                               else value < self.best_value)
        if improved:
            self.best_value = value
            self.evals_without_improvement = 0
            state = self.state_dict(full=False)
            self._write_on_main(lambda: ckpt.save_checkpoint(self.output_dir / "checkpoint_best.pth", state))
            self.log.info("new best %s = %.6g at step %d", self.best_metric_key, value, self.step)
        else:
            self.evals_without_improvement += 1
            patience = int(self.tcfg.early_stop_patience)
            if patience > 0 and self.evals_without_improvement >= patience:
                self.stop_reason = (f"early stop: {self.best_metric_key} did not improve in {patience} evaluations "
                                    f"(best {self.best_value:.6g})")

    # --------------------------------------------------------------------------------------------- training
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _loss_weight(self, name: str) -> float:
        return float(self.tcfg.loss_weights.get(name, 1.0))

    def _epoch_iterator(self) -> Iterator[Any]:
        self.sampler.set_epoch(self.epoch)
        if self.iter_in_epoch:
            self.sampler.set_start_batch(self.iter_in_epoch, self.loader.batch_size)
        # Creating a DataLoader iterator draws its base seed from torch's global RNG; restoring the state keeps the
        # training RNG stream independent of where iterators were created (so resume == uninterrupted).
        rng = torch.get_rng_state()
        iterator = iter(self.loader)
        torch.set_rng_state(rng)
        return iterator

    def _chunk_ends(self) -> set[int]:
        """Optimizer-step indices (1-based, within an epoch) after which an epoch-cadence evaluation runs."""
        chunks = max(1, int(self.tcfg.epoch_chunks))
        return {math.ceil(self.steps_per_epoch * k / chunks) for k in range(1, chunks + 1)}

    def _counted_micro_step(self, batch: Any, progress: Progress, last: bool, group_size: int
                            ) -> dict[str, torch.Tensor]:
        """`_micro_step`, and on the run's first micro-batch also its FLOPs per sample (for train/mfu): counted on the
        step training does anyway (uncompiled: FlopCounterMode cannot see inside a compiled graph)."""
        if self.meter.flops_per_sample is not None or not self.tcfg.count_flops or self.meter.peak_flops is None:
            return self._micro_step(batch, progress, last, group_size)
        start = time.perf_counter()
        out, flops = throughput.count_flops(
            lambda: self._micro_step(batch, progress, last, group_size, model=self._eager_train_model))
        samples = throughput.batch_size_of(batch, int(self.loader.batch_size))
        self.meter.discount(time.perf_counter() - start, samples)
        self.meter.flops_per_sample = flops / max(samples, 1)
        self.log.info("FLOPs per training sample: %.4g (forward + backward of the first batch, %d samples); MFU "
                      "against %s = %.4g TFLOP/s", self.meter.flops_per_sample, samples, self.peak_source,
                      self.meter.peak_flops / 1e12)
        return out

    def _micro_step(self, batch: Any, progress: Progress, last: bool, group_size: int,
                    model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch; returns its detached named losses and TOTAL (weighted sum)."""
        sync = contextlib.nullcontext()
        if self.ddp is not None and not last:
            sync = self.ddp.no_sync()  # gradients are all-reduced once, on the last micro-batch of the step
        with sync:
            with self._autocast():
                losses = self.task.train_step(model or self.train_model, batch, progress)
            if not isinstance(losses, dict) or not losses or TOTAL in losses:
                raise ValueError(f"{type(self.task).__name__}.train_step must return a non-empty dict of named "
                                 f"scalar losses (not named {TOTAL!r}), got {type(losses).__name__} "
                                 f"{list(losses) if isinstance(losses, dict) else ''}")
            total = None
            for name, loss in losses.items():
                if not torch.is_tensor(loss) or loss.ndim != 0:
                    raise ValueError(f"train_step loss {name!r} must be a scalar tensor, got "
                                     f"{getattr(loss, 'shape', type(loss).__name__)}")
                weighted = loss.float() * self._loss_weight(name)
                total = weighted if total is None else total + weighted
            if self.ds_engine is not None:
                self.ds_engine.backward(total)  # DeepSpeed divides by its gradient_accumulation_steps itself
                if not last:
                    self.ds_engine.step()  # DeepSpeed counts micro-batches: step() after each, it acts on the last
            elif self.scaler is not None:
                self.scaler.scale(total / group_size).backward()
            else:
                (total / group_size).backward()
        out = {name: loss.detach().float() for name, loss in losses.items()}
        out[TOTAL] = total.detach()
        return out

    def _grad_norm(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        clip = float(self.tcfg.clip_grad_norm)
        if clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, clip)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def _finish_step(self, step_losses: dict[str, torch.Tensor], stop_flag: bool) -> tuple[str, bool, torch.Tensor]:
        """Check finiteness, then step or skip. Returns (status, stop requested on any rank, grad norm); status is
        'stepped', 'nonfinite' (skipped, counts toward the limit) or 'overflow' (fp16 loss-scale calibration)."""
        if self.ds_engine is not None:
            return self._finish_step_deepspeed(stop_flag)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._grad_norm().detach().float()
        flags = torch.stack([
            (~torch.isfinite(step_losses[TOTAL])).float(),
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
            return status, bool(stop_any), grad_norm
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return "stepped", bool(stop_any), grad_norm

    def _finish_step_deepspeed(self, stop_flag: bool) -> tuple[str, bool, torch.Tensor]:
        """DeepSpeed's step: it skips a step whose gradient norm is not finite (and fp16 overflows) by itself,
        stepping the scheduler only when the step was applied; the engine reads that decision back."""
        self.ds_engine.step()
        stepped = bool(self.ds_engine.was_step_applied())
        norm = self.ds_engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(0.0 if norm is None else float(norm), device=self.device)
        stop_any = dist.all_reduce_max(torch.tensor(float(stop_flag), device=self.device)).item()
        if stepped and self.ema is not None:
            self.ema.update_parameters(self.model)
        return "stepped" if stepped else "nonfinite", bool(stop_any), grad_norm

    def _handle_skip(self, step_losses: dict[str, torch.Tensor]) -> None:
        self.consecutive_skips += 1
        bad_names = [name for name, v in step_losses.items() if name != TOTAL and not bool(torch.isfinite(v))]
        what = f"non-finite losses {bad_names}" if bad_names else "a non-finite gradient norm"
        self.log.warning("step %d (epoch %d, iter %d): %s, step skipped (%d in a row)", self.step, self.epoch,
                         self.iter_in_epoch, what, self.consecutive_skips)
        limit = int(self.tcfg.nonfinite_max_consecutive)
        if limit > 0 and self.consecutive_skips >= limit:
            self.save_resumable()
            raise RuntimeError(
                f"{self.consecutive_skips} consecutive optimizer steps had non-finite values ({what}) at step "
                f"{self.step}, epoch {self.epoch}: stopping (train.nonfinite_max_consecutive={limit}). The last good "
                f"state is in {self.output_dir / ckpt.rolling_name(self.step)}; lower the lr, enable clipping or "
                "check the data."
            )

    def _flush_log(self, sums: dict[str, torch.Tensor], counts: list[int]) -> None:
        """Reduce accumulated losses (one sync per log interval) and write a record."""
        steps, micro = counts
        if steps == 0:
            return
        names = sorted(sums)
        values = dist.all_reduce_mean(torch.stack([sums[n] for n in names])).tolist()
        record: dict[str, Any] = {"epoch": self.epoch}
        for name, value in zip(names, values, strict=True):
            if name == "grad_norm":
                record["train/grad_norm"] = value / steps
            else:
                record[f"train/{name}"] = value / micro
        record["train/lr"] = self.optimizer.param_groups[0]["lr"]
        speed = self.meter.fields()
        self.meter.reset()
        record.update(speed)
        share = speed["train/data_wait_share"]
        self._windows_logged += 1  # the first window holds the loader workers' start-up: no warning from it
        if (share > float(self.tcfg.data_wait_warn_share) and self._input_bound_warned != self.epoch
                and self._windows_logged > 1):
            self._input_bound_warned = self.epoch
            self.log.warning("input-bound: %.0f%% of the last %d steps was spent waiting for data (%.3g s a step): "
                             "raise data.num_workers (now %s) or check the storage", 100 * share, steps,
                             speed["train/data_wait_s"], getattr(self.loader, "num_workers", "?"))
        self.log.log_record(record, self.step)
        quiet = {"epoch", "train/data_wait_s", "train/compute_s", "train/samples_per_s_per_device",
                 "train/tflops_per_device"}  # in log.jsonl and TensorBoard, left out of the text line
        self.log.info("step %d/%d epoch %d: %s", self.step, self.total_steps, self.epoch,
                      ", ".join(f"{k.removeprefix('train/')}={v:.4g}" for k, v in record.items() if k not in quiet))
        bar = {"loss": record.get(f"train/{TOTAL}", float("nan")), "lr": record["train/lr"],
               "samples/s": record["train/samples_per_s"]}
        if "train/mfu" in record:
            bar["mfu"] = record["train/mfu"]
        self.log.update_bar(0, **bar)
        sums.clear()
        counts[:] = [0, 0]

    def _report_skipped_images(self, epoch: int, mid_epoch: bool = False) -> None:
        """Log how many unreadable images the datasets skipped on all ranks since the last report (each replaced by
        another sample, so batches stayed full): at each epoch's end, and at a stop inside an epoch (max_steps, a
        signal, early stopping; ``mid_epoch``). Logged as train/skipped_images too."""
        local = torch.tensor([float(self.skipped_images)], device=self.device)
        total = int(round(float(dist.all_reduce_mean(local)) * self.world))
        self.skipped_images = 0
        where = f"epoch {epoch}" + (f" (stopped after batch {self.iter_in_epoch})" if mid_epoch else "")
        if total:
            self.log.info("%s: %d unreadable image(s) skipped and replaced by other samples (see the warnings naming "
                          "them)", where, total)
        self.log.log_record({"epoch": epoch if mid_epoch else epoch + 1, "train/skipped_images": total}, self.step)

    def train(self) -> None:
        """The loop over epochs and optimizer steps; see the module docstring for the policies."""
        tcfg = self.tcfg
        epochs = int(tcfg.epochs)
        chunk_ends = self._chunk_ends()
        sums: dict[str, torch.Tensor] = {}
        counts = [0, 0]  # optimizer steps, micro-batches in the log window
        self.meter.reset()
        if tcfg.eval_before_training and self.step == 0 and self.last_eval_step < 0:
            self.evaluate_and_track()
        self.model.train()
        self.log.start_bar(self.total_steps, self.step)
        while self.epoch < epochs and self.step < self.total_steps and self.stop_reason is None:
            iterator = self._epoch_iterator()
            done = self.iter_in_epoch
            while done < self.iters_per_epoch:
                group = min(self.accum, self.iters_per_epoch - done)
                step_losses: dict[str, torch.Tensor] = {}
                for m in range(group):
                    try:
                        wait_start = time.perf_counter()
                        batch = next(iterator)
                        self.meter.record_data_wait(time.perf_counter() - wait_start,
                                                    throughput.batch_size_of(batch, int(self.loader.batch_size)))
                    except StopIteration:
                        raise RuntimeError(f"the training loader stopped after {done + m} batches but its len() is "
                                           f"{self.iters_per_epoch}") from None
                    except Exception:
                        if self.stop_signal.requested is None:
                            raise
                        # Data workers can die from the same preemption signal: keep the last finished step.
                        self.optimizer.zero_grad(set_to_none=True)
                        self.stop_reason = f"{self.stop_signal.requested} (data loader stopped)"
                        break
                    if isinstance(batch, dict):  # datasets count the unreadable images they replaced (an int)
                        self.skipped_images += int(batch.get("num_skipped", 0))
                    progress = Progress(self.epoch, done + m, self.iters_per_epoch, self.step, self.total_steps)
                    for name, value in self._counted_micro_step(batch, progress, m == group - 1, group).items():
                        step_losses[name] = step_losses[name] + value if name in step_losses else value
                if self.stop_reason is not None:
                    break
                done += group
                self.iter_in_epoch = done
                status, stop_any, grad_norm = self._finish_step(step_losses, self.stop_signal.requested is not None)
                stepped = status == "stepped"
                if stepped:
                    self.step += 1
                    self.consecutive_skips = 0
                    for name, value in step_losses.items():
                        sums[name] = sums[name] + value if name in sums else value
                    sums["grad_norm"] = sums["grad_norm"] + grad_norm if "grad_norm" in sums else grad_norm
                    counts[0] += 1
                    counts[1] += group
                    self.meter.steps += 1
                    self.log.update_bar(1)
                elif status == "overflow":
                    self.log.info("step %d: fp16 gradient overflow, step skipped and loss scale lowered", self.step)
                else:
                    self._handle_skip(step_losses)
                if stepped and self.step % max(1, int(tcfg.log_every_steps)) == 0:
                    self._flush_log(sums, counts)

                group_index = math.ceil(done / self.accum)
                finished_epoch = self.epoch
                if done == self.iters_per_epoch:
                    self._report_skipped_images(finished_epoch)
                    self.task.on_epoch_end(finished_epoch)
                    self.epoch += 1
                    self.iter_in_epoch = 0
                    self._unfreeze_event("epochs")
                epoch_eval = (tcfg.eval_every_epochs > 0 and (finished_epoch + 1) % tcfg.eval_every_epochs == 0
                              and group_index in chunk_ends)
                step_eval = stepped and tcfg.eval_every_steps > 0 and self.step % tcfg.eval_every_steps == 0
                if (epoch_eval or step_eval) and self.step != self.last_eval_step and self.task.eval_splits():
                    self.evaluate_and_track()
                    self.model.train()
                    self._unfreeze_event("evals")
                if stop_any:
                    self.stop_reason = f"signal {self.stop_signal.requested or 'on another rank'}"
                if self.step >= self.total_steps and self.stop_reason is None:
                    self.stop_reason = f"reached {self.total_steps} optimizer steps"
                if self.iter_in_epoch == 0 or self.stop_reason is not None or (
                    stepped and tcfg.ckpt_every_steps > 0 and self.step % tcfg.ckpt_every_steps == 0
                ):
                    self.save_resumable()
                if self.stop_reason is not None:
                    break
            assert self.stop_reason is not None or self.iter_in_epoch == 0, "epoch left mid-way without a reason"
        self._flush_log(sums, counts)
        if self.iter_in_epoch:  # stopped inside an epoch: its skipped images so far
            self._report_skipped_images(self.epoch, mid_epoch=True)
        self.log.close_bar()
        interrupted = self.stop_signal.requested is not None
        if not interrupted and self.step != self.last_eval_step and self.task.eval_splits():
            self.evaluate_and_track()  # the final weights are always evaluated once
        self.save_resumable()
        self.log.info("training finished at step %d, epoch %d%s", self.step, self.epoch,
                      f" ({self.stop_reason})" if self.stop_reason else "")

    def fit(self) -> dict[str, float]:
        """Train (or only evaluate with --evaluate) and return the last metrics."""
        self.task.check_data()
        resume = self._resume_state()
        if resume is None and self.args.checkpoint:
            self.task.load_pretrained(self.model, self.args.checkpoint, evaluate=bool(self.args.evaluate),
                                      allow_partial=bool(getattr(self.args, "allow_partial_checkpoint", False)))
        if self.args.evaluate:
            self.log.info("%s", self.banner(training=False))
            if self.tcfg.ema_decay > 0 and resume is not None and resume[1].get("ema") is not None:
                self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(self.tcfg.ema_decay),
                                         use_buffers=True)
                self.ema.load_state_dict(resume[1]["ema"])
            if resume is not None:
                self.model.load_state_dict(resume[1]["model"])
            return self.evaluate()
        ckpt.remove_temp_files(self.output_dir)  # leftovers of a save killed mid-write (training owns output_dir)
        self._setup_training(resume)
        self.log.info("%s", self.banner(training=True))
        self.stop_signal.install()
        peer_failed = False
        try:
            self.train()
        except Exception as err:
            if not dist.is_peer_failure(err):
                raise
            peer_failed = True
            raise self._peer_failure(err) from err
        finally:
            self.stop_signal.restore(ignore_term=peer_failed or self.stop_signal.requested is not None)
        return dict(self.last_metrics)

    def _peer_failure(self, err: BaseException) -> dist.PeerFailure:
        """The error a surviving rank exits with when a collective failed (a rank died, hung or was cut off)."""
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        message = (
            f"rank {self.rank} of {self.world}: a collective operation failed at step {self.step} (epoch {self.epoch},"
            f" iter {self.iter_in_epoch}): another rank has most likely died, hung or lost its connection "
            f"(collectives wait at most train.dist_timeout_s={float(self.tcfg.dist_timeout_s):g} s). The other "
            f"ranks' logs hold the root cause; resumable checkpoints are in {self.output_dir}: restart the job with "
            f"--resume auto. Cause: {cause}"
        )
        self.log.warning("%s", message)
        return dist.PeerFailure(message)

    def close(self) -> None:
        if hasattr(self, "loader"):
            from dataset.loader import shutdown_workers  # here, not at the top: the engine runs without OpenCV too

            shutdown_workers(self.loader)  # persistent workers would otherwise live on until interpreter exit
        self.log.close()
        dist.destroy()


def build_trainer(task_cls: type[Task], argv: Sequence[str] | None = None) -> Trainer:
    """Parse the run-level flags, build the config from the task's schema and set up the run (not started)."""
    parser = build_arg_parser(f"{task_cls.name}: AlignFuse task")
    args = parser.parse_args(argv)
    overrides = list(args.opts)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    schema = build_schema(task_cls.config_defaults)
    cfg = load_config(args.config, overrides, schema, task_cls.open_config_keys)
    return Trainer(task_cls, cfg, args)


def run(task_cls: type[Task], argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train (or evaluate with --evaluate) `task_cls` as the flags in `argv` say; returns the final metrics.

    After a SIGTERM/SIGINT the run writes a resumable checkpoint, cleans up and exits with status 0.
    """
    trainer = build_trainer(task_cls, argv)
    try:
        metrics = trainer.fit()
        signalled = trainer.stop_signal.requested
        if signalled:
            trainer.log.info("stopped by %s: resumable checkpoint written to %s; continue with --resume auto",
                             signalled, trainer.output_dir)
    finally:
        trainer.close()
    if signalled:
        report_clean_stop(trainer.step)  # lets engine.launch exit 0 although torchrun raises on the signal
        sys.exit(0)
    return metrics


def main_for(task_cls: type[Task]) -> Any:
    """`main = engine.main_for(XTask)` - a main(argv=None) for an entry script.

    main() reads the command line and ends a user mistake (engine.errors) with one message and exit status 2
    (--debug: the traceback); main([...]) from Python lets every error propagate."""

    def main(argv: Sequence[str] | None = None) -> dict[str, float]:
        if argv is not None:
            return run(task_cls, argv)
        with errors.exit_on_user_error():
            return run(task_cls, None)

    return main


