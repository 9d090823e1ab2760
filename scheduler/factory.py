"""create_scheduler: linear warmup, then cosine / linear / step / multistep / constant / plateau, per optimizer step.

Group g's lr at optimizer step t (0-based: the lr the t-th ``optimizer.step()`` uses) is
``initial_lr_g * factor_g(t)``, so per-module lr multipliers set by create_optimizer are kept. The factor is 1 at the
end of warmup and decays towards ``min_lr / base_lr``, where base_lr = initial_lr_g / lr_mult_g is the optimizer's
base lr: a group with lr_mult 0.1 ends at 0.1 x min_lr, like the rest of its schedule.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from optim.options import merge_block

logger = logging.getLogger(__name__)
# The ``scheduler:`` config block. This is the one home of these keys; the engine merges it into the config schema.
SCHEDULER_DEFAULTS: dict[str, Any] = {
    # cosine | linear | step | multistep | constant | plateau (what follows the warmup).
    "name": "cosine",
    # Linear warmup length in optimizer steps; 0 means use warmup_fraction.
    "warmup_steps": 0,
    # Warmup length as a fraction of the total optimizer steps, used when warmup_steps is 0.
    "warmup_fraction": 0.0,
    # Warmup factor goes linearly from this value to 1; the first step already uses a factor above it, so 0.0
    # still gives a positive first lr.
    "warmup_start_factor": 0.0,
    # Lowest lr of the base group (absolute); lr_mult groups get lr_mult x min_lr. cosine and linear reach it at
    # step == total steps (the value after the last optimizer step); step, multistep and plateau never go below it.
    "min_lr": 1e-5,
    # step: multiply the lr by gamma every step_size_steps optimizer steps (counted from the start; 0 = one epoch).
    "step_size_steps": 0,
    # step / multistep: decay factor applied at each step boundary or milestone.
    "gamma": 0.1,
    # multistep: optimizer steps (counted from the start) at which the lr is multiplied by gamma.
    "milestones_steps": [],
    # plateau: scale the lr by `factor` once the evaluation metric has not improved for more than
    # `patience_evals` evaluations in a row; mode 'max' (accuracy, recall) or 'min' (loss).
    "plateau": {"patience_evals": 2, "factor": 0.1, "mode": "max"},
}

SCHEDULER_NAMES: tuple[str, ...] = ("cosine", "linear", "step", "multistep", "constant", "plateau")


class WarmupLR(LambdaLR):
    """LambdaLR stepped once per optimizer step; its lambdas come from the config, so state_dict holds only the
    step count (and, for PlateauLR, the plateau state)."""


class PlateauLR(WarmupLR):
    """Warmup, then a constant lr scaled by ``factor`` each time the evaluation metric stops improving; never below
    each group's min_lr."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr_lambdas: list[Callable[[int], float]],
        min_factors: list[float],
        patience_evals: int,
        factor: float,
        mode: str,
    ) -> None:
        # Set before LambdaLR.__init__, which already computes the first lrs through get_lr.
        self.min_factors = min_factors
        self.patience_evals = patience_evals
        self.factor = factor
        self.mode = mode
        self.plateau_scale = 1.0
        self.best: float | None = None
        self.bad_evals = 0
        super().__init__(optimizer, lr_lambdas)

    def get_lr(self) -> list[float]:
        """Warmup factor x plateau scale, the scale floored at the group's min_lr / base lr."""
        return [
            base_lr * fn(self.last_epoch) * max(min_factor, self.plateau_scale)
            for base_lr, fn, min_factor in zip(self.base_lrs, self.lr_lambdas, self.min_factors, strict=True)
        ]

    def step_metric(self, value: float) -> None:
        """Record one evaluation result; after more than patience_evals evaluations in a row without improvement,
        scale the lr by ``factor`` at once (not only from the next optimizer step)."""
        value = float(value)
        improved = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if improved:
            self.best = value
            self.bad_evals = 0
            return
        self.bad_evals += 1
        if self.bad_evals > self.patience_evals:
            self.plateau_scale *= self.factor
            self.bad_evals = 0
            values = self.get_lr()
            for group, lr in zip(self.optimizer.param_groups, values, strict=True):
                group["lr"] = lr
            self._last_lr = values


def _non_negative_int(options: Mapping[str, Any], key: str) -> int:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"scheduler.{key} must be an integer >= 0, got {value!r}")
    return value


def _after_warmup_factor(
    options: Mapping[str, Any], step: int, warmup: int, total: int, steps_per_epoch: int, min_factor: float
) -> float:
    """The schedule's factor at optimizer step ``step`` ignoring warmup (1.0 where it has not decayed yet)."""
    name = options["name"]
    progress = min(1.0, max(0, step - warmup) / max(1, total - warmup))
    if name == "cosine":
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "linear":
        return min_factor + (1.0 - min_factor) * (1.0 - progress)
    if name == "step":
        step_size = options["step_size_steps"] or steps_per_epoch
        return max(min_factor, options["gamma"] ** (step // step_size))
    if name == "multistep":
        return max(min_factor, options["gamma"] ** bisect.bisect_right(options["milestones_steps"], step))
    return 1.0  # constant, plateau (its reductions are applied by PlateauLR)


def create_scheduler(
    cfg_scheduler: Mapping[str, Any] | None,
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    epochs: int,
    max_steps: int = 0,
) -> WarmupLR:
    """Scheduler stepped once per optimizer step over min(steps_per_epoch * epochs, max_steps if > 0) steps.

    The plateau schedule returns a PlateauLR: call ``step_metric(value)`` after each evaluation.
    """
    options = merge_block(SCHEDULER_DEFAULTS, cfg_scheduler, "scheduler")
    name = options["name"]
    if name not in SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler.name '{name}'; valid names: {', '.join(SCHEDULER_NAMES)}")
    # Training stops at whichever comes first (as in the engine); max_steps alone when the epoch length is unknown.
    total = steps_per_epoch * epochs
    if max_steps > 0:
        total = min(total, max_steps) if total > 0 else max_steps
    if total <= 0:
        raise ValueError(
            f"the schedule has no steps: max_steps={max_steps}, steps_per_epoch={steps_per_epoch}, epochs={epochs}"
        )
    warmup = _non_negative_int(options, "warmup_steps")
    if warmup == 0:
        fraction = float(options["warmup_fraction"])
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"scheduler.warmup_fraction must be in [0, 1), got {fraction}")
        warmup = round(fraction * total)
    if warmup > total:
        # A short run (a smoke test with train.max_steps, a tiny dataset) with a config's warm-up: the run would end
        # still warming up towards an lr it never reaches. Warm up over the whole run instead, reaching the base lr
        # at its last step, and say so.
        logger.warning("scheduler.warmup_steps=%d is longer than the run (%d optimizer steps): the warm-up is "
                       "clamped to the run's %d steps (set scheduler.warmup_steps or warmup_fraction to choose)",
                       warmup, total, total)
        warmup = total
    start_factor = float(options["warmup_start_factor"])
    if not 0.0 <= start_factor <= 1.0:
        raise ValueError(f"scheduler.warmup_start_factor must be in [0, 1], got {start_factor}")
    _non_negative_int(options, "step_size_steps")
    if name == "step" and options["step_size_steps"] == 0 and steps_per_epoch <= 0:
        raise ValueError("scheduler.step_size_steps is 0 (one epoch) but steps_per_epoch is unknown (0)")
    milestones = list(options["milestones_steps"])
    if name == "multistep" and (not milestones or milestones != sorted(milestones)):
        raise ValueError(f"scheduler.milestones_steps must be a non-empty increasing list, got {milestones}")
    options["milestones_steps"] = milestones
    min_lr = float(options["min_lr"])

    lr_lambdas: list[Callable[[int], float]] = []
    min_factors: list[float] = []
    for group in optimizer.param_groups:
        initial_lr = group.get("initial_lr", group["lr"])
        lr_mult = group.get("lr_mult", 1.0)
        base_lr = initial_lr / lr_mult if lr_mult > 0 else initial_lr
        # A group with lr 0 (lr_mult 0) stays at 0 whatever the factor; min_lr applies to the others.
        min_factor = min(1.0, min_lr / base_lr) if base_lr > 0 else 0.0

        def factor(step: int, min_factor: float = min_factor) -> float:
            if step < warmup:
                # (step + 1): the first optimizer step already has a positive lr even with start factor 0.
                warm = start_factor + (1.0 - start_factor) * (step + 1) / warmup
            else:
                warm = 1.0
            return warm * _after_warmup_factor(options, step, warmup, total, steps_per_epoch, min_factor)

        lr_lambdas.append(factor)
        min_factors.append(min_factor)

    if name == "plateau":
        block = options["plateau"]
        if block["mode"] not in ("max", "min"):
            raise ValueError(f"scheduler.plateau.mode must be 'max' or 'min', got {block['mode']!r}")
        if not 0.0 < float(block["factor"]) < 1.0:
            raise ValueError(f"scheduler.plateau.factor must be in (0, 1), got {block['factor']}")
        return PlateauLR(
            optimizer, lr_lambdas, min_factors, int(block["patience_evals"]), float(block["factor"]), block["mode"]
        )
    return WarmupLR(optimizer, lr_lambdas)
