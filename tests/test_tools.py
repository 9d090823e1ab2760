"""The tools for using a trained model, through their commands (`python -m tools.X` in a subprocess, at least once
each) on the session's pretrained demo model (tests/conftest.py `pretrained_demo`) and a folder of ordinary JPEG /
PNG files of mixed sizes with unreadable files among them: feature extraction (resumed after an interruption),
search (index, text query with ITM re-rank, image query, JSON + HTML), zero-shot classification (the README's
commands, beside the majority-class baseline), export to safetensors and an entry script evaluating from it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch
from safetensors.torch import load_file

import Retrieval
from dataset.transforms import load_image
from models import Predictor
from tools import extract_features, search

REPO = Path(__file__).resolve().parents[1]
SIZES = [(64, 64), (100, 80), (37, 120), (300, 200), (48, 48)]  # (height, width)


def run_tool(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def layout(pretrained_demo, tmp_path_factory) -> Path:
    """What `bash run.sh demo` leaves (output/demo/checkpoint_last.pth, data/demo/) and photos/: 20 of its images
    re-saved as JPEG or PNG in five sizes, some in a sub-folder, plus an empty, a truncated and a non-image file."""
    root = tmp_path_factory.mktemp("tools")
    (root / "output" / "demo").mkdir(parents=True)
    os.symlink(pretrained_demo.checkpoint, root / "output" / "demo" / "checkpoint_last.pth")
    demo = root / "data" / "demo"
    demo.mkdir(parents=True)
    for name in ("images", "retrieval_test.json"):
        os.symlink(pretrained_demo.data / name, demo / name)
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    for index, source in enumerate(sorted((pretrained_demo.data / "images").glob("*.jpg"))[:20]):
        height, width = SIZES[index % len(SIZES)]
        image = cv2.resize(cv2.imread(str(source)), (width, height), interpolation=cv2.INTER_AREA)
        folder = photos / "sub" if index % 6 == 0 else photos
        cv2.imwrite(str(folder / f"img_{index:02d}{'.png' if index % 3 == 0 else '.jpg'}"), image)
    (photos / "empty.png").write_bytes(b"")
    (photos / "truncated.jpg").write_bytes((photos / "img_01.jpg").read_bytes()[:300])
    (photos / "notes.txt").write_text("not an image")
    return root


def readable_photos(layout: Path) -> list[Path]:
    photos = layout / "photos"
    return sorted((path for path in photos.rglob("img_*")), key=lambda path: path.relative_to(photos).as_posix())


def test_extract_features_resumes_after_an_interruption(layout, monkeypatch, caplog):
    texts = layout / "texts.json"
    texts.write_text(json.dumps(["a red circle", {"id": "two", "caption": ["a blue square", "a green star"]}]))
    out = layout / "feats.safetensors"
    args = ["--checkpoint", "output/demo/checkpoint_last.pth", "--images", "photos", "--texts", str(texts),
            "--out", str(out), "--chunk_size", "4", "--batch_size", "3", "--num_workers", "1"]
    # 1. The command, stopped on purpose after 2 of its 6 image chunks.
    run_tool("tools.extract_features", *args, "--max_chunks", "2", cwd=layout)
    parts = layout / "feats.safetensors.parts"
    assert not out.exists() and json.loads((parts / "progress.json").read_text())["done"]["images"] == [0, 1]
    # 2. Interrupted (Ctrl-C) while writing its second new chunk: the finished one stays done.
    writes = []
    real_write = extract_features.ChunkStore.write

    def interrupted_write(self, *a, **k):
        if len(writes) == 1:
            raise KeyboardInterrupt
        writes.append(a[:2])
        real_write(self, *a, **k)

    monkeypatch.chdir(layout)
    monkeypatch.setattr(extract_features.ChunkStore, "write", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        extract_features.main(args)
    monkeypatch.undo()
    assert json.loads((parts / "progress.json").read_text())["done"]["images"] == [0, 1, 2]
    # 3. Run again: it continues from the record and finishes.
    monkeypatch.chdir(layout)
    with caplog.at_level("INFO"):
        summary = extract_features.main(args)
    assert "3 of 6 image chunks and 0 of 1 text chunks already done" in caplog.text
    assert not parts.exists()
    photos = readable_photos(layout)
    assert summary["image_ids"] == [path.relative_to(layout / "photos").as_posix() for path in photos]
    assert {item["image"]: item["reason"] for item in summary["skipped"]} == {
        "empty.png": "file is empty (0 bytes)",
        "truncated.jpg": "truncated JPEG (no end-of-image marker after the last scan)"}
    assert summary["text_ids"] == ["0", "two#0", "two#1"]
    assert json.loads(out.with_suffix(".json").read_text())["image_ids"] == summary["image_ids"]
    # The features are the model's, as one uninterrupted call computes them.
    saved = load_file(str(out))
    predictor = Predictor.from_checkpoint(layout / "output" / "demo" / "checkpoint_last.pth")
    assert torch.allclose(saved["image_feats"], predictor.image_features(photos), atol=1e-5)
    assert torch.allclose(saved["text_feats"], predictor.text_features(["a red circle", "a blue square",
                                                                         "a green star"]), atol=1e-5)
    assert torch.allclose(saved["image_feats"].norm(dim=1), torch.ones(len(photos)), atol=1e-5)


def test_search_index_and_queries(layout, monkeypatch, capsys):
    index = layout / "index"
    proc = run_tool("tools.search", "index", "--checkpoint", "output/demo/checkpoint_last.pth", "--images", "photos",
                    "--out", str(index), "--num_workers", "1", cwd=layout)
    assert "indexed 20 images" in proc.stdout and "2 unreadable skipped" in proc.stdout
    assert "skipped 2 of 22 images that cannot be read" in proc.stderr
    monkeypatch.chdir(layout)
    answer = search.main(["query", str(index), "a red circle", "--top_k", "5", "--rerank"])
    assert json.loads(capsys.readouterr().out) == answer == json.loads((index / "results.json").read_text())
    results = answer["results"]
    assert [result["rank"] for result in results] == [1, 2, 3, 4, 5]
    itm = [result["itm"] for result in results]
    assert itm == sorted(itm, reverse=True)
    predictor = Predictor.from_checkpoint(layout / "output" / "demo" / "checkpoint_last.pth")
    cosine = predictor.image_features([result["path"] for result in results]) @ predictor.text_features(
        ["a red circle"])[0]
    assert torch.allclose(cosine, torch.tensor([result["similarity"] for result in results]), atol=1e-4)
    all_cosine = predictor.image_features(readable_photos(layout)) @ predictor.text_features(["a red circle"])[0]
    assert min(result["similarity"] for result in results) >= float(all_cosine.topk(5).values[-1]) - 1e-4
    page = (index / "results.html").read_text()
    assert len(re.findall(r'<img src="data:image/jpeg;base64,[A-Za-z0-9+/=]{100,}"', page)) == 5
    query = layout / "photos" / "img_04.jpg"
    by_image = search.main(["query", str(index), "--image", str(query), "--top_k", "3", "--out", str(layout / "q")])
    assert by_image["results"][0]["image"] == "img_04.jpg" and by_image["results"][0]["similarity"] > 0.9999
    assert (layout / "q" / "results.html").is_file()
    with pytest.raises(ValueError, match="needs a text query"):
        search.main(["query", str(index), "--image", str(query), "--rerank"])


def readme_snippet(pattern: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Use a trained model"):]
    return re.search(pattern, section, re.S).group(1)


def test_zeroshot_readme_commands(layout, monkeypatch):
    """The README's zero-shot commands: the colour ImageFolder of the held-out images, then tools.zeroshot; the model
    beats the majority class (measured: top-1 65.8% vs 27.4%, chance 16.7%)."""
    code = readme_snippet(r"python - <<'PY'[^\n]*\n(.*?)\nPY\n")
    monkeypatch.chdir(layout)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    colours = layout / "data" / "demo" / "colours"
    (colours / "red" / "unreadable.jpg").write_bytes(b"\xff\xd8\xff garbage")
    command = readme_snippet(r"\n(python -m tools.zeroshot [^\n]*)\n")
    proc = run_tool(*command.split()[2:], cwd=layout)
    result = json.loads((layout / "output" / "demo" / "zeroshot" / "zeroshot.json").read_text())
    metrics = result["metrics"]
    print(proc.stdout)
    assert metrics["classes"] == 6 and metrics["images"] == sum(1 for _ in colours.rglob("synth_*.jpg"))
    assert metrics["top5"] >= metrics["top1"] >= 1.5 * metrics["majority_top1"]
    assert [item["image"] for item in result["skipped"]] == ["red/unreadable.jpg"]
    confusion = torch.tensor(result["confusion"])
    assert int(confusion.sum()) == metrics["images"]
    assert float(confusion.diag().sum()) / metrics["images"] * 100 == pytest.approx(metrics["top1"])
    picture = load_image(layout / "output" / "demo" / "zeroshot" / "confusion.png")
    assert picture.shape[0] > 300 and picture.shape[1] > 300
    assert f"top-1 {metrics['top1']:.1f}%" in proc.stdout and "majority class" in proc.stdout


def test_export_then_evaluate_from_safetensors(layout, pretrained_demo):
    out = layout / "output" / "demo" / "model.safetensors"
    proc = run_tool("tools.export", "--checkpoint", "output/demo/checkpoint_last.pth", "--out", str(out), cwd=layout)
    assert "task pretrain" in proc.stdout and out.with_suffix(".json").is_file()
    assert out.stat().st_size < pretrained_demo.checkpoint.stat().st_size / 2  # no optimizer, no momentum copies
    # Predict.py reads it as it reads a .pth.
    from Predict import main as predict

    sheet = layout / "cam.png"
    predict(["--checkpoint", str(out), "--image", str(layout / "photos" / "img_01.jpg"), "--text", "a red circle",
             "--out", str(sheet)])
    assert load_image(sheet).shape[0] > 200
    data = pretrained_demo.data
    metrics = Retrieval.main([
        "--config", str(REPO / "configs" / "demo" / "Retrieval.yaml"), "--checkpoint", str(out), "--evaluate",
        "--output_dir", str(layout / "eval"), "--device", "cpu",
        "--opts", f"model.tokenizer={data / 'vocab.txt'}", f"data.train_file=[{data / 'retrieval_train.json'}]",
        "data.val_file=", f"data.test_file={data / 'retrieval_test.json'}", f"data.image_root={data / 'images'}",
        "eval.k_test=16"])
    # The same held-out set as the pretraining run's own evaluation (k_test 16 there too): the ITC ranking is the
    # same; the ITM re-rank may differ by near-ties (AlbefRetrieval vs AlbefPretrain kernels), within a point.
    assert metrics["test/itc_r_mean"] == pytest.approx(pretrained_demo.metrics["val/itc_r_mean"], abs=1e-4)
    assert metrics["test/r_mean"] == pytest.approx(pretrained_demo.metrics["val/r_mean"], abs=1.0)
