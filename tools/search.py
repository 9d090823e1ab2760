"""Search your own images by text or by image with a trained model.

    python -m tools.search index --checkpoint output/retrieval/checkpoint_best.pth --images photos/ --out index/
    python -m tools.search query index/ "a dog on a red sofa" --top_k 10 [--rerank]
    python -m tools.search query index/ --image query.jpg --top_k 10

``index`` stores the normalised ITC features of every image under the folder (tools.extract_features: batched,
resumable, unreadable files skipped and listed) in ``index/features.safetensors`` and the image list and checkpoint
in ``index/index.json``. ``query`` ranks the images by cosine similarity to the text's (or the query image's) ITC
feature; ``--rerank`` re-orders the ``top_k`` by the ITM head's match probability (ALBEF's retrieval: ITC picks the
candidates, ITM scores them). The results are printed as JSON and written to ``<out>/results.json`` and a static HTML
page of thumbnails ``<out>/results.html`` (the thumbnails inside the page: it can be mailed or copied alone).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import torch
from safetensors.torch import load_file

from dataset.transforms import ImageDecodeError, load_image, resize_bicubic
from tools.common import add_model_args, collect_images, load_predictor, run_command, write_json
from tools.extract_features import extract

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
FEATURES_FILE = "features.safetensors"
THUMBNAIL_PX = 192  # longest side of a thumbnail in the HTML page


def build_index(args: argparse.Namespace) -> dict[str, Any]:
    """``index``: features of every image under --images into --out (resumable, like tools.extract_features)."""
    folder = Path(args.out)
    images = collect_images(args.images, args.image_root)
    predictor = load_predictor(args)
    summary = extract(predictor, args.checkpoint, images, folder / FEATURES_FILE, chunk_size=args.chunk_size,
                      num_workers=args.num_workers)
    assert summary is not None  # no max_chunks: every chunk is done
    paths = {item.id: item.path.resolve() for item in images}
    index = {"checkpoint": str(Path(args.checkpoint).resolve()), "images_root": str(Path(args.images).resolve()),
             "images": [{"id": image_id, "path": str(paths[image_id])} for image_id in summary["image_ids"]],
             "skipped": summary["skipped"]}
    write_json(folder / INDEX_FILE, index)
    print(f"indexed {len(index['images'])} images into {folder} ({len(index['skipped'])} unreadable skipped)")
    return index


def load_index(folder: str | Path) -> tuple[dict[str, Any], torch.Tensor]:
    folder = Path(folder)
    record = folder / INDEX_FILE
    if not record.is_file():
        raise FileNotFoundError(f"{folder} is not a search index (no {INDEX_FILE}): build one with python -m "
                                "tools.search index --checkpoint CK --images DIR --out DIR")
    index = json.loads(record.read_text(encoding="utf-8"))
    feats = load_file(str(folder / FEATURES_FILE))["image_feats"]  # (N, embed_dim), normalised
    if feats.shape[0] != len(index["images"]):
        raise ValueError(f"{folder}: {FEATURES_FILE} has {feats.shape[0]} rows for {len(index['images'])} images; "
                         "build the index again")
    return index, feats


def run_query(args: argparse.Namespace) -> dict[str, Any]:
    """``query``: the --top_k images of the index nearest to the text (or --image), optionally re-ranked by ITM."""
    if (args.text is None) == (args.image is None):
        raise ValueError("give either a text query or --image, not both / neither")
    if args.rerank and args.image is not None:
        raise ValueError("--rerank scores (image, text) pairs with the ITM head: it needs a text query")
    if args.top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {args.top_k}")
    index, feats = load_index(args.index)
    if not index["images"]:
        raise ValueError(f"{args.index} holds no images")
    predictor = load_predictor(args, checkpoint=args.checkpoint or index["checkpoint"])
    query = predictor.text_features([args.text]) if args.text is not None else predictor.image_features([args.image])
    similarity = (feats.float() @ query[0].float())  # (N,) cosine
    top_k = min(args.top_k, len(index["images"]))
    scores, rows = similarity.topk(top_k)
    results = [{"image": index["images"][row]["id"], "path": index["images"][row]["path"],
                "similarity": round(float(score), 5)} for score, row in zip(scores, rows.tolist(), strict=True)]
    if args.rerank:
        itm = predictor.match([result["path"] for result in results], [args.text])
        for result, prob in zip(results, itm.tolist(), strict=True):
            result["itm"] = round(float(prob), 5)
        results.sort(key=lambda result: -result["itm"])
    for rank, result in enumerate(results, start=1):
        result["rank"] = rank
    out = Path(args.out or args.index)
    answer = {"query": args.text if args.text is not None else str(args.image),
              "kind": "text" if args.text is not None else "image", "rerank": bool(args.rerank),
              "index": str(args.index), "results": results}
    write_json(out / "results.json", answer)
    write_html(out / "results.html", answer)
    print(json.dumps(answer, indent=1, ensure_ascii=False))
    return answer


def thumbnail_uri(path: str | Path) -> str:
    """A JPEG thumbnail (longest side THUMBNAIL_PX) as a data: URI; '' for a file that cannot be read now."""
    try:
        image = load_image(path)
    except ImageDecodeError as err:
        log.warning("%s", err)
        return ""
    height, width = image.shape[:2]
    scale = THUMBNAIL_PX / max(height, width)
    if scale < 1:
        image = resize_bicubic(image, max(1, round(width * scale)), max(1, round(height * scale)))
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return "data:image/jpeg;base64," + base64.b64encode(data.tobytes()).decode("ascii") if ok else ""


def write_html(path: Path, answer: dict[str, Any]) -> Path:
    """A static page: the query, then one card per result (thumbnail, rank, file name, scores)."""
    def card(result: dict[str, Any]) -> str:
        scores = f"cos {result['similarity']:.3f}" + (f" · ITM {result['itm']:.3f}" if "itm" in result else "")
        uri = thumbnail_uri(result["path"])
        picture = f'<img src="{uri}" alt="{html.escape(result["image"])}">' if uri else "<p>(unreadable)</p>"
        return (f'<figure>{picture}<figcaption>#{result["rank"]} {html.escape(result["image"])}<br>{scores}'
                "</figcaption></figure>")

    query = html.escape(answer["query"])
    if answer["kind"] == "image":
        uri = thumbnail_uri(answer["query"])
        query = f'<img src="{uri}" alt="query image"> {query}' if uri else query
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>search: {html.escape(answer["query"])}</title>
<style>body{{font-family:sans-serif;margin:1.5em}}figure{{display:inline-block;margin:.5em;text-align:center;
vertical-align:top;width:{THUMBNAIL_PX + 8}px}}figcaption{{font-size:.85em;word-break:break-all}}</style></head>
<body><h1>Query ({answer["kind"]}): {query}</h1>
<p>{len(answer["results"])} results from index {html.escape(answer["index"])}{", re-ranked by ITM" if answer["rerank"]
                                                                             else ""}</p>
{"".join(card(result) for result in answer["results"])}
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.search", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="extract and store the features of a folder of images")
    add_model_args(index)
    index.add_argument("--images", required=True, help="a folder of images (or a JSON list of images)")
    index.add_argument("--image_root", default=None, help="folder of the relative paths in an --images JSON")
    index.add_argument("--out", required=True, help="the index folder to write")
    index.add_argument("--chunk_size", type=int, default=1024, help="images per resumable chunk")
    query = commands.add_parser("query", help="the images of an index nearest to a text or an image")
    query.add_argument("index", help="an index folder written by `index`")
    query.add_argument("text", nargs="?", default=None, help="the text query")
    query.add_argument("--image", default=None, help="an image file as the query instead of a text")
    query.add_argument("--top_k", type=int, default=10, help="how many images to return")
    query.add_argument("--rerank", action="store_true", help="re-rank the top_k by the ITM match probability")
    query.add_argument("--out", default=None, help="folder for results.json / results.html (default: the index)")
    add_model_args(query, checkpoint_required=False)  # --checkpoint: default the index's own
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    return build_index(args) if args.command == "index" else run_query(args)


if __name__ == "__main__":
    run_command(main, "tools.search")
