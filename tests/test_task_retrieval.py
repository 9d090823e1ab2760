"""Retrieval.py: two-stage recall@K against a brute-force computation, training and evaluation through the real entry
point in one process and under torchrun (2 gloo processes, same numbers as one process), zero-shot evaluation of a
pretraining checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metrics.retrieval import recall_at_k
from models import create_model
from tasks.retrieval_eval import two_stage_scores
from tests.test_metrics_retrieval import _brute_force
from tests.test_models import SPECIAL, tiny_batch, tiny_cfg

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_opts(synthetic_dir: Path) -> list[str]:
    """--opts pointing the demo config at the session's synthetic data, small and quick."""
    s = synthetic_dir
    return [f"model.tokenizer={s / 'vocab.txt'}", f"data.train_file=[{s / 'retrieval_train.json'}]",
            f"data.val_file={s / 'retrieval_val.json'}", f"data.test_file={s / 'retrieval_test.json'}",
            f"data.image_root={s / 'images'}", "data.num_workers=0", "train.epochs=1", "train.log_every_steps=2"]


def eval_records(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if any(key.endswith("/r_mean") for key in r)]


def metrics_of(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if "/" in k and not k.startswith("train/")}


# ---------------------------------------------------------------------------------------------- two-stage recall
def test_two_stage_recall_equals_brute_force(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("retrieval", tiny_cfg(tmp_path), special=SPECIAL).eval()
    num_images, k = 6, 3
    img2txt = [[0, 1, 2], [3], [4, 5], [6, 7, 8, 9], [10], [11, 12]]  # several captions per image
    txt2img = [image for image, texts in enumerate(img2txt) for _ in texts]
    num_texts = len(txt2img)
    images, _, _ = tiny_batch(batch=num_images, seed=1)
    _, ids, mask = tiny_batch(batch=num_texts, seed=2)
    with torch.no_grad():
        image_embeds = model.encode_image(images)  # (N, 1+P, D)
        text_embeds = model.encode_text(ids, mask)  # (T, L, D)
        image_feats = model.image_feat(image_embeds)  # (N, E)
        text_feats = model.text_feat(text_embeds)  # (T, E)
    # Image 0 points away from its captions: none of them is among its top k candidates, so ITM never sees them.
    image_feats[0] = -F.normalize(text_feats[img2txt[0]].mean(0), dim=0)
    sims = image_feats @ text_feats.t()  # (N, T)

    score_i2t, score_t2i = two_stage_scores(model, image_embeds, image_feats, text_embeds, mask, text_feats, k,
                                            query_batch=4)

    # Brute force: one ITM pass per (image, text) pair, then keep each query's top k by ITC similarity.
    with torch.no_grad():
        dense = torch.stack([torch.cat([model.itm_scores(image_embeds[i:i + 1], text_embeds[t:t + 1], mask[t:t + 1])
                                        for t in range(num_texts)]) for i in range(num_images)])  # (N, T)
    expected_i2t = torch.full((num_images, num_texts), -100.0)
    expected_t2i = torch.full((num_texts, num_images), -100.0)
    for image in range(num_images):
        top = np.argsort(-sims[image].numpy(), kind="stable")[:k]
        expected_i2t[image, top] = dense[image, top]
    for text in range(num_texts):
        top = np.argsort(-sims[:, text].numpy(), kind="stable")[:k]
        expected_t2i[text, top] = dense[top, text]
    assert not set(np.argsort(-sims[0].numpy())[:k]) & set(img2txt[0])  # the missed image really is missed
    torch.testing.assert_close(score_i2t, expected_i2t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(score_t2i, expected_t2i, rtol=1e-4, atol=1e-5)

    ks = (1, 2, k)
    result = recall_at_k(score_i2t, score_t2i, img2txt, txt2img, ks=ks)
    expected = _brute_force(expected_i2t.numpy(), expected_t2i.numpy(), img2txt, txt2img, ks=ks)
    assert result == pytest.approx(expected)
    assert result[f"txt_r{k}"] <= 100.0 * (num_images - 1) / num_images  # image 0 counts as a miss
    assert 0 < result["img_r2"] < 100


# ------------------------------------------------------------------------------------------ entry point, 1 process
@pytest.fixture(scope="module")
def trained(synthetic_dir: Path, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """One epoch of Retrieval.py in this process, evaluated on val and test."""
    from Retrieval import main

    out = tmp_path_factory.mktemp("retrieval_1p")
    metrics = main(["--config", str(DEMO / "Retrieval.yaml"), "--output_dir", str(out), "--device", "cpu",
                    "--opts", *data_opts(synthetic_dir)])
    return out, metrics


def test_retrieval_trains_one_epoch_and_evaluates(trained: tuple[Path, dict[str, float]]) -> None:
    out, metrics = trained
    for split in ("val", "test"):
        for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
            assert 0.0 <= metrics[f"{split}/{key}"] <= 100.0, key
        assert metrics[f"{split}/img_r10"] >= metrics[f"{split}/img_r5"] >= metrics[f"{split}/img_r1"]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r for r in records if "train/loss_ita" in r]
    assert losses and all(np.isfinite(r["train/loss_itm"]) for r in losses)
    assert (out / "checkpoint_best.pth").is_file() and (out / "config.yaml").is_file()
    best = torch.load(out / "checkpoint_best.pth", weights_only=True)
    assert "text_encoder.encoder.layer.0.attention.self.query.weight" in best["model"]  # the official key names
    assert "idx_queue" in best["model"]


def test_zero_shot_evaluate_of_a_pretraining_checkpoint(synthetic_dir: Path, tmp_path: Path) -> None:
    """--evaluate from a pretraining checkpoint (text_encoder.bert.* keys) gives the pretraining model's own
    retrieval numbers: the key surgery maps every weight the evaluation uses."""
    from Pretrain import main as pretrain_main
    from Retrieval import main

    opts = data_opts(synthetic_dir)
    test_file = synthetic_dir / "retrieval_test.json"
    pre_out = tmp_path / "pre"
    torch.manual_seed(3)
    pretrain_main(["--config", str(DEMO / "Pretrain.yaml"), "--output_dir", str(pre_out), "--device", "cpu",
                   "--opts", opts[0], f"data.train_file=[{synthetic_dir / 'pretrain.json'}]", "train.max_steps=2",
                   "scheduler.warmup_steps=1", f"data.eval_file={test_file}",
                   f"data.eval_image_root={synthetic_dir / 'images'}", "data.num_workers=0", "eval.k_test=8",
                   "data.batch_size=8"])
    pre_metrics = metrics_of(eval_records(pre_out)[-1])
    state = torch.load(pre_out / "checkpoint_last.pth", weights_only=True)["model"]
    assert any(key.startswith("text_encoder.bert.") for key in state)  # the pretraining layout
    metrics = main(["--config", str(DEMO / "Retrieval.yaml"), "--output_dir", str(tmp_path / "zs"), "--device", "cpu",
                    "--checkpoint", str(pre_out / "checkpoint_last.pth"), "--evaluate",
                    "--opts", *opts, "data.val_file=", "eval.k_test=8", "model.queue_size=512"])
    assert metrics == pytest.approx({key.replace("val/", "test/"): value for key, value in pre_metrics.items()})


# ----------------------------------------------------------------------------------------- entry point, 2 processes
@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_train_and_evaluate_like_one(synthetic_dir: Path, tmp_path: Path) -> None:
    """torchrun with 2 gloo processes trains and evaluates; evaluating its checkpoint in one process gives exactly
    the numbers the two processes reported."""
    from Retrieval import main

    out = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "Retrieval.py"), "--config", str(DEMO / "Retrieval.yaml"), "--output_dir", str(out),
           "--device", "cpu", "--opts", *data_opts(synthetic_dir), "data.batch_size=8"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two_process = metrics_of(eval_records(out)[-1])
    config = (out / "config.yaml").read_text()
    assert "batch_size: 8" in config
    one = main(["--config", str(DEMO / "Retrieval.yaml"), "--output_dir", str(tmp_path / "one"), "--device", "cpu",
                "--checkpoint", str(out / "checkpoint_last.pth"), "--evaluate", "--opts", *data_opts(synthetic_dir)])
    assert one == two_process  # exactly: the score matrices are split across ranks and gathered, not averaged
