"""Models: ``create_model(task, cfg, tokenizer)`` builds a task model; ``load_checkpoint(model, src)`` loads official
ALBEF or AlignFuse weights through the model's ``checkpoint_filter_fn``.

The registry is an explicit table (no import side effects): task name -> "module:Class".
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.albef import MODEL_DEFAULTS, SpecialTokens

log = logging.getLogger(__name__)

MODEL_REGISTRY: dict[str, str] = {
    "pretrain": "models.model_pretrain:AlbefPretrain",
    "retrieval": "models.model_retrieval:AlbefRetrieval",
    "ve": "models.model_ve:AlbefVE",
    "nlvr": "models.model_nlvr:AlbefNLVR",
    "nlvr_pretrain": "models.model_nlvr:AlbefNLVRPretrain",
    "vqa": "models.model_vqa:AlbefVQA",
    "caption": "models.model_caption:AlbefCaption",
    "grounding": "models.model_retrieval:AlbefRetrieval",
}

__all__ = ["MODEL_DEFAULTS", "MODEL_REGISTRY", "SpecialTokens", "create_model", "load_checkpoint", "read_state_dict"]


def model_class(task: str) -> type[nn.Module]:
    if task not in MODEL_REGISTRY:
        raise ValueError(f"unknown model task {task!r}; known: {sorted(MODEL_REGISTRY)}")
    module_name, class_name = MODEL_REGISTRY[task].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def create_model(task: str, cfg: dict[str, Any], tokenizer: Any = None,
                 special: SpecialTokens | None = None) -> nn.Module:
    """Build the model for ``task`` from the ``model:`` config block. Vocabulary size and special token ids come from
    ``tokenizer`` (or ``special``); momentum copies start equal to the online weights."""
    if special is None:
        special = SpecialTokens.from_tokenizer(tokenizer) if tokenizer is not None else SpecialTokens()
    model = model_class(task)(cfg, special)
    if hasattr(model, "copy_params_to_momentum"):
        model.copy_params_to_momentum()
    return model


def read_state_dict(src: str | Path | dict[str, Tensor]) -> dict[str, Tensor]:
    """A state_dict from a path (loaded with weights_only=True: a file that needs arbitrary unpickling is refused) or
    a dict; ALBEF / AlignFuse checkpoints keep the weights under 'model'."""
    if isinstance(src, str | Path):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            src = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError / RuntimeError for unsafe or corrupt files
            raise ValueError(f"refused to load checkpoint {path}: it is corrupt or needs arbitrary unpickling "
                             f"(only tensors and plain containers are accepted): {err}") from err
    if not isinstance(src, dict):
        raise ValueError(f"checkpoint holds a {type(src).__name__}, expected a dict / state_dict")
    state = src.get("model", src) if isinstance(src.get("model", None), dict) else src
    return dict(state)


QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "queue_ptr")


def _drop_mismatched_queues(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The ITC queues are negatives collected during training, not weights: a checkpoint whose queues have another
    length (another model.queue_size) leaves the model's fresh queues in place instead of failing."""
    own = model.state_dict()
    if all(key not in state or key not in own or state[key].shape == own[key].shape for key in QUEUE_KEYS):
        return state
    log.info("checkpoint queues have another size than model.queue_size: starting with fresh queues")
    return {key: value for key, value in state.items() if key not in QUEUE_KEYS}


def load_checkpoint(model: nn.Module, src: str | Path | dict[str, Tensor], strict: bool = False
                    ) -> tuple[list[str], list[str]]:
    """Load weights through ``model.checkpoint_filter_fn`` (documented key surgery, pos_embed resampling).
    Returns (missing, unexpected) keys; with ``strict`` any mismatch is an error."""
    state = read_state_dict(src)
    filter_fn = getattr(model, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    state = _drop_mismatched_queues(state, model)
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint does not match {type(model).__name__}: missing {missing[:10]} "
                         f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})")
    if missing:
        log.warning("missing keys (%d): %s", len(missing), missing[:20])
    if unexpected:
        log.info("unused checkpoint keys (%d): %s", len(unexpected), unexpected[:20])
    return missing, unexpected
