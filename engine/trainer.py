"""The one training loop: every entry script is a Task plus `main = engine.main_for(XTask)`.

What the engine owns, so that tasks only return named losses and metrics:
- run-level flags and config schema (engine.cli, engine.config); process group, seeding (seed + rank), output
  folder checks, resolved config saved to output_dir/config.yaml;
- AMP autocast, gradient accumulation, clipping, optimizer and scheduler steps (the scheduler once per optimizer step)
  through a backend (engine.backend: torch's DDP + GradScaler + torch.compile, or DeepSpeed), EMA weights;
- evaluation cadence (every N epochs, N chunks per epoch, every N steps), best / last / rolling checkpoints,
  early stopping, resume (exact, including RNG and the position inside the epoch: engine.state.RunState),
  SIGTERM/SIGINT checkpointing, throughput and MFU in the logs (engine.throughput);
- failures of the job around the task: a collective that fails because another rank died or hung (bounded by
  train.dist_timeout_s) is re-raised as dist.PeerFailure naming the step and the way back (--resume auto); a
  checkpoint write that fails (disk full) raises OSError on every rank at that save, the earlier files untouched.

Non-finite policy: a step whose summed loss or gradient norm is not finite is skipped (how each backend decides:
engine.backend) - gradients dropped, no optimizer, scheduler or EMA update, global step not advanced - with a warning
naming the step and the non-finite losses; an fp16 overflow of the GradScaler is logged and not counted. After
`train.nonfinite_max_consecutive` consecutive skipped steps the run writes a resumable checkpoint of the last good
state (the weights the skipped steps did not touch) and raises RuntimeError.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from engine import backend as backends
from engine import checkpoint as ckpt
from engine import dist, throughput
from engine.batches import TrainBatches
from engine.config import Config, save_config
from engine.logger import LossWindow, RunLogger
from engine.runtime import StopSignal, autocast, check_writable, resolve_amp, seed_everything
from engine.state import RunCheckpoints, RunState
from engine.task import Progress, Task, check_train_loader, evaluate_splits, weighted_loss_sum

TOTAL = "total_loss"  # the engine's name for the weighted sum of a step's named losses (logged as train/total_loss)


class Trainer:
    """Holds one run; `fit()` trains (or evaluates with --evaluate) and returns the final metrics."""

    # The run state and the backend's pieces under the names callers use (optimizer and scheduler are DeepSpeed's
    # wrappers under DeepSpeed).
    epoch = property(lambda self: self.state.epoch)
    step = property(lambda self: self.state.step)
    last_metrics = property(lambda self: self.state.last_metrics)
    optimizer = property(lambda self: self.backend.optimizer if self.backend else None)
    scheduler = property(lambda self: self.backend.scheduler if self.backend else None)
    scaler = property(lambda self: self.backend.scaler if self.backend else None)

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
        cfg, tcfg = self.cfg, self.tcfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.output_dir = Path(self.args.output_dir or Path("output") / task_cls.name)
        check_writable(self.output_dir)
        self.log = RunLogger(self.output_dir, dist.is_main(), self.rank)
        if dist.is_main():
            save_config(cfg, self.output_dir)
        seed_everything(int(cfg.seed) + self.rank)
        self.amp_dtype = resolve_amp(tcfg.amp, self.device)
        self.task = task_cls(cfg, self.device)
        self.task.output_dir = self.output_dir
        self.best_metric_key = tcfg.best_metric or task_cls.best_metric
        self.best_mode = tcfg.best_mode or task_cls.best_mode
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"train.best_mode must be max or min, got {self.best_mode!r}")
        if tcfg.early_stop_patience > 0 and not self.best_metric_key:
            raise ValueError("train.early_stop_patience > 0 needs a best metric (train.best_metric or the task's)")
        self.accum = int(tcfg.grad_accum_steps)
        if self.accum < 1:
            raise ValueError(f"train.grad_accum_steps must be >= 1, got {self.accum}")
        backends.check_config(cfg)

        self.state = RunState()  # saved in checkpoints
        self.consecutive_skips = 0  # optimizer steps skipped in a row (non-finite policy)
        self.stop_reason: str | None = None
        self.model = self.task.build_model().to(self.device)
        self.backend: backends.Backend | None = None  # set up with the optimizer (training only)
        self.checkpoints: RunCheckpoints | None = None  # (training only)
        self.ema: AveragedModel | None = None
        self.unfreeze: Any = None  # optim.UnfreezeSchedule when optimizer.unfreeze is on (set up with the optimizer)
        self.meter: throughput.StepMeter | None = None  # training throughput (set up with the loader)
        self.window = LossWindow()  # the losses since the last training record

    # ----------------------------------------------------------------------------------------------- setup
    def _new_ema(self) -> AveragedModel:
        return AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(self.tcfg.ema_decay), use_buffers=True)

    def _setup_training(self, resume: tuple[Path, dict[str, Any]] | None) -> None:
        import optim
        import scheduler as scheduler_mod

        self.loader = self.task.build_train_loader()
        check_train_loader(self.task, self.loader)
        self.sampler = self.loader.sampler
        self.sampler.set_epoch(0)
        self.iters_per_epoch = len(self.loader)
        if self.iters_per_epoch == 0:
            raise ValueError("the training loader is empty on this rank (is the dataset smaller than batch_size x "
                             "world_size?)")
        self.steps_per_epoch = math.ceil(self.iters_per_epoch / self.accum)
        epochs, max_steps = int(self.tcfg.epochs), int(self.tcfg.max_steps)
        self.total_steps = self.steps_per_epoch * epochs
        if max_steps > 0:
            self.total_steps = min(self.total_steps, max_steps)
        chunks = max(1, int(self.tcfg.epoch_chunks))  # epoch-cadence evaluations after these steps of an epoch
        self.chunk_ends = {math.ceil(self.steps_per_epoch * k / chunks) for k in range(1, chunks + 1)}

        # Progressive unfreezing: the optimizer's groups hold every parameter the schedule will train; those not
        # unfrozen yet get no gradient, which the optimizer skips (groups, lrs and optimizer state keep their layout).
        self.unfreeze = optim.build_unfreeze_schedule(self.cfg.optimizer, self.model)
        optimizer = optim.create_optimizer(self.cfg.optimizer, self.model, unfreeze=self.unfreeze)
        scheduler = scheduler_mod.create_scheduler(self.cfg.scheduler, optimizer, steps_per_epoch=self.steps_per_epoch,
                                                   epochs=epochs, max_steps=max_steps)
        self.backend = backends.build_backend(
            self.cfg, self.model, optimizer, scheduler, device=self.device, amp_dtype=self.amp_dtype,
            world_size=self.world, micro_batch_size=int(self.loader.batch_size), iters_per_epoch=self.iters_per_epoch,
            unfreezing=self.unfreeze is not None)
        if self.tcfg.ema_decay > 0:
            if not 0.0 < self.tcfg.ema_decay < 1.0:
                raise ValueError(f"train.ema_decay must be in (0, 1) or 0 (off), got {self.tcfg.ema_decay}")
            self.ema = self._new_ema()
        self.checkpoints = RunCheckpoints(self.output_dir, self.cfg, self.model, self.backend, self.ema, self.unfreeze)
        if resume is not None:
            self.state = self.checkpoints.load(*resume)
        if self.unfreeze is not None:
            self.unfreeze.apply(self.model)  # the stage reached before a resume (stage 0 on a fresh run)
            self.log.info("%s", self.unfreeze.describe(self.model, self.optimizer))
        self.backend.prepare()
        peak, self.peak_source = (throughput.device_peak_flops(self.device, self.amp_dtype)
                                  if self.tcfg.count_flops else (None, "not measured (train.count_flops: false)"))
        self.meter = throughput.StepMeter(self.world, peak)
        self.batches = TrainBatches(self.loader, self.meter, self.stop_signal, self.device)

    def _unfreeze_event(self, unit: str) -> None:
        """An epoch ended or an evaluation ran ("epochs" / "evals"): the unfreezing schedule may start its next stage,
        whose parameters then train from the next optimizer step on (every rank reaches this point together)."""
        if self.unfreeze is None or not self.unfreeze.record(unit):
            return
        self.unfreeze.apply(self.model)
        self.backend.rewrap()
        self.log.info("%s", self.unfreeze.describe(self.model, self.optimizer))

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
            extras = self.backend.features() + (["EMA"] if self.ema is not None else [])
            extras_text = "; " + ", ".join(extras) if extras else ""
            lines += [
                f"data: {len(self.loader.dataset)} training samples, {self.loader.num_workers} loader worker(s) per "
                f"rank; eval splits {self.task.eval_splits()}",
                f"batch: {batch} per rank x {self.world} ranks x {self.accum} accumulation = "
                f"{batch * self.world * self.accum} per optimizer step; {self.steps_per_epoch} steps per epoch, "
                f"{self.total_steps} in this run (from step {self.state.step}){extras_text}",
                f"MFU peak: {self.peak_source}",
            ]
        lines += [f"config {self.args.config or '(defaults only)'}, output {self.output_dir.resolve()}"]
        return "\n  ".join(lines)

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Every eval split on the EMA (or raw) weights; logs and returns '<split>/<metric>' values."""
        model = self.ema.module if self.ema is not None else self.model
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        with torch.no_grad(), autocast(self.device, self.amp_dtype):
            metrics = evaluate_splits(self.task, model)
        model.train(was_training)
        self.state.last_eval_step = self.state.step
        self.state.last_metrics = metrics
        if self.meter is not None:
            self.meter.exclude(time.perf_counter() - start)  # evaluation time is not training throughput
        if metrics:
            self.log.log_record({"epoch": self.state.epoch, **metrics, "eval_time_s": time.perf_counter() - start},
                                self.state.step)
            self.log.info("eval step %d epoch %d: %s", self.state.step, self.state.epoch,
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
        value = self._metric_value(self.evaluate())
        if value is None:
            return
        if self.scheduler is not None and hasattr(self.scheduler, "step_metric"):
            self.scheduler.step_metric(value)
        patience = int(self.tcfg.early_stop_patience)
        if self.state.record_eval(value, self.best_mode):
            self.checkpoints.save_best(self.state)
            self.log.info("new best %s = %.6g at step %d", self.best_metric_key, value, self.state.step)
        elif 0 < patience <= self.state.evals_without_improvement:
            self.stop_reason = (f"early stop: {self.best_metric_key} did not improve in {patience} evaluations "
                                f"(best {self.state.best_value:.6g})")

    # --------------------------------------------------------------------------------------------- training
    def train(self) -> None:
        """Epochs of optimizer steps until the last step, a stop signal or early stopping; then the final evaluation
        and checkpoint. See the module docstring for the policies."""
        self.meter.reset()
        if self.tcfg.eval_before_training and self.state.step == 0 and self.state.last_eval_step < 0:
            self.evaluate_and_track()
        self.model.train()
        self.log.start_bar(self.total_steps, self.state.step)
        while (self.stop_reason is None and self.state.epoch < int(self.tcfg.epochs)
               and self.state.step < self.total_steps):
            self._train_epoch()
        self._finish_training()

    def _train_epoch(self) -> None:
        """Optimizer steps from the current position to the end of the epoch, or to a stop."""
        self.batches.start_epoch(self.state.epoch, self.state.iter_in_epoch)
        while self.stop_reason is None:
            done = self.state.iter_in_epoch
            group = min(self.accum, self.iters_per_epoch - done)  # micro-batches in this step (fewer at the end)
            losses = self._forward_backward(group)
            if losses is None:  # the loader failed under a stop signal: keep the last finished step
                return
            self.state.iter_in_epoch = done + group
            stepped, stop_any = self._optimizer_step(losses, group)
            epoch_ended = self.state.iter_in_epoch == self.iters_per_epoch
            self._after_step(stepped, stop_any, epoch_ended, group_index=math.ceil((done + group) / self.accum))
            if epoch_ended:
                return

    def _forward_backward(self, group: int) -> dict[str, torch.Tensor] | None:
        """Forward and backward of the `group` micro-batches of one optimizer step; their detached losses summed.
        None when the loader failed after a stop signal (data workers can die from the same preemption signal)."""
        step_losses: dict[str, torch.Tensor] = {}
        for m in range(group):
            index = self.state.iter_in_epoch + m
            batch = self.batches.next(index)
            if batch is None:
                self.optimizer.zero_grad(set_to_none=True)
                self.stop_reason = f"{self.stop_signal.requested} (data loader stopped)"
                return None
            progress = Progress(self.state.epoch, index, self.iters_per_epoch, self.state.step, self.total_steps)
            for name, value in self._counted_micro_step(batch, progress, m == group - 1, group).items():
                step_losses[name] = step_losses[name] + value if name in step_losses else value
        return step_losses

    def _counted_micro_step(self, batch: Any, progress: Progress, last: bool, group_size: int
                            ) -> dict[str, torch.Tensor]:
        """`_micro_step`, and on the run's first micro-batch also its FLOPs per sample (for train/mfu): counted on the
        step training does anyway (uncompiled: FlopCounterMode cannot see inside a compiled graph)."""
        if self.meter.flops_per_sample is not None or not self.tcfg.count_flops or self.meter.peak_flops is None:
            return self._micro_step(batch, progress, last, group_size)
        start = time.perf_counter()
        out, flops = throughput.count_flops(
            lambda: self._micro_step(batch, progress, last, group_size, model=self.backend.eager_model))
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
        with self.backend.micro_batch(last):
            with autocast(self.device, self.amp_dtype):
                losses = self.task.train_step(model or self.backend.train_model, batch, progress)
            total = weighted_loss_sum(self.task, losses, self.tcfg.loss_weights, TOTAL)
            self.backend.backward(total, last, group_size)
        out = {name: loss.detach().float() for name, loss in losses.items()}
        out[TOTAL] = total.detach()
        return out

    def _optimizer_step(self, losses: dict[str, torch.Tensor], group: int) -> tuple[bool, bool]:
        """Finish the step through the backend, then count it or apply the non-finite policy. Returns (stepped, stop
        requested on any rank)."""
        result = self.backend.step(losses[TOTAL], stop_flag=self.stop_signal.requested is not None)
        if result.status == "stepped":
            self.state.step += 1
            self.consecutive_skips = 0
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.window.add(losses, result.grad_norm, group)
            self.meter.steps += 1
            self.log.update_bar(1)
            if self.state.step % max(1, int(self.tcfg.log_every_steps)) == 0:
                self._flush_log()
        elif result.status == "overflow":
            self.log.info("step %d: fp16 gradient overflow, step skipped and loss scale lowered", self.state.step)
        else:
            self._handle_skip(losses)
        return result.status == "stepped", result.stop_any

    def _handle_skip(self, step_losses: dict[str, torch.Tensor]) -> None:
        self.consecutive_skips += 1
        bad_names = [name for name, v in step_losses.items() if name != TOTAL and not bool(torch.isfinite(v))]
        what = f"non-finite losses {bad_names}" if bad_names else "a non-finite gradient norm"
        self.log.warning("step %d (epoch %d, iter %d): %s, step skipped (%d in a row)", self.state.step,
                         self.state.epoch, self.state.iter_in_epoch, what, self.consecutive_skips)
        limit = int(self.tcfg.nonfinite_max_consecutive)
        if limit > 0 and self.consecutive_skips >= limit:
            self.checkpoints.save_resumable(self.state)
            raise RuntimeError(
                f"{self.consecutive_skips} consecutive optimizer steps had non-finite values ({what}) at step "
                f"{self.state.step}, epoch {self.state.epoch}: stopping (train.nonfinite_max_consecutive={limit}). The "
                f"last good state is in {self.output_dir / ckpt.rolling_name(self.state.step)}; lower the lr, enable "
                "clipping or check the data."
            )

    def _after_step(self, stepped: bool, stop_any: bool, epoch_ended: bool, group_index: int) -> None:
        """What follows an optimizer step (taken or skipped): the epoch's end, an evaluation when one is due, the
        reasons to stop, a checkpoint when one is due. `group_index`: the step's 1-based index within its epoch."""
        finished_epoch = self.state.epoch
        if epoch_ended:
            self.log.log_record(self.batches.report_skipped(finished_epoch), self.state.step)
            self.task.on_epoch_end(finished_epoch)
            self.state.epoch += 1
            self.state.iter_in_epoch = 0
            self._unfreeze_event("epochs")
        if self._eval_due(stepped, finished_epoch, group_index):
            self.evaluate_and_track()
            self.model.train()
            self._unfreeze_event("evals")
        if stop_any:
            self.stop_reason = f"signal {self.stop_signal.requested or 'on another rank'}"
        if self.state.step >= self.total_steps and self.stop_reason is None:
            self.stop_reason = f"reached {self.total_steps} optimizer steps"
        every = int(self.tcfg.ckpt_every_steps)
        if (self.state.iter_in_epoch == 0 or self.stop_reason is not None
                or (stepped and every > 0 and self.state.step % every == 0)):
            self.checkpoints.save_resumable(self.state)

    def _eval_due(self, stepped: bool, epoch: int, group_index: int) -> bool:
        """train.eval_every_epochs (at the chunk ends of train.epoch_chunks) or train.eval_every_steps, at most once
        per step, and only for a task with eval splits."""
        tcfg = self.tcfg
        epoch_eval = (tcfg.eval_every_epochs > 0 and (epoch + 1) % tcfg.eval_every_epochs == 0
                      and group_index in self.chunk_ends)
        step_eval = stepped and tcfg.eval_every_steps > 0 and self.state.step % tcfg.eval_every_steps == 0
        return (epoch_eval or step_eval) and self.state.step != self.state.last_eval_step and bool(
            self.task.eval_splits())

    def _finish_training(self) -> None:
        self._flush_log()
        if self.state.iter_in_epoch:  # stopped inside an epoch: its skipped images so far
            self.log.log_record(self.batches.report_skipped(self.state.epoch, self.state.iter_in_epoch),
                                self.state.step)
        self.log.close_bar()
        interrupted = self.stop_signal.requested is not None
        if not interrupted and self.state.step != self.state.last_eval_step and self.task.eval_splits():
            self.evaluate_and_track()  # the final weights are always evaluated once
        self.checkpoints.save_resumable(self.state)
        self.log.info("training finished at step %d, epoch %d%s", self.state.step, self.state.epoch,
                      f" ({self.stop_reason})" if self.stop_reason else "")

    def _flush_log(self) -> None:
        """Reduce the window's losses (one sync per log interval) and write a training record with its throughput."""
        steps = self.window.steps
        if steps == 0:
            return
        record = {"epoch": self.state.epoch, **self.window.reduce(), "train/lr": self.optimizer.param_groups[0]["lr"]}
        speed = self.meter.fields()
        self.meter.reset()
        record.update(speed)
        if self.meter.input_bound(speed, float(self.tcfg.data_wait_warn_share), self.state.epoch):
            self.log.warning("input-bound: %.0f%% of the last %d steps was spent waiting for data (%.3g s a step): "
                             "raise data.num_workers (now %s) or check the storage",
                             100 * speed["train/data_wait_share"], steps, speed["train/data_wait_s"],
                             getattr(self.loader, "num_workers", "?"))
        self.log.train_record(record, self.state.step, self.total_steps, TOTAL)

    # ------------------------------------------------------------------------------------------------- run
    def fit(self) -> dict[str, float]:
        """Train (or only evaluate with --evaluate) and return the last metrics."""
        self.task.check_data()
        resume = ckpt.resume_source(self.args.resume, self.output_dir)
        if resume is None and self.args.checkpoint:
            self.task.load_pretrained(self.model, self.args.checkpoint, evaluate=bool(self.args.evaluate),
                                      allow_partial=bool(getattr(self.args, "allow_partial_checkpoint", False)))
        if self.args.evaluate:
            self.log.info("%s", self.banner(training=False))
            if self.tcfg.ema_decay > 0 and resume is not None and resume[1].get("ema") is not None:
                self.ema = self._new_ema()
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
            where = f"step {self.state.step} (epoch {self.state.epoch}, iter {self.state.iter_in_epoch})"
            failure = dist.peer_failure(err, where, float(self.tcfg.dist_timeout_s), self.output_dir)
            self.log.warning("%s", failure)
            raise failure from err
        finally:
            self.stop_signal.restore(ignore_term=peer_failed or self.stop_signal.requested is not None)
        return dict(self.state.last_metrics)

    def close(self) -> None:
        if hasattr(self, "loader"):
            from dataset.loader import shutdown_workers  # here, not at the top: the engine runs without OpenCV too

            shutdown_workers(self.loader)  # persistent workers would otherwise live on until interpreter exit
        self.log.close()
        dist.destroy()
