"""Broken and missing images through the real entry scripts: a few broken files among many do not stop pretraining
(with loader workers) and are reported, also when a run stops inside an epoch; a wrong image folder is one clear
error before training; evaluation never scores a stand-in image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_IMAGES = 1500  # what `bash run.sh demo` generates: 1,050 of them are the pretraining images


def _run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _break(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "not_an_image": b"plain text\n"}[how])


@pytest.mark.slow
def test_pretrain_survives_6_broken_of_1050_images_with_workers(tmp_path_factory):
    """The reported case: 0.57% broken images, below the default max_bad_image_fraction of 1%, stopped the run after
    2 failures in 173 loads. One epoch of Pretrain.py with 2 loader workers and the default guard must finish, log
    train/skipped_images = 6 and name the 6 files."""
    from dataset.synthetic import generate

    data = tmp_path_factory.mktemp("demo_data")
    generate(data, num_images=DEMO_IMAGES, image_size=64, seed=0)
    entries = json.loads((data / "pretrain.json").read_text())
    assert len(entries) == 1050
    broken = [Path(entries[index]["image"]) for index in (40, 211, 388, 515, 802, 1003)]
    for path, how in zip(broken, ["empty", "truncated", "not_an_image"] * 2, strict=True):
        _break(path, how)
    out = tmp_path_factory.mktemp("pretrain_broken")
    result = _run("Pretrain.py", "--config", "configs/demo/Pretrain.yaml", "--output_dir", str(out),
                  "--device", "cpu", "--opts", f"data.train_file=[{data / 'pretrain.json'}]", "data.eval_file=",
                  f"model.tokenizer={data / 'vocab.txt'}", "data.num_workers=2", "data.batch_size=35",
                  "train.epochs=1", "scheduler.warmup_steps=5", "train.log_every_steps=10")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reported = [r["train/skipped_images"] for r in _records(out) if "train/skipped_images" in r]
    assert reported == [6]  # one epoch end; 1,050 = 30 batches of 35, so every image was loaded once
    log_text = (out / "log.txt").read_text()
    assert "epoch 0: 6 unreadable image(s) skipped" in log_text
    for path in broken:
        assert str(path) in log_text, f"{path.name} is not named in log.txt"
    assert "max_bad_image_fraction" not in log_text + result.stderr


def test_skipped_images_reported_when_max_steps_stops_inside_an_epoch(synthetic_dir, tmp_path):
    from Pretrain import main

    entries = json.loads((synthetic_dir / "pretrain.json").read_text())[:40]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"")
    entries += [{"image": str(broken), "caption": "a red circle"}] * 40  # half of the samples
    train_file = tmp_path / "half_broken.json"
    train_file.write_text(json.dumps(entries))
    out = tmp_path / "run"
    main(["--config", str(REPO / "configs/demo/Pretrain.yaml"), "--output_dir", str(out), "--device", "cpu",
          "--opts", f"data.train_file=[{train_file}]", "data.eval_file=",
          f"model.tokenizer={synthetic_dir / 'vocab.txt'}", "data.batch_size=8", "data.num_workers=0",
          "data.max_bad_image_fraction=1.0", "train.max_steps=2", "train.epochs=3", "scheduler.warmup_steps=1"])
    reported = [r for r in _records(out) if "train/skipped_images" in r]
    assert len(reported) == 1 and reported[0]["train/skipped_images"] > 0 and reported[0]["epoch"] == 0
    assert "(stopped after batch 2): " in (out / "log.txt").read_text()


def test_wrong_image_root_is_one_error_before_training(synthetic_dir, tmp_path, capsys):
    from VE import main

    def run(image_root: Path) -> str:
        out = tmp_path / f"run_{image_root.name}"
        with pytest.raises(FileNotFoundError) as caught:
            main(["--config", str(REPO / "configs/demo/VE.yaml"), "--output_dir", str(out), "--device", "cpu",
                  "--opts", f"model.tokenizer={synthetic_dir / 'vocab.txt'}", f"data.image_root={image_root}",
                  f"data.train_file=[{synthetic_dir / 've_train.json'}]",
                  f"data.val_file={synthetic_dir / 've_dev.json'}", "data.test_file=", "data.num_workers=0"])
        output = capsys.readouterr().out
        assert "cannot use image" not in output and "step 1/" not in output  # no image was loaded, nothing trained
        assert not (out / "checkpoint_last.pth").exists()
        return str(caught.value)

    # A folder that does not exist.
    message = run(tmp_path / "nowhere")
    assert f"image folder {tmp_path / 'nowhere'} does not exist" in message and "data.image_root" in message
    # A folder that exists but does not hold the images (here one level too high): the error shows a path it tried.
    message = run(synthetic_dir)
    assert f"exists under {synthetic_dir}, e.g. {synthetic_dir}/synth_" in message and "data.image_root" in message


def _retrieval_eval_argv(data: Path, image_root: Path, out: Path, *opts: str) -> list[str]:
    return ["--config", str(REPO / "configs/demo/Retrieval.yaml"), "--output_dir", str(out), "--device", "cpu",
            "--evaluate", "--opts", f"model.tokenizer={data / 'vocab.txt'}", f"data.image_root={image_root}",
            f"data.val_file={data / 'retrieval_val.json'}", "data.test_file=", "eval.k_test=4", *opts]


@pytest.mark.slow
def test_evaluation_never_scores_an_unreadable_image(synthetic_dir, tmp_path):
    from Retrieval import main

    entries = json.loads((synthetic_dir / "retrieval_val.json").read_text())
    images = tmp_path / "images"
    images.mkdir()
    for entry in entries:  # a copy of the val images, one of them then broken
        (images / entry["image"]).write_bytes((synthetic_dir / "images" / entry["image"]).read_bytes())
    _break(images / entries[3]["image"], "truncated")

    # The command a user runs, with a loader worker: a one-line error naming the image, a non-zero exit.
    result = _run("Retrieval.py", *_retrieval_eval_argv(synthetic_dir, images, tmp_path / "strict",
                                                         "data.num_workers=1"))
    assert result.returncode != 0
    assert f"{entries[3]['image']}: truncated" in result.stderr and "entry 3 of" in result.stderr
    assert "Traceback" not in result.stderr and "val/r_mean" not in result.stdout

    # Allowed by the config: the sample is left out and the count is printed beside the metrics.
    metrics = main(_retrieval_eval_argv(synthetic_dir, images, tmp_path / "lenient", "data.num_workers=0",
                                        "data.eval_skip_broken_images=true"))
    assert metrics["val/skipped_images"] == 1.0
    assert 0.0 <= metrics["val/r_mean"] <= 100.0
    log_text = (tmp_path / "lenient" / "log.txt").read_text()
    assert "entry 3 left out of the evaluation (data.eval_skip_broken_images): cannot use image" in log_text
    assert "val/skipped_images=1" in log_text  # printed beside the metrics
