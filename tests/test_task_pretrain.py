"""Pretrain.py through its real entry point on the synthetic data: 1 process (with a broken image in the data, which
is skipped, counted and reported per epoch) and 2 gloo processes under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _opts(data: Path, out: Path, train_file: Path) -> list[str]:
    return ["--config", str(REPO / "configs" / "demo" / "Pretrain.yaml"), "--output_dir", str(out), "--device", "cpu",
            "--opts", f"data.train_file=[{train_file}]", f"data.eval_file={data / 'retrieval_test.json'}",
            f"data.eval_image_root={data / 'images'}", f"model.tokenizer={data / 'vocab.txt'}", "data.batch_size=8",
            "data.eval_batch_size=16", "data.num_workers=0", "train.epochs=1", "eval.k_test=4",
            "scheduler.warmup_steps=1", "model.queue_size=32", "train.log_every_steps=1"]


def test_pretrain_trains_evaluates_and_reports_a_skipped_image(synthetic_dir, tmp_path):
    from Pretrain import main

    entries = json.loads((synthetic_dir / "pretrain.json").read_text())[:31]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"")  # zero bytes: unreadable
    entries.append({"image": str(broken), "caption": "a red circle"})
    train_file = tmp_path / "pretrain_with_broken.json"
    train_file.write_text(json.dumps(entries))
    out = tmp_path / "run"
    metrics = main(_opts(synthetic_dir, out, train_file))

    for key in ("val/txt_r1", "val/img_r10", "val/r_mean", "val/itc_r_mean"):
        assert key in metrics and 0.0 <= metrics[key] <= 100.0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(r.get("train/skipped_images", 0) >= 1 for r in records), "the skipped image was not reported"
    losses = [r for r in records if "train/loss_ita" in r]
    assert losses and all(torch.isfinite(torch.tensor(r["train/loss_mlm"])) for r in losses)
    log_text = (out / "log.txt").read_text()
    assert "broken.jpg" in log_text and "unreadable image(s) skipped" in log_text
    for name in ("checkpoint_last.pth", "checkpoint_best.pth", "config.yaml"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    state = torch.load(out / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    for key in ("visual_encoder.pos_embed", "text_encoder.bert.embeddings.position_ids", "image_queue"):
        assert key in state["model"], key  # official key names


@pytest.mark.slow
@pytest.mark.dist
def test_pretrain_under_torchrun_with_two_gloo_processes(synthetic_dir, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "run2"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--rdzv-endpoint=127.0.0.1:{port}",
           "--rdzv-backend=c10d", str(REPO / "Pretrain.py"),
           *_opts(synthetic_dir, out, synthetic_dir / "pretrain.json"), "train.max_steps=3"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(out / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    assert state["step"] == 3
    assert int(state["model"]["queue_ptr"]) == (3 * 2 * 8) % 32  # 3 steps x global batch 16, wrapped


@pytest.mark.slow
@pytest.mark.dist
def test_pretrain_with_deepspeed_zero2_on_two_cpu_processes_runs_and_resumes(synthetic_dir, tmp_path):
    """DeepSpeed ZeRO-2 through the real entry point (gloo); checkpoints keep the official key shapes."""
    out = tmp_path / "ds"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}

    def launch(max_steps: int, *extra: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-backend=c10d", str(REPO / "Pretrain.py"), *extra,
               *_opts(synthetic_dir, out, synthetic_dir / "pretrain.json"), "data.eval_file=",
               "deepspeed.enabled=true", "deepspeed.zero_stage=2", "train.ckpt_every_steps=2", "train.epochs=2",
               f"train.max_steps={max_steps}"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]

    launch(2)
    launch(4, "--resume", "auto")
    state = torch.load(out / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    assert state["step"] == 4
    assert state["model"]["temp"].shape == ()  # held as a 1-element tensor under DeepSpeed, saved in its own shape
