"""Multi-process runs of the engine (gloo on CPU): DDP equals one process on the combined batch; collectives;
SIGTERM writes a resumable checkpoint and --resume auto continues as if uninterrupted."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from engine import checkpoint as ckpt
from tests.test_engine_trainer import BASE_OPTS, toy_run
from tests.toy_task import ddp_worker

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.dist
def test_two_process_ddp_equals_single_process(tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    opts = ["train.grad_accum_steps=2", "toy.batch_size=2", "train.epochs=2", "scheduler.name=cosine"]
    argv = ["--output_dir", str(out), "--device", "cpu", "--opts", *BASE_OPTS, *opts]
    mp.spawn(ddp_worker, args=(2, free_port(), argv, str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world_size"] == 2
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key  # DDP kept the replicas identical

    # Each rank's micro-batch j holds every other sample of the global batch of 4: one process with batch 4 and the
    # same accumulation sees the same samples per step.
    single = toy_run(tmp_path / "single", "train.grad_accum_steps=2", "toy.batch_size=4", "train.epochs=2",
                     "scheduler.name=cosine")
    assert single.step == 8
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(ranks[0]["model"][key], value, rtol=1e-5, atol=1e-6)
    state = ckpt.load_checkpoint_file(out / "checkpoint_last.pth")
    assert state["step"] == 8 and len(state["rng"]) == 2  # every rank's RNG state is kept

    c0, c1 = (r["collectives"] for r in ranks)
    assert c0["gather_tensor"].tolist() == c1["gather_tensor"].tolist() == [0, 0, 1]
    assert c0["gather_object"] == [{"rank": 0}, {"rank": 1}]
    assert c0["broadcast"] == c1["broadcast"] == "from rank 0"
    assert c0["mean"].item() == c1["mean"].item() == 0.5
    assert torch.equal(c0["gathered"], c1["gathered"])
    # Both ranks compute the same loss sum(w * g^2); the local rows' gradient sums both ranks' contributions.
    for rank, c in enumerate((c0, c1)):
        local = c["gathered"][2 * rank : 2 * rank + 2]
        expected = 2 * (2 * local * c["weight"][2 * rank : 2 * rank + 2])
        torch.testing.assert_close(c["local_grad"], expected)


@pytest.mark.slow
def test_sigterm_then_resume_auto_equals_uninterrupted(tmp_path):
    opts = ["train.epochs=2", "toy.noise_std=0.1", "scheduler.name=cosine", "scheduler.warmup_steps=3"]
    straight = toy_run(tmp_path / "a", *opts)
    out = tmp_path / "b"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "tests" / "toy_task.py"), "--output_dir", str(out), "--device", "cpu",
           "--opts", *BASE_OPTS, *opts, "toy.sigterm_at_step=5"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "stopped by SIGTERM" in proc.stdout
    state = ckpt.load_checkpoint_file(out / "checkpoint_last.pth")
    # The signal arrived during step 6 (global_step 5 done): that step completes, then the run saves and exits.
    assert (state["step"], state["epoch"], state["iter_in_epoch"]) == (6, 0, 6)
    resumed = toy_run(out, *opts, flags=("--resume", "auto"))
    assert resumed.task.calls == 10  # only the remaining 10 of 16 steps were run
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.dist
def test_deepspeed_zero2_two_cpu_processes_runs_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator; the engine gives it a gloo group
    opts = ["deepspeed.enabled=true", "deepspeed.zero_stage=2", "train.amp=none", "train.epochs=2",
            "train.grad_accum_steps=2", "toy.batch_size=2", "train.ckpt_every_steps=2", "train.keep_last_ckpts=10",
            "scheduler.name=cosine"]
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    argv = ["--output_dir", str(first), "--device", "cpu", "--opts", *BASE_OPTS, *opts]
    mp.spawn(ddp_worker, args=(2, free_port(), argv, str(first)), nprocs=2, join=True)
    mid = first / ckpt.rolling_name(2)
    state = ckpt.load_checkpoint_file(mid)
    assert (state["step"], state["epoch"], state["iter_in_epoch"]) == (2, 0, 4)
    assert (first / "deepspeed" / state["deepspeed_tag"]).is_dir()
    argv = ["--output_dir", str(second), "--device", "cpu", "--resume", str(mid), "--opts", *BASE_OPTS, *opts]
    mp.spawn(ddp_worker, args=(2, free_port(), argv, str(second)), nprocs=2, join=True)
    straight = torch.load(first / "rank0.pt", weights_only=True)["model"]
    for rank in range(2):
        resumed = torch.load(second / f"rank{rank}.pt", weights_only=True)["model"]
        for key, value in straight.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)
    assert ckpt.load_checkpoint_file(second / "checkpoint_last.pth")["step"] == 8
    # ZeRO-2 over 2 ranks x micro-batch 2 x 2 accumulation == one process with batch 4 x 2 accumulation.
    single = toy_run(tmp_path / "single", "train.grad_accum_steps=2", "toy.batch_size=4", "train.epochs=2",
                     "scheduler.name=cosine")
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(straight[key], value, rtol=1e-5, atol=1e-6)
    assert not torch.equal(straight["0.weight"], state["model"]["0.weight"])  # it trained after step 2
