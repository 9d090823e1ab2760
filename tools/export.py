"""Export a checkpoint's weights alone, as safetensors, with its config: the small file to share and load anywhere.

    python -m tools.export --checkpoint output/retrieval/checkpoint_best.pth --out retrieval.safetensors

Writes ``<out>`` (the model's weights; no optimizer, scheduler, RNG or run state) and ``<out stem>.json`` beside it
(``{"task": ..., "config": {...}, "source": ...}``); the task and config are also in the safetensors metadata, so
either file alone is enough for ``load_model_and_transforms``, ``Predictor``, the tools and every entry script's
``--checkpoint``. The momentum copies (``*_m.*``) and the ITC queues are left out unless ``--keep_momentum``: they only
serve training, and a model loading the file starts its momentum copies from the weights (as from any checkpoint
without them). ``--ema`` exports the EMA weights of a run with ``train.ema_decay`` instead of the model's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from common.checkpoint_file import META_CONFIG, META_TASK, SAFETENSORS_SUFFIX, load_checkpoint_file, sidecar_json
from engine import errors
from models import QUEUE_KEYS
from models.inference import infer_task
from tools.common import publish, run_command, write_json

log = logging.getLogger(__name__)

MOMENTUM_SUFFIX = "_m"  # <module>_m.*: the momentum copy of <module> (models.albef.AlbefBase._build_momentum)


def export_weights(checkpoint: dict[str, Any], keep_momentum: bool = False, ema: bool = False,
                   source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The tensors to export from a loaded checkpoint: its ``model`` (or, with ``ema``, its EMA) weights, without
    the momentum copies and queues unless ``keep_momentum``; each tensor contiguous and with its own storage."""
    if ema:
        averaged = checkpoint.get("ema")
        if not isinstance(averaged, dict):
            raise ValueError(f"{source} holds no EMA weights (trained without train.ema_decay): export without --ema")
        state = {key.removeprefix("module."): value for key, value in averaged.items() if key != "n_averaged"}
    else:
        state = checkpoint["model"] if isinstance(checkpoint.get("model"), dict) else checkpoint
    weights = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not weights:
        raise ValueError(f"{source} holds no weight tensors")
    if not keep_momentum:
        momentum = {key.split(".", 1)[0] for key in weights if key.split(".", 1)[0].endswith(MOMENTUM_SUFFIX)
                    and key.split(".", 1)[0].removesuffix(MOMENTUM_SUFFIX) in {k.split(".", 1)[0] for k in weights}}
        weights = {key: value for key, value in weights.items()
                   if key.split(".", 1)[0] not in momentum and key not in QUEUE_KEYS}
    # safetensors refuses tensors that share memory (tied weights): every tensor gets its own copy.
    return {key: value.detach().contiguous().clone() for key, value in weights.items()}


def export(checkpoint_path: str | Path, out: str | Path, task: str | None = None, keep_momentum: bool = False,
           ema: bool = False) -> dict[str, Any]:
    """Write ``out`` and its JSON (see the module docstring); returns the summary printed by the command."""
    out = Path(out)
    if out.suffix != SAFETENSORS_SUFFIX:
        raise ValueError(f"--out {out}: expected a file name ending in {SAFETENSORS_SUFFIX}")
    checkpoint = load_checkpoint_file(checkpoint_path)
    config = checkpoint.get("config")
    task = task or infer_task(checkpoint)
    if config is None:
        log.warning("%s carries no config (an official file?): the export holds the weights only; loading it will "
                    "need task= / config=", checkpoint_path)
    weights = export_weights(checkpoint, keep_momentum, ema, str(checkpoint_path))
    metadata = {"format": "pt", "source": Path(checkpoint_path).name}
    if task:
        metadata[META_TASK] = task
    if config is not None:
        metadata[META_CONFIG] = json.dumps(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    save_file(weights, str(tmp), metadata=metadata)
    publish(tmp, out)
    write_json(sidecar_json(out), {"task": task, "config": config, "source": str(checkpoint_path),
                                   "ema": ema, "momentum": keep_momentum})
    return {"out": str(out), "tensors": len(weights), "bytes": out.stat().st_size,
            "source_bytes": Path(checkpoint_path).stat().st_size, "task": task}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the training checkpoint (.pth)")
    parser.add_argument("--out", required=True, help="the .safetensors file to write (its config: <out stem>.json)")
    parser.add_argument("--task", default=None, help="the model task, where the checkpoint does not tell")
    parser.add_argument("--keep_momentum", action="store_true", help="also the momentum copies and ITC queues")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the model's")
    parser.add_argument(errors.DEBUG_FLAG, action="store_true", help="show the traceback of a user error")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    summary = export(args.checkpoint, args.out, args.task, args.keep_momentum, args.ema)
    print(f"wrote {summary['out']} ({summary['tensors']} tensors, {summary['bytes'] / 2**20:.1f} MiB; the checkpoint: "
          f"{summary['source_bytes'] / 2**20:.1f} MiB), task {summary['task']}, config in "
          f"{sidecar_json(summary['out'])}")
    return summary


if __name__ == "__main__":
    run_command(main, "tools.export")
