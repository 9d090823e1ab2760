"""scheduler: lr values at chosen steps for every schedule, lr_mult groups, plateau, state_dict resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from optim import create_optimizer
from scheduler import SCHEDULER_DEFAULTS, PlateauLR, create_scheduler

BASE_LR = 1e-3
MIN_LR = 1e-5


def _optimizer() -> torch.optim.Optimizer:
    model = nn.ModuleDict({"backbone": nn.Linear(2, 2), "head": nn.Linear(2, 2)})
    return create_optimizer({"lr": BASE_LR, "lr_mult": {"backbone": 0.1}}, model)


def _lrs(cfg: dict, steps: int, steps_per_epoch: int = 10, epochs: int = 10, max_steps: int = 0) -> list[list[float]]:
    """lrs[t][g]: the lr of group g used by optimizer step t, for t in [0, steps]."""
    optimizer = _optimizer()
    scheduler = create_scheduler({"min_lr": MIN_LR, **cfg}, optimizer, steps_per_epoch, epochs, max_steps)
    lrs = []
    for _ in range(steps + 1):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return lrs


def _head(lrs: list[list[float]], step: int) -> float:
    """The lr of the base group (lr_mult 1); create_optimizer puts the backbone (0.1) groups first."""
    return lrs[step][-1]


def _assert_mult_kept(lrs: list[list[float]]) -> None:
    # Groups: backbone decay, backbone no-decay (mult 0.1), head decay, head no-decay (mult 1).
    for values in lrs:
        assert values[0] == pytest.approx(0.1 * values[2], rel=1e-9) and values[1] == values[0]
        assert values[2] == values[3]


def test_warmup_then_cosine() -> None:
    lrs = _lrs({"name": "cosine", "warmup_steps": 4}, steps=110, epochs=11, max_steps=104)
    assert _head(lrs, 0) == pytest.approx(0.25 * BASE_LR)  # first step already positive with start factor 0
    assert _head(lrs, 1) == pytest.approx(0.5 * BASE_LR)
    assert _head(lrs, 3) == pytest.approx(BASE_LR)  # warmup end
    assert _head(lrs, 4) == pytest.approx(BASE_LR)
    assert _head(lrs, 54) == pytest.approx(MIN_LR + (BASE_LR - MIN_LR) * 0.5)  # half-way through the cosine
    quarter = MIN_LR + (BASE_LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi / 4))
    assert _head(lrs, 29) == pytest.approx(quarter)
    assert _head(lrs, 104) == pytest.approx(MIN_LR)  # end of the schedule
    assert _head(lrs, 110) == pytest.approx(MIN_LR)  # and it stays there
    assert lrs[104][0] == pytest.approx(0.1 * MIN_LR)  # lr_mult groups scale min_lr the same way
    _assert_mult_kept(lrs)


def test_warmup_fraction_and_start_factor_and_epochs() -> None:
    # 10 x 10 = 100 steps, warmup 10% = 10 steps from factor 0.5.
    lrs = _lrs({"name": "constant", "warmup_fraction": 0.1, "warmup_start_factor": 0.5}, steps=20)
    assert _head(lrs, 0) == pytest.approx(0.55 * BASE_LR)
    assert _head(lrs, 9) == pytest.approx(BASE_LR)
    assert _head(lrs, 20) == pytest.approx(BASE_LR)
    _assert_mult_kept(lrs)


def test_linear() -> None:
    lrs = _lrs({"name": "linear"}, steps=100)  # 100 steps, no warmup
    assert _head(lrs, 0) == pytest.approx(BASE_LR)
    assert _head(lrs, 25) == pytest.approx(MIN_LR + (BASE_LR - MIN_LR) * 0.75)
    assert _head(lrs, 100) == pytest.approx(MIN_LR)

    # The schedule spans whichever ends first: 2 epochs of 10 steps here, not max_steps=50; max_steps alone when the
    # epoch length is unknown.
    assert _head(_lrs({"name": "linear"}, steps=20, epochs=2, max_steps=50), 20) == pytest.approx(MIN_LR)
    assert _head(_lrs({"name": "linear"}, steps=20, steps_per_epoch=0, max_steps=20), 10) == pytest.approx(
        (BASE_LR + MIN_LR) / 2
    )


def test_step_and_multistep() -> None:
    lrs = _lrs({"name": "step", "step_size_steps": 7, "gamma": 0.5}, steps=60)
    assert _head(lrs, 6) == pytest.approx(BASE_LR)
    assert _head(lrs, 7) == pytest.approx(0.5 * BASE_LR)
    assert _head(lrs, 20) == pytest.approx(0.25 * BASE_LR)
    assert _head(lrs, 60) == pytest.approx(MIN_LR)  # 0.5**8 x 1e-3 < min_lr: floored
    _assert_mult_kept(lrs)

    per_epoch = _lrs({"name": "step", "gamma": 0.1}, steps=25)  # step_size_steps 0 = one epoch (10 steps)
    assert [_head(per_epoch, t) for t in (9, 10, 19, 20)] == pytest.approx([BASE_LR, 1e-4, 1e-4, MIN_LR])

    lrs = _lrs({"name": "multistep", "milestones_steps": [5, 8], "gamma": 0.1, "min_lr": 1e-7}, steps=12)
    assert [_head(lrs, t) for t in (4, 5, 7, 8, 12)] == pytest.approx([BASE_LR, 1e-4, 1e-4, 1e-5, 1e-5])


def test_plateau_reduces_after_patience() -> None:
    optimizer = _optimizer()
    cfg = {"name": "plateau", "min_lr": 2e-5, "plateau": {"patience_evals": 2, "factor": 0.1, "mode": "max"}}
    scheduler = create_scheduler(cfg, optimizer, steps_per_epoch=10, epochs=10)
    assert isinstance(scheduler, PlateauLR)
    for value in (1.0, 2.0, 1.5, 2.0):  # improvement, then two evaluations without: still within patience
        scheduler.step_metric(value)
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(BASE_LR)
    scheduler.step_metric(1.9)  # third without improvement: reduced at once
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(1e-4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(1e-4)  # kept by later steps
    scheduler.step_metric(3.0)  # improvement resets the count
    for value in (2.0, 2.0, 2.0):
        scheduler.step_metric(value)
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(2e-5)  # 1e-5 would be below min_lr
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-6)

    loss_scheduler = create_scheduler(
        {"name": "plateau", "plateau": {"patience_evals": 0, "mode": "min"}}, _optimizer(), 10, 1
    )
    loss_scheduler.step_metric(1.0)
    loss_scheduler.step_metric(0.5)
    assert loss_scheduler.get_last_lr()[-1] == pytest.approx(BASE_LR)
    loss_scheduler.step_metric(0.7)
    assert loss_scheduler.get_last_lr()[-1] == pytest.approx(1e-4)


@pytest.mark.parametrize("name", ["cosine", "plateau"])
def test_state_dict_round_trip_resumes_the_same_lrs(name: str) -> None:
    cfg = {"name": name, "warmup_steps": 5, "plateau": {"patience_evals": 1}}

    def run(steps: range, optimizer, scheduler) -> list[float]:
        seen = []
        for step in steps:
            optimizer.step()
            scheduler.step()
            if name == "plateau" and step % 4 == 3:
                scheduler.step_metric(1.0 if step < 8 else 0.5)  # stalls, so the lr drops during the run
            seen.append(optimizer.param_groups[-1]["lr"])
        return seen

    optimizer = _optimizer()
    scheduler = create_scheduler(cfg, optimizer, steps_per_epoch=10, epochs=3)
    uninterrupted = run(range(30), optimizer, scheduler)

    optimizer = _optimizer()
    scheduler = create_scheduler(cfg, optimizer, steps_per_epoch=10, epochs=3)
    first = run(range(12), optimizer, scheduler)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # checkpoints are loaded with weights_only

    optimizer = _optimizer()
    scheduler = create_scheduler(cfg, optimizer, steps_per_epoch=10, epochs=3)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    resumed = first + run(range(12, 30), optimizer, scheduler)
    assert resumed == pytest.approx(uninterrupted, rel=1e-12)
    assert len(set(uninterrupted)) > 3  # the schedule moved, so the comparison means something


def test_warmup_longer_than_the_run_is_clamped_with_a_warning(caplog) -> None:
    # 6 steps (max_steps of a smoke run) with a config's 100-step warm-up: warm up over the 6 steps instead.
    with caplog.at_level("WARNING", logger="scheduler.factory"):
        lrs = _lrs({"name": "cosine", "warmup_steps": 100}, steps=6, max_steps=6)
    assert "warmup_steps=100 is longer than the run (6 optimizer steps)" in caplog.text
    assert [_head(lrs, t) for t in range(6)] == pytest.approx([BASE_LR * (t + 1) / 6 for t in range(6)])
    # A warm-up as long as the run is what the clamp gives, and is no error either.
    caplog.clear()
    with caplog.at_level("WARNING", logger="scheduler.factory"):
        assert _lrs({"name": "cosine", "warmup_steps": 6}, steps=6, max_steps=6) == lrs
    assert not caplog.text


def test_config_errors() -> None:
    optimizer = _optimizer()
    with pytest.raises(ValueError, match="unknown scheduler.name 'cosin'.*cosine"):
        create_scheduler({"name": "cosin"}, optimizer, 10, 1)
    with pytest.raises(ValueError, match="scheduler.min_l.*min_lr"):
        create_scheduler({"min_l": 0.0}, optimizer, 10, 1)
    with pytest.raises(ValueError, match="scheduler.plateau.patience.*patience_evals"):
        create_scheduler({"plateau": {"patience": 1}}, optimizer, 10, 1)
    with pytest.raises(ValueError, match="milestones_steps"):
        create_scheduler({"name": "multistep", "milestones_steps": [8, 5]}, optimizer, 10, 1)
    with pytest.raises(ValueError, match="no steps"):
        create_scheduler({}, optimizer, 0, 5)
    assert SCHEDULER_DEFAULTS["name"] == "cosine"


def test_smoke_run_shorter_than_the_configs_warmup_runs(synthetic_dir, tmp_path) -> None:
    """`--opts train.max_steps=6` on a demo config whose warm-up is longer (VQA.yaml: 20 steps) runs to the end."""
    from pathlib import Path

    from VQA import main

    repo = Path(__file__).resolve().parents[1]
    data, out = synthetic_dir, tmp_path / "vqa"
    main(["--config", str(repo / "configs/demo/VQA.yaml"), "--output_dir", str(out), "--device", "cpu", "--opts",
          f"model.tokenizer={data / 'vocab.txt'}", f"data.train_file=[{data / 'vqa_train.json'}]",
          f"data.val_file={data / 'vqa_val.json'}", "data.test_file=", f"data.answer_list={data / 'answer_list.json'}",
          f"data.image_root={data / 'images'}", f"data.vg_root={data / 'images'}", "data.val_question_file=",
          "data.val_annotation_file=", "data.num_workers=0", "data.batch_size=4", "train.max_steps=6",
          "train.log_every_steps=1"])
    log_text = (out / "log.txt").read_text()
    assert "warmup_steps=20 is longer than the run (6 optimizer steps): the warm-up is clamped" in log_text
    assert "training finished at step 6" in log_text
