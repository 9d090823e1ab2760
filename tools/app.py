"""A local web demo of trained checkpoints: upload an image, type a text, and see the ITM score with its Grad-CAM
sheet, the caption, the VQA answer, and the nearest images of an indexed folder.

    bash run.sh app --checkpoint output/retrieval/checkpoint_best.pth [--index index/] [--port 7860]
    python -m tools.app --checkpoint pretrain.pth caption.pth vqa.pth --index index/ --answer_list answers.json

Each --checkpoint is loaded for inference (models.inference) and serves the heads it has: ITM / ITC (pretraining,
retrieval, grounding: match, Grad-CAM, search), captioning (Caption.py), VQA (VQA.py); a tab whose head no checkpoint
has says so. --index is a folder written by ``python -m tools.search index``. The app listens on 127.0.0.1 only,
with Gradio's analytics off (GRADIO_ANALYTICS_ENABLED=False) and no web fonts: it makes no request off the machine.

`DemoApp` holds the callables (plain Python, tested without a browser); `build_blocks` puts the Gradio page on top.
Gradio is an optional extra: ``pip install -e .[app]`` (``bash run.sh app`` installs it when missing).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.inference import Predictor, to_rgb_array
from models.model_caption import AlbefCaption
from models.model_vqa import AlbefVQA
from tasks.gradcam_view import Explanation, explain_answer, explain_caption, explain_text, render

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# Set before gradio is imported: no usage statistics, no version check, no hub telemetry.
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1",
               "DO_NOT_TRACK": "1"}


@dataclass
class MatchResult:
    itm: float  # ITM probability that the text matches the image
    similarity: float  # ITC cosine similarity of the image and the text
    explanation: Explanation
    sheet: np.ndarray  # the Grad-CAM sheet (H, W, 3) uint8 RGB


@dataclass
class HeadResult:
    text: str  # the caption, or the answer
    explanation: Explanation
    sheet: np.ndarray


class DemoApp:
    """The demo's functions on loaded checkpoints: ``match``, ``caption``, ``answer``, ``search``. Images are
    anything models.inference accepts (a path, a PIL image, a uint8 (H, W, 3) array)."""

    def __init__(self, predictors: Sequence[Predictor], index: str | Path | None = None,
                 answer_list: Sequence[str] | str | Path | None = None, top_k: int = 8) -> None:
        self.itm = next((p for p in predictors if hasattr(p.model, "itm_head")), None)
        self.captioner = next((p for p in predictors if isinstance(p.model, AlbefCaption)), None)
        self.vqa = next((p for p in predictors if isinstance(p.model, AlbefVQA)), None)
        if not (self.itm or self.captioner or self.vqa):
            raise ValueError("none of the checkpoints has a head the demo serves (ITM, captioning or VQA)")
        self.answer_list = answer_list
        self.top_k = top_k
        self.index: dict[str, Any] | None = None
        self.index_feats: torch.Tensor | None = None
        if index is not None:
            from tools.search import load_index

            if self.itm is None:
                raise ValueError("--index needs a checkpoint with the ITC head (pretraining / retrieval) for the "
                                 "text features")
            self.index, self.index_feats = load_index(index)
            log.info("search index %s: %d images (built with %s)", index, len(self.index["images"]),
                     self.index["checkpoint"])

    @classmethod
    def from_checkpoints(cls, checkpoints: Sequence[str | Path], index: str | Path | None = None,
                         device: str = "cpu", answer_list: Sequence[str] | str | Path | None = None,
                         tokenizer: str | None = None) -> DemoApp:
        predictors = []
        for checkpoint in checkpoints:
            predictor = Predictor.from_checkpoint(checkpoint, device=device, tokenizer=tokenizer)
            log.info("%s: %s", checkpoint, predictor.task_name)
            predictors.append(predictor)
        return cls(predictors, index, answer_list)

    @property
    def heads(self) -> list[str]:
        heads = [name for name, predictor in (("itm", self.itm), ("caption", self.captioner), ("vqa", self.vqa))
                 if predictor is not None]
        return heads + (["search"] if self.index is not None else [])

    @staticmethod
    def _image(image: Any) -> np.ndarray:
        if image is None:
            raise ValueError("upload an image first")
        return to_rgb_array(image)

    def _need(self, predictor: Predictor | None, what: str, checkpoint: str) -> Predictor:
        if predictor is None:
            raise ValueError(f"{what} needs a {checkpoint} checkpoint: start the app with one (--checkpoint)")
        return predictor

    def match(self, image: Any, text: str) -> MatchResult:
        """ITM probability and ITC similarity of (image, text), and the ITM Grad-CAM sheet (a map per word)."""
        predictor = self._need(self.itm, "matching", "pretraining / retrieval / grounding")
        if not text or not text.strip():
            raise ValueError("type a text to match with the image")
        rgb = self._image(image)
        explanation = explain_text(predictor, rgb, text, "itm")
        similarity = float(predictor.similarity([rgb], [text])[0, 0]) * float(predictor.model.temp.detach())
        return MatchResult(itm=explanation.itm_prob, similarity=similarity, explanation=explanation,
                           sheet=render(rgb, explanation))

    def caption(self, image: Any) -> HeadResult:
        """The generated caption and its Grad-CAM sheet (a map per word)."""
        predictor = self._need(self.captioner, "captioning", "captioning (Caption.py)")
        rgb = self._image(image)
        explanation = explain_caption(predictor, rgb)
        return HeadResult(explanation.text, explanation, render(rgb, explanation))

    def answer(self, image: Any, question: str) -> HeadResult:
        """The VQA answer and its Grad-CAM sheet (the answer's map, a map per question word)."""
        predictor = self._need(self.vqa, "question answering", "VQA (VQA.py)")
        if not question or not question.strip():
            raise ValueError("type a question about the image")
        rgb = self._image(image)
        explanation = explain_answer(predictor, rgb, question, self.answer_list)
        return HeadResult(explanation.answer or "", explanation, render(rgb, explanation))

    def search(self, text: str, top_k: int | None = None) -> list[dict[str, Any]]:
        """The ``top_k`` images of the index nearest to the text (ITC cosine): [{path, image, similarity}]."""
        if self.index is None or self.index_feats is None:
            raise ValueError("no search index: start the app with --index DIR (python -m tools.search index ...)")
        if not text or not text.strip():
            raise ValueError("type a text to search for")
        predictor = self._need(self.itm, "search", "pretraining / retrieval")
        query = predictor.text_features([text])[0].float()
        similarity = self.index_feats.float() @ query
        scores, rows = similarity.topk(min(int(top_k or self.top_k), len(self.index["images"])))
        return [{"path": self.index["images"][row]["path"], "image": self.index["images"][row]["id"],
                 "similarity": round(float(score), 4)} for score, row in zip(scores, rows.tolist(), strict=True)]


def import_gradio() -> Any:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import gradio
    except ImportError as err:
        raise ImportError("the web demo needs gradio: pip install -e '.[app]' (bash run.sh app installs it)") from err
    return gradio


def build_blocks(app: DemoApp) -> Any:
    """The Gradio page: one tab per head (a tab whose head is missing says which checkpoint brings it)."""
    gr = import_gradio()

    def guarded(function: Any) -> Any:
        def call(*args: Any) -> Any:
            try:
                return function(*args)
            except (ValueError, OSError) as err:  # a user error: shown in the page, not a traceback
                raise gr.Error(str(err)) from err
        return call

    def do_match(image: Any, text: str) -> tuple[str, str, np.ndarray]:
        result = app.match(image, text)
        return f"{result.itm:.4f}", f"{result.similarity:.4f}", result.sheet

    def do_caption(image: Any) -> tuple[str, np.ndarray]:
        result = app.caption(image)
        return result.text, result.sheet

    def do_answer(image: Any, question: str) -> tuple[str, np.ndarray]:
        result = app.answer(image, question)
        return result.text, result.sheet

    def do_search(text: str, top_k: float) -> tuple[list[tuple[str, str]], str]:
        results = app.search(text, int(top_k))
        gallery = [(item["path"], f"{item['image']}  {item['similarity']:.3f}") for item in results]
        ranking = "\n".join(f"{rank}. {item['image']}  {item['similarity']:.4f}"
                            for rank, item in enumerate(results, start=1))
        return gallery, ranking

    def missing(text: str) -> None:
        gr.Markdown(f"*{text}*")

    with gr.Blocks(title="AlignFuse demo", analytics_enabled=False) as blocks:
        gr.Markdown("## AlignFuse: match, caption, answer, search\nUpload an image, then use a tab. Heat maps: "
                    "Grad-CAM of each word (red = the regions the score rests on).")
        image = gr.Image(label="Image", type="numpy", elem_id="image", height=300)
        with gr.Tab("Match + Grad-CAM", elem_id="tab-match"):
            if app.itm is None:
                missing("needs a pretraining / retrieval / grounding checkpoint (ITM head)")
            else:
                text = gr.Textbox(label="Text", elem_id="match-text", placeholder="a red circle on the left")
                button = gr.Button("Match", elem_id="match-button", variant="primary")
                with gr.Row():
                    itm = gr.Textbox(label="ITM match probability", elem_id="itm-score", interactive=False)
                    itc = gr.Textbox(label="ITC cosine similarity", elem_id="itc-score", interactive=False)
                sheet = gr.Image(label="Grad-CAM", elem_id="match-sheet", interactive=False, show_label=False)
                button.click(guarded(do_match), [image, text], [itm, itc, sheet])
                text.submit(guarded(do_match), [image, text], [itm, itc, sheet])
        with gr.Tab("Caption", elem_id="tab-caption"):
            if app.captioner is None:
                missing("needs a captioning checkpoint (Caption.py)")
            else:
                button = gr.Button("Caption", elem_id="caption-button", variant="primary")
                caption = gr.Textbox(label="Caption", elem_id="caption-text", interactive=False)
                sheet = gr.Image(label="Grad-CAM per word", elem_id="caption-sheet", interactive=False,
                                 show_label=False)
                button.click(guarded(do_caption), [image], [caption, sheet])
        with gr.Tab("VQA", elem_id="tab-vqa"):
            if app.vqa is None:
                missing("needs a VQA checkpoint (VQA.py)")
            else:
                question = gr.Textbox(label="Question", elem_id="vqa-question")
                button = gr.Button("Answer", elem_id="vqa-button", variant="primary")
                answer = gr.Textbox(label="Answer", elem_id="vqa-answer", interactive=False)
                sheet = gr.Image(label="Grad-CAM", elem_id="vqa-sheet", interactive=False, show_label=False)
                button.click(guarded(do_answer), [image, question], [answer, sheet])
        with gr.Tab("Search", elem_id="tab-search"):
            if app.index is None:
                missing("start the app with --index DIR (python -m tools.search index --checkpoint CK --images "
                        "DIR --out DIR)")
            else:
                query = gr.Textbox(label="Search text", elem_id="search-text")
                top_k = gr.Slider(1, 32, value=app.top_k, step=1, label="top k")
                button = gr.Button("Search", elem_id="search-button", variant="primary")
                ranking = gr.Textbox(label="Ranking", elem_id="search-ranking", interactive=False, lines=4)
                gallery = gr.Gallery(label="Nearest images", elem_id="search-gallery", columns=4)
                button.click(guarded(do_search), [query, top_k], [gallery, ranking])
    return blocks


def launch(app: DemoApp, port: int = DEFAULT_PORT, block: bool = True) -> Any:
    """Serve the page on http://127.0.0.1:port (local only; no share link, no server-side rendering process)."""
    gr = import_gradio()
    blocks = build_blocks(app)
    allowed = [str(Path(item["path"]).parent) for item in (app.index or {}).get("images", [])]
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # system fonts: no Google Fonts request
    blocks.launch(server_name=HOST, server_port=port, share=False, inbrowser=False, prevent_thread_lock=True,
                  ssr_mode=False, allowed_paths=sorted(set(allowed)), theme=theme, quiet=True, footer_links=[])
    print(f"AlignFuse demo on http://{HOST}:{port} (heads: {', '.join(app.heads)})", flush=True)
    if block:
        blocks.block_thread()
    return blocks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.app", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", nargs="+", required=True,
                        help="checkpoint(s) (.pth / .safetensors): each serves the heads it has")
    parser.add_argument("--index", default=None, help="a search index folder (python -m tools.search index)")
    parser.add_argument("--answer_list", default=None, help="VQA candidate answers (default: the config's)")
    parser.add_argument("--tokenizer", default=None, help="vocab.txt / hub name (default: each config's)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port on 127.0.0.1")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1..65535, got {args.port}")
    import_gradio()  # before the minutes of loading: a missing extra is said at once
    app = DemoApp.from_checkpoints(args.checkpoint, args.index, args.device, args.answer_list, args.tokenizer)
    launch(app, args.port)


if __name__ == "__main__":
    from tools.common import run_command

    run_command(main, "tools.app")
