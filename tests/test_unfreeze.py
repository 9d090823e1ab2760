"""Progressive unfreezing (optimizer.unfreeze): the trainable set at each stage, seen through the optimizer's groups
(what one optimizer step changes), the log line with the counts, resume, and DDP (2 gloo processes) equal to one
process on the combined batch across a stage change."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.multiprocessing as mp

from engine import checkpoint as ckpt
from optim import build_unfreeze_schedule, create_optimizer
from scheduler import create_scheduler
from tests.test_engine_dist import free_port
from tests.test_engine_trainer import BASE_OPTS, toy_run
from tests.test_optim import TinyAlbef
from tests.toy_task import ddp_worker


def _updated_by_one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> set[str]:
    """Names of the parameters one optimizer step changes after a backward through every parameter."""
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer.zero_grad(set_to_none=True)
    loss = sum(param.sum() for param in model.parameters() if param.requires_grad)  # gradient 1 everywhere
    loss.backward()
    optimizer.step()
    return {name for name, param in model.named_parameters() if not torch.equal(param.detach(), before[name])}


VISUAL_TAIL = {"visual_encoder.norm.weight", "visual_encoder.norm.bias"}


def _block(prefix: str, index: int) -> set[str]:
    return {f"{prefix}.{index}.{leaf}" for leaf in ("norm1.weight", "norm1.bias", "fc.weight", "fc.bias")}


def test_stages_through_the_optimizer_groups():
    torch.manual_seed(0)
    model = TinyAlbef()  # visual_encoder: 3 blocks; text_encoder: 2 layers; visual_encoder_m frozen (momentum copy)
    cfg = {"lr": 0.1, "weight_decay": 0.01, "lr_mult": {"visual_encoder": 0.5},
           "freeze": {"visual_encoder": 1, "text_encoder": 0, "temp": 0},
           "unfreeze": {"every_epochs": 2, "blocks_per_stage": 1}}
    schedule = build_unfreeze_schedule(cfg, model)
    optimizer = create_optimizer(cfg, model, unfreeze=schedule)
    scheduler = create_scheduler({"name": "constant"}, optimizer, steps_per_epoch=10, epochs=10)
    grouped = {name for name, param in model.named_parameters()
               if any(param is p for group in optimizer.param_groups for p in group["params"])}
    everything = {name for name, _ in model.named_parameters()}
    momentum = {name for name in everything if name.startswith("visual_encoder_m.")}
    # The groups hold all the schedule will ever train (not the momentum copy, not temp: a parameter stays fixed).
    assert grouped == everything - momentum - {"temp"}
    assert schedule.prefixes == ["visual_encoder", "text_encoder"] and schedule.num_stages == 4

    visual_all = {name for name in everything if name.startswith("visual_encoder.")}
    text_all = {name for name in everything if name.startswith("text_encoder.")}
    expected = [
        _block("visual_encoder.blocks", 2) | VISUAL_TAIL | {"vision_proj.weight", "vision_proj.bias"},
        _block("visual_encoder.blocks", 1) | _block("text_encoder.encoder.layer", 1)
        | {"text_encoder.pooler.weight", "text_encoder.pooler.bias"},
        _block("visual_encoder.blocks", 0) | _block("text_encoder.encoder.layer", 0),
        visual_all | text_all,  # the embeddings (patch_embed, cls_token, pos_embed; word embeddings) last
    ]
    trainable: set[str] = set()
    layout = [len(group["params"]) for group in optimizer.param_groups]
    for stage, added in enumerate(expected):
        trainable |= added
        if stage:
            assert not schedule.record("epochs")  # every_epochs 2: the first epoch of the pair changes nothing
            assert not schedule.record("evals")  # evaluations do not count for an epoch schedule
            assert schedule.record("epochs")
            schedule.apply(model)
        assert schedule.stage == stage
        assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
        assert _updated_by_one_step(model, optimizer) == trainable, stage  # the optimizer updates exactly those
        scheduler.step()
        assert [len(group["params"]) for group in optimizer.param_groups] == layout  # same groups all along

        # The log line: stage, per-module and total counts, and what the optimizer updates.
        line = schedule.describe(model, optimizer)
        count = {name: p.numel() for name, p in model.named_parameters()}
        visual_now = sum(count[n] for n in trainable if n.startswith("visual_encoder."))
        total_now = sum(count[n] for n in trainable)
        assert f"unfreeze stage {stage}/3 after {2 * stage} epochs" in line
        assert f"visual_encoder {['last 1 of 3 blocks', 'last 2 of 3 blocks', 'last 3 of 3 blocks', 'all'][stage]}" \
            f" ({visual_now:,} of {sum(count[n] for n in visual_all):,})" in line
        assert f"model {total_now:,} of {sum(count.values()):,} parameters trainable" in line
        assert f"optimizer updates {total_now:,} of the {sum(count[n] for n in grouped):,} in its groups" in line
    assert not model.temp.requires_grad and not any(model.get_parameter(n).requires_grad for n in momentum)
    for _ in range(4):  # past the last stage nothing changes any more
        assert not schedule.record("epochs")
    assert schedule.stage == 3


def test_resume_rebuilds_the_stage_and_the_optimizer_state_fits():
    torch.manual_seed(0)
    cfg = {"freeze": {"visual_encoder": 0}, "unfreeze": {"every_evals": 1, "blocks_per_stage": 2,
                                                          "modules": ["visual_encoder"]}}
    model = TinyAlbef()
    schedule = build_unfreeze_schedule(cfg, model)
    optimizer = create_optimizer(cfg, model, unfreeze=schedule)
    assert schedule.levels["visual_encoder"] == [0, 2, 3, -1]  # 0, then 2 blocks, then all 3, then everything
    _updated_by_one_step(model, optimizer)
    schedule.record("evals")
    schedule.apply(model)
    _updated_by_one_step(model, optimizer)  # Adam state for the unfrozen blocks now

    resumed = copy.deepcopy(TinyAlbef())
    resumed.load_state_dict(model.state_dict())
    schedule2 = build_unfreeze_schedule(cfg, resumed)
    optimizer2 = create_optimizer(cfg, resumed, unfreeze=schedule2)
    schedule2.load_state_dict(schedule.state_dict())
    schedule2.apply(resumed)
    optimizer2.load_state_dict(optimizer.state_dict())
    names = {id(p): n for n, p in model.named_parameters()}
    names2 = {id(p): n for n, p in resumed.named_parameters()}
    states = {names[id(p)]: s for p, s in optimizer.state.items()}
    states2 = {names2[id(p)]: s for p, s in optimizer2.state.items()}
    assert states.keys() == states2.keys() and "visual_encoder.blocks.1.fc.weight" in states
    assert "visual_encoder.blocks.0.fc.weight" not in states  # still frozen: never had a gradient, no state
    for name in states:
        torch.testing.assert_close(states2[name]["exp_avg"], states[name]["exp_avg"])
    assert _updated_by_one_step(model, optimizer) == _updated_by_one_step(resumed, optimizer2)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_unfreeze_config_errors():
    with pytest.raises(ValueError, match="every_epochs or every_evals, not both"):
        build_unfreeze_schedule({"freeze": {"visual_encoder": 0}, "unfreeze": {"every_epochs": 1, "every_evals": 1}},
                                TinyAlbef())
    with pytest.raises(ValueError, match=r"modules names \['text_encoder'\], which optimizer.freeze does not freeze"):
        build_unfreeze_schedule({"freeze": {"visual_encoder": 0},
                                 "unfreeze": {"every_epochs": 1, "modules": ["text_encoder"]}}, TinyAlbef())
    with pytest.raises(ValueError, match="nothing to unfreeze"):
        build_unfreeze_schedule({"freeze": {"temp": 0}, "unfreeze": {"every_epochs": 1}}, TinyAlbef())
    with pytest.raises(ValueError, match="blocks_per_stage must be >= 1"):
        build_unfreeze_schedule({"freeze": {"visual_encoder": 0},
                                 "unfreeze": {"every_epochs": 1, "blocks_per_stage": 0}}, TinyAlbef())
    assert build_unfreeze_schedule({"freeze": {"visual_encoder": 0}}, TinyAlbef()) is None  # off by default


# ---------------------------------------------------------------------------------- through the engine (ToyTask)
# The toy model is Linear(4, h) -> Tanh -> Linear(h, 2): module "0" frozen in epoch 0, trainable from epoch 1 on.
UNFREEZE = ["optimizer.freeze.0=0", "optimizer.unfreeze.every_epochs=1", "train.epochs=2"]


def _log_lines(out) -> list[str]:
    return [line for line in (out / "log.txt").read_text().splitlines() if "unfreeze stage" in line]


def test_engine_unfreezes_at_the_epoch_end_and_resumes(tmp_path):
    straight = toy_run(tmp_path / "straight", *UNFREEZE, "train.ckpt_every_steps=1", "train.keep_last_ckpts=100")
    assert straight.step == 16
    lines = _log_lines(tmp_path / "straight")
    assert len(lines) == 2 and "unfreeze stage 0/1 after 0 epochs" in lines[0]
    assert "unfreeze stage 1/1 after 1 epochs" in lines[1]
    hidden = straight.model[0].weight.numel() + straight.model[0].bias.numel()
    total = sum(p.numel() for p in straight.model.parameters())
    assert re.search(rf"0 frozen \(0 of {hidden:,}\).*model {total - hidden:,} of {total:,}", lines[0])
    assert re.search(rf"0 all \({hidden:,} of {hidden:,}\).*model {total:,} of {total:,}", lines[1])
    # Layer 0 did not move during epoch 0 (steps 1-8) and did afterwards; layer 2 trained all along.
    states = {step: ckpt.load_checkpoint_file(tmp_path / "straight" / ckpt.rolling_name(step)) for step in (1, 8, 9)}
    first = straight.task.trajectory[0]  # the weights before step 1
    assert torch.equal(states[8]["model"]["0.weight"], first[0])
    assert not torch.equal(states[9]["model"]["0.weight"], first[0])
    assert not torch.equal(states[1]["model"]["2.weight"], first[2])
    assert states[8]["unfreeze"] == {"events": 1} and states[1]["unfreeze"] == {"events": 0}

    # Resuming before and after the stage change continues exactly as the uninterrupted run.
    for step in (5, 12):
        out = tmp_path / f"resumed{step}"
        resumed = toy_run(out, *UNFREEZE, flags=("--resume", str(tmp_path / "straight" / ckpt.rolling_name(step))))
        for a, b in zip(resumed.model.parameters(), straight.model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert f"after {int(step > 8)} epochs" in _log_lines(out)[0]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("compiled", [False, True])
def test_engine_unfreezing_under_ddp_equals_one_process(tmp_path, compiled):
    """2 gloo processes x batch 2 == 1 process x batch 4, across the stage change: DDP is wrapped again (and compiled
    again under train.compile), so the newly trainable layer's gradients are averaged over the ranks too (otherwise
    the replicas drift apart)."""
    out = tmp_path / "ddp"
    out.mkdir()
    compile_opts = ["train.compile=true", "train.compile_backend=aot_eager"] if compiled else []
    argv = ["--output_dir", str(out), "--device", "cpu", "--opts", *BASE_OPTS, *UNFREEZE, "toy.batch_size=2",
            *compile_opts]
    mp.spawn(ddp_worker, args=(2, free_port(), argv, str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True)["model"] for r in range(2)]
    single = toy_run(tmp_path / "single", *UNFREEZE, "toy.batch_size=4")
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-6)
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert not torch.equal(ranks[0]["0.weight"], single.task.trajectory[0][0])  # layer 0 trained after unfreezing


def test_engine_unfreezes_after_evaluations(tmp_path):
    trainer = toy_run(tmp_path / "evals", "optimizer.freeze.0=0", "optimizer.unfreeze.every_evals=2",
                      "train.eval_every_steps=3", "train.epochs=1")
    lines = _log_lines(tmp_path / "evals")
    assert [line.split("unfreeze ")[1].split(":")[0] for line in lines] == [
        "stage 0/1 after 0 evals", "stage 1/1 after 2 evals"]  # evaluations at steps 3 and 6
    # Layer 0 first moved in step 7 (after the second evaluation).
    assert torch.equal(trainer.task.trajectory[6][0], trainer.task.trajectory[0][0])
    assert not torch.equal(trainer.task.trajectory[7][0], trainer.task.trajectory[0][0])


def test_caption_unfreezes_vit_blocks_one_by_one(synthetic_dir, tmp_path):
    """Caption.py with the real ViT (2 blocks): frozen in epoch 0, its last block in epoch 1, then the first one."""
    from Caption import main
    from tests.test_task_caption import caption_argv

    out = tmp_path / "caption"
    main(caption_argv(synthetic_dir, out, "train.epochs=3", "train.eval_every_epochs=3", "data.batch_size=32",
                      "generation.max_length=5", "train.keep_last_ckpts=10", "optimizer.freeze.visual_encoder=0",
                      "optimizer.unfreeze.every_epochs=1"))
    lines = _log_lines(out)
    # Stage 3 (the embeddings) begins as the last epoch ends: counted for a resume with more epochs, trains nothing.
    assert [re.search(r"visual_encoder (.*?) \(", line).group(1) for line in lines] == [
        "frozen", "last 1 of 2 blocks", "last 2 of 2 blocks", "all"]
    assert "unfreeze stage 2/3 after 2 epochs" in lines[2]
    after0, after1, after2 = (ckpt.load_checkpoint_file(out / ckpt.rolling_name(step))["model"]
                              for step in _epoch_end_steps(out))
    qkv = "visual_encoder.blocks.{}.attn.qkv.weight"
    assert not torch.equal(after0[qkv.format(1)], after1[qkv.format(1)])  # the last block trains from epoch 1
    assert torch.equal(after0[qkv.format(0)], after1[qkv.format(0)])  # the first one only in epoch 2
    assert not torch.equal(after1[qkv.format(0)], after2[qkv.format(0)])
    patch = "visual_encoder.patch_embed.proj.weight"  # the embeddings would train from a 4th epoch on
    assert torch.equal(after0[patch], after2[patch])


def _epoch_end_steps(out) -> list[int]:
    """Steps of the rolling checkpoints written at epoch ends, in order."""
    return sorted(int(re.search(r"(\d+)", path.name).group(1)) for path in out.glob("checkpoint_0*.pth"))
