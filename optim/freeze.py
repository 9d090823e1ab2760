"""Freeze all but the last N blocks of a sub-module (e.g. ``visual_encoder: 2`` trains the last two ViT blocks)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from torch import nn

# Where the block list lives inside a module, tried in order: timm ViT keeps it in ``blocks`` (an nn.Sequential),
# BERT in ``encoder.layer`` (``bert.encoder.layer`` in a BertForMaskedLM, ``layer`` when the prefix points at the
# encoder).
BLOCK_LIST_PATHS: tuple[str, ...] = ("blocks", "encoder.layer", "bert.encoder.layer", "layer")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model behind DDP (``.module``) or torch.compile (``._orig_mod``) wrappers; parameters are shared."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def find_submodule(model: nn.Module, prefix: str, what: str) -> nn.Module:
    """``model.get_submodule(prefix)`` with an error naming the nearest module names when there is none."""
    try:
        return model.get_submodule(prefix)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        nearest = difflib.get_close_matches(prefix, names, n=3, cutoff=0.4)
        if not nearest:
            nearest = [name for name, _ in model.named_children()]
        raise ValueError(
            f"{what} names module '{prefix}', which the model does not have; nearest module names: "
            f"{', '.join(nearest) or '(none)'}"
        ) from None


def _block_list(module: nn.Module) -> tuple[str, nn.ModuleList | nn.Sequential] | None:
    """The (path, list of blocks) of the module's repeated blocks, or None when it has none."""
    for path in BLOCK_LIST_PATHS:
        try:
            candidate = module.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(candidate, (nn.ModuleList, nn.Sequential)):
            return path, candidate
    return None


def _is_parameter(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True


def _modules_after(module: nn.Module, path: str) -> list[nn.Module]:
    """Children registered after each step of ``path`` (e.g. ViT's final ``norm`` and ``head`` after ``blocks``,
    BERT's ``pooler`` after ``encoder``): they run after the blocks, so they stay trainable with them."""
    after: list[nn.Module] = []
    parent = module
    for part in path.split("."):
        names = [name for name, _ in parent.named_children()]
        after.extend(getattr(parent, name) for name in names[names.index(part) + 1 :])
        parent = getattr(parent, part)
    return after


def apply_freeze(model: nn.Module, freeze_cfg: Mapping[str, int] | None) -> None:
    """For each ``prefix: n`` set requires_grad=False on the prefix's parameters except its last n blocks and the
    modules after them; n=0 freezes the whole sub-module (or the parameter of that name). Parameters already frozen
    stay frozen."""
    model = unwrap_model(model)
    for prefix, num_trainable in (freeze_cfg or {}).items():
        if isinstance(num_trainable, bool) or not isinstance(num_trainable, int) or num_trainable < 0:
            raise ValueError(
                f"optimizer.freeze.{prefix} must be the number of last blocks left trainable (int >= 0), "
                f"got {num_trainable!r}"
            )
        if num_trainable == 0 and _is_parameter(model, prefix):
            model.get_parameter(prefix).requires_grad_(False)  # e.g. ``temp: 0`` fixes the temperature
            continue
        module = find_submodule(model, prefix, f"optimizer.freeze.{prefix}")
        keep: set[int] = set()
        if num_trainable > 0:
            found = _block_list(module)
            if found is None:
                raise ValueError(
                    f"optimizer.freeze.{prefix}={num_trainable}: module '{prefix}' has no block list at "
                    f"{' / '.join(BLOCK_LIST_PATHS)}; use 0 to freeze it entirely"
                )
            path, blocks = found
            if num_trainable > len(blocks):
                raise ValueError(
                    f"optimizer.freeze.{prefix}={num_trainable}, but '{prefix}.{path}' has only {len(blocks)} blocks"
                )
            for kept_module in [*blocks[len(blocks) - num_trainable :], *_modules_after(module, path)]:
                keep.update(id(param) for param in kept_module.parameters())
        for param in module.parameters():
            if id(param) not in keep:
                param.requires_grad_(False)
