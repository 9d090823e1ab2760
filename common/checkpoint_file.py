"""Reading a checkpoint file that a user hands in: torch.load(weights_only=True), with our own clear refusals, or a
``.safetensors`` file of weights (``tools.export`` writes them) with the config and task stored in its metadata or in a
JSON file beside it.

A leaf module (torch and the standard library only), so that models load official weights without importing the
training engine; `engine.checkpoint` re-exports `load_checkpoint_file` beside the engine's own checkpoint files.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_OPERAND = re.compile(r"Unsupported operand (\d+)")
SAFETENSORS_SUFFIX = ".safetensors"
# Metadata keys of an exported .safetensors file (strings: safetensors metadata is str -> str); the same values sit
# in the sibling <name>.json as {"task": ..., "config": {...}}.
META_TASK = "alignfuse.task"
META_CONFIG = "alignfuse.config"
RESAVE_HINT = ("if it comes from a source you trust, re-save only its weights "
               "(torch.save({'model': model.state_dict()}, 'weights.pth')); otherwise do not use it")


def _refusal(path: Path, err: BaseException) -> ValueError:
    """Our message for a file that torch.load(weights_only=True) did not load: why, and what to do (not torch's
    advice to load it with weights_only=False, which would run whatever the file holds)."""
    text = str(err)
    named = _GLOBAL.search(text)
    operand = _OPERAND.search(text)
    if named is not None:
        return ValueError(
            f"checkpoint {path} was refused: it holds the Python object {named.group(1)}, and unpickling objects "
            "could run code, so nothing in it was loaded (AlignFuse loads only tensors, numbers, strings, lists and "
            f"dicts: torch.load(weights_only=True)); {RESAVE_HINT}")
    if operand is not None or isinstance(err, pickle.UnpicklingError):
        detail = f"unsupported pickle operand {operand.group(1)}" if operand else _first_line(err)
        return ValueError(
            f"checkpoint {path} was refused: it is corrupt or not a torch checkpoint (a raw pickle or another "
            f"format: {detail}), and nothing in it was run; expected a file written by torch.save")
    if path.stat().st_size == 0:
        return ValueError(f"checkpoint {path} is corrupt: the file is empty (0 bytes); was its copy or save cut off?")
    return ValueError(f"checkpoint {path} is corrupt or not a torch checkpoint ({type(err).__name__}: "
                      f"{_first_line(err)}); expected a file written by torch.save")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def sidecar_json(path: str | Path) -> Path:
    """The JSON file beside an exported ``<name>.safetensors``: ``<name>.json``."""
    return Path(path).with_suffix(".json")


def load_safetensors_file(path: str | Path) -> dict[str, Any]:
    """An exported weights file as a checkpoint dict: ``{"model": state_dict}``, plus ``"config"`` and ``"task"`` from
    the file's metadata or, where it has none, from ``<name>.json`` beside it (a plain safetensors file from elsewhere
    has neither: then only ``"model"``)."""
    from safetensors import SafetensorError, safe_open  # only for this format

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        size = path.stat().st_size
        detail = "the file is empty (0 bytes)" if size == 0 else _first_line(err)
        raise ValueError(f"checkpoint {path} is not a readable safetensors file ({detail}); expected a file written "
                         "by python -m tools.export or safetensors.torch.save_file") from None
    out: dict[str, Any] = {"model": state}
    extra: dict[str, Any] = {}
    if META_CONFIG in metadata:
        try:
            extra = {"config": json.loads(metadata[META_CONFIG]), "task": metadata.get(META_TASK) or None}
        except json.JSONDecodeError as err:
            raise ValueError(f"checkpoint {path}: metadata {META_CONFIG!r} is not valid JSON ({err})") from None
    elif sidecar_json(path).is_file():
        side = sidecar_json(path)
        try:
            extra = json.loads(side.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{side} (the config beside {path.name}) is not valid JSON ({err})") from None
        if not isinstance(extra, dict):
            raise ValueError(f"{side}: expected an object {{\"task\": ..., \"config\": {{...}}}}, got "
                             f"{type(extra).__name__}")
    if extra.get("config") is not None:
        out["config"] = extra["config"]
    if extra.get("task"):
        out["task"] = str(extra["task"])
    return out


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """torch.load(path, map_location='cpu', weights_only=True), with clear errors; a ``.safetensors`` file through
    `load_safetensors_file` (``{"model": weights, "config": ..., "task": ...}``).

    A file that needs arbitrary unpickling (custom classes, functions) is refused with a ValueError naming the object
    and never executed; a damaged or foreign file is a ValueError too.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"checkpoint {path} {what}")
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return load_safetensors_file(path)
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol of a file it is about to refuse
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file fails anywhere inside the unpickler (EOFError, KeyError, ...)
        raise _refusal(path, err) from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path}: expected a dict at the top level, got {type(state).__name__}")
    return state
