"""Optimizer factory: parameter groups (no weight decay on norms/biases, per-module lr multipliers) and freezing."""

from optim.factory import OPTIMIZER_DEFAULTS, build_param_groups, create_optimizer, valid_optimizer_names
from optim.freeze import apply_freeze, unwrap_model

__all__ = [
    "OPTIMIZER_DEFAULTS",
    "apply_freeze",
    "build_param_groups",
    "create_optimizer",
    "unwrap_model",
    "valid_optimizer_names",
]
