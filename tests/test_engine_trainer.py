"""The engine's training loop on the toy task, in process: resume, accumulation, EMA, cadence, policies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import engine
from engine import checkpoint as ckpt
from tests.toy_task import ToyTask

BASE_OPTS = ["optimizer.lr=0.05", "optimizer.weight_decay=0.0", "scheduler.name=constant", "train.log_every_steps=2",
             "train.epochs=1"]


def toy_run(out: Path, *opts: str, flags: tuple[str, ...] = ()) -> engine.Trainer:
    """One in-process run of the toy task; returns the finished trainer."""
    trainer = engine.build_trainer(ToyTask, ["--output_dir", str(out), "--device", "cpu", *flags,
                                             "--opts", *BASE_OPTS, *opts])
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def weights(trainer: engine.Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), (x - y).abs().max()


def eval_steps(out: Path) -> list[int]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "val/loss" in r]


def test_resume_after_one_epoch_equals_two_epochs(tmp_path):
    opts = ("toy.noise_std=0.1", "train.ema_decay=0.9")  # RNG in train_step and EMA state must both resume
    straight = toy_run(tmp_path / "a", "train.epochs=2", *opts)
    toy_run(tmp_path / "b", "train.epochs=1", *opts)
    resumed = toy_run(tmp_path / "b", "train.epochs=2", *opts, flags=("--resume", "auto"))
    assert straight.step == resumed.step == 16
    assert_same(weights(straight), weights(resumed))
    assert_same(list(straight.ema.parameters()), list(resumed.ema.parameters()))
    assert straight.last_metrics == resumed.last_metrics


def test_resume_mid_epoch_equals_uninterrupted(tmp_path):
    opts = ("train.epochs=2", "toy.noise_std=0.1", "scheduler.name=cosine", "scheduler.warmup_steps=2",
            "train.ckpt_every_steps=3", "train.keep_last_ckpts=20")
    straight = toy_run(tmp_path / "a", *opts)
    mid = tmp_path / "a" / ckpt.rolling_name(3)
    state = ckpt.load_checkpoint_file(mid)
    assert (state["epoch"], state["step"], state["iter_in_epoch"]) == (0, 3, 3)
    resumed = toy_run(tmp_path / "b", *opts, flags=("--resume", str(mid)))
    assert_same(weights(straight), weights(resumed))
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]


def test_corrupt_newest_checkpoint_is_skipped_by_resume_auto(tmp_path):
    opts = ("train.ckpt_every_steps=2", "train.keep_last_ckpts=3", "toy.noise_std=0.1")
    straight = toy_run(tmp_path / "a", *opts)
    out = tmp_path / "a"
    newest = out / ckpt.rolling_name(8)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a crash mid-copy
    resumed = toy_run(out, *opts, flags=("--resume", "auto"))
    log_text = (out / "log.txt").read_text()
    assert "skipping" in log_text and newest.name in log_text
    assert resumed.task.calls == 2 * 1  # steps 7 and 8 re-run with batch 4, one micro-batch each
    assert_same(weights(straight), weights(resumed))


def test_grad_accumulation_equals_larger_batch(tmp_path):
    full = toy_run(tmp_path / "a", "toy.batch_size=8")
    accum = toy_run(tmp_path / "b", "toy.batch_size=4", "train.grad_accum_steps=2")
    assert full.step == accum.step == 4
    for x, y in zip(weights(full), weights(accum), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert not torch.equal(weights(full)[0], torch.nn.Linear(4, 8).weight)  # it trained


def test_nonfinite_step_is_skipped_and_scheduler_steps_once_per_step(tmp_path):
    trainer = toy_run(tmp_path, "toy.nan_at_calls=[3]", "scheduler.name=cosine", "train.grad_accum_steps=2",
                      "toy.batch_size=2")
    # 16 micro-batches = 8 step attempts; the NaN one (calls 3-4, step 1) is skipped.
    assert trainer.step == 7 and trainer.scheduler.last_epoch == 7  # last_epoch counts scheduler.step() calls
    lr = trainer.optimizer.param_groups[0]["lr"]
    assert lr == pytest.approx(0.05 * trainer.scheduler.lr_lambdas[0](7))
    log_text = (tmp_path / "log.txt").read_text()
    assert "step 1 " in log_text and "['mse']" in log_text and "skipped" in log_text
    assert all(torch.isfinite(w).all() for w in weights(trainer))
    seen = trainer.task.seen
    assert [step for step, _ in seen[:8]] == [0, 0, 1, 1, 1, 1, 2, 2]  # the skipped step did not count
    assert_same(seen[2][1], seen[4][1])  # ... nor change the weights
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(r.get("train/mse", 0.0) == r.get("train/mse", 0.0) for r in records)  # no NaN reached the logs


def test_nonfinite_stops_after_consecutive_skips(tmp_path):
    with pytest.raises(RuntimeError, match="3 consecutive optimizer steps had non-finite") as err:
        toy_run(tmp_path, "toy.nan_at_calls=[5, 6, 7]", "train.nonfinite_max_consecutive=3")
    assert "mse" in str(err.value)
    state = ckpt.load_checkpoint_file(tmp_path / ckpt.rolling_name(4))
    assert state["step"] == 4 and state["iter_in_epoch"] == 7
    good = ToyTask(engine.load_config(None, [], engine.build_schema(ToyTask.config_defaults)), torch.device("cpu"))
    model = good.build_model()
    model.load_state_dict(state["model"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ema_follows_formula_and_is_evaluated(tmp_path):
    decay = 0.75
    trainer = toy_run(tmp_path, f"train.ema_decay={decay}")
    traj = trainer.task.trajectory  # global step k -> weights after k optimizer steps
    final = weights(trainer)
    expected = [w.clone() for w in traj[1]]  # the first update copies the weights
    for k in range(2, trainer.step + 1):
        current = traj[k] if k in traj else final
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, current, strict=True)]
    for e, got in zip(expected, trainer.ema.module.parameters(), strict=True):
        torch.testing.assert_close(got, e, rtol=1e-6, atol=1e-7)
    loss = torch.nn.functional.mse_loss(trainer.ema.module(trainer.task.val_x), trainer.task.val_y).item()
    assert trainer.last_metrics["val/loss"] == pytest.approx(loss)
    state = ckpt.load_checkpoint_file(tmp_path / "checkpoint_last.pth")
    assert torch.equal(state["ema"]["module.0.weight"], trainer.ema.module[0].weight)


def test_early_stopping_after_patience(tmp_path):
    trainer = toy_run(tmp_path, "toy.constant_metric=true", "train.epochs=10", "train.early_stop_patience=2")
    assert trainer.task.evaluations == 3  # first evaluation sets the best, two more without improvement
    assert trainer.epoch == 3 and trainer.stop_reason.startswith("early stop")
    assert eval_steps(tmp_path) == [8, 16, 24]


def test_eval_cadence_and_best_checkpoint(tmp_path):
    trainer = toy_run(tmp_path, "train.epochs=2", "train.epoch_chunks=2", "train.eval_every_steps=3",
                      "train.eval_before_training=true")
    assert eval_steps(tmp_path) == [0, 3, 4, 6, 8, 9, 12, 15, 16]
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["val/loss"] for r in records if "val/loss" in r]
    best = ckpt.load_checkpoint_file(tmp_path / "checkpoint_best.pth")
    assert best["best_metric_value"] == pytest.approx(min(losses))
    assert trainer.task.epochs_ended == [0, 1]
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "tensorboard").is_dir()
    assert any("train/total_loss" in r for r in records)


def test_evaluate_only_and_pretrained_checkpoint(tmp_path):
    trained = toy_run(tmp_path / "a")
    metrics = engine.run(ToyTask, ["--output_dir", str(tmp_path / "b"), "--device", "cpu", "--evaluate",
                                   "--resume", str(tmp_path / "a" / "checkpoint_last.pth")])
    assert metrics == trained.last_metrics
    metrics = engine.run(ToyTask, ["--output_dir", str(tmp_path / "c"), "--device", "cpu", "--evaluate",
                                   "--checkpoint", str(tmp_path / "a" / "checkpoint_best.pth")])
    assert metrics == trained.last_metrics


def test_unwritable_output_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="output_dir .*a_file/out cannot be created or written"):
        engine.build_trainer(ToyTask, ["--output_dir", str(blocker / "out"), "--device", "cpu"])


def test_zero_stage_3_is_refused_before_deepspeed_starts(tmp_path):
    # It used to reach deepspeed.initialize and fail inside the momentum update, on a partitioned (empty) weight.
    with pytest.raises(ValueError, match="deepspeed.zero_stage must be 0, 1 or 2, got 3"):
        engine.build_trainer(ToyTask, ["--output_dir", str(tmp_path / "out"), "--device", "cpu",
                                       "--opts", *BASE_OPTS, "deepspeed.enabled=true", "deepspeed.zero_stage=3"])


class Opaque:
    """Needs arbitrary unpickling."""


def test_resume_refuses_arbitrary_pickle(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "epoch": 0, "step": 0, "iter_in_epoch": 0, "x": Opaque()}, evil)
    with pytest.raises(ValueError, match="refused"):
        toy_run(tmp_path / "out", flags=("--resume", str(evil)))


@pytest.mark.parametrize("amp", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])  # fp16 on CPU: ~15 s
def test_amp_modes_train_on_cpu(tmp_path, amp):
    trainer = toy_run(tmp_path, f"train.amp={amp}", "train.epochs=3", "train.clip_grad_norm=5.0")
    assert trainer.amp_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert (trainer.scaler is not None) == (amp == "fp16")
    # fp16 starts at a loss scale of 2**16: the first steps overflow and are skipped while the scale calibrates.
    overflows = (tmp_path / "log.txt").read_text().count("fp16 gradient overflow")
    assert (overflows > 0) == (amp == "fp16")
    assert trainer.step + overflows == 24 and trainer.scheduler.last_epoch == trainer.step
    assert all(torch.isfinite(w).all() for w in weights(trainer))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["val/loss"] for r in records if "val/loss" in r]
    assert losses[-1] < losses[0]  # it learns under autocast
    if amp == "fp16":
        state = ckpt.load_checkpoint_file(tmp_path / "checkpoint_last.pth")
        assert state["scaler"]["scale"] > 0  # the GradScaler state is checkpointed


def test_stop_signal_flag_then_second_sigint_interrupts():
    import os
    import signal

    from engine.trainer import StopSignal

    before = signal.getsignal(signal.SIGINT)
    stop = StopSignal()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"  # the first signal only sets the flag: the loop checkpoints and exits
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before
