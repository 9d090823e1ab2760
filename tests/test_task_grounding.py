"""Grounding.py through its real entry point on the synthetic RefCOCO+ data: one epoch of ITC + ITM fine-tuning, then
Grad-CAM grounding per REFER split equal to grounding each expression on its own; two gloo processes evaluate the
same checkpoint to the same accuracies (batches split across ranks, predictions merged in memory).

Accuracy above a random proposal (random_proposal_accuracy(), the chance level) is asserted from a pretrained model
in tests/test_learning.py::test_grounding_from_pretraining_learns; a one-epoch run from random init learns nothing."""

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

from dataset.text import pre_caption
from dataset.tokenizer import build_tokenizer, tokenize
from dataset.transforms import build_transform, load_image, normalize
from Grounding import main
from models import create_model
from models.gradcam import compute_gradcam
from refTools import REFER, evaluate_heatmaps, load_dets, paired_iou

REPO = Path(__file__).resolve().parents[1]
SPLIT_KEYS = {"val": "val/acc_val", "testA": "test/acc_testA", "testB": "test/acc_testB"}


def grounding_opts(data: Path, *extra: str) -> list[str]:
    return [
        f"data.train_file=[{data / 'refcoco+_train.json'}]", f"data.val_file={data / 'refcoco+_val.json'}",
        f"data.test_file={data / 'refcoco+_test.json'}", f"data.image_root={data / 'images'}",
        f"data.refer_root={data}", f"data.dets_file={data / 'refcoco+' / 'dets.json'}",
        f"model.tokenizer={data / 'vocab.txt'}", "data.num_workers=0", "data.eval_batch_size=16",
        "scheduler.warmup_steps=0", "train.epochs=1", *extra,
    ]


def random_proposal_accuracy(data: Path) -> dict[str, float]:
    """Expected accuracy (%) per REFER split of picking a uniformly random proposal for every expression."""
    refer = REFER(data, "refcoco+", "unc")
    dets = load_dets(data / "refcoco+" / "dets.json")
    hits: dict[str, list[float]] = {}
    for split in ("val", "test"):
        for entry in json.loads((data / f"refcoco+_{split}.json").read_text()):
            ref = refer.Refs[entry["ref_id"]]
            boxes = dets[ref["image_id"]]
            truth = torch.tensor(refer.get_ref_box(entry["ref_id"]), dtype=torch.float64).expand(len(boxes), 4)
            hits.setdefault(ref["split"], []).append(float((paired_iou(boxes, truth) >= 0.5).double().mean()))
    return {split: 100.0 * sum(values) / len(values) for split, values in hits.items()}


@pytest.fixture(scope="module")
def trained(synthetic_dir, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    out = tmp_path_factory.mktemp("grounding")
    metrics = main(["--config", str(REPO / "configs" / "demo" / "Grounding.yaml"), "--output_dir", str(out),
                    "--device", "cpu", "--seed", "0", "--opts", *grounding_opts(synthetic_dir)])
    return out, metrics


def test_one_epoch_then_accuracy_equals_a_per_expression_recount(trained, synthetic_dir) -> None:
    """The entry point's batched, de-duplicated evaluation equals grounding every expression on its own with the
    trained weights (Grad-CAM -> best proposal -> IoU >= 0.5, counted per sentence and per REFER split)."""
    out, metrics = trained
    assert set(metrics) == set(SPLIT_KEYS.values())
    assert (out / "checkpoint_last.pth").is_file() and (out / "checkpoint_best.pth").is_file()
    state = torch.load(out / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    model_cfg = state["config"]["model"]
    tokenizer = build_tokenizer(model_cfg["tokenizer"])
    model = create_model("grounding", model_cfg, tokenizer=tokenizer)
    model.load_state_dict(state["model"])
    model.eval()
    transform = build_transform("test", int(model_cfg["image_res"]))
    refer = REFER(synthetic_dir, "refcoco+", "unc")
    dets = load_dets(synthetic_dir / "refcoco+" / "dets.json")
    heatmaps = []
    for split in ("val", "test"):
        for entry in json.loads((synthetic_dir / f"refcoco+_{split}.json").read_text()):
            image = transform(load_image(synthetic_dir / "images" / entry["image"]), np.random.default_rng(0))
            ids, mask = tokenize(tokenizer, [pre_caption(entry["text"], 30)], 32)
            maps = compute_gradcam(model, normalize(image[None]), ids, mask, "itm", block_num=2)
            heatmaps.append((entry["ref_id"], maps.text_map[0]))
    recount = evaluate_heatmaps(heatmaps, dets, refer)
    for split, key in SPLIT_KEYS.items():
        assert metrics[key] == pytest.approx(recount[split], abs=1e-9), (split, metrics, recount)
    # The chance level a learning check compares with (see the module docstring).
    chance = random_proposal_accuracy(synthetic_dir)
    assert set(chance) == set(SPLIT_KEYS) and all(0 < value < 100 for value in chance.values())


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_evaluate_to_the_same_accuracy(trained, synthetic_dir, tmp_path) -> None:
    out, metrics = trained
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist_out = tmp_path / "dist"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               str(REPO / "Grounding.py"), "--config", str(REPO / "configs" / "demo" / "Grounding.yaml"),
               "--output_dir", str(dist_out), "--device", "cpu", "--evaluate",
               "--checkpoint", str(out / "checkpoint_last.pth"), "--opts", *grounding_opts(synthetic_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (dist_out / "log.jsonl").read_text().splitlines()]
    evaluated = [record for record in records if SPLIT_KEYS["val"] in record]
    assert evaluated, records
    for key in SPLIT_KEYS.values():
        assert evaluated[-1][key] == pytest.approx(metrics[key], abs=1e-9), key
