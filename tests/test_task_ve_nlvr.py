"""VE.py through its real entry point (one process and torchrun with 2 gloo processes) on the synthetic data, and the
accuracy evaluation of VE and NLVR2 against hand-computed values. NLVR.py and Pretrain_nlvr.py: test_task_nlvr.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.classification import evaluate_accuracy
from tests.test_task_retrieval import free_port

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"


class FixedLoader:
    """Stands in for an evaluation loader: fixed batches over a dataset of ``size`` items."""

    def __init__(self, batches: list[dict], size: int) -> None:
        self.batches = batches
        self.dataset = range(size)

    def __iter__(self):
        return iter(self.batches)


def logits_for(preds: list[int], num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(preds), num_classes).float() * 5.0 - 1.0  # (B, C)


@pytest.mark.parametrize(("num_classes", "labels", "preds", "expected"), [
    (3, [2, 0, 1, 1, 0, 2, 2], [2, 1, 1, 0, 0, 2, 0], 100.0 * 4 / 7),  # SNLI-VE
    (2, [1, 0, 0, 1, 1], [1, 0, 1, 1, 0], 60.0),  # NLVR2
])
def test_accuracy_equals_hand_computed(num_classes: int, labels: list[int], preds: list[int],
                                       expected: float) -> None:
    size = len(labels)
    # Two batches in a shuffled order, the second padded with a repeat of item 0 predicted wrongly (as the
    # distributed evaluation sampler pads the last share): the repeat must not count.
    order = [3, 1, 4, 0, 2, *range(5, size)]
    wrong = (preds[0] + 1) % num_classes
    batches = []
    for chunk in (order[:3], order[3:]):
        batches.append({"label": torch.tensor([labels[i] for i in chunk]), "index": torch.tensor(chunk),
                        "logits": logits_for([preds[i] for i in chunk], num_classes)})
    batches[-1] = {"label": torch.cat([batches[-1]["label"], torch.tensor([labels[0]])]),
                   "index": torch.cat([batches[-1]["index"], torch.tensor([0])]),
                   "logits": torch.cat([batches[-1]["logits"], logits_for([wrong], num_classes)])}
    result = evaluate_accuracy(FixedLoader(batches, size), lambda batch: batch, lambda batch: batch["logits"])
    assert result == {"acc": pytest.approx(expected)}
    with pytest.raises(RuntimeError, match="not evaluated"):
        evaluate_accuracy(FixedLoader(batches[:1], size), lambda batch: batch, lambda batch: batch["logits"])


# ------------------------------------------------------------------------------------------------- entry points
def task_opts(synthetic_dir: Path, task: str) -> list[str]:
    s = synthetic_dir
    common = [f"model.tokenizer={s / 'vocab.txt'}", f"data.image_root={s / 'images'}", "data.num_workers=0",
              "train.epochs=1", "train.log_every_steps=2"]
    files = {
        "VE": [f"data.train_file=[{s / 've_train.json'}]", f"data.val_file={s / 've_dev.json'}",
               f"data.test_file={s / 've_test.json'}"],
        "NLVR": [f"data.train_file=[{s / 'nlvr_train.json'}]", f"data.val_file={s / 'nlvr_dev.json'}",
                 f"data.test_file={s / 'nlvr_test.json'}"],
        "Pretrain_nlvr": [f"data.train_file=[{s / 'pretrain.json'}]", f"data.eval_file={s / 'retrieval_test.json'}"],
    }[task]
    return [*common, *files]


def run_in_process(task: str, out: Path, synthetic_dir: Path, *extra: str, flags: tuple[str, ...] = ()) -> dict:
    module = __import__(task)
    return module.main(["--config", str(DEMO / f"{task}.yaml"), "--output_dir", str(out), "--device", "cpu", *flags,
                        "--opts", *task_opts(synthetic_dir, task), *extra])


def run_two_processes(task: str, out: Path, synthetic_dir: Path, *extra: str, flags: tuple[str, ...] = ()) -> dict:
    """torchrun --nproc_per_node=2 <task>.py on CPU (gloo); returns the last evaluation it logged."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / f"{task}.py"), "--config", str(DEMO / f"{task}.yaml"), "--output_dir", str(out),
           "--device", "cpu", *flags, "--opts", *task_opts(synthetic_dir, task), *extra]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if any(key.endswith("/acc") for key in r)]
    return {k: v for k, v in evals[-1].items() if k.endswith("/acc")}


def test_ve_learns_above_chance(synthetic_dir: Path, tmp_path: Path) -> None:
    """A short run with a higher lr: accuracy clearly above the 33.3% of chance on val and test (held-out images)."""
    metrics = run_in_process("VE", tmp_path / "ve", synthetic_dir, "train.epochs=5", "optimizer.lr=1e-3")
    records = [json.loads(line) for line in (tmp_path / "ve" / "log.jsonl").read_text().splitlines()]
    assert len([r for r in records if "val/acc" in r]) == 5  # evaluated after every epoch
    assert (tmp_path / "ve" / "checkpoint_best.pth").is_file()
    assert metrics["val/acc"] > 55.0 and metrics["test/acc"] > 55.0, metrics


@pytest.mark.slow
@pytest.mark.dist
def test_ve_two_processes_evaluate_like_one(synthetic_dir: Path, tmp_path: Path) -> None:
    two = run_two_processes("VE", tmp_path / "two", synthetic_dir, "data.batch_size=8")
    one = run_in_process("VE", tmp_path / "one", synthetic_dir,
                         flags=("--evaluate", "--checkpoint", str(tmp_path / "two" / "checkpoint_last.pth")))
    assert one == two
