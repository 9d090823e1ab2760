"""Pretrain_nlvr.py and NLVR.py through their real entry points on the synthetic data: text-assignment pretraining
under torchrun (2 gloo processes), NLVR2 fine-tuning from its checkpoint under torchrun, one-process evaluation of the
result equal to what the two processes reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import create_model, load_checkpoint
from tests.test_task_ve_nlvr import DEMO, run_in_process, run_two_processes


def nlvr_model(synthetic_dir: Path) -> torch.nn.Module:
    """The NLVR2 model of the demo config (defaults completed, the synthetic vocabulary)."""
    from dataset.tokenizer import build_tokenizer
    from engine.config import build_schema, load_config
    from NLVR import NLVRTask

    cfg = load_config(str(DEMO / "NLVR.yaml"), [f"model.tokenizer={synthetic_dir / 'vocab.txt'}"],
                      build_schema(NLVRTask.config_defaults), NLVRTask.open_config_keys)
    return create_model("nlvr", cfg.model, tokenizer=build_tokenizer(str(synthetic_dir / "vocab.txt")))


@pytest.mark.slow
@pytest.mark.dist
def test_pretrain_nlvr_two_processes(synthetic_dir: Path, tmp_path: Path) -> None:
    metrics = run_two_processes("Pretrain_nlvr", tmp_path / "pre", synthetic_dir, "data.batch_size=8")
    assert set(metrics) == {"val/acc"} and 0.0 <= metrics["val/acc"] <= 100.0
    state = torch.load(tmp_path / "pre" / "checkpoint_last.pth", weights_only=True)["model"]
    assert any(key.startswith("ta_head.") for key in state)


@pytest.mark.slow
@pytest.mark.dist
def test_nlvr_fine_tunes_from_text_assignment_checkpoint(synthetic_dir: Path, tmp_path: Path) -> None:
    pre = tmp_path / "pre"
    run_in_process("Pretrain_nlvr", pre, synthetic_dir, "train.max_steps=2")
    # The text-assignment checkpoint holds every weight of the NLVR2 model except its new head and momentum copies.
    missing, unexpected = load_checkpoint(nlvr_model(synthetic_dir), pre / "checkpoint_last.pth")
    assert missing and all(key.startswith("cls_head") or "_m." in key for key in missing), missing
    assert unexpected and all(key.startswith("ta_head.") for key in unexpected), unexpected

    out = tmp_path / "nlvr"
    two = run_two_processes("NLVR", out, synthetic_dir, "data.batch_size=8",
                            flags=("--checkpoint", str(pre / "checkpoint_last.pth")))
    assert set(two) == {"val/acc", "test/acc"}
    one = run_in_process("NLVR", tmp_path / "nlvr_eval", synthetic_dir,
                         flags=("--evaluate", "--checkpoint", str(out / "checkpoint_last.pth")))
    assert one == two
