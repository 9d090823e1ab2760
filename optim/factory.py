"""create_optimizer: parameter groups by (lr multiplier, weight decay or not), then torch's AdamW or a timm optimizer.

Every group carries its own ``lr`` (= base lr x multiplier), ``initial_lr`` and ``lr_mult``, so a scheduler that
scales each group's ``initial_lr`` keeps the multipliers; nothing else multiplies the learning rate.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import timm.optim
import torch
from torch import nn

from optim.freeze import UNFREEZE_DEFAULTS, UnfreezeSchedule, apply_freeze, unwrap_model
from optim.options import merge_block

# The ``optimizer:`` config block. This is the one home of these keys; the engine merges it into the config schema.
OPTIMIZER_DEFAULTS: dict[str, Any] = {
    # 'adamw' is torch's AdamW (fused on CUDA and CPU); any other name is built by timm.optim.create_optimizer_v2
    # (sgd, lamb, lion, adafactor, ...).
    "name": "adamw",
    # Base learning rate: the lr of parameters without a multiplier; schedulers scale it per step.
    "lr": 1e-4,
    # Decoupled weight decay for matrices; biases, norm weights (ndim <= 1) and no_decay_names get none.
    "weight_decay": 0.02,
    # Adam-family moment coefficients (ignored by optimizers without betas).
    "betas": [0.9, 0.999],
    # Adam-family denominator epsilon (ignored by optimizers without eps).
    "eps": 1e-8,
    # Momentum for the SGD family built by timm (ignored by the others).
    "momentum": 0.9,
    # Open dict: module-name prefix -> lr multiplier, e.g. {visual_encoder: 0.1}; the longest matching prefix wins.
    "lr_mult": {},
    # Open dict: module-name prefix -> number of its last blocks left trainable (0 freezes it all), e.g.
    # {visual_encoder: 2}; see optim.freeze.apply_freeze.
    "freeze": {},
    # Progressive unfreezing of the freeze prefixes, one stage every N epochs or evaluations (off by default); see
    # optim.freeze.UNFREEZE_DEFAULTS for the keys and optim.freeze.UnfreezeSchedule for the rules.
    "unfreeze": dict(UNFREEZE_DEFAULTS),
    # Substrings of parameter names that get no weight decay, besides biases and norm weights.
    "no_decay_names": ["pos_embed", "cls_token", "embeddings", "temp"],
    # Fused AdamW kernel: null or 'auto' (on when every trainable parameter is on CUDA), true or false (foreach
    # then). The default is null rather than 'auto' so that the config's type check accepts a bool here too.
    "fused": None,
}

# Names create_optimizer accepts: torch's AdamW plus timm's registry (optionally wrapped as 'lookahead_<name>').
TORCH_OPTIMIZERS: tuple[str, ...] = ("adamw",)


def valid_optimizer_names() -> list[str]:
    """Every optimizer name create_optimizer accepts."""
    return sorted(set(TORCH_OPTIMIZERS) | set(timm.optim.list_optimizers()))


def _check_name(name: str) -> None:
    valid = valid_optimizer_names()
    base = name.lower().removeprefix("lookahead_")
    if base not in valid:
        nearest = difflib.get_close_matches(base, valid, n=3, cutoff=0.5)
        hint = f" (nearest: {', '.join(nearest)})" if nearest else ""
        raise ValueError(f"unknown optimizer.name '{name}'{hint}; valid names: {', '.join(valid)}")


def _fused_setting(value: Any) -> bool | None:
    """None for automatic selection (null or 'auto'), else the bool (true/false, or their strings) asked for."""
    setting = "auto" if value is None else str(value).lower()
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"optimizer.fused must be null/'auto', true or false, got {value!r}")
    return None if setting == "auto" else setting == "true"


def _matches(name: str, prefix: str) -> bool:
    """Whether a parameter name lies under a module-name prefix (``visual_encoder`` does not match
    ``visual_encoder_m``)."""
    return name == prefix or name.startswith(prefix + ".")


def _lr_multiplier(name: str, lr_mult: Mapping[str, float]) -> float:
    matching = [prefix for prefix in lr_mult if _matches(name, prefix)]
    return float(lr_mult[max(matching, key=len)]) if matching else 1.0


def _check_prefixes(model: nn.Module, lr_mult: Mapping[str, float]) -> None:
    names = [name for name, _ in model.named_parameters()]
    for prefix in lr_mult:
        if not any(_matches(name, prefix) for name in names):
            modules = [module_name for module_name, _ in model.named_modules() if module_name]
            nearest = difflib.get_close_matches(prefix, modules + names, n=3, cutoff=0.4)
            nearest = nearest or [child for child, _ in model.named_children()]
            raise ValueError(
                f"optimizer.lr_mult names '{prefix}', which matches no parameter of the model; "
                f"nearest names: {', '.join(nearest) or '(none)'}"
            )


def build_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    lr_mult: Mapping[str, float],
    no_decay_names: list[str],
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (lr multiplier, decay or not), in order of first appearance."""
    _check_prefixes(model, lr_mult)
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        mult = _lr_multiplier(name, lr_mult)
        decay = param.ndim > 1 and not any(pattern in name for pattern in no_decay_names)
        if (mult, decay) not in groups:
            groups[(mult, decay)] = {
                "params": [],
                "param_names": [],
                "lr": lr * mult,
                "initial_lr": lr * mult,
                "lr_mult": mult,
                "weight_decay": weight_decay if decay else 0.0,
            }
        groups[(mult, decay)]["params"].append(param)
        groups[(mult, decay)]["param_names"].append(name)
    return list(groups.values())


def build_unfreeze_schedule(cfg_optimizer: Mapping[str, Any] | None, model: nn.Module) -> UnfreezeSchedule | None:
    """The progressive-unfreezing schedule of ``optimizer.unfreeze`` (None when off). Build it before
    create_optimizer freezes anything and hand it over, so that it knows which parameters the model trains."""
    options = merge_block(OPTIMIZER_DEFAULTS, cfg_optimizer, "optimizer")
    return UnfreezeSchedule.from_config(unwrap_model(model), options["freeze"], options["unfreeze"])


def create_optimizer(
    cfg_optimizer: Mapping[str, Any] | None, model: nn.Module, unfreeze: UnfreezeSchedule | None = None
) -> torch.optim.Optimizer:
    """Freeze what ``freeze`` asks, then build the optimizer over the trainable parameters' groups.

    With a progressive-unfreezing schedule (``unfreeze``, or the one ``optimizer.unfreeze`` asks for) the groups
    hold every parameter the schedule will ever train, and the model is left at the schedule's current stage: the
    parameters still frozen have no gradient, which the optimizer skips.
    Call it on the model before wrapping it in DDP: freezing changes which parameters DDP must reduce.
    """
    options = merge_block(OPTIMIZER_DEFAULTS, cfg_optimizer, "optimizer")
    name = str(options["name"]).lower()
    _check_name(name)
    fused = _fused_setting(options["fused"])
    model = unwrap_model(model)
    if unfreeze is None:
        unfreeze = UnfreezeSchedule.from_config(model, options["freeze"], options["unfreeze"])
    if unfreeze is None:
        apply_freeze(model, options["freeze"])
    else:
        apply_freeze(model, {prefix: n for prefix, n in options["freeze"].items() if prefix not in unfreeze.prefixes})
        unfreeze.apply(model, unfreeze.last_stage)  # the groups take everything the schedule will train

    lr = float(options["lr"])
    groups = build_param_groups(
        model, lr, float(options["weight_decay"]), options["lr_mult"], list(options["no_decay_names"])
    )
    if not groups:
        raise ValueError("the model has no trainable parameters (all requires_grad=False after optimizer.freeze)")

    optimizer = _build(name, groups, options, lr, fused)
    if unfreeze is not None:
        unfreeze.apply(model)  # back to the current stage
    return optimizer


def _build(
    name: str, groups: list[dict[str, Any]], options: Mapping[str, Any], lr: float, fused: bool | None
) -> torch.optim.Optimizer:
    """torch's AdamW or timm's optimizer ``name`` over ``groups``."""
    betas = tuple(float(beta) for beta in options["betas"])
    eps = float(options["eps"])
    if name == "adamw":
        params = [param for group in groups for param in group["params"]]
        if fused is None:
            # torch has fused AdamW kernels for CUDA and CPU: one pass over the state, no parameter-sized temporaries
            # (measured on the base pretrain step, 2 CPU threads: 8.1 s vs 8.9 s foreach; benchmarks/README.md).
            fused = all(param.device.type in ("cuda", "cpu") and param.is_floating_point() for param in params)
        return torch.optim.AdamW(
            groups,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=float(options["weight_decay"]),
            fused=bool(fused),
            foreach=None if fused else True,
        )
    # Groups carry their own weight_decay, so the default passed here only applies to nothing.
    return timm.optim.create_optimizer_v2(
        groups, opt=name, lr=lr, weight_decay=0.0, momentum=float(options["momentum"]), betas=betas, eps=eps
    )
