"""Features of your own images (and texts) from a trained model, into one safetensors file.

    python -m tools.extract_features --checkpoint output/retrieval/checkpoint_best.pth --images photos/ \
        --texts captions.json --out feats.safetensors

Writes ``image_feats`` (N, embed_dim) and ``text_feats`` (M, embed_dim), the L2-normalised ITC features (cosine
similarity = dot product), and with ``--embeds`` the full ``image_embeds`` (N, 1 + patches, width: the image encoder's
tokens) and ``text_embeds`` (M, width: the text encoder's [CLS]). The ids (image paths relative to the folder or as the
JSON names them; text ids) are in the file's metadata and in ``<out>.json`` beside it, with the images skipped
because they cannot be read (and why): those get no row.

``--images``: a folder (every JPEG/PNG/... under it) or a JSON list of paths or of ALBEF annotations
``[{"image": ...}]`` (paths relative to ``--image_root``, default the JSON's folder). ``--texts``: a JSON list of
strings, or of objects with ``text`` or ``caption`` (a string or a list: one text each) and optionally ``id``.

Resumable: the work goes in chunks of ``--chunk_size`` items to ``<out>.parts/`` with a progress record
(``progress.json``); a run that is interrupted (or stopped by ``--max_chunks``) continues where it stopped when run
again with the same arguments, and the parts are removed once ``<out>`` is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.inference import Predictor
from tools.common import (
    ImageItem,
    add_model_args,
    collect_images,
    encode_images,
    load_predictor,
    publish,
    read_json_list,
    report_skipped,
    run_command,
    write_json,
)

log = logging.getLogger(__name__)

PROGRESS = "progress.json"


# ---- inputs ---------------------------------------------------------------------------------------------------------
def load_texts(path: str | Path) -> tuple[list[str], list[str]]:
    """(ids, texts) of a --texts JSON file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--texts {path} does not exist")
    entries = read_json_list(path, "--texts", "strings or of {\"text\": ...}")
    ids: list[str] = []
    texts: list[str] = []
    for index, entry in enumerate(entries):
        if isinstance(entry, str):
            ids.append(str(index))
            texts.append(entry)
            continue
        value = entry.get("text", entry.get("caption")) if isinstance(entry, dict) else None
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values or not all(isinstance(text, str) for text in values):
            raise ValueError(f"--texts {path}: entry {index} has no text (expected a string, or an object with "
                             f"'text' or 'caption': a string or a list of strings; got {str(entry)[:80]})")
        base = str(entry.get("id", entry.get("image", index)))
        for number, text in enumerate(values):
            ids.append(base if len(values) == 1 else f"{base}#{number}")
            texts.append(text)
    return ids, texts


# ---- chunks and their progress record -------------------------------------------------------------------------------
def fingerprint(checkpoint: str | Path, image_ids: Sequence[str], texts: Sequence[str], embeds: bool,
                chunk_size: int) -> str:
    """What makes two runs the same work: the checkpoint file (path, size, time), the inputs and the options."""
    stat = Path(checkpoint).stat()
    text = json.dumps([str(Path(checkpoint).resolve()), stat.st_size, stat.st_mtime_ns, list(image_ids),
                       list(texts), embeds, chunk_size])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ChunkStore:
    """``<out>.parts/``: one safetensors file per finished chunk (written whole, then renamed) and progress.json."""

    def __init__(self, folder: Path, key: str, counts: dict[str, int], chunk_size: int) -> None:
        self.folder, self.chunk_size, self.counts = folder, chunk_size, counts
        self.done: dict[str, list[int]] = {kind: [] for kind in counts}
        record = folder / PROGRESS
        if record.is_file():
            try:
                state = json.loads(record.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                state = {}
            if state.get("key") == key:
                self.done = {kind: sorted(int(k) for k in state.get("done", {}).get(kind, [])
                                          if self.path(kind, int(k)).is_file()) for kind in counts}
            else:
                log.warning("%s holds the progress of another run (other inputs, checkpoint or options): starting "
                            "over", folder)
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.key = key
        self._save_record()

    def num_chunks(self, kind: str) -> int:
        return -(-self.counts[kind] // self.chunk_size)

    def path(self, kind: str, chunk: int) -> Path:
        return self.folder / f"{kind}_{chunk:06d}.safetensors"

    def rows(self, kind: str, chunk: int) -> range:
        return range(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.counts[kind]))

    def todo(self, kind: str) -> list[int]:
        return [chunk for chunk in range(self.num_chunks(kind)) if chunk not in self.done[kind]]

    def write(self, kind: str, chunk: int, tensors: dict[str, torch.Tensor], errors: list[str]) -> None:
        path = self.path(kind, chunk)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({name: value.contiguous() for name, value in tensors.items()}, str(tmp),
                  metadata={"errors": json.dumps(errors)})
        os.replace(tmp, path)
        self.done[kind].append(chunk)
        self._save_record()

    def read(self, kind: str, chunk: int) -> tuple[dict[str, torch.Tensor], list[str]]:
        with safe_open(str(self.path(kind, chunk)), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
            return tensors, json.loads((handle.metadata() or {}).get("errors", "[]"))

    def _save_record(self) -> None:
        write_json(self.folder / PROGRESS, {"key": self.key, "chunk_size": self.chunk_size, "counts": self.counts,
                                            "done": self.done})


# ---- extraction -----------------------------------------------------------------------------------------------------
def extract(predictor: Predictor, checkpoint: str | Path, images: Sequence[ImageItem], out: str | Path,
            texts: tuple[list[str], list[str]] | None = None, embeds: bool = False, chunk_size: int = 1024,
            num_workers: int = 2, max_chunks: int | None = None) -> dict[str, Any] | None:
    """Write ``out`` (see the module docstring); returns its summary (ids, skipped images), or None when
    ``max_chunks`` new chunks were done before the end (run again to continue)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: expected a .safetensors file name")
    if chunk_size < 1:
        raise ValueError(f"--chunk_size must be >= 1, got {chunk_size}")
    text_ids, text_list = texts or ([], [])
    image_ids = [item.id for item in images]
    store = ChunkStore(out.with_name(out.name + ".parts"), fingerprint(checkpoint, image_ids, text_list, embeds,
                                                                        chunk_size),
                       {"images": len(images), "texts": len(text_list)}, chunk_size)
    done_before = {kind: len(chunks) for kind, chunks in store.done.items()}
    if any(done_before.values()):
        log.info("resuming from %s: %d of %d image chunks and %d of %d text chunks already done", store.folder,
                 done_before["images"], store.num_chunks("images"), done_before["texts"], store.num_chunks("texts"))
    budget = max_chunks if max_chunks is not None else float("inf")
    try:
        budget -= _image_chunks(predictor, images, store, embeds, num_workers, budget)
        for chunk in store.todo("texts")[:None if budget == float("inf") else max(0, int(budget))]:
            part = [text_list[row] for row in store.rows("texts", chunk)]
            feats, cls = predictor.text_features(part, return_embeds=True)
            store.write("texts", chunk, {"feats": feats, **({"embeds": cls} if embeds else {})}, [""] * len(part))
    except KeyboardInterrupt:
        done = sum(len(chunks) for chunks in store.done.values())
        log.warning("interrupted: %d finished chunks are kept in %s; run the same command again to continue",
                    done, store.folder)
        raise
    if store.todo("images") or store.todo("texts"):
        left = len(store.todo("images")) + len(store.todo("texts"))
        log.info("stopped after --max_chunks %s new chunks; %d chunks left: run the same command again to continue",
                 max_chunks, left)
        return None
    return _merge(store, out, images, text_ids, checkpoint, embeds)


def _image_chunks(predictor: Predictor, images: Sequence[ImageItem], store: ChunkStore, embeds: bool,
                  num_workers: int, budget: float) -> int:
    """Encode the image chunks not yet done (at most ``budget``); returns how many were written."""
    chunks = store.todo("images")
    if budget != float("inf"):
        chunks = chunks[:int(budget)]
    if not chunks:
        return 0
    rows = [row for chunk in chunks for row in store.rows("images", chunk)]
    pending: dict[str, list] = {"feats": [], "embeds": [], "errors": []}
    position = 0  # rows of the current chunk collected so far
    written = 0
    done_rows = sum(len(store.rows("images", chunk)) for chunk in store.done["images"])
    for batch in encode_images(predictor, [images[row] for row in rows], num_workers, embeds=embeds,
                               done=done_rows, total=len(images)):
        for offset in range(len(batch.indices)):
            pending["feats"].append(batch.feats[offset])
            pending["embeds"].append(batch.embeds[offset] if batch.embeds is not None else None)
            pending["errors"].append(batch.errors[offset])
            position += 1
            chunk = chunks[written]
            if position == len(store.rows("images", chunk)):
                tensors = {"feats": torch.stack(pending["feats"])}
                if embeds:
                    tensors["embeds"] = torch.stack(pending["embeds"])
                store.write("images", chunk, tensors, pending["errors"])
                pending = {"feats": [], "embeds": [], "errors": []}
                position, written = 0, written + 1
    return written


def _merge(store: ChunkStore, out: Path, images: Sequence[ImageItem], text_ids: list[str],
           checkpoint: str | Path, embeds: bool) -> dict[str, Any]:
    tensors: dict[str, list[torch.Tensor]] = {}
    kept: list[str] = []
    skipped: list[dict[str, str]] = []
    for chunk in range(store.num_chunks("images")):
        part, errors = store.read("images", chunk)
        ok = torch.tensor([not error for error in errors], dtype=torch.bool)
        for name, value in part.items():
            tensors.setdefault(f"image_{name}", []).append(value[ok])
        for row, error in zip(store.rows("images", chunk), errors, strict=True):
            if error:
                skipped.append({"image": images[row].id, "reason": error})
            else:
                kept.append(images[row].id)
    for chunk in range(store.num_chunks("texts")):
        part, _ = store.read("texts", chunk)
        for name, value in part.items():
            tensors.setdefault(f"text_{name}", []).append(value)
    merged = {name: torch.cat(parts).contiguous() for name, parts in tensors.items()}
    summary = {"checkpoint": str(checkpoint), "image_ids": kept, "text_ids": text_ids, "skipped": skipped,
               "tensors": {name: list(value.shape) for name, value in merged.items()}, "embeds": embeds}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(merged, str(tmp), metadata={"image_ids": json.dumps(kept), "text_ids": json.dumps(text_ids),
                                          "skipped": json.dumps(skipped)})
    publish(tmp, out)
    write_json(out.with_suffix(".json"), summary)
    shutil.rmtree(store.folder)
    report_skipped(skipped, len(images))
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.extract_features", description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--images", required=True, help="a folder of images or a JSON list of images")
    parser.add_argument("--image_root", default=None, help="folder of the relative paths in an --images JSON")
    parser.add_argument("--texts", default=None, help="JSON list of texts (strings or {text|caption, id})")
    parser.add_argument("--out", required=True, help="output .safetensors file (its ids: <out>.json)")
    parser.add_argument("--embeds", action="store_true", help="also the full image/text encoder embeddings")
    parser.add_argument("--chunk_size", type=int, default=1024, help="items per resumable chunk")
    parser.add_argument("--max_chunks", type=int, default=None,
                        help="stop after this many new chunks (run again to continue), e.g. for time-limited jobs")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = build_parser().parse_args(argv)
    images = collect_images(args.images, args.image_root)
    texts = load_texts(args.texts) if args.texts else None
    predictor = load_predictor(args)
    summary = extract(predictor, args.checkpoint, images, args.out, texts, args.embeds, args.chunk_size,
                      args.num_workers, args.max_chunks)
    if summary is not None:
        shapes = ", ".join(f"{name} {tuple(shape)}" for name, shape in summary["tensors"].items())
        print(f"wrote {args.out}: {shapes}; ids in {Path(args.out).with_suffix('.json')}; "
              f"{len(summary['skipped'])} unreadable images skipped")
    return summary


if __name__ == "__main__":
    run_command(main, "tools.extract_features")
