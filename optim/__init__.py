"""Optimizer factory: parameter groups (no weight decay on norms/biases, per-module lr multipliers) and freezing."""

from optim.factory import (
    OPTIMIZER_DEFAULTS,
    build_param_groups,
    build_unfreeze_schedule,
    create_optimizer,
    valid_optimizer_names,
)
from optim.freeze import UnfreezeSchedule, apply_freeze, unwrap_model

__all__ = [
    "OPTIMIZER_DEFAULTS",
    "UnfreezeSchedule",
    "apply_freeze",
    "build_param_groups",
    "build_unfreeze_schedule",
    "create_optimizer",
    "unwrap_model",
    "valid_optimizer_names",
]
