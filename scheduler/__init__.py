"""Learning-rate schedules stepped once per optimizer step: warmup + cosine/linear/step/multistep/constant/plateau."""

from scheduler.factory import SCHEDULER_DEFAULTS, SCHEDULER_NAMES, PlateauLR, WarmupLR, create_scheduler

__all__ = ["SCHEDULER_DEFAULTS", "SCHEDULER_NAMES", "PlateauLR", "WarmupLR", "create_scheduler"]
