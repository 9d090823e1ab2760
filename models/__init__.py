"""Models: ``create_model(task, cfg, tokenizer)`` builds a task model; ``load_checkpoint(model, src)`` loads official
ALBEF or AlignFuse weights through the model's ``checkpoint_filter_fn``.

The registry is an explicit table (no import side effects): task name -> "module:Class".
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from common.checkpoint_file import load_checkpoint_file  # a leaf: torch.load with weights_only + clear messages
from models.albef import MODEL_DEFAULTS, SpecialTokens
from models.layers import apply_memory_efficient

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

__all__ = ["MODEL_DEFAULTS", "MODEL_REGISTRY", "CheckpointLoad", "Predictor", "SpecialTokens", "create_model",
           "load_checkpoint", "load_checkpoint_detailed", "load_model_and_transforms", "optional_checkpoint_keys",
           "read_state_dict"]


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
    if getattr(model, "memory_efficient", False):  # model.memory_efficient, resolved by the model (models.layers)
        apply_memory_efficient(model)
    if hasattr(model, "copy_params_to_momentum"):
        model.copy_params_to_momentum()
    return model


def read_state_dict(src: str | Path | dict[str, Tensor]) -> dict[str, Tensor]:
    """A state_dict from a path (loaded with weights_only=True: a file that needs arbitrary unpickling is refused) or
    a dict; ALBEF / AlignFuse checkpoints keep the weights under 'model'."""
    if isinstance(src, str | Path):
        src = load_checkpoint_file(src)
    if not isinstance(src, dict):
        raise ValueError(f"checkpoint holds a {type(src).__name__}, expected a dict / state_dict")
    state = src.get("model", src) if isinstance(src.get("model", None), dict) else src
    return dict(state)


QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "queue_ptr")


def _drop_mismatched_queues(state: dict[str, Tensor], model: nn.Module,
                            notes: list[str] | None = None) -> dict[str, Tensor]:
    """The ITC queues are negatives collected during training, not weights: a checkpoint whose queues have another
    length (another model.queue_size) leaves the model's fresh queues in place instead of failing."""
    own = model.state_dict()
    if all(key not in state or key not in own or state[key].shape == own[key].shape for key in QUEUE_KEYS):
        return state
    if notes is not None:
        notes.append("queues of another model.queue_size left out (fresh queues)")
    return {key: value for key, value in state.items() if key not in QUEUE_KEYS}


def optional_checkpoint_keys(model: nn.Module) -> set[str]:
    """The model's state_dict keys that a checkpoint may lack without harm: buffers that are not weights (the ITC
    queues, negatives collected in training; BERT's position_ids) and the momentum copies (``<module>_m.*``), which
    start from the online weights when absent."""
    momentum = tuple(f"{name_m}." for _, name_m in getattr(model, "momentum_pairs", ()))
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {key for key in model.state_dict() if key not in params or (momentum and key.startswith(momentum))}


@dataclass
class CheckpointLoad:
    """What ``load_checkpoint_detailed`` put into a model, after the key surgery."""

    num_tensors: int  # tensors in the checkpoint's state_dict, before the surgery
    loaded: list[str]  # the model's state_dict keys filled from the checkpoint
    missing: list[str]  # the model's keys it did not fill
    unexpected: list[str]  # checkpoint keys (after the surgery) the model has no place for
    surgery: list[str]  # what checkpoint_filter_fn did, in words ([] = the model's own key names, as they are)


def load_checkpoint_detailed(model: nn.Module, src: str | Path | dict[str, Tensor]) -> CheckpointLoad:
    """Load weights through ``model.checkpoint_filter_fn`` (documented key surgery, pos_embed resampling), non-strict,
    and say what was filled. A tensor whose shape differs from the model's (another model config: vocabulary, width,
    depth) is a ValueError naming them, not a torch error."""
    source = f"checkpoint {src}" if isinstance(src, str | Path) else "the state_dict"
    state = read_state_dict(src)
    num_tensors = len(state)
    notes: list[str] = []
    filter_fn = getattr(model, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model, notes)
    state = _drop_mismatched_queues(state, model, notes)
    own = model.state_dict()
    mismatched = [key for key, value in state.items()
                  if key in own and hasattr(value, "shape") and tuple(value.shape) != tuple(own[key].shape)]
    if mismatched:
        shown = ", ".join(f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}" for key in mismatched[:3])
        raise ValueError(f"{source} does not fit {type(model).__name__}: {len(mismatched)} tensors have another "
                         f"shape than the model's (checkpoint vs model: {shown}); build the model with the config "
                         "the checkpoint was trained with (model.* keys, model.tokenizer's vocabulary, image_res)")
    result = model.load_state_dict(state, strict=False)
    loaded = [key for key in state if key in own]
    return CheckpointLoad(num_tensors, loaded, list(result.missing_keys), list(result.unexpected_keys), notes)


def load_checkpoint(model: nn.Module, src: str | Path | dict[str, Tensor], strict: bool = False
                    ) -> tuple[list[str], list[str]]:
    """Load weights through ``model.checkpoint_filter_fn`` (documented key surgery, pos_embed resampling).
    Returns (missing, unexpected) keys; with ``strict`` any mismatch is an error. Missing keys other than
    ``optional_checkpoint_keys`` are logged as a warning."""
    done = load_checkpoint_detailed(model, src)
    missing, unexpected = done.missing, done.unexpected
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint does not match {type(model).__name__}: missing {missing[:10]} "
                         f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})")
    optional = optional_checkpoint_keys(model)
    needed = [key for key in missing if key not in optional]
    if needed:
        log.warning("missing keys (%d): %s", len(needed), needed[:20])
    if unexpected:
        log.info("unused checkpoint keys (%d): %s", len(unexpected), unexpected[:20])
    return missing, unexpected


# Using a trained model (models/inference.py imports this module's functions: imported last).
from models.inference import Predictor, load_model_and_transforms  # noqa: E402
