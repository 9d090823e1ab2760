"""tools/app.py, the local web demo: its callables on tiny random checkpoints of every head (no browser), the Gradio
page built on them, and the real command (python -m tools.app) on the session's demo pretraining driven by a headless
Chromium from the system packages through Playwright: upload an image, type a text, read the ITM score back, search
the indexed folder, take a screenshot; no request may leave 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dataset.tokenizer import build_tokenizer
from models import create_model
from tests.test_predict import TINY_MODEL
from tools.app import DemoApp, build_parser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (apt-get install chromium); .ci/run installs it
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _required() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in ("CI", "ALBEF_REFERENCE_REQUIRED"))


def _need(ok: bool, reason: str) -> None:
    """Skip with the reason on a developer machine; under CI a missing browser or package is a failure."""
    if not ok:
        (pytest.fail if _required() else pytest.skip)(f"the browser test cannot run: {reason}")


def _images(folder: Path, synthetic_dir: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((synthetic_dir / "images").glob("*.jpg"))[:count]
    return [Path(shutil.copy(source, folder / source.name)) for source in sources]


@pytest.fixture(scope="module")
def head_checkpoints(synthetic_dir, tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints of the three heads (ITM, captioning, VQA), an answer list and a search index."""
    from tools.search import main as search

    out = tmp_path_factory.mktemp("app")
    tokenizer = build_tokenizer(str(synthetic_dir / "vocab.txt"))
    paths = {}
    for task in ("retrieval", "caption", "vqa"):
        config = {"model": {**TINY_MODEL, "tokenizer": str(synthetic_dir / "vocab.txt")}, "data": {"max_tokens": 24},
                  "generation": {"num_beams": 2, "max_length": 6, "min_length": 3}}
        torch.manual_seed(0)
        model = create_model(task, config["model"], tokenizer=tokenizer)
        paths[task] = out / f"{task}.pth"
        torch.save({"model": model.state_dict(), "config": config}, paths[task])
    paths["answers"] = out / "answers.json"
    paths["answers"].write_text(json.dumps(["red", "blue", "green", "two"]))
    _images(out / "photos", synthetic_dir, 6)
    search(["index", "--checkpoint", str(paths["retrieval"]), "--images", str(out / "photos"), "--out",
            str(out / "index")])
    paths["index"] = out / "index"
    paths["image"] = sorted((out / "photos").glob("*.jpg"))[0]
    return paths


def test_app_functions_serve_every_head(head_checkpoints) -> None:
    ck = head_checkpoints
    app = DemoApp.from_checkpoints([ck["retrieval"], ck["caption"], ck["vqa"]], ck["index"],
                                   answer_list=ck["answers"])
    assert app.heads == ["itm", "caption", "vqa", "search"]
    image = cv2.cvtColor(cv2.imread(str(ck["image"])), cv2.COLOR_BGR2RGB)
    match = app.match(image, "a red circle")
    expected = float(app.itm.match([image], ["a red circle"])[0])
    assert match.itm == pytest.approx(expected, abs=1e-5) and -1 <= match.similarity <= 1
    assert match.explanation.words == ["a", "red", "circle"] and match.sheet.shape[0] >= 224
    caption = app.caption(str(ck["image"]))  # a path works as well as an array
    assert caption.text and caption.explanation.words == caption.text.split()
    answer = app.answer(image, "what colour is it?")
    assert answer.text in json.loads(ck["answers"].read_text())
    assert answer.explanation.summary_label == f"answer: {answer.text}"
    results = app.search("a red circle", top_k=4)
    assert len(results) == 4 and all(Path(item["path"]).is_file() for item in results)
    similarities = [item["similarity"] for item in results]
    assert similarities == sorted(similarities, reverse=True)
    best = app.itm.similarity([results[0]["path"]], ["a red circle"])[0, 0] * float(app.itm.model.temp.detach())
    assert similarities[0] == pytest.approx(float(best), abs=1e-3)
    with pytest.raises(ValueError, match="upload an image"):
        app.match(None, "a red circle")
    with pytest.raises(ValueError, match="type a question"):
        app.answer(image, " ")


def test_app_without_a_head_says_which_checkpoint_brings_it(head_checkpoints) -> None:
    app = DemoApp.from_checkpoints([head_checkpoints["caption"]])
    assert app.heads == ["caption"]
    with pytest.raises(ValueError, match="needs a pretraining / retrieval / grounding checkpoint"):
        app.match(np.zeros((8, 8, 3), np.uint8), "a cat")
    with pytest.raises(ValueError, match="no search index"):
        app.search("a cat")
    with pytest.raises(ValueError, match="--index needs a checkpoint with the ITC head"):
        DemoApp.from_checkpoints([head_checkpoints["caption"]], head_checkpoints["index"])
    with pytest.raises(SystemExit):
        build_parser().parse_args([])  # --checkpoint is required


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the app did not answer on {url} within {timeout} s")


def drive_app(checkpoints: list[Path], photos: list[Path], index: Path, out: Path, text: str = "a red circle",
              caption: bool = True) -> dict[str, object]:
    """Start ``python -m tools.app`` on a free port and drive it with headless Chromium: match (upload the first
    photo, type ``text``, read the ITM score), caption (``caption``: a captioner is among the checkpoints), search;
    screenshots into ``out``. Returns what the page showed and every request that left 127.0.0.1."""
    from playwright.sync_api import sync_playwright

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tools.app", "--checkpoint", *map(str, checkpoints), "--index",
                             str(index), "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    shown: dict[str, object] = {"outside": []}

    def value(selector: str) -> str:
        page.wait_for_function("s => document.querySelector(s) && document.querySelector(s).value !== ''",
                               arg=selector, timeout=60_000)
        return page.locator(selector).input_value()

    try:
        _wait_for(url, proc, timeout=120)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.on("request", lambda request: None if request.url.startswith((url, "data:", "blob:"))
                    else shown["outside"].append(request.url))
            page.goto(url, wait_until="networkidle")
            page.locator("#image input[type=file]").set_input_files(str(photos[0]))
            page.locator("#match-text textarea").fill(text)
            page.locator("#match-button").click()
            shown["itm"] = float(value("#itm-score textarea"))
            page.locator("#match-sheet img").wait_for(timeout=30_000)
            page.screenshot(path=str(out / "match.png"), full_page=True)
            if caption:
                page.get_by_role("tab", name="Caption").click()
                page.locator("#caption-button").click()
                shown["caption"] = value("#caption-text textarea")
            page.get_by_role("tab", name="Search").click()
            page.locator("#search-text textarea").fill("a blue square")
            page.locator("#search-button").click()
            shown["ranking"] = value("#search-ranking textarea").splitlines()
            page.screenshot(path=str(out / "search.png"), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return shown


@pytest.mark.slow
def test_app_in_a_headless_browser(pretrained_demo, tmp_path) -> None:
    """python -m tools.app on the demo pretraining (plus a tiny captioner) and a search index of 8 of its images,
    driven by Chromium: the ITM score the page shows equals DemoApp.match's, the caption DemoApp.caption's, the
    search ranks the indexed images, the screenshot is not blank and shows the Grad-CAM sheet, and the browser made
    no request outside 127.0.0.1 (no analytics, web fonts or CDN)."""
    _need(CHROMIUM.is_file(), f"{CHROMIUM} not found (apt-get install -y chromium)")
    try:
        import gradio  # noqa: F401
        import playwright  # noqa: F401
    except ImportError as err:
        _need(False, f"{err.name} is not installed (pip install -e '.[test]')")
    from tools.search import main as search

    checkpoint = pretrained_demo.checkpoint
    captioner = tmp_path / "caption.pth"
    config = {"model": {**TINY_MODEL, "tokenizer": str(pretrained_demo.data / "vocab.txt")},
              "generation": {"num_beams": 2, "max_length": 6, "min_length": 3}}
    torch.manual_seed(0)
    model = create_model("caption", config["model"], tokenizer=build_tokenizer(config["model"]["tokenizer"]))
    torch.save({"model": model.state_dict(), "config": config}, captioner)
    photos = _images(tmp_path / "photos", pretrained_demo.data, 8)
    search(["index", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "photos"), "--out",
            str(tmp_path / "index")])
    text = "a red circle"
    app = DemoApp.from_checkpoints([checkpoint, captioner])
    expected_itm, expected_caption = app.match(str(photos[0]), text).itm, app.caption(str(photos[0])).text

    shown = drive_app([checkpoint, captioner], photos, tmp_path / "index", tmp_path, text)
    assert shown["outside"] == [], f"the page requested addresses off the machine: {shown['outside'][:5]}"
    assert shown["itm"] == pytest.approx(expected_itm, abs=1e-3)
    assert shown["caption"] == expected_caption
    ranking = shown["ranking"]
    assert len(ranking) == 8 and {line.split()[1] for line in ranking} == {path.name for path in photos}
    shot = cv2.imread(str(tmp_path / "match.png"))
    assert shot.shape[0] >= 800 and shot.shape[1] == 1280
    assert float(shot.std()) > 20  # not blank
    # The Grad-CAM sheet is in the page: the colour bar's saturated blue-to-red ramp shows in the screenshot.
    hsv = cv2.cvtColor(shot, cv2.COLOR_BGR2HSV)
    assert int(((hsv[..., 1] > 150) & (hsv[..., 2] > 100)).sum()) > 5_000
